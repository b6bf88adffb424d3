"""Host capability detection: what this machine can offer the fleet.

:func:`detect` looks at CPU cores (after affinity and cgroup quota), RAM
(after cgroup limits), NVIDIA GPUs through NVML (honouring
``NVIDIA_VISIBLE_DEVICES`` and ``CUDA_VISIBLE_DEVICES``; MIG mode and NVML permission
errors degrade to "no CUDA: <reason>"), and torch in a subprocess, and returns a
:class:`~trainfleet.broker.schema.Capability`. Detection never raises: a probe
that fails degrades to a safe value and says why in ``Capability.notes`` or
``Capability.cuda_reason``, because an agent that cannot describe itself
precisely should still announce what it surely has.

Every source is injectable (``proc_root``, ``cgroup_root``, ``env``, ``nvml``)
so tests run on fake trees and a fake NVML.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from trainfleet.agent import hostos
from trainfleet.broker.eligibility import KNOWN_MODULES, module_available
from trainfleet.broker.schema import Capability, GpuInfo, GpuStat

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is expected, but detection must not need it
    psutil = None

__all__ = [
    "GpuTelemetry",
    "apply_overrides",
    "code_commit",
    "default_host_id",
    "detect",
    "refresh_gpus",
    "render_text",
    "with_free_vram",
]

HOST_ID_ENV = "TRAINFLEET_HOST_ID"
CODE_COMMIT_ENV = "TRAINFLEET_CODE_COMMIT"

_GIB = 1024**3
_HOST_ID_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_SHA = re.compile(r"^[0-9a-f]{40,64}$")
# cgroup v1 reports "no limit" as a page-rounded LONG_MAX; anything this big is no limit.
_UNLIMITED = 1 << 60
_DEFAULT_CFS_PERIOD_US = 100_000
# Mount directories a v1 controller may live under, in the order worth trying.
_V1_MOUNTS = {"cpu": ("cpu,cpuacct", "cpu"), "memory": ("memory",)}
_CONTAINER_MARKERS = ("docker", "kubepods", "containerd", "lxc", "libpod")
_VISIBILITY_VARS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
_HIDDEN_VALUES = ("", "-1", "none", "void")
# Variables that decide which GPUs CUDA shows; the torch probe must see the same ones.
_CUDA_ENV_VARS = (*_VISIBILITY_VARS, "CUDA_DEVICE_ORDER")
_TORCH_TIMEOUT_S = 60.0
_GIT_TIMEOUT_S = 2.0
_TORCH_SCRIPT = (
    "import json, torch\n"
    "print(json.dumps({'version': torch.__version__,"
    " 'cuda_available': bool(torch.cuda.is_available()),"
    " 'device_count': int(torch.cuda.device_count())}))\n"
)

_T = TypeVar("_T")


# --------------------------------------------------------------------------- host id / commit


def default_host_id(flag: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The agent's host id: ``flag``, else ``$TRAINFLEET_HOST_ID``, else the hostname.

    The result is lowercased, every character outside ``[A-Za-z0-9_.-]`` becomes ``-``
    and empty dot-separated labels are dropped, so it is a hostname (``pi.lan`` stays
    ``pi.lan``; broker.names.host_token makes it a subject token). Empty sources are
    skipped; if all are empty the id is ``"host"``.
    """
    env = os.environ if env is None else env
    for raw in (flag, env.get(HOST_ID_ENV), _hostname()):
        value = _HOST_ID_BAD.sub("-", (raw or "").strip()).lower()
        value = ".".join(label for label in value.split(".") if label)
        if value:
            return value
    return "host"


def _hostname() -> str:
    try:
        return socket.gethostname()
    except OSError:
        return ""


def code_commit() -> str:
    """The trainfleet source commit: ``$TRAINFLEET_CODE_COMMIT``, else git HEAD, else ``""``."""
    return os.environ.get(CODE_COMMIT_ENV, "").strip() or _git_head()


@functools.cache
def _git_head() -> str:
    # Run git next to this file, not in the cwd: the agent may be started anywhere.
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    head = proc.stdout.strip()
    return head if proc.returncode == 0 and _SHA.match(head) else ""


# --------------------------------------------------------------------------- small helpers


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _parse_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _gib(n_bytes: float) -> float:
    return round(n_bytes / _GIB, 3)


