"""Operator queries over a :class:`Broker`: what the CLI, the control service and the monitor show.

Everything here reads NATS directly (the jobs and workers KV, the logs stream, the
artifacts object store), so it works with no controller running. Each function
returns plain JSON-able values: the CLI's ``--json`` output and the service's
replies are these same shapes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import zstandard
from nats.aio.msg import Msg
from nats.js import api
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_STREAM_TEMPLATE

from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import ArtifactError, BrokerError, SchemaError
from trainfleet.broker.schema import JobRecord, JobStatus, WorkerRecord, decode
from trainfleet.controller.store import Stored, get_record, key_history, load_records, load_workers, resolve_job

log = logging.getLogger("trainfleet.controller")

PROVENANCE_NAME = "provenance.json"  # the first member of every bundle (agent/artifacts.py)
PROVENANCE_MAX_CHUNKS = 16  # 2 MiB of bundle at 128 KiB per object-store chunk
LOG_BATCH = 256


# -- status and listings -------------------------------------------------------
def stale_after_s(broker: Broker) -> float:
    """A worker whose entry is older than this is stale (three missed heartbeats)."""
    return broker.settings.heartbeat_s * 3


async def fleet_status(broker: Broker, now: float | None = None) -> dict[str, Any]:
    """Job counts for every state, and which workers are alive or stale."""
    now = time.time() if now is None else now
    records = await load_records(broker)
    workers = await load_workers(broker)
    counts = {s.value: 0 for s in JobStatus}
    for stored in records.values():
        counts[stored.record.status.value] += 1
    alive = [w.host_id for w in workers if now - w.last_seen <= stale_after_s(broker)]
    stale = [w.host_id for w in workers if w.host_id not in alive]
    return {
        "jobs": counts,
        "total": len(records),
        "workers": {"alive": len(alive), "stale": len(stale)},
        "hosts": {"alive": alive, "stale": stale},
    }


def job_row(rec: JobRecord) -> dict[str, Any]:
    """One line of ``trainfleet jobs``."""
    headline = rec.metrics.get("headline") if rec.metrics else None
    duration = (rec.finished_at - rec.started_at) if rec.finished_at and rec.started_at else None
    return {
        "job_id": rec.job_id,
        "name": rec.spec.name,
        "model": rec.spec.model,
        "mode": rec.spec.mode,
        "state": rec.status.value,
        "host": rec.claimed_by,
        "attempts": rec.attempt,
        "generation": rec.generation,
        "priority": rec.spec.priority,
        "duration_s": duration,
        "artifact": rec.artifact,
        "metric": {headline: rec.metrics.get(headline)} if headline else None,
        "progress": rec.progress or None,
        "reason": rec.reason,
        "last_error": rec.last_error,
    }


async def list_jobs(
    broker: Broker, *, state: str | None = None, model: str | None = None, host: str | None = None
) -> list[dict[str, Any]]:
    """Jobs matching every given filter, highest priority first (then by name)."""
    rows = [job_row(s.record) for s in (await load_records(broker)).values()]
    rows = [
        r
        for r in rows
        if (not state or r["state"] == state) and (not model or r["model"] == model) and (not host or r["host"] == host)
    ]
    rows.sort(key=lambda r: (-r["priority"], r["name"], r["job_id"]))
    return rows


async def list_workers(broker: Broker, now: float | None = None) -> list[dict[str, Any]]:
    """Every registered worker with its capability, plus ``age_s`` and ``alive``."""
    now = time.time() if now is None else now
    out = []
    for worker in await load_workers(broker):
        row = msgspec.to_builtins(worker)
        row["age_s"] = max(0.0, now - worker.last_seen)
        row["alive"] = row["age_s"] <= stale_after_s(broker)
        out.append(row)
    return out


async def resolve(broker: Broker, ref: str) -> Stored:
    """A job by full id, unique id prefix or exact name (JobNotFound / AmbiguousJob otherwise)."""
    return resolve_job(await load_records(broker), ref)


# -- history -------------------------------------------------------------------
@dataclass(frozen=True)
class Transition:
    """A revision of a job record that changed more than its heartbeat or progress."""

    revision: int
    at: float
    status: str
    host: str | None
    attempt: int
    generation: int
    reason: str | None


def _transition_key(rec: JobRecord) -> tuple[Any, ...]:
    return (rec.status, rec.claimed_by, rec.attempt, rec.generation, rec.reason, rec.artifact)


async def job_history(broker: Broker, job_id: str) -> tuple[list[Transition], bool]:
    """The state transitions among the revisions the jobs KV keeps (oldest first), and whether
    older revisions were already dropped (the bucket keeps the last ten of each key)."""
    entries = await key_history(broker, broker.jobs, job_id)
    out: list[Transition] = []
    last: tuple[Any, ...] | None = None
    for entry in entries:
        if entry.value is None or entry.operation is not None:
            continue
        try:
            rec: JobRecord = decode(entry.value, JobRecord)
        except SchemaError:
            continue
        key = _transition_key(rec)
        if key == last:
            continue  # a heartbeat or a progress update: same state, same holder
        last = key
        out.append(
            Transition(
                revision=entry.revision or 0,
                at=rec.updated_at,
                status=rec.status.value,
                host=rec.claimed_by,
                attempt=rec.attempt,
                generation=rec.generation,
                reason=rec.reason,
            )
        )
    # Every record is born pending at generation 1: starting elsewhere means revisions were dropped.
    truncated = bool(out) and (
        out[0].status != JobStatus.PENDING.value or out[0].generation != 1 or out[0].attempt != 0
    )
    return out, truncated


# -- provenance ----------------------------------------------------------------
def _first_member(data: bytes) -> dict[str, Any] | None:
    """provenance.json from the start of a tar, or None when ``data`` does not hold it all yet."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            member = tar.firstmember or tar.next()
    except (tarfile.TarError, EOFError):
        return None
    if member is None:
        return None
    if member.name != PROVENANCE_NAME:
        raise ArtifactError(f"bundle does not start with {PROVENANCE_NAME} (first member: {member.name!r})")
    end = member.offset_data + member.size
    if end > len(data):
        return None
    try:
        value = json.loads(data[member.offset_data : end])
    except ValueError as exc:
        raise ArtifactError(f"{PROVENANCE_NAME} is not JSON: {exc}") from exc
    return value if isinstance(value, dict) else {}


