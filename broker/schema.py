"""Message and record schemas: frozen msgspec structs, encoded only at the edge.

Every value trainfleet stores in NATS is JSON produced from one of these
structs, so ``nats kv get trainfleet-jobs <id>`` shows something readable and
other-language clients can decode it. Records carry ``schema_version``; a
decoder meeting a newer version refuses it with :class:`SchemaError`.
"""

from __future__ import annotations

import enum
import time
from typing import Any

import msgspec

from trainfleet.broker.errors import SchemaError

# 2: job records hold state only; the spec moved to the specs bucket (broker/specs.py).
SCHEMA_VERSION = 2


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)

    @property
    def held(self) -> bool:
        """A live agent may hold a lease on the job."""
        return self in (JobStatus.CLAIMED, JobStatus.RUNNING)


class Constraints(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    require_cuda: bool = False
    prefer_cuda: bool = False
    min_vram_gib: float = 0.0
    min_ram_gib: float = 0.0
    min_cores: float = 0.0
    allowed_hosts: tuple[str, ...] = ()
    denied_hosts: tuple[str, ...] = ()


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What to train and where it may run; resolved from the manifest."""

    job_id: str
    name: str
    model: str
    mode: str
    hyper: dict[str, Any]
    data: dict[str, Any]
    seed: int
    command: tuple[str, ...]
    priority: int = 0
    constraints: Constraints = Constraints()
    # Python modules the trainer imports (e.g. torch): hosts without them are ineligible.
    requires: tuple[str, ...] = ()
    # Environment variables the model's trainers get (beside the allow-listed ones).
    env: dict[str, str] = {}

    def identity(self) -> dict[str, Any]:
        """The fields the job id hashes: editing name or priority keeps the id."""
        return {
            "model": self.model,
            "mode": self.mode,
            "hyper": self.hyper,
            "data": self.data,
            "train_hosts": sorted(self.constraints.allowed_hosts),
            "seed": self.seed,
        }


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The state of one job, stored in the jobs KV under its id: the source of truth for state.

    It holds no command: what to run is the job's signed spec (broker/specs.py). Every
    change is a compare-and-swap on the KV revision. ``generation`` is bumped by requeue:
    a ticket whose generation differs is stale. ``attempt`` counts claims, so a takeover
    after a lapsed lease is visible.
    """

    job_id: str
    status: JobStatus = JobStatus.PENDING
    generation: int = 1
    attempt: int = 0
    klass: str = "cpu"
    claimed_by: str | None = None
    claimed_at: float | None = None
    heartbeat_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    artifact: str | None = None
    artifact_bytes: int | None = None
    metrics: dict[str, Any] = {}
    last_error: str | None = None
    reason: str | None = None
    # Scheduling, set by the controller from the spec: tickets are published in priority order.
    priority: int = 0
    # Classes ticketed for this generation, and when it became pending (prefer_cuda grace).
    offered: tuple[str, ...] = ()
    queued_at: float = 0.0
    # prefer_cuda: the class the job is also offered on once the grace window has passed.
    fallback_class: str | None = None
    max_attempts: int = 3
    # Stream sequence of the ticket the current holder claimed with: another
    # ticket for a held job is a duplicate and is dropped, not redelivered.
    ticket_seq: int | None = None
    # host id -> why the manifest's host policy (allow_jobs/deny_jobs) excludes it.
    excluded_hosts: dict[str, str] = {}
    progress: dict[str, Any] = {}
    # Where the trainer ran: "cpu" or "gpu:<index> <uuid>" (the CUDA_VISIBLE_DEVICES it got).
    device: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def evolve(self, **changes: Any) -> JobRecord:
        changes.setdefault("updated_at", time.time())
        return msgspec.structs.replace(self, **changes)

    def lease_expired(self, lease_s: float, now: float | None = None) -> bool:
        last = self.heartbeat_at or self.claimed_at or 0.0
        return ((now if now is not None else time.time()) - last) > lease_s


class Ticket(msgspec.Struct, frozen=True, kw_only=True):
    """A hint that a job may be claimable; the record decides."""

    job_id: str
    generation: int
    klass: str
    priority: int = 0
    published_at: float = 0.0
    schema_version: int = SCHEMA_VERSION


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str
    uuid: str = ""
    vram_total_gib: float = 0.0
    vram_free_gib: float = 0.0
    compute_capability: str = ""


class Capability(msgspec.Struct, frozen=True, kw_only=True):
    """What a host can do, as its agent detected it (after manifest overrides)."""

    host_id: str
    cores_physical: int = 1
    cores_logical: int = 1
    cores_usable: float = 1.0
    ram_total_gib: float = 0.0
    ram_available_gib: float = 0.0
    gpus: tuple[GpuInfo, ...] = ()
    cuda_reason: str = ""
    driver_version: str = ""
    cuda_version: str = ""
    torch_version: str | None = None
    torch_cuda: bool | None = None
    python: str = ""
    platform: str = ""
    code_commit: str = ""
    in_container: bool = False
    # Importable ML modules among a known list (see capability.KNOWN_MODULES), for `requires`.
    modules: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def has_cuda(self) -> bool:
        return bool(self.gpus)

    @property
    def vram_total_gib(self) -> float:
        return max((g.vram_total_gib for g in self.gpus), default=0.0)

    @property
    def vram_free_gib(self) -> float:
        return max((g.vram_free_gib for g in self.gpus), default=0.0)


class GpuStat(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU's live telemetry, read from NVML at a worker heartbeat.

    ``index`` is the GPU's position in ``Capability.gpus`` (the CUDA index). A GPU NVML could
    not read this time has ``error`` set and its other readings left at their defaults;
    ``util_pct`` and ``temp_c`` are None when the driver does not report them.
    """

    index: int
    name: str = ""
    uuid: str = ""
    vram_used_gib: float = 0.0
    vram_free_gib: float = 0.0
    vram_total_gib: float = 0.0
    util_pct: float | None = None
    temp_c: float | None = None
    error: str = ""


class WorkerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An agent's entry in the workers KV (the bucket's TTL reaps dead ones)."""

    host_id: str
    capability: Capability
    classes: tuple[str, ...]
    current_jobs: tuple[str, ...] = ()
    state: str = "idle"
    started_at: float = 0.0
    last_seen: float = 0.0
    pid: int = 0
    # Live GPU telemetry, one entry per GPU of the capability (added without a schema bump:
    # readers that predate it ignore the field, and entries without it read as no telemetry).
    # Empty on a host without GPUs (``capability.cuda_reason`` says why) or when NVML could not
    # be read this heartbeat (``gpu_stats_reason`` says why).
    gpu_stats: tuple[GpuStat, ...] = ()
    gpu_stats_reason: str = ""
    schema_version: int = SCHEMA_VERSION


class ProgressEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An event on ``<prefix>.events.<job_id>``: a trainer's progress report (kind
    ``progress``) or the agent's lifecycle marks (``started``, ``finished``)."""

    job_id: str
    kind: str = "progress"
    step: int | None = None
    total: int | None = None
    metrics: dict[str, Any] = {}
    at: float = 0.0
    host: str | None = None
    attempt: int | None = None
    generation: int | None = None
    outcome: str | None = None


_encoder = msgspec.json.Encoder()


def encode(value: msgspec.Struct) -> bytes:
    return _encoder.encode(value)


def decode(data: bytes, kind: type[Any]) -> Any:
    """Decode JSON into ``kind``; anything malformed or too new is a SchemaError."""
    try:
        value = msgspec.json.decode(data, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SchemaError(f"cannot decode {kind.__name__}: {exc}") from exc
    version = getattr(value, "schema_version", SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{kind.__name__} has schema_version {version}; this trainfleet understands "
            f"<= {SCHEMA_VERSION} (upgrade trainfleet)"
        )
    return value