def _text(value: Any) -> str:
    """NVML strings are bytes in older pynvml releases and str in newer ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _errmsg(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _guarded(what: str, probe: Callable[[], _T], fallback: _T, notes: list[str]) -> _T:
    # A bug or an odd kernel file in one probe must not stop the agent announcing the rest.
    try:
        return probe()
    except Exception as exc:  # noqa: BLE001 - the one deliberate catch-all, see above
        notes.append(f"{what} probe failed: {_errmsg(exc)}")
        return fallback


# --------------------------------------------------------------------------- cgroups


@dataclass(frozen=True)
class _Cgroups:
    """Where this process's cgroup files are, per hierarchy.

    ``own`` maps a v1 controller name (or ``""`` for the v2 unified hierarchy)
    to (mount directory name, path from ``/proc/self/cgroup``).
    """

    root: str
    own: dict[str, tuple[str, str]]

    @classmethod
    def read(cls, proc_root: str, cgroup_root: str) -> _Cgroups:
        own: dict[str, tuple[str, str]] = {}
        if hostos.is_windows():  # no cgroups (nor /proc): no limits from them
            return cls(cgroup_root, own)
        for line in (_read(os.path.join(proc_root, "self", "cgroup")) or "").splitlines():
            parts = line.strip().split(":", 2)
            if len(parts) != 3:
                continue
            _, controllers, path = parts
            # "0::/path" is the v2 line; "4:cpu,cpuacct:/path" names v1 controllers.
            for controller in controllers.split(",") if controllers else [""]:
                own.setdefault(controller, (controllers, path))
        return cls(cgroup_root, own)

    def v2_dirs(self) -> list[str]:
        """The own v2 cgroup directory, then its ancestors up to the root."""
        return self._dirs(("",), self.own.get("", ("", "/"))[1])

    def v1_dirs(self, controller: str) -> list[str]:
        """The own v1 directory for ``controller``, then its ancestors up to the mount root."""
        mount, path = self.own.get(controller, ("", "/"))
        mounts = tuple(dict.fromkeys(m for m in (mount, *_V1_MOUNTS.get(controller, ())) if m))
        return self._dirs(mounts, path)

    def _dirs(self, mounts: tuple[str, ...], path: str) -> list[str]:
        if hostos.is_windows():
            return []
        base = next((b for m in mounts if os.path.isdir(b := os.path.join(self.root, m))), None)
        if base is None:
            return []
        # Walk up: a parent's limit also binds us, and inside a container the path from
        # /proc/self/cgroup often does not exist because only our subtree is mounted.
        return [os.path.join(base, rel) if rel else base for rel in _ancestors(path)]


def _ancestors(path: str) -> list[str]:
    parts = [p for p in path.strip().split("/") if p and p != "."]
    if ".." in parts:
        # Our cgroup lies outside this namespace's view; only the mount root is ours to read.
        return [""]
    return ["/".join(parts[:n]) for n in range(len(parts), -1, -1)]


def _parse_cpu_max(text: str | None) -> float | None:
    """cgroup v2 ``cpu.max``: ``"max 100000"`` is no limit, ``"150000 100000"`` is 1.5 cores."""
    fields = (text or "").split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = float(fields[0])
        period = float(fields[1]) if len(fields) > 1 else float(_DEFAULT_CFS_PERIOD_US)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _parse_cfs(quota_text: str | None, period_text: str | None) -> float | None:
    """cgroup v1 CFS quota/period; a quota of -1 is no limit."""
    quota = _parse_int(quota_text)
    period = _parse_int(period_text) or _DEFAULT_CFS_PERIOD_US
    if quota is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def _cpu_quota(cg: _Cgroups) -> tuple[float | None, str]:
    """The tightest CPU quota over the v2 and v1 hierarchies, and the file it came from."""
    found: list[tuple[float, str]] = []
    for d in cg.v2_dirs():
        path = os.path.join(d, "cpu.max")
        if (quota := _parse_cpu_max(_read(path))) is not None:
            found.append((quota, path))
    for d in cg.v1_dirs("cpu"):
        path = os.path.join(d, "cpu.cfs_quota_us")
        if (quota := _parse_cfs(_read(path), _read(os.path.join(d, "cpu.cfs_period_us")))) is not None:
            found.append((quota, path))
    return min(found, default=(None, ""))


@dataclass(frozen=True)
class _MemLimit:
    limit: int
    available: int
    source: str


def _stat_value(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _parse_int(value) or 0
    return 0


def _mem_limit(d: str, names: tuple[str, str, str, str]) -> _MemLimit | None:
    """One cgroup directory's memory limit; ``names`` are (limit, usage, stat, inactive key)."""
    limit_file, usage_file, stat_file, inactive_key = names
    path = os.path.join(d, limit_file)
    limit = _parse_int(_read(path))  # v2 "max" does not parse: no limit
    if limit is None or limit <= 0 or limit >= _UNLIMITED:
        return None
    usage = _parse_int(_read(os.path.join(d, usage_file)))
    if usage is None:
        return _MemLimit(limit, limit, path)
    # Inactive page cache is reclaimable, so it is not really "used" (same as docker stats).
    working_set = max(usage - _stat_value(_read(os.path.join(d, stat_file)), inactive_key), 0)
    return _MemLimit(limit, max(limit - working_set, 0), path)


_V2_MEM_FILES = ("memory.max", "memory.current", "memory.stat", "inactive_file")
_V1_MEM_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")


def _memory_limit(cg: _Cgroups) -> _MemLimit | None:
    """The tightest memory limit over both hierarchies (smallest total and smallest headroom)."""
    found = [m for d in cg.v2_dirs() if (m := _mem_limit(d, _V2_MEM_FILES))]
    found += [m for d in cg.v1_dirs("memory") if (m := _mem_limit(d, _V1_MEM_FILES))]
    if not found:
        return None
    tightest = min(found, key=lambda m: m.limit)
    return _MemLimit(tightest.limit, min(m.available for m in found), tightest.source)


# --------------------------------------------------------------------------- cores and RAM


def _cpu_counts() -> tuple[int, int]:
    logical = os.cpu_count() or (psutil.cpu_count() if psutil else None) or 1
    physical = None
    if psutil is not None:
        with contextlib.suppress(OSError, psutil.Error):
            physical = psutil.cpu_count(logical=False)
    return logical, physical or logical


def _affinity_count() -> int | None:
    getter = getattr(os, "sched_getaffinity", None)  # Linux only
    if getter is None:
        return None
    try:
        return len(getter(0)) or None
    except OSError:
        return None