async def fetch_provenance(broker: Broker, artifact: str) -> dict[str, Any]:
    """A bundle's provenance.json, read from the object store's first chunk(s) only.

    provenance.json is the bundle's first tar member, so a few KiB of the zstd stream
    hold it: this reads chunk by chunk (the object store's chunk layout is the NATS
    object-store spec) and stops as soon as the member is complete. The whole-bundle
    sha256 is not checked here; ``artifacts get`` verifies it.
    """
    bucket = broker.names.artifacts_bucket
    try:
        info = await broker.artifacts.get_info(artifact)
    except nats.js.errors.Error as exc:
        raise ArtifactError(f"artifact {artifact} is not in the object store") from exc
    stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
    subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid)
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    data = bytearray()
    seq = 1
    for _ in range(PROVENANCE_MAX_CHUNKS):
        try:
            msg = await broker.js.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        try:
            data += decompressor.decompress(msg.data or b"")
        except zstandard.ZstdError as exc:
            raise ArtifactError(f"artifact {artifact} is not a zstd bundle: {exc}") from exc
        found = _first_member(bytes(data))
        if found is not None:
            return found
        seq = (msg.seq or seq) + 1
    raise ArtifactError(f"artifact {artifact}: no complete {PROVENANCE_NAME} at the start of the bundle")


