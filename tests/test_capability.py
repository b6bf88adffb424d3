"""Capability detection on fake /proc and cgroup trees and a fake NVML."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from trainfleet.agent import capability
from trainfleet.agent.capability import (
    apply_overrides,
    default_host_id,
    detect,
    refresh_gpus,
    render_text,
)
from trainfleet.broker.schema import Capability, GpuInfo

GIB = 1024**3
MEMINFO = "MemTotal:       16777216 kB\nMemFree:         1048576 kB\nMemAvailable:   12582912 kB\n"
V1_UNLIMITED = "9223372036854771712"


# --------------------------------------------------------------------------- fake host trees


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc_tree(tmp_path: Path, self_cgroup: str = "0::/\n", meminfo: str | None = MEMINFO) -> Path:
    """A fake /proc: meminfo (16 GiB total, 12 GiB available) and self/cgroup."""
    root = tmp_path / "proc"
    write(root, "self/cgroup", self_cgroup)
    if meminfo is not None:
        write(root, "meminfo", meminfo)
    return root


def cgroup_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A fake /sys/fs/cgroup holding ``files`` (relative path -> content)."""
    root = tmp_path / "cgroup"
    root.mkdir(exist_ok=True)
    for rel, text in files.items():
        write(root, rel, text)
    return root


def run_detect(tmp_path: Path, proc: Path, cg: Path, **kwargs) -> Capability:
    kwargs.setdefault("env", {})
    kwargs.setdefault("nvml", FakeNvml([]))
    kwargs.setdefault("probe_torch", False)
    return detect(
        "test-host",
        proc_root=str(proc),
        cgroup_root=str(cg),
        code_commit="abc123",
        dockerenv_path=str(tmp_path / "no-dockerenv"),
        **kwargs,
    )