@dataclass(frozen=True)
class _Cores:
    logical: int = 1
    physical: int = 1
    usable: float = 1.0
    limited: bool = False


def _detect_cores(cg: _Cgroups, notes: list[str]) -> _Cores:
    logical, physical = _cpu_counts()
    usable = float(logical)
    affinity = _affinity_count()
    if affinity is not None and affinity < usable:
        usable = float(affinity)
        notes.append(f"cores: CPU affinity allows {affinity} of {logical} logical cores")
    quota, source = _cpu_quota(cg)
    limited = quota is not None and quota < logical
    if limited:
        notes.append(f"cores: cgroup CPU quota {quota:g} ({source})")
        usable = min(usable, quota)
    return _Cores(logical, physical, round(usable, 3), limited)


def _meminfo(proc_root: str) -> tuple[int, int] | None:
    """(total, available) bytes from meminfo; None when unreadable."""
    values: dict[str, int] = {}
    for line in (_read(os.path.join(proc_root, "meminfo")) or "").splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key.strip()] = int(fields[0]) * 1024  # meminfo says kB and means KiB
    total = values.get("MemTotal")
    if not total:
        return None
    # Kernels before 3.14 lack MemAvailable; free + cache is the classic estimate.
    fallback = sum(values.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return total, values.get("MemAvailable", fallback)


def _host_memory(proc_root: str, notes: list[str]) -> tuple[int, int] | None:
    if hostos.is_windows():  # no /proc/meminfo: psutil (GlobalMemoryStatusEx)
        return _psutil_memory(notes)
    found = _meminfo(proc_root)
    if found is not None:
        return found
    if psutil is not None:
        with contextlib.suppress(OSError, psutil.Error):
            vm = psutil.virtual_memory()
            notes.append(f"ram: {proc_root}/meminfo unreadable; using psutil")
            return int(vm.total), int(vm.available)
    notes.append(f"ram: {proc_root}/meminfo unreadable; RAM unknown")
    return None


def _psutil_memory(notes: list[str]) -> tuple[int, int] | None:
    if psutil is not None:
        with contextlib.suppress(OSError, psutil.Error):
            vm = psutil.virtual_memory()
            return int(vm.total), int(vm.available)
    notes.append("ram: psutil unavailable on Windows; RAM unknown")
    return None


@dataclass(frozen=True)
class _Ram:
    total: int = 0
    available: int = 0
    limited: bool = False


def _detect_ram(proc_root: str, cg: _Cgroups, notes: list[str]) -> _Ram:
    host = _host_memory(proc_root, notes)
    limit = _memory_limit(cg)
    if limit is None:
        return _Ram(*host) if host else _Ram()
    total, available = host or (limit.limit, limit.available)
    limited = limit.limit < total
    if limited:
        notes.append(f"ram: cgroup memory limit {_gib(limit.limit):g} GiB ({limit.source})")
    total = min(total, limit.limit)
    return _Ram(total, min(available, limit.available, total), limited)


def _in_container(limited: bool, proc_root: str, dockerenv_path: str) -> bool:
    if hostos.is_windows():  # Windows containers are not detected (no /proc to ask)
        return False
    if limited or os.path.exists(dockerenv_path):
        return True
    init_cgroup = _read(os.path.join(proc_root, "1", "cgroup")) or ""
    return any(marker in init_cgroup for marker in _CONTAINER_MARKERS)


# --------------------------------------------------------------------------- GPUs via NVML


@dataclass(frozen=True)
class _Visibility:
    """One device-selection variable as set in the environment."""

    var: str = ""
    raw: str = ""
    hidden: bool = False
    entries: tuple[str, ...] | None = None  # None: every device (unset, or "all")


def _visibility(var: str, env: Mapping[str, str]) -> _Visibility:
    if var not in env:
        return _Visibility()
    raw = env[var].strip()
    if raw.lower() in _HIDDEN_VALUES:
        return _Visibility(var, raw, hidden=True)
    if raw.lower() == "all":
        return _Visibility(var, raw)
    return _Visibility(var, raw, entries=tuple(e.strip() for e in raw.split(",")))


def _visibilities(env: Mapping[str, str]) -> tuple[_Visibility, _Visibility]:
    """(NVIDIA_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES): the container runtime's selection, then
    CUDA's within it. Both apply; either one hiding every device hides them all."""
    return _visibility("NVIDIA_VISIBLE_DEVICES", env), _visibility("CUDA_VISIBLE_DEVICES", env)


def _is_uuid(entry: str) -> bool:
    return entry.upper().startswith(("GPU-", "MIG-"))


def _is_mig(entry: str) -> bool:
    """A MIG instance: its UUID (MIG-...), or the runtime's ``<gpu>:<instance>`` form."""
    return entry.upper().startswith("MIG-") or ":" in entry


MIG_UNSUPPORTED = "MIG instances are not supported by this agent (give it whole GPUs)"


def _load_nvml(nvml: Any | None) -> tuple[Any | None, str]:
    if nvml is not None:
        return nvml, ""
    try:
        # Imported here, not at the top: nvidia-ml-py is optional and only useful on GPU hosts.
        import pynvml
    except ImportError:
        return None, "no CUDA: nvidia-ml-py not installed"
    return pynvml, ""


# NVML's code for "the caller may not open the device" (pynvml: NVML_ERROR_NO_PERMISSION).
_NVML_ERROR_NO_PERMISSION = 4
# pynvml's NVML_DEVICE_MIG_ENABLE: the GPU is split into MIG instances.
_NVML_DEVICE_MIG_ENABLE = 1


def _nvml_errmsg(lib: Any, exc: BaseException) -> str:
    """What an NVML error means for the operator (no permission named as such)."""
    code = getattr(exc, "value", None)
    if code is not None and code == getattr(lib, "NVML_ERROR_NO_PERMISSION", _NVML_ERROR_NO_PERMISSION):
        return f"no permission to the GPU ({_errmsg(exc)}; can this user open /dev/nvidia*?)"
    return _errmsg(exc)


def _nvml_errors(lib: Any) -> tuple[type[BaseException], ...]:
    """What an NVML call may raise: NVMLError and its kin, plus what a wrapper or an old
    pynvml without a function raises (ctypes OSError, AttributeError, odd return values)."""
    nvml_error = getattr(lib, "NVMLError", None)
    extra = (nvml_error,) if isinstance(nvml_error, type) and issubclass(nvml_error, BaseException) else ()
    return (*extra, OSError, AttributeError, LookupError, RuntimeError, TypeError, ValueError)


@dataclass(frozen=True)
class _Device:
    nvml_index: int
    handle: Any = None
    uuid: str = ""
    error: str = ""


def _enumerate(lib: Any) -> list[_Device]:
    errors = _nvml_errors(lib)
    devices = []
    for i in range(int(lib.nvmlDeviceGetCount())):
        try:
            handle = lib.nvmlDeviceGetHandleByIndex(i)
        except errors as exc:  # permission / lost device: keep its slot so indices stay right
            devices.append(_Device(i, error=_nvml_errmsg(lib, exc)))
            continue
        uuid = ""
        with contextlib.suppress(*errors):
            uuid = _text(lib.nvmlDeviceGetUUID(handle))
        devices.append(_Device(i, handle, uuid))
    return devices


def _match(entry: str, devices: list[_Device]) -> _Device | None:
    """The device an entry names: an index into ``devices``, or a unique GPU UUID prefix."""
    if re.fullmatch(r"-?\d+", entry):
        i = int(entry)
        return devices[i] if 0 <= i < len(devices) else None
    if entry.upper().startswith("GPU-"):
        hits = [d for d in devices if d.uuid and d.uuid.lower().startswith(entry.lower())]
        return hits[0] if len(hits) == 1 else None
    return None


def _runtime_view(devices: list[_Device], vis: _Visibility, notes: list[str]) -> tuple[list[_Device], str]:
    """The devices NVIDIA_VISIBLE_DEVICES selects, in NVML's order, and why none if none.

    The NVIDIA container runtime applies the variable itself: NVML inside the container sees
    only those devices, renumbered from 0. UUIDs name the same device either way. Indices are
    host numbering: when NVML sees exactly as many devices as are listed, the runtime has
    applied them; otherwise (a host, a privileged container) they pick from what NVML sees."""
    if vis.entries is None:
        return devices, ""
    mig = [e for e in vis.entries if _is_mig(e)]
    whole = [e for e in vis.entries if e and not _is_mig(e)]
    if mig:
        notes.append(f"gpu: {vis.var} entries {','.join(mig)}: {MIG_UNSUPPORTED}")
    if not whole:
        if mig:
            return [], f"no CUDA: {vis.var}={vis.raw} names MIG instances only; {MIG_UNSUPPORTED}"
        return [], f"no CUDA: {vis.var}={vis.raw} matches no GPU"
    if not all(_is_uuid(e) for e in whole) and len(set(whole)) == len(devices):
        notes.append(f"gpu: {vis.var}={vis.raw} lists host indices the runtime applied; using every GPU NVML sees")
        return devices, ""
    chosen: set[int] = set()
    for entry in whole:
        device = _match(entry, devices)
        if device is None:
            notes.append(f"gpu: {vis.var} entry {entry!r}: no such GPU")
        else:
            chosen.add(device.nvml_index)
    view = [d for d in devices if d.nvml_index in chosen]
    return view, "" if view else f"no CUDA: {vis.var}={vis.raw} matches no GPU"


def _cuda_view(devices: list[_Device], vis: _Visibility, notes: list[str]) -> tuple[list[_Device], str]:
    """The devices CUDA_VISIBLE_DEVICES selects from ``devices``, in the order CUDA numbers them."""
    if vis.entries is None:
        return devices, ""
    chosen: list[_Device] = []
    for n, entry in enumerate(vis.entries):
        device = None if _is_mig(entry) else _match(entry, devices)
        if device is None:
            # CUDA stops at the first entry it cannot resolve and ignores the rest.
            kind = MIG_UNSUPPORTED if _is_mig(entry) else "no such GPU"
            rest = ", later entries ignored" if n + 1 < len(vis.entries) else ""
            notes.append(f"gpu: {vis.var} entry {entry!r}: {kind}{rest}")
            if n == 0 and _is_mig(entry):
                return [], f"no CUDA: {vis.var}={vis.raw} names a MIG instance; {MIG_UNSUPPORTED}"
            break
        if device not in chosen:
            chosen.append(device)
    return chosen, "" if chosen else f"no CUDA: {vis.var}={vis.raw} matches no GPU"


def _resolve_visible(devices: list[_Device], env: Mapping[str, str], notes: list[str]) -> tuple[list[_Device], str]:
    """The devices this agent may use, in the order CUDA will number them (the runtime's
    selection, then CUDA's within it), and why none if none."""
    runtime, cuda = _visibilities(env)
    view, reason = _runtime_view(devices, runtime, notes)
    if not view:
        return [], reason
    return _cuda_view(view, cuda, notes)


def _compute_capability(lib: Any, handle: Any) -> str:
    with contextlib.suppress(*_nvml_errors(lib)):
        major, minor = lib.nvmlDeviceGetCudaComputeCapability(handle)
        return f"{major}.{minor}"
    return ""


def _mig_enabled(lib: Any, handle: Any) -> bool:
    """Whether the GPU runs in MIG mode (CUDA then sees its instances, not the GPU). GPUs and
    drivers without MIG answer NOT_SUPPORTED, an old pynvml lacks the call: no MIG."""
    getter = getattr(lib, "nvmlDeviceGetMigMode", None)
    if getter is None:
        return False
    try:
        current = getter(handle)
    except _nvml_errors(lib):
        return False
    if isinstance(current, (tuple, list)):
        current = current[0] if current else 0
    return current == getattr(lib, "NVML_DEVICE_MIG_ENABLE", _NVML_DEVICE_MIG_ENABLE)


def _gpu_info(lib: Any, device: _Device, position: int) -> GpuInfo:
    if device.handle is None:
        raise RuntimeError(device.error)
    if _mig_enabled(lib, device.handle):
        raise RuntimeError(f"MIG mode is enabled; {MIG_UNSUPPORTED}")
    name = _text(lib.nvmlDeviceGetName(device.handle))
    memory = lib.nvmlDeviceGetMemoryInfo(device.handle)
    return GpuInfo(
        index=position,
        name=name,
        uuid=device.uuid,
        vram_total_gib=_gib(memory.total),
        vram_free_gib=_gib(memory.free),
        compute_capability=_compute_capability(lib, device.handle),
    )


def _cuda_version_text(version: int) -> str:
    """NVML encodes CUDA 12.4 as 12040."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def _driver_versions(lib: Any, notes: list[str]) -> tuple[str, str]:
    driver = cuda = ""
    try:
        driver = _text(lib.nvmlSystemGetDriverVersion())
        cuda = _cuda_version_text(int(lib.nvmlSystemGetCudaDriverVersion()))
    except _nvml_errors(lib) as exc:
        notes.append(f"gpu: driver version unavailable: {_errmsg(exc)}")
    return driver, cuda


@dataclass(frozen=True)
class _Gpus:
    gpus: tuple[GpuInfo, ...] = ()
    reason: str = ""
    driver: str = ""
    cuda: str = ""


def _probe_devices(lib: Any, env: Mapping[str, str], notes: list[str]) -> _Gpus:
    errors = _nvml_errors(lib)
    driver, cuda = _driver_versions(lib, notes)
    try:
        devices = _enumerate(lib)
    except errors as exc:
        return _Gpus(reason=f"no CUDA: cannot count GPUs: {_nvml_errmsg(lib, exc)}", driver=driver, cuda=cuda)
    if not devices:
        return _Gpus(reason="no CUDA: NVML sees no GPU", driver=driver, cuda=cuda)
    visible, reason = _resolve_visible(devices, env, notes)
    if not visible:
        return _Gpus(reason=reason, driver=driver, cuda=cuda)
    gpus, skipped = [], []
    for position, device in enumerate(visible):
        try:
            gpus.append(_gpu_info(lib, device, position))
        except errors as exc:  # MIG parent, no permission, fallen off the bus: skip just this one
            skipped.append(f"gpu {position} (NVML {device.nvml_index}) skipped: {_nvml_errmsg(lib, exc)}")
            continue
        if position != device.nvml_index:
            notes.append(f"gpu: gpu {position} is NVML device {device.nvml_index}")
    notes.extend(skipped)
    notes.extend(_order_note(gpus, env))
    return _Gpus(tuple(gpus), "" if gpus else f"no CUDA: {skipped[0]}", driver, cuda)


def _order_note(gpus: list[GpuInfo], env: Mapping[str, str]) -> list[str]:
    # CUDA numbers fastest-first by default while NVML uses PCI order; they agree only on
    # identical cards, so mixed models need CUDA_DEVICE_ORDER=PCI_BUS_ID for indices to match.
    if len({g.name for g in gpus}) > 1 and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        return ["gpu: mixed GPU models; set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA indices match these"]
    return []


def _detect_gpus(nvml: Any | None, env: Mapping[str, str], notes: list[str]) -> _Gpus:
    hidden = next((v for v in _visibilities(env) if v.hidden), None)
    if hidden is not None:
        return _Gpus(reason=f"no CUDA: hidden by {hidden.var}")
    lib, reason = _load_nvml(nvml)
    if lib is None:
        return _Gpus(reason=reason)
    errors = _nvml_errors(lib)
    try:
        lib.nvmlInit()
    except errors as exc:  # no driver, libnvidia-ml.so missing, ...
        return _Gpus(reason=f"no CUDA: NVML init failed: {_nvml_errmsg(lib, exc)}")
    try:
        return _probe_devices(lib, env, notes)
    finally:
        with contextlib.suppress(*errors):
            lib.nvmlShutdown()


# --------------------------------------------------------------------------- torch


@dataclass(frozen=True)
class _Torch:
    version: str | None = None
    cuda: bool | None = None
    device_count: int = 0


def _child_env(env: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment, with the CUDA device variables taken from ``env``."""
    child = dict(os.environ)
    for var in _CUDA_ENV_VARS:
        if var in env:
            child[var] = env[var]
        else:
            child.pop(var, None)
    return child


def _torch_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def _probe_torch(env: Mapping[str, str], notes: list[str]) -> _Torch:
    if not _torch_installed():
        return _Torch()
    # A subprocess keeps torch (and a CUDA context) out of the long-lived agent process.
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _TORCH_SCRIPT],
            capture_output=True,
            text=True,
            timeout=_TORCH_TIMEOUT_S,
            env=_child_env(env),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        notes.append(f"torch: probe timed out after {_TORCH_TIMEOUT_S:g} s")
        return _Torch()
    except (OSError, subprocess.SubprocessError) as exc:
        notes.append(f"torch: probe could not start: {_errmsg(exc)}")
        return _Torch()
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        notes.append(f"torch: import failed: {last[:200]}")
        return _Torch()
    return _parse_torch(proc.stdout, notes)