# -- show ----------------------------------------------------------------------
async def job_detail(broker: Broker, ref: str, *, provenance: bool = True) -> dict[str, Any]:
    """``trainfleet show``: the record (spec included), its revision, state history, provenance."""
    stored = await resolve(broker, ref)
    rec = stored.record
    data = msgspec.to_builtins(rec)
    data["revision"] = stored.revision
    history, truncated = await job_history(broker, rec.job_id)
    data["history"] = [asdict(t) for t in history]
    data["history_truncated"] = truncated
    data["provenance"] = None
    data["provenance_error"] = None
    if provenance and rec.artifact:
        try:
            data["provenance"] = await fetch_provenance(broker, rec.artifact)
        except ArtifactError as exc:
            data["provenance_error"] = str(exc)
    return data


# -- logs and events -------------------------------------------------------------
@dataclass(frozen=True)
class LogEntry:
    """One message of a job's logs (a line of trainer output) or events (progress, lifecycle)."""

    seq: int
    at: float
    kind: str  # "log" for trainer output, else the event's kind: "progress", "started", "finished"
    attempt: int | None
    stream: str | None = None  # stdout | stderr, for logs
    line: str | None = None
    event: dict[str, Any] | None = None
    generation: int | None = None  # when the agent stamps it (attempts restart at 1 after a requeue)

    @property
    def run(self) -> tuple[int | None, int | None]:
        """Which run of the job this belongs to: (generation, attempt)."""
        return self.generation, self.attempt

    def to_json(self) -> dict[str, Any]:
        out = {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "attempt": self.attempt,
            "generation": self.generation,
        }
        if self.kind == "log":
            out.update(stream=self.stream, line=self.line)
        else:
            out["event"] = self.event
        return out


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _entry(msg: Msg, logs_subject: str, current: tuple[int | None, int | None]) -> LogEntry:
    meta = msg.metadata
    at = meta.timestamp.timestamp() if meta.timestamp else time.time()
    headers = msg.headers or {}
    if msg.subject == logs_subject:
        return LogEntry(
            seq=meta.sequence.stream,
            at=at,
            kind="log",
            attempt=_int_or_none(headers.get("Trainfleet-Attempt")),
            generation=_int_or_none(headers.get("Trainfleet-Generation")),
            stream=headers.get("Trainfleet-Stream", "stdout"),
            line=msg.data.decode(errors="replace").rstrip("\n"),
        )
    try:
        event = json.loads(msg.data)
        if not isinstance(event, dict):
            raise ValueError("not an object")
    except ValueError:
        event = {"kind": "garbage", "data": msg.data.decode(errors="replace")}
    # Events that do not name their run belong to the run whose output surrounds them.
    attempt, generation = _int_or_none(event.get("attempt")), _int_or_none(event.get("generation"))
    return LogEntry(
        seq=meta.sequence.stream,
        at=at,
        kind=str(event.get("kind") or "progress"),
        event=event,
        attempt=attempt if attempt is not None else current[1],
        generation=generation if generation is not None else current[0],
    )


async def read_logs(
    broker: Broker,
    job_id: str,
    *,
    follow: bool = False,
    events: bool = False,
    attempt: int | None = None,
    poll_s: float = 1.0,
) -> AsyncIterator[LogEntry]:
    """A job's trainer output (and, with ``events``, its progress events) in stream order.

    Reads from the first message the logs stream still holds. Without ``follow`` it stops
    at the end of what is stored; with ``follow`` it keeps reading live until the job's
    record is terminal and nothing more arrives. Use under ``contextlib.aclosing`` so
    the ephemeral consumer is removed when the caller stops early.
    """
    names = broker.names
    logs_subject = names.logs_subject(job_id)
    subjects = [logs_subject, names.events_subject(job_id)] if events else [logs_subject]
    config = api.ConsumerConfig(
        filter_subjects=subjects,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.NONE,
        inactive_threshold=60.0,
        mem_storage=True,
        num_replicas=1,
        description=f"trainfleet logs reader for {job_id[:12]}",
    )
    if follow and (await get_record(broker, job_id)).record.status.terminal:
        follow = False  # a finished job's output is all stored already: read it and stop
    try:
        sub = await broker.js.pull_subscribe(logs_subject, stream=names.logs_stream, config=config)
        info = await sub.consumer_info()
    except nats.js.errors.NotFoundError as exc:
        raise BrokerError(f"the logs stream {names.logs_stream} does not exist: run `trainfleet provision`") from exc
    pending = info.num_pending
    current: tuple[int | None, int | None] = (None, None)  # (generation, attempt) of the last line
    finishing = False
    try:
        while follow or pending > 0:
            try:
                msgs = await sub.fetch(LOG_BATCH, timeout=poll_s)
            except TimeoutError:  # nats.errors.TimeoutError is one
                msgs = []
            except nats.errors.Error as exc:
                raise BrokerError(f"reading the logs of {job_id[:12]} failed: {exc!r}") from exc
            for msg in msgs:
                pending = msg.metadata.num_pending
                entry = _entry(msg, logs_subject, current)
                if entry.kind == "log":
                    current = entry.run
                if attempt is None or entry.attempt == attempt:
                    yield entry
            if msgs:
                continue
            if not follow or finishing:
                return
            # Nothing new: a terminal job gets one more read for lines still on their way.
            finishing = (await get_record(broker, job_id)).record.status.terminal
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await broker.js.delete_consumer(names.logs_stream, info.name)


