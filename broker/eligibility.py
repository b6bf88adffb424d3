"""Can this host run this job? Every failing constraint, each with a reason.

Used by the agent after fetching a ticket (a non-empty answer is a delayed
NAK plus a recorded reason) and by ``trainfleet explain`` / ``plan`` for every
registered worker, so both give the same answer. Pure functions: no NATS.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import msgspec

from trainfleet.broker.schema import Capability, JobRecord, JobSpec

# ML modules an agent reports as importable (Capability.modules), for a job's ``requires``.
KNOWN_MODULES = ("torch", "sklearn", "numpy", "scipy", "pandas", "jax", "tensorflow", "xgboost", "lightgbm")


def module_available(name: str) -> bool:
    """Whether ``name`` can be imported here (found on the path, not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def reported_module_check(cap: Capability) -> Callable[[str], bool]:
    """A worker's modules as it reported them; modules outside the known list can't be judged remotely."""

    def has(module: str) -> bool:
        return module in cap.modules or module not in KNOWN_MODULES

    return has


def at_best(cap: Capability) -> Capability:
    """The host with nothing else running: what it could *ever* offer."""
    gpus = tuple(msgspec.structs.replace(g, vram_free_gib=g.vram_total_gib) for g in cap.gpus)
    return msgspec.structs.replace(cap, ram_available_gib=cap.ram_total_gib, gpus=gpus)


def _gpu_reasons(spec: JobSpec, cap: Capability) -> list[str]:
    c = spec.constraints
    reasons = []
    if c.require_cuda and not cap.has_cuda:
        reasons.append(f"require_cuda: host has no CUDA ({cap.cuda_reason or 'no GPU detected'})")
    elif c.min_vram_gib and (c.require_cuda or cap.has_cuda) and cap.vram_free_gib < c.min_vram_gib:
        reasons.append(f"min_vram_gib {c.min_vram_gib:g}: most free VRAM on a GPU is {cap.vram_free_gib:.1f} GiB")
    return reasons


def _host_reasons(spec: JobSpec, host_id: str, excluded: dict[str, str]) -> list[str]:
    c = spec.constraints
    reasons = []
    if c.allowed_hosts and host_id not in c.allowed_hosts:
        reasons.append(f"allowed_hosts {list(c.allowed_hosts)} does not include {host_id}")
    if host_id in c.denied_hosts:
        reasons.append(f"denied_hosts includes {host_id}")
    if host_id in excluded:
        reasons.append(excluded[host_id])
    return reasons


def ineligibility(
    spec: JobSpec,
    cap: Capability,
    *,
    record: JobRecord | None = None,
    has_module: Callable[[str], bool] = module_available,
) -> list[str]:
    """Reasons ``cap`` cannot run ``spec`` (empty: eligible)."""
    c = spec.constraints
    reasons = _gpu_reasons(spec, cap)
    if c.min_ram_gib and cap.ram_available_gib < c.min_ram_gib:
        reasons.append(f"min_ram_gib {c.min_ram_gib:g}: {cap.ram_available_gib:.1f} GiB available")
    if c.min_cores and cap.cores_usable < c.min_cores:
        reasons.append(f"min_cores {c.min_cores:g}: {cap.cores_usable:g} usable")
    reasons += _host_reasons(spec, cap.host_id, record.excluded_hosts if record else {})
    for module in spec.requires:
        if module in cap.modules or (module == "torch" and cap.torch_version is not None):
            continue
        if not has_module(module):
            reasons.append(f"requires python module {module!r}, not installed on this host")
    return reasons