def _parse_torch(stdout: str, notes: list[str]) -> _Torch:
    # torch or a sitecustomize may print first; the report is the last line.
    lines = stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
        return _Torch(str(report["version"]), bool(report["cuda_available"]), int(report["device_count"]))
    except (IndexError, ValueError, TypeError, KeyError):
        notes.append(f"torch: unreadable probe output: {stdout.strip()[-200:]!r}")
        return _Torch()


def _torch_notes(torch: _Torch, gpus: tuple[GpuInfo, ...], cuda_reason: str) -> list[str]:
    if torch.version is None:
        return []
    n = len(gpus)
    plural = "s" if n != 1 else ""
    if torch.cuda and not n:
        return [f"torch: {torch.version} sees {torch.device_count} CUDA device(s), NVML none ({cuda_reason})"]
    if n and not torch.cuda:
        return [f"torch: {torch.version} cannot use the {n} GPU{plural} NVML sees"]
    if n and torch.device_count != n:
        return [f"torch: {torch.version} sees {torch.device_count} CUDA device(s), NVML {n}"]
    return []


# --------------------------------------------------------------------------- public API


def detect(
    host_id: str | None = None,
    *,
    proc_root: str = "/proc",
    cgroup_root: str = "/sys/fs/cgroup",
    env: Mapping[str, str] | None = None,
    nvml: Any | None = None,
    probe_torch: bool = True,
    code_commit: str | None = None,
    dockerenv_path: str = "/.dockerenv",
) -> Capability:
    """Detect what this host can offer; never raises.

    ``host_id`` goes through :func:`default_host_id` (so ``None`` means env or
    hostname). ``proc_root``, ``cgroup_root``, ``dockerenv_path``, ``env``
    (default ``os.environ``) and ``nvml`` (a pynvml-like object; default: import
    ``pynvml``) exist so tests can fake the host. ``probe_torch=False`` skips the
    torch subprocess. ``code_commit=None`` means :func:`code_commit`.
    """
    env = os.environ if env is None else env
    notes: list[str] = []
    cg = _guarded("cgroup", lambda: _Cgroups.read(proc_root, cgroup_root), _Cgroups(cgroup_root, {}), notes)
    cores = _guarded("cores", lambda: _detect_cores(cg, notes), _Cores(), notes)
    ram = _guarded("ram", lambda: _detect_ram(proc_root, cg, notes), _Ram(), notes)
    gpus = _guarded("GPU", lambda: _detect_gpus(nvml, env, notes), None, notes)
    if gpus is None:  # a bug or an NVML wrapper raising what it should not: no GPUs, and why
        gpus = _Gpus(reason=f"no CUDA: {notes[-1]}")
    torch = _guarded("torch", lambda: _probe_torch(env, notes), _Torch(), notes) if probe_torch else _Torch()
    notes += _torch_notes(torch, gpus.gpus, gpus.reason)
    limited = cores.limited or ram.limited
    container = _guarded("container", lambda: _in_container(limited, proc_root, dockerenv_path), False, notes)
    return Capability(
        host_id=default_host_id(host_id, env),
        cores_physical=cores.physical,
        cores_logical=cores.logical,
        cores_usable=cores.usable,
        ram_total_gib=_gib(ram.total),
        ram_available_gib=_gib(ram.available),
        gpus=gpus.gpus,
        cuda_reason=gpus.reason,
        driver_version=gpus.driver,
        cuda_version=gpus.cuda,
        torch_version=torch.version,
        torch_cuda=torch.cuda,
        python=platform.python_version(),
        platform=f"{platform.system()}-{platform.machine()}",
        code_commit=code_commit if code_commit is not None else _resolve_commit(),
        in_container=container,
        modules=importable_modules(),
        notes=tuple(notes),
    )