@pytest.fixture(autouse=True)
def eight_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the host to 8 logical / 4 physical cores with no affinity limit."""
    monkeypatch.setattr(capability, "_cpu_counts", lambda: (8, 4))
    monkeypatch.setattr(capability, "_affinity_count", lambda: None)


# --------------------------------------------------------------------------- fake NVML


class FakeNvmlError(Exception):
    def __init__(self, message: str, value: int | None = None) -> None:
        super().__init__(message)
        self.value = value  # pynvml's NVMLError carries NVML's return code here


NVML_ERROR_NO_PERMISSION = 4


@dataclass
class FakeGpu:
    name: str | bytes
    uuid: str | bytes
    total: int = 80 * GIB
    free: int = 79 * GIB
    cc: tuple[int, int] = (9, 0)
    broken: bool = False  # memory info raises, as for a MIG parent without permission
    mig: bool = False  # the GPU runs in MIG mode
    no_permission: bool = False  # its handle is refused with NVML_ERROR_NO_PERMISSION


class FakeNvml:
    NVMLError = FakeNvmlError

    def __init__(self, gpus: list[FakeGpu], init_error: str | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNvmlError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if self.gpus[index].no_permission:
            raise FakeNvmlError("Insufficient Permissions", NVML_ERROR_NO_PERMISSION)
        return self.gpus[index]

    def nvmlDeviceGetMigMode(self, handle: FakeGpu) -> list[int]:
        return [int(handle.mig), int(handle.mig)]  # (current, pending)

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str | bytes:
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str | bytes:
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        if handle.broken:
            raise FakeNvmlError("Insufficient Permissions")
        return SimpleNamespace(total=handle.total, free=handle.free, used=handle.total - handle.free)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeGpu) -> tuple[int, int]:
        return handle.cc

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"580.159.04"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu(b"NVIDIA H100 80GB HBM3", b"GPU-aaaa1111-0000", 80 * GIB, 79 * GIB, (9, 0)),
            FakeGpu("NVIDIA H100 80GB HBM3", "GPU-bbbb2222-0000", 80 * GIB, 40 * GIB, (9, 0)),
        ]
    )


def gpu_detect(tmp_path: Path, nvml: FakeNvml, env: dict[str, str] | None = None) -> Capability:
    return run_detect(tmp_path, proc_tree(tmp_path), cgroup_tree(tmp_path, {}), nvml=nvml, env=env or {})


# --------------------------------------------------------------------------- cores


def test_v2_cpu_quota_fractional(tmp_path: Path) -> None:
    cg = cgroup_tree(tmp_path, {"cpu.max": "150000 100000\n"})
    cap = run_detect(tmp_path, proc_tree(tmp_path), cg)
    assert (cap.cores_logical, cap.cores_physical, cap.cores_usable) == (8, 4, 1.5)
    assert cap.in_container
    assert any("cgroup CPU quota 1.5" in n for n in cap.notes)


def test_v2_cpu_max_unlimited(tmp_path: Path) -> None:
    cg = cgroup_tree(tmp_path, {"cpu.max": "max 100000\n"})
    cap = run_detect(tmp_path, proc_tree(tmp_path), cg)
    assert cap.cores_usable == 8.0
    assert not cap.in_container


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_v1_cfs_quota(tmp_path: Path, mount: str) -> None:
    cg = cgroup_tree(tmp_path, {f"{mount}/cpu.cfs_quota_us": "250000\n", f"{mount}/cpu.cfs_period_us": "100000\n"})
    assert run_detect(tmp_path, proc_tree(tmp_path, "1:cpu:/\n"), cg).cores_usable == 2.5


def test_v1_cfs_unlimited(tmp_path: Path) -> None:
    cg = cgroup_tree(tmp_path, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert run_detect(tmp_path, proc_tree(tmp_path), cg).cores_usable == 8.0


def test_v2_own_nested_cgroup(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, "0::/kubepods/pod1/ctr\n")
    cg = cgroup_tree(tmp_path, {"kubepods/pod1/ctr/cpu.max": "50000 100000\n", "cpu.max": "max 100000\n"})
    assert run_detect(tmp_path, proc, cg).cores_usable == 0.5


def test_v2_parent_limit_binds_child(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, "0::/kubepods/pod1/ctr\n")
    files = {"kubepods/pod1/ctr/cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "200000 100000\n"}
    assert run_detect(tmp_path, proc, cgroup_tree(tmp_path, files)).cores_usable == 2.0


def test_v2_nested_path_missing_falls_back_to_root(tmp_path: Path) -> None:
    # Inside a container only its own subtree is mounted, so the host path does not exist.
    proc = proc_tree(tmp_path, "0::/system.slice/docker-abc.scope\n")
    cg = cgroup_tree(tmp_path, {"cpu.max": "300000 100000\n"})
    assert run_detect(tmp_path, proc, cg).cores_usable == 3.0


def test_v1_own_nested_cgroup_and_fallback(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, "4:cpu,cpuacct:/docker/abc\n7:memory:/docker/abc\n1:name=systemd:/\n")
    files = {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "memory/memory.limit_in_bytes": f"{4 * GIB}\n",  # nested memory dir absent: controller root
        "memory/memory.usage_in_bytes": f"{1 * GIB}\n",
    }
    cap = run_detect(tmp_path, proc, cgroup_tree(tmp_path, files))
    assert cap.cores_usable == 1.5
    assert (cap.ram_total_gib, cap.ram_available_gib) == (4.0, 3.0)


def test_affinity_limits_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capability, "_affinity_count", lambda: 3)
    cg = cgroup_tree(tmp_path, {"cpu.max": "500000 100000\n"})
    cap = run_detect(tmp_path, proc_tree(tmp_path), cg)
    assert cap.cores_usable == 3.0
    assert any("affinity allows 3 of 8" in n for n in cap.notes)


# --------------------------------------------------------------------------- RAM and container


def test_meminfo_without_cgroup_limit(tmp_path: Path) -> None:
    cg = cgroup_tree(tmp_path, {"memory.max": "max\n", "memory.current": f"{GIB}\n"})
    cap = run_detect(tmp_path, proc_tree(tmp_path), cg)
    assert (cap.ram_total_gib, cap.ram_available_gib) == (16.0, 12.0)
    assert not cap.in_container


def test_v2_memory_limit_caps_meminfo(tmp_path: Path) -> None:
    cg = cgroup_tree(tmp_path, {"memory.max": f"{4 * GIB}\n", "memory.current": f"{GIB + GIB // 2}\n"})
    cap = run_detect(tmp_path, proc_tree(tmp_path), cg)
    assert (cap.ram_total_gib, cap.ram_available_gib) == (4.0, 2.5)
    assert cap.in_container
    assert any("cgroup memory limit 4 GiB" in n for n in cap.notes)


def test_v2_memory_inactive_file_counts_as_available(tmp_path: Path) -> None:
    files = {
        "memory.max": f"{4 * GIB}\n",
        "memory.current": f"{3 * GIB}\n",
        "memory.stat": f"anon {GIB}\ninactive_file {2 * GIB}\n",
    }
    assert run_detect(tmp_path, proc_tree(tmp_path), cgroup_tree(tmp_path, files)).ram_available_gib == 3.0


def test_v1_memory_unlimited(tmp_path: Path) -> None:
    files = {"memory/memory.limit_in_bytes": V1_UNLIMITED, "memory/memory.usage_in_bytes": f"{GIB}"}
    cap = run_detect(tmp_path, proc_tree(tmp_path), cgroup_tree(tmp_path, files))
    assert (cap.ram_total_gib, cap.ram_available_gib) == (16.0, 12.0)


def test_v1_memory_limit_applies(tmp_path: Path) -> None:
    files = {"memory/memory.limit_in_bytes": f"{2 * GIB}", "memory/memory.usage_in_bytes": f"{GIB // 2}"}
    cap = run_detect(tmp_path, proc_tree(tmp_path), cgroup_tree(tmp_path, files))
    assert (cap.ram_total_gib, cap.ram_available_gib) == (2.0, 1.5)


def test_limit_above_host_ram_does_not_apply(tmp_path: Path) -> None:
    cg = cgroup_tree(tmp_path, {"memory.max": f"{64 * GIB}\n", "memory.current": f"{GIB}\n"})
    cap = run_detect(tmp_path, proc_tree(tmp_path), cg)
    assert (cap.ram_total_gib, cap.ram_available_gib) == (16.0, 12.0)
    assert not cap.in_container


def test_container_markers(tmp_path: Path) -> None:
    proc, cg = proc_tree(tmp_path), cgroup_tree(tmp_path, {})
    assert not run_detect(tmp_path, proc, cg).in_container
    write(proc, "1/cgroup", "12:cpu:/kubepods/besteffort/pod1\n")
    assert run_detect(tmp_path, proc, cg).in_container
    (proc / "1" / "cgroup").unlink()
    (tmp_path / "no-dockerenv").touch()
    assert run_detect(tmp_path, proc, cg).in_container


def test_missing_and_garbage_files_do_not_crash(tmp_path: Path) -> None:
    cap = run_detect(tmp_path, tmp_path / "no-proc", tmp_path / "no-cgroup")
    assert cap.cores_usable == 8.0
    assert cap.ram_total_gib > 0  # psutil fallback
    assert any("meminfo unreadable" in n for n in cap.notes)
    garbage = {"cpu.max": "lots\n", "memory.max": "huge\n", "memory/memory.limit_in_bytes": "?"}
    proc = proc_tree(tmp_path, "garbage line\n::\n0::/../../elsewhere\n", meminfo="nonsense\n")
    cap = run_detect(tmp_path, proc, cgroup_tree(tmp_path, garbage))
    assert cap.cores_usable == 8.0


def test_probe_bug_is_a_note_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object) -> None:
        raise RuntimeError("kaput")

    monkeypatch.setattr(capability, "_detect_ram", boom)
    cap = run_detect(tmp_path, proc_tree(tmp_path), cgroup_tree(tmp_path, {}))
    assert cap.ram_total_gib == 0.0
    assert "ram probe failed: kaput" in cap.notes


# --------------------------------------------------------------------------- GPUs


def test_two_gpus(tmp_path: Path) -> None:
    nvml = two_gpus()
    cap = gpu_detect(tmp_path, nvml)
    assert cap.gpus == (
        GpuInfo(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa1111-0000", vram_total_gib=80.0,
                vram_free_gib=79.0, compute_capability="9.0"),
        GpuInfo(index=1, name="NVIDIA H100 80GB HBM3", uuid="GPU-bbbb2222-0000", vram_total_gib=80.0,
                vram_free_gib=40.0, compute_capability="9.0"),
    )  # fmt: skip
    assert (cap.driver_version, cap.cuda_version, cap.cuda_reason) == ("580.159.04", "13.0", "")
    assert cap.has_cuda and cap.vram_free_gib == 79.0
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


@pytest.mark.parametrize("visible", ["1", "GPU-bbbb2222-0000", "GPU-bbbb", " 1 "])
def test_cuda_visible_devices_selects_second(tmp_path: Path, visible: str) -> None:
    cap = gpu_detect(tmp_path, two_gpus(), {"CUDA_VISIBLE_DEVICES": visible})
    assert [(g.index, g.uuid, g.vram_free_gib) for g in cap.gpus] == [(0, "GPU-bbbb2222-0000", 40.0)]
    assert "gpu: gpu 0 is NVML device 1" in cap.notes


def test_cuda_visible_devices_order_and_stop_at_invalid(tmp_path: Path) -> None:
    cap = gpu_detect(tmp_path, two_gpus(), {"CUDA_VISIBLE_DEVICES": "1,0"})
    assert [g.uuid[:8] for g in cap.gpus] == ["GPU-bbbb", "GPU-aaaa"]
    cap = gpu_detect(tmp_path, two_gpus(), {"CUDA_VISIBLE_DEVICES": "0,7,1"})
    assert [g.uuid[:8] for g in cap.gpus] == ["GPU-aaaa"]
    assert any("'7': no such GPU, later entries ignored" in n for n in cap.notes)


@pytest.mark.parametrize("visible", ["7", "GPU-", "GPU-cccc"])
def test_cuda_visible_devices_matching_nothing(tmp_path: Path, visible: str) -> None:
    cap = gpu_detect(tmp_path, two_gpus(), {"CUDA_VISIBLE_DEVICES": visible})
    assert cap.gpus == ()
    assert cap.cuda_reason == f"no CUDA: CUDA_VISIBLE_DEVICES={visible} matches no GPU"


@pytest.mark.parametrize("visible", ["", "-1", "none", "void", " NoNe "])
def test_cuda_visible_devices_hides_all(tmp_path: Path, visible: str) -> None:
    nvml = two_gpus()
    cap = gpu_detect(tmp_path, nvml, {"CUDA_VISIBLE_DEVICES": visible})
    assert cap.gpus == ()
    assert cap.cuda_reason == "no CUDA: hidden by CUDA_VISIBLE_DEVICES"
    assert nvml.inits == 0


def test_cuda_visible_devices_all(tmp_path: Path) -> None:
    assert len(gpu_detect(tmp_path, two_gpus(), {"CUDA_VISIBLE_DEVICES": "all"}).gpus) == 2


def test_nvidia_visible_devices(tmp_path: Path) -> None:
    cap = gpu_detect(tmp_path, two_gpus(), {"NVIDIA_VISIBLE_DEVICES": "GPU-aaaa1111-0000"})
    assert [g.uuid for g in cap.gpus] == ["GPU-aaaa1111-0000"]
    # Indices are host numbering the container runtime already applied: NVML's view is kept.
    cap = gpu_detect(tmp_path, two_gpus(), {"NVIDIA_VISIBLE_DEVICES": "2,3"})
    assert len(cap.gpus) == 2
    assert any("lists host indices" in n for n in cap.notes)
    cap = gpu_detect(tmp_path, two_gpus(), {"NVIDIA_VISIBLE_DEVICES": "void"})
    assert cap.cuda_reason == "no CUDA: hidden by NVIDIA_VISIBLE_DEVICES"
    # Both apply: the runtime's selection hides every GPU, whatever CUDA's says.
    cap = gpu_detect(tmp_path, two_gpus(), {"NVIDIA_VISIBLE_DEVICES": "void", "CUDA_VISIBLE_DEVICES": "0"})
    assert cap.gpus == () and cap.cuda_reason == "no CUDA: hidden by NVIDIA_VISIBLE_DEVICES"


def four_gpus() -> FakeNvml:
    return FakeNvml([FakeGpu("NVIDIA L4", f"GPU-{c * 4}-0000", 24 * GIB, 20 * GIB, (8, 9)) for c in "abcd"])


@pytest.mark.parametrize("value", ["", "none", "void", " NONE "])
def test_nvidia_visible_devices_hiding_every_gpu_is_no_cuda_with_the_reason(tmp_path: Path, value: str) -> None:
    nvml = two_gpus()
    cap = gpu_detect(tmp_path, nvml, {"NVIDIA_VISIBLE_DEVICES": value})
    assert cap.gpus == () and cap.cuda_reason == "no CUDA: hidden by NVIDIA_VISIBLE_DEVICES"
    assert nvml.inits == 0
    assert len(gpu_detect(tmp_path, two_gpus(), {"NVIDIA_VISIBLE_DEVICES": "all"}).gpus) == 2


def test_nvidia_visible_devices_indices_pick_from_what_nvml_sees_unless_the_runtime_applied_them(
    tmp_path: Path,
) -> None:
    # On a host (or a privileged container) NVML sees all four: the listed ones are taken.
    cap = gpu_detect(tmp_path, four_gpus(), {"NVIDIA_VISIBLE_DEVICES": "3,1"})
    assert [(g.index, g.uuid[:8]) for g in cap.gpus] == [(0, "GPU-bbbb"), (1, "GPU-dddd")]
    cap = gpu_detect(tmp_path, four_gpus(), {"NVIDIA_VISIBLE_DEVICES": "1,9"})
    assert [g.uuid[:8] for g in cap.gpus] == ["GPU-bbbb"]
    assert "gpu: NVIDIA_VISIBLE_DEVICES entry '9': no such GPU" in cap.notes
    cap = gpu_detect(tmp_path, four_gpus(), {"NVIDIA_VISIBLE_DEVICES": "7,9,11"})
    assert cap.gpus == () and cap.cuda_reason == "no CUDA: NVIDIA_VISIBLE_DEVICES=7,9,11 matches no GPU"


def test_nvidia_visible_devices_by_uuid_then_cuda_visible_devices_within_them(tmp_path: Path) -> None:
    env = {"NVIDIA_VISIBLE_DEVICES": "GPU-dddd-0000,GPU-bbbb"}
    assert [g.uuid[:8] for g in gpu_detect(tmp_path, four_gpus(), env).gpus] == ["GPU-bbbb", "GPU-dddd"]
    # CUDA numbers what the runtime left: its index 1 is the fourth GPU of the host.
    cap = gpu_detect(tmp_path, four_gpus(), {**env, "CUDA_VISIBLE_DEVICES": "1"})
    assert [(g.index, g.uuid) for g in cap.gpus] == [(0, "GPU-dddd-0000")]
    cap = gpu_detect(tmp_path, four_gpus(), {**env, "CUDA_VISIBLE_DEVICES": "GPU-aaaa"})
    assert cap.gpus == () and cap.cuda_reason == "no CUDA: CUDA_VISIBLE_DEVICES=GPU-aaaa matches no GPU"
    cap = gpu_detect(tmp_path, four_gpus(), {**env, "CUDA_VISIBLE_DEVICES": "none"})
    assert cap.cuda_reason == "no CUDA: hidden by CUDA_VISIBLE_DEVICES"


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"CUDA_VISIBLE_DEVICES": "MIG-1234"}, "CUDA_VISIBLE_DEVICES=MIG-1234 names a MIG instance"),
        ({"NVIDIA_VISIBLE_DEVICES": "MIG-1234,MIG-5678"}, "NVIDIA_VISIBLE_DEVICES=MIG-1234,MIG-5678 names MIG"),
        ({"NVIDIA_VISIBLE_DEVICES": "0:1"}, "NVIDIA_VISIBLE_DEVICES=0:1 names MIG instances only"),
    ],
)
def test_mig_instances_named_in_the_environment_are_no_cuda_with_the_reason(
    tmp_path: Path, env: dict[str, str], reason: str
) -> None:
    cap = gpu_detect(tmp_path, two_gpus(), env)
    assert cap.gpus == ()
    assert cap.cuda_reason.startswith(f"no CUDA: {reason}") and "MIG instances are not supported" in cap.cuda_reason


def test_a_gpu_in_mig_mode_is_skipped_and_all_in_mig_mode_is_no_cuda(tmp_path: Path) -> None:
    nvml = two_gpus()
    nvml.gpus[0].mig = True
    cap = gpu_detect(tmp_path, nvml)
    assert [(g.index, g.uuid[:8]) for g in cap.gpus] == [(1, "GPU-bbbb")]
    assert any(n.startswith("gpu 0 (NVML 0) skipped: MIG mode is enabled") for n in cap.notes)
    nvml.gpus[1].mig = True
    cap = gpu_detect(tmp_path, nvml)
    assert cap.gpus == ()
    assert cap.cuda_reason.startswith("no CUDA: gpu 0 (NVML 0) skipped: MIG mode is enabled; MIG instances are not")
    assert (nvml.inits, nvml.shutdowns) == (2, 2)


def test_no_permission_to_the_devices_is_no_cuda_naming_permission(tmp_path: Path) -> None:
    nvml = two_gpus()
    for gpu in nvml.gpus:
        gpu.no_permission = True
    cap = gpu_detect(tmp_path, nvml)
    assert cap.gpus == ()
    assert cap.cuda_reason == (
        "no CUDA: gpu 0 (NVML 0) skipped: no permission to the GPU "
        "(Insufficient Permissions; can this user open /dev/nvidia*?)"
    )
    refused = FakeNvml([])

    def init() -> None:
        raise FakeNvmlError("Insufficient Permissions", NVML_ERROR_NO_PERMISSION)

    refused.nvmlInit = init  # type: ignore[method-assign]
    cap = gpu_detect(tmp_path, refused)
    assert cap.cuda_reason.startswith("no CUDA: NVML init failed: no permission to the GPU")


def test_nvml_raising_the_unexpected_is_no_cuda_with_what_it_raised(tmp_path: Path) -> None:
    class Exploding(FakeNvml):
        def nvmlDeviceGetCount(self) -> int:
            raise ZeroDivisionError("wrapper bug")

    cap = gpu_detect(tmp_path, Exploding([]))
    assert cap.gpus == () and cap.cuda_reason == "no CUDA: GPU probe failed: wrapper bug"


def test_telemetry_and_refresh_follow_the_same_selection(tmp_path: Path) -> None:
    env = {"NVIDIA_VISIBLE_DEVICES": "GPU-cccc,GPU-dddd", "CUDA_VISIBLE_DEVICES": "1"}
    nvml = four_gpus()
    nvml.gpus[3].free = 5 * GIB
    cap = gpu_detect(tmp_path, nvml, env)
    assert [g.uuid[:8] for g in cap.gpus] == ["GPU-dddd"]
    stats, reason = capability.GpuTelemetry(env=env, nvml=nvml).read(cap.gpus)
    assert reason == "" and [(s.uuid[:8], s.vram_free_gib) for s in stats] == [("GPU-dddd", 5.0)]
    # A GPU known by index only (no UUID) is found through the same selection.
    bare = msgspec.structs.replace(cap, gpus=(msgspec.structs.replace(cap.gpus[0], uuid=""),))
    assert refresh_gpus(bare, env=env, nvml=nvml).gpus[0].vram_free_gib == 5.0


def test_detect_json_reports_the_cuda_reason_from_the_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["NVIDIA_VISIBLE_DEVICES"] = "void"
    out = subprocess.run(
        [sys.executable, "-m", "trainfleet.controller.cli", "agent", "--detect", "--json", "--no-torch-probe"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout
    cap = msgspec.json.decode(out, type=Capability)
    assert cap.gpus == () and cap.cuda_reason == "no CUDA: hidden by NVIDIA_VISIBLE_DEVICES"


def test_nvml_init_failure(tmp_path: Path) -> None:
    nvml = FakeNvml([], init_error="Driver Not Loaded")
    cap = gpu_detect(tmp_path, nvml)
    assert cap.gpus == ()
    assert cap.cuda_reason == "no CUDA: NVML init failed: Driver Not Loaded"
    assert nvml.shutdowns == 0  # nothing to shut down after a failed init


def test_no_gpus(tmp_path: Path) -> None:
    assert gpu_detect(tmp_path, FakeNvml([])).cuda_reason == "no CUDA: NVML sees no GPU"


def test_pynvml_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    cap = run_detect(tmp_path, proc_tree(tmp_path), cgroup_tree(tmp_path, {}), nvml=None)
    assert cap.cuda_reason == "no CUDA: nvidia-ml-py not installed"


def test_broken_device_is_skipped(tmp_path: Path) -> None:
    nvml = two_gpus()
    nvml.gpus[0].broken = True
    cap = gpu_detect(tmp_path, nvml)
    # CUDA still numbers the broken card, so the survivor keeps index 1.
    assert [(g.index, g.uuid) for g in cap.gpus] == [(1, "GPU-bbbb2222-0000")]
    assert "gpu 0 (NVML 0) skipped: Insufficient Permissions" in cap.notes
    assert cap.cuda_reason == ""
    assert nvml.shutdowns == 1
    nvml.gpus[1].broken = True
    cap = gpu_detect(tmp_path, nvml)
    assert cap.gpus == ()
    assert cap.cuda_reason == "no CUDA: gpu 0 (NVML 0) skipped: Insufficient Permissions"


def test_mixed_models_suggest_pci_order(tmp_path: Path) -> None:
    nvml = FakeNvml([FakeGpu("NVIDIA A100", "GPU-a"), FakeGpu("NVIDIA T4", "GPU-b", 16 * GIB, 15 * GIB)])
    assert any("CUDA_DEVICE_ORDER=PCI_BUS_ID" in n for n in gpu_detect(tmp_path, nvml).notes)
    cap = gpu_detect(tmp_path, nvml, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert not any("CUDA_DEVICE_ORDER" in n for n in cap.notes)


# --------------------------------------------------------------------------- refresh / overrides


def test_refresh_gpus_updates_free_vram(tmp_path: Path) -> None:
    nvml = two_gpus()
    cap = gpu_detect(tmp_path, nvml)
    nvml.gpus[0].free = 10 * GIB
    nvml.gpus.reverse()  # matched by UUID, not by position
    fresh = refresh_gpus(cap, env={}, nvml=nvml)
    assert [g.vram_free_gib for g in fresh.gpus] == [10.0, 40.0]
    assert [g.index for g in fresh.gpus] == [0, 1]
    assert nvml.shutdowns == 2


def test_refresh_gpus_keeps_vram_override(tmp_path: Path) -> None:
    nvml = two_gpus()
    cap = apply_overrides(gpu_detect(tmp_path, nvml), max_vram_gib=24)
    assert refresh_gpus(cap, env={}, nvml=nvml).vram_free_gib == 24.0


def test_refresh_gpus_trouble_returns_cap_unchanged(tmp_path: Path) -> None:
    nvml = two_gpus()
    cap = gpu_detect(tmp_path, nvml)
    nvml.init_error = "GPU is lost"
    assert refresh_gpus(cap, env={}, nvml=nvml) is cap
    nvml.init_error = None
    nvml.gpus[1].broken = True
    assert refresh_gpus(cap, env={}, nvml=nvml) is cap
    nvml.gpus.pop()
    assert refresh_gpus(cap, env={}, nvml=nvml) is cap


def test_apply_overrides(tmp_path: Path) -> None:
    cap = gpu_detect(tmp_path, two_gpus())
    capped = apply_overrides(cap, max_cores=2, max_ram_gib=8, max_vram_gib=24)
    assert capped.cores_usable == 2
    assert (capped.ram_total_gib, capped.ram_available_gib) == (8, 8)
    assert [(g.vram_total_gib, g.vram_free_gib) for g in capped.gpus] == [(24, 24), (24, 24)]
    assert capped.notes[-3:] == (
        "override: max_cores=2 caps 8 cores to 2",
        "override: max_ram_gib=8 caps 16 GiB RAM to 8",
        "override: max_vram_gib=24 caps 80 GiB VRAM per GPU to 24",
    )
    roomy = apply_overrides(cap, max_cores=64)
    assert roomy.cores_usable == 8.0
    assert roomy.notes[-1] == "override: max_cores=64 is not below the detected 8 cores; no change"
    assert apply_overrides(cap) == cap
    with pytest.raises(ValueError, match="max_ram_gib"):
        apply_overrides(cap, max_ram_gib=-1)


# --------------------------------------------------------------------------- host id, commit, render


def test_default_host_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capability.socket, "gethostname", lambda: "Box.Example.COM")
    env = {"TRAINFLEET_HOST_ID": "From Env!"}
    assert default_host_id("Flag.Host", env) == "flag.host"
    assert default_host_id(".pi..lan.", env) == "pi.lan"
    assert default_host_id("...", env) == "from-env-"
    assert default_host_id(None, env) == "from-env-"
    assert default_host_id("", env) == "from-env-"
    assert default_host_id(None, {}) == "box.example.com"
    assert default_host_id("gpu_box-2", {}) == "gpu_box-2"
    monkeypatch.setattr(capability.socket, "gethostname", lambda: "")
    assert default_host_id(None, {"TRAINFLEET_HOST_ID": "  "}) == "host"


def test_detect_host_id_sanitised(tmp_path: Path) -> None:
    cap = detect("My.Host!", proc_root=str(tmp_path), cgroup_root=str(tmp_path), env={},
                 nvml=FakeNvml([]), probe_torch=False, code_commit="")  # fmt: skip
    assert cap.host_id == "my.host-"


def test_code_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINFLEET_CODE_COMMIT", "deadbeef")
    assert capability.code_commit() == "deadbeef"
    monkeypatch.delenv("TRAINFLEET_CODE_COMMIT")
    head = capability.code_commit()
    assert head == "" or len(head) == 40

    def no_git(*_args: object, **_kwargs: object) -> None:
        raise FileNotFoundError("git")

    capability._git_head.cache_clear()
    monkeypatch.setattr(capability.subprocess, "run", no_git)
    try:
        assert capability.code_commit() == ""
    finally:
        capability._git_head.cache_clear()


def test_render_text(tmp_path: Path) -> None:
    cap = apply_overrides(gpu_detect(tmp_path, two_gpus()), max_cores=1.5)
    text = render_text(cap)
    assert "host        test-host" in text
    assert "cores       1.5 usable (8 logical, 4 physical)" in text
    assert "gpu 1       NVIDIA H100 80GB HBM3  80.0 GiB total, 40.0 GiB free, cc 9.0" in text
    assert "driver      580.159.04, CUDA 13.0" in text
    assert "notes       override: max_cores=1.5" in text
    bare = render_text(gpu_detect(tmp_path, FakeNvml([], init_error="Driver Not Loaded")))
    assert "cuda        none (no CUDA: NVML init failed: Driver Not Loaded)" in bare
    assert "torch       not available" in bare


def test_capability_round_trips_through_json(tmp_path: Path) -> None:
    cap = gpu_detect(tmp_path, two_gpus())
    assert msgspec.json.decode(msgspec.json.encode(cap), type=Capability) == cap


# --------------------------------------------------------------------------- torch


def test_torch_probe_real(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    nvml = FakeNvml([FakeGpu("NVIDIA L4", "GPU-l4", 24 * GIB, 23 * GIB, (8, 9))])
    cap = run_detect(tmp_path, proc_tree(tmp_path), cgroup_tree(tmp_path, {}), nvml=nvml, probe_torch=True)
    assert cap.torch_version is not None and cap.torch_version.startswith("2.")
    assert cap.torch_cuda is False  # this test machine has the CPU build
    assert f"torch: {cap.torch_version} cannot use the 1 GPU NVML sees" in cap.notes


@pytest.mark.parametrize(
    ("outcome", "note"),
    [
        (subprocess.TimeoutExpired("python", 60), "torch: probe timed out after 60 s"),
        (
            subprocess.CompletedProcess([], 1, "", "Traceback\nImportError: libtorch.so"),
            "ImportError: libtorch.so",
        ),
        (subprocess.CompletedProcess([], 0, "hello\n", ""), "torch: unreadable probe output"),
    ],
)
def test_torch_probe_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: object, note: str) -> None:
    def fake_run(*_args: object, **_kwargs: object) -> object:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(capability, "_torch_installed", lambda: True)
    monkeypatch.setattr(capability.subprocess, "run", fake_run)
    cap = run_detect(tmp_path, proc_tree(tmp_path), cgroup_tree(tmp_path, {}), probe_torch=True)
    assert (cap.torch_version, cap.torch_cuda) == (None, None)
    assert any(note in n for n in cap.notes)


def test_torch_probe_output_and_mismatch_notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = '{"version": "2.9.0+cu128", "cuda_available": true, "device_count": 1}'
    seen: dict[str, object] = {}

    def fake_run(*_args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.update(kwargs)
        return subprocess.CompletedProcess([], 0, f"warning: noise\n{report}\n", "")

    monkeypatch.setattr(capability, "_torch_installed", lambda: True)
    monkeypatch.setattr(capability.subprocess, "run", fake_run)
    env = {"CUDA_VISIBLE_DEVICES": "0"}
    cap = run_detect(tmp_path, proc_tree(tmp_path), cgroup_tree(tmp_path, {}), nvml=two_gpus(), env=env,
                     probe_torch=True)  # fmt: skip
    assert (cap.torch_version, cap.torch_cuda) == ("2.9.0+cu128", True)
    assert not any(n.startswith("torch:") for n in cap.notes)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "0"  # the probe sees the GPUs detect reasoned about
    cap = run_detect(tmp_path, proc_tree(tmp_path), cgroup_tree(tmp_path, {}), probe_torch=True)
    assert any("sees 1 CUDA device(s), NVML none" in n for n in cap.notes)