class LiveProgress:
    """The latest progress event of every job, from a plain subscription to the events subjects.

    Records carry progress only as of their holder's last heartbeat; live views overlay
    these events (the agent relays several a second) with :meth:`apply`.
    """

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self._sub: Any = None

    async def start(self, broker: Broker) -> LiveProgress:
        self._sub = await broker.nc.subscribe(broker.names.events_subject("*"), cb=self._on_event)
        return self

    async def _on_event(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            event = json.loads(msg.data)
            if isinstance(event, dict) and event.get("kind", "progress") == "progress" and event.get("job_id"):
                self.latest[str(event["job_id"])] = event

    def apply(self, rec: JobRecord) -> JobRecord:
        """``rec`` with the newest progress of its current attempt, while it is held."""
        event = self.latest.get(rec.job_id)
        if event is None or not rec.status.held or event.get("attempt") not in (None, rec.attempt):
            return rec
        progress = {k: event.get(k) for k in ("step", "total", "metrics")}
        return msgspec.structs.replace(rec, progress=progress)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


# -- artifacts -----------------------------------------------------------------
async def list_artifacts(broker: Broker) -> list[dict[str, Any]]:
    """Every job with an artifact, then every stored bundle no record points at (an orphan:
    the upload of an agent that lost its lease, or of a job since requeued)."""
    try:
        objects = {o.name: o for o in await broker.artifacts.list(ignore_deletes=True)}
    except nats.js.errors.NotFoundError:
        objects = {}
    rows: list[dict[str, Any]] = []
    referenced: set[str] = set()
    for stored in sorted((await load_records(broker)).values(), key=lambda s: s.record.spec.name):
        rec = stored.record
        if not rec.artifact:
            continue
        referenced.add(rec.artifact)
        obj = objects.get(rec.artifact)
        rows.append(
            {
                "artifact": rec.artifact,
                "job_id": rec.job_id,
                "name": rec.spec.name,
                "host": rec.claimed_by,
                "state": rec.status.value,
                "bytes": obj.size if obj else rec.artifact_bytes,
                "stored": obj is not None,
                "orphan": False,
                "mtime": obj.mtime if obj else None,
            }
        )
    for name, obj in sorted(objects.items()):
        if name not in referenced:
            rows.append(
                {
                    "artifact": name,
                    "job_id": None,
                    "name": None,
                    "host": None,
                    "state": None,
                    "bytes": obj.size,
                    "stored": True,
                    "orphan": True,
                    "mtime": obj.mtime,
                }
            )
    return rows


def worker_summary(worker: WorkerRecord) -> str:
    """``2 cores, 12.0 GiB, 1 GPU`` — for the monitor's workers panel."""
    cap = worker.capability
    gpus = f", {len(cap.gpus)} GPU" if cap.gpus else ""
    return f"{cap.cores_usable:g} cores, {cap.ram_available_gib:.1f} GiB{gpus}"