# Modules a manifest's `requires` commonly names; the registry lists which are importable here
# so `trainfleet explain` can judge remote hosts. Any other module is checked by the agent itself.
def importable_modules(candidates: tuple[str, ...] = KNOWN_MODULES) -> tuple[str, ...]:
    """Which of ``candidates`` can be imported (found on the path, not imported)."""
    return tuple(name for name in candidates if module_available(name))


def _resolve_commit() -> str:
    # detect() has a parameter named code_commit that hides the function inside it.
    return code_commit()


def refresh_gpus(cap: Capability, *, env: Mapping[str, str] | None = None, nvml: Any | None = None) -> Capability:
    """Re-read free VRAM for ``cap.gpus`` (the claim-time check).

    GPUs are matched by UUID, or by visible index when the UUID is unknown. Free
    VRAM never exceeds the recorded total, so a ``max_vram_gib`` override keeps
    holding. Any NVML trouble returns ``cap`` unchanged.
    """
    if not cap.gpus:
        return cap
    lib, _ = _load_nvml(nvml)
    if lib is None:
        return cap
    errors = _nvml_errors(lib)
    try:
        lib.nvmlInit()
    except errors:
        return cap
    try:
        gpus = _refreshed(lib, cap.gpus, os.environ if env is None else env)
    except errors:  # includes the LookupError for a GPU that has gone
        return cap
    finally:
        with contextlib.suppress(*errors):
            lib.nvmlShutdown()
    return msgspec.structs.replace(cap, gpus=gpus)


def _refreshed(lib: Any, gpus: tuple[GpuInfo, ...], env: Mapping[str, str]) -> tuple[GpuInfo, ...]:
    devices = _enumerate(lib)
    by_uuid = {d.uuid: d for d in devices if d.uuid}
    visible, _ = _resolve_visible(devices, env, [])
    out = []
    for gpu in gpus:
        device = by_uuid.get(gpu.uuid) if gpu.uuid else None
        if device is None and not gpu.uuid and gpu.index < len(visible):
            device = visible[gpu.index]
        if device is None or device.handle is None:
            raise LookupError(f"gpu {gpu.index} is gone")
        free = _gib(lib.nvmlDeviceGetMemoryInfo(device.handle).free)
        out.append(msgspec.structs.replace(gpu, vram_free_gib=min(free, gpu.vram_total_gib)))
    return tuple(out)


# --------------------------------------------------------------------------- live telemetry


class GpuTelemetry:
    """Live readings of this host's GPUs for the worker heartbeat (``WorkerRecord.gpu_stats``).

    NVML is initialised once, at the first :meth:`read` that has GPUs to read, and stays open
    until :meth:`close`; the devices are enumerated once too (their handles stay valid while
    NVML is open). If NVML cannot be loaded or initialised, that reason is kept and given by
    every later read without trying again. :meth:`read` never raises: trouble is no readings
    plus a reason (NVML as a whole) or a ``GpuStat.error`` (one GPU). ``env`` and ``nvml`` are
    injectable as for :func:`detect`.
    """

    def __init__(self, *, env: Mapping[str, str] | None = None, nvml: Any | None = None):
        self._env = os.environ if env is None else env
        self._nvml = nvml
        self._lib: Any | None = None
        self._opened = False
        self._unusable = ""
        self._devices: list[_Device] | None = None

    def read(self, gpus: tuple[GpuInfo, ...]) -> tuple[tuple[GpuStat, ...], str]:
        """(one GpuStat per GPU of ``gpus``, "") or ((), why not). No GPUs: ((), "") and NVML is
        never touched (the capability's ``cuda_reason`` says why there are none)."""
        if not gpus:
            return (), ""
        try:
            return self._read(gpus)
        except Exception as exc:  # noqa: BLE001 - a heartbeat must never die of telemetry
            return (), f"gpu telemetry failed: {_errmsg(exc)}"

    def close(self) -> None:
        """Shut NVML down if this reader opened it (a later read opens it again)."""
        if self._lib is not None:
            with contextlib.suppress(*_nvml_errors(self._lib)):
                self._lib.nvmlShutdown()
        self._lib, self._opened, self._devices = None, False, None

    def _open(self) -> str:
        if not self._opened:
            self._opened = True
            lib, reason = _load_nvml(self._nvml)
            if lib is None:
                self._unusable = reason.removeprefix("no CUDA: ")
                return self._unusable
            try:
                lib.nvmlInit()
            except _nvml_errors(lib) as exc:
                self._unusable = f"NVML init failed: {_nvml_errmsg(lib, exc)}"
                return self._unusable
            self._lib = lib
        return self._unusable

    def _read(self, gpus: tuple[GpuInfo, ...]) -> tuple[tuple[GpuStat, ...], str]:
        unusable = self._open()
        if unusable:
            return (), unusable
        lib = self._lib
        errors = _nvml_errors(lib)
        if self._devices is None:
            try:
                self._devices = _enumerate(lib)
            except errors as exc:  # tried again next heartbeat
                return (), f"cannot count GPUs: {_errmsg(exc)}"
        by_uuid = {d.uuid: d for d in self._devices if d.uuid}
        visible, _ = _resolve_visible(self._devices, self._env, [])
        stats = []
        for gpu in gpus:
            device = by_uuid.get(gpu.uuid) if gpu.uuid else None
            if device is None and not gpu.uuid and gpu.index < len(visible):
                device = visible[gpu.index]
            stats.append(_gpu_stat(lib, gpu, device))
        return tuple(stats), ""


def _gpu_stat(lib: Any, gpu: GpuInfo, device: _Device | None) -> GpuStat:
    errors = _nvml_errors(lib)
    base = GpuStat(index=gpu.index, name=gpu.name, uuid=gpu.uuid, vram_total_gib=gpu.vram_total_gib)
    if device is None or device.handle is None:
        error = device.error if device is not None and device.error else "NVML no longer sees this GPU"
        return msgspec.structs.replace(base, error=error)
    try:
        memory = lib.nvmlDeviceGetMemoryInfo(device.handle)
        total, free = float(memory.total), float(memory.free)
        used = float(getattr(memory, "used", total - free))
    except errors as exc:  # fallen off the bus, no permission: this GPU only
        return msgspec.structs.replace(base, error=_nvml_errmsg(lib, exc))
    util = temp = None
    with contextlib.suppress(*errors):
        util = float(lib.nvmlDeviceGetUtilizationRates(device.handle).gpu)
    with contextlib.suppress(*errors):
        temp = float(lib.nvmlDeviceGetTemperature(device.handle, getattr(lib, "NVML_TEMPERATURE_GPU", 0)))
    return msgspec.structs.replace(
        base,
        vram_used_gib=_gib(used),
        vram_free_gib=_gib(free),
        vram_total_gib=_gib(total),
        util_pct=util,
        temp_c=temp,
    )


def with_free_vram(cap: Capability, stats: tuple[GpuStat, ...]) -> Capability:
    """``cap`` with each GPU's free VRAM taken from a telemetry reading of it (never above the
    recorded total, so a ``max_vram_gib`` override keeps holding). GPUs without a good reading
    keep what they had."""
    fresh = {s.index: s for s in stats if not s.error}
    gpus = tuple(
        msgspec.structs.replace(g, vram_free_gib=min(fresh[g.index].vram_free_gib, g.vram_total_gib))
        if g.index in fresh and fresh[g.index].uuid == g.uuid
        else g
        for g in cap.gpus
    )
    return cap if gpus == cap.gpus else msgspec.structs.replace(cap, gpus=gpus)


def _check_override(name: str, value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def apply_overrides(
    cap: Capability,
    *,
    max_cores: float | None = None,
    max_ram_gib: float | None = None,
    max_vram_gib: float | None = None,
) -> Capability:
    """Cap what the agent offers (manifest/CLI overrides); overrides never raise a value.

    Each override given adds a note saying what it did. A negative or non-finite
    override is a configuration error and raises :class:`ValueError`.
    """
    max_cores = _check_override("max_cores", max_cores)
    max_ram_gib = _check_override("max_ram_gib", max_ram_gib)
    max_vram_gib = _check_override("max_vram_gib", max_vram_gib)
    changes: dict[str, Any] = {}
    notes = list(cap.notes)
    if max_cores is not None:
        changes["cores_usable"] = float(min(cap.cores_usable, max_cores))
        notes.append(_override_note("max_cores", max_cores, cap.cores_usable, "cores"))
    if max_ram_gib is not None:
        changes["ram_total_gib"] = float(min(cap.ram_total_gib, max_ram_gib))
        changes["ram_available_gib"] = float(min(cap.ram_available_gib, max_ram_gib))
        notes.append(_override_note("max_ram_gib", max_ram_gib, cap.ram_total_gib, "GiB RAM"))
    if max_vram_gib is not None:
        changes["gpus"] = tuple(_cap_vram(g, max_vram_gib) for g in cap.gpus)
        notes.append(_override_note("max_vram_gib", max_vram_gib, cap.vram_total_gib, "GiB VRAM per GPU"))
    return msgspec.structs.replace(cap, notes=tuple(notes), **changes)


def _cap_vram(gpu: GpuInfo, limit: float) -> GpuInfo:
    total, free = float(min(gpu.vram_total_gib, limit)), float(min(gpu.vram_free_gib, limit))
    return msgspec.structs.replace(gpu, vram_total_gib=total, vram_free_gib=free)


def _override_note(name: str, limit: float, detected: float, unit: str) -> str:
    if limit < detected:
        return f"override: {name}={limit:g} caps {detected:g} {unit} to {limit:g}"
    return f"override: {name}={limit:g} is not below the detected {detected:g} {unit}; no change"


def render_text(cap: Capability) -> str:
    """A human-readable multi-line report (``trainfleet agent --detect``)."""
    cores = f"{cap.cores_usable:g} usable ({cap.cores_logical} logical, {cap.cores_physical} physical)"
    rows: list[tuple[str, str]] = [
        ("host", cap.host_id),
        ("cores", cores),
        ("ram", f"{cap.ram_total_gib:.1f} GiB total, {cap.ram_available_gib:.1f} GiB available"),
        ("cuda", _cuda_text(cap)),
    ]
    rows += [(f"gpu {g.index}", _gpu_text(g)) for g in cap.gpus]
    if cap.driver_version or cap.cuda_version:
        rows.append(("driver", f"{cap.driver_version or '?'}, CUDA {cap.cuda_version or '?'}"))
    rows += [
        ("torch", _torch_text(cap)),
        ("python", f"{cap.python} on {cap.platform}"),
        ("commit", cap.code_commit or "unknown"),
        ("container", "yes" if cap.in_container else "no"),
    ]
    rows += [("notes" if i == 0 else "", note) for i, note in enumerate(cap.notes)]
    return "\n".join(f"{label:<12}{value}".rstrip() for label, value in rows)


def _cuda_text(cap: Capability) -> str:
    if cap.gpus:
        return f"{len(cap.gpus)} GPU{'s' if len(cap.gpus) != 1 else ''}"
    return f"none ({cap.cuda_reason})" if cap.cuda_reason else "none"


def _gpu_text(gpu: GpuInfo) -> str:
    return (
        f"{gpu.name}  {gpu.vram_total_gib:.1f} GiB total, {gpu.vram_free_gib:.1f} GiB free, "
        f"cc {gpu.compute_capability or '?'}, uuid {gpu.uuid or '?'}"
    )


def _torch_text(cap: Capability) -> str:
    if cap.torch_version is None:
        return "not available"
    cuda = {True: "yes", False: "no", None: "unknown"}[cap.torch_cuda]
    return f"{cap.torch_version} (cuda: {cuda})"
