"""Job records: the jobs KV bucket, the source of truth for every job's state.

Every state change is a compare-and-swap on the record's KV revision (:func:`cas`);
:func:`update_record` is the one read → change → CAS loop that retries a lost CAS
on a fresh read. Records are created by the controller (``sync``), claimed and
renewed by the agent that holds them, cancelled and requeued by the controller.
:func:`job_history` (over :func:`transitions`) is a record's kept revisions with the
heartbeat-only ones collapsed, as ``trainfleet show`` and the monitor show them.

Roles: the controller creates and CASes records; an agent CASes the records it
claims or holds; operators and viewers only read (get, load, watch, history). The
controller's reconcile reads through a :class:`RecordCache` (a KV watch under the
controller's own role: an ephemeral consumer of the bucket's stream, as any reader may).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from trainfleet.broker import kv
from trainfleet.broker.errors import TRANSIENT, Conflict, JobNotFound, SchemaError
from trainfleet.broker.schema import SCHEMA_VERSION, JobRecord, JobStatus, decode, encode

if TYPE_CHECKING:
    from trainfleet.broker.connection import Broker

log = logging.getLogger("trainfleet.records")

# Retry pause after a transient error inside update_record's patience.
TRANSIENT_RETRY_S = 0.25


@dataclass(frozen=True)
class Stored:
    """A record as read, with the KV revision a compare-and-swap must name."""

    record: JobRecord
    revision: int


# -- read ---------------------------------------------------------------------
async def get_record(broker: Broker, job_id: str) -> Stored:
    """The record of ``job_id`` (JobNotFound when there is none; SchemaError when unreadable)."""
    try:
        entry = await broker.jobs.get(job_id)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError) as exc:
        raise JobNotFound(f"no job {job_id}") from exc
    return Stored(decode(entry.value, JobRecord), entry.revision or 0)


async def load_records(broker: Broker) -> dict[str, Stored]:
    """Every readable job record with its KV revision (unreadable ones are logged and skipped)."""
    out: dict[str, Stored] = {}
    for entry in await kv.snapshot(broker.jobs):
        try:
            out[entry.key] = Stored(decode(entry.value, JobRecord), entry.revision or 0)
        except SchemaError as exc:
            log.warning("job record %s is unreadable: %s", entry.key, exc)
    return out


T = TypeVar("T")


async def load_as(broker: Broker, kind: type[T]) -> dict[str, tuple[T, int]]:
    """Every readable job record decoded as ``kind`` (a Struct of some of JobRecord's fields:
    the rest are skipped, not kept), with its KV revision; unreadable ones are logged and
    skipped. For reading every record in one go when only a few fields matter."""
    decoder = msgspec.json.Decoder(kind)
    out: dict[str, tuple[T, int]] = {}

    def keep(d: kv.Delivery) -> None:
        if d.operation is not None:
            out.pop(d.key, None)
            return
        try:
            out[d.key] = (decoder.decode(d.value), d.revision)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            out.pop(d.key, None)
            log.warning("job record %s is unreadable: %s", d.key, exc)

    await kv.read_latest(broker.js, broker.names.jobs_bucket, keep)
    return out


async def job_ids(broker: Broker) -> set[str]:
    """Every live key of the jobs bucket, without reading the records."""
    return {entry.key for entry in await kv.snapshot(broker.jobs, meta_only=True)}


# -- the controller's record cache ----------------------------------------------
class RecordView(msgspec.Struct, kw_only=True, gc=False):
    """The fields of a job record reconcile looks at, with the KV revision it was read at.

    A hint, never a basis for a write: every repair re-reads the record (or CASes on
    ``revision``). Decoded straight from the stored JSON (the other fields are skipped),
    so 100k of them are a few tens of MiB, not the records' hundreds."""

    job_id: str
    status: JobStatus = JobStatus.PENDING
    generation: int = 1
    klass: str = "cpu"
    claimed_at: float | None = None
    heartbeat_at: float | None = None
    priority: int = 0
    offered: tuple[str, ...] = ()
    queued_at: float = 0.0
    fallback_class: str | None = None
    ticket_seq: int | None = None
    schema_version: int = SCHEMA_VERSION
    revision: int = 0

    def lease_expired(self, lease_s: float, now: float | None = None) -> bool:
        last = self.heartbeat_at or self.claimed_at or 0.0
        return ((now if now is not None else time.time()) - last) > lease_s


_view_decoder = msgspec.json.Decoder(RecordView)
# Resync when the watch has not caught up with the bucket this long after being asked to.
CACHE_CATCH_UP_S = 2.0
CACHE_LOAD_TIMEOUT_S = 30.0


class RecordCache:
    """Every job record that is not finished, as :class:`RecordView`, kept current by a KV
    watch (:class:`kv.LatestWatch`) instead of a read of every record per reconcile pass.

    :meth:`current` answers only from a watch it trusts: one that has delivered every write
    up to the bucket's last sequence as of the call (so a record someone else changed
    before the call is seen, as a fresh snapshot would see it). A watch that lost
    deliveries, went silent or does not catch up within CACHE_CATCH_UP_S is replaced by a
    fresh one, which loads every record again (``resyncs`` counts them). Finished records
    (completed, failed, cancelled) are not kept: reconcile has nothing to do for them.
    Unreadable records are logged once and skipped."""

    def __init__(self, broker: Broker, *, catch_up_s: float = CACHE_CATCH_UP_S):
        self.broker = broker
        self.catch_up_s = catch_up_s
        self.views: dict[str, RecordView] = {}
        self.loads = 0  # full loads: the first, and every resync after it
        self._watch: kv.LatestWatch | None = None
        self._intern: dict[str, str] = {}  # one string per class name, not one per record
        self._lock = asyncio.Lock()

    def _on_entry(self, d: kv.Delivery) -> None:
        if d.operation is not None:
            self.views.pop(d.key, None)
            return
        try:
            view = _view_decoder.decode(d.value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.views.pop(d.key, None)
            log.warning("job record %s is unreadable: %s", d.key, exc)
            return
        if view.status.terminal or view.schema_version > SCHEMA_VERSION or view.job_id != d.key:
            self.views.pop(d.key, None)
            return
        intern = self._intern
        view.job_id = d.key  # one string for the key and the view
        view.klass = intern.setdefault(view.klass, view.klass)
        view.offered = tuple(intern.setdefault(k, k) for k in view.offered)
        view.revision = d.revision
        self.views[d.key] = view

    async def _restart(self) -> None:
        await self.stop()
        self.views = {}
        self.loads += 1
        watch = kv.LatestWatch(self.broker.js, self.broker.names.jobs_bucket, self._on_entry)
        await watch.start()
        self._watch = watch
        try:
            await watch.wait_caught_up(CACHE_LOAD_TIMEOUT_S)
        except BaseException:
            await self.stop()
            raise

    async def current(self) -> dict[str, RecordView]:
        """Every unfinished record as of now (the mapping is the cache's own: copy it before
        awaiting anything while iterating over it). One caller at a time (a pass the control
        service asks for may overlap the loop's)."""
        async with self._lock:
            return await self._current()

    async def _current(self) -> dict[str, RecordView]:
        watch = self._watch
        if watch is None or not watch.healthy:
            if watch is not None:
                log.info("record cache: resyncing (%s)", watch.lost)
            await self._restart()
            return self.views
        info = await self.broker.js.stream_info(watch.stream)
        target = info.state.last_seq
        deadline = time.monotonic() + self.catch_up_s
        while watch.last_seq < target and watch.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if watch.last_seq < target or not watch.healthy:
            log.info(
                "record cache: resyncing (%s)",
                watch.lost or f"watch at {watch.last_seq}, bucket at {target} after {self.catch_up_s} s",
            )
            await self._restart()
        return self.views

    async def stop(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await watch.stop()


# -- write --------------------------------------------------------------------
async def create_record(broker: Broker, record: JobRecord) -> bool:
    """Create the record of a new job; False when a record with that id already exists."""
    try:
        await broker.jobs.create(record.job_id, encode(record))
        return True
    except nats.js.errors.KeyWrongLastSequenceError:
        return False


async def cas(broker: Broker, record: JobRecord, revision: int) -> int | None:
    """Compare-and-swap a job record on its KV revision: the new revision, or None when
    another write got there first (the caller re-reads and decides again)."""
    try:
        return await broker.jobs.update(record.job_id, encode(record), last=revision)
    except nats.js.errors.KeyWrongLastSequenceError:
        return None


Change = Callable[[JobRecord], JobRecord | None]


async def update_record(
    broker: Broker,
    job_id: str,
    change: Change,
    *,
    known: Stored | None = None,
    attempts: int | None = 10,
    patience_s: float = 0.0,
) -> Stored | None:
    """Read → ``change`` → CAS, again on a fresh read whenever another write wins.

    ``change(current)`` returns the record to write; ``current`` itself when the record is
    already as wanted (nothing is written); or None to write nothing and give up (then None is
    returned). It may raise to refuse. ``known`` skips the first read (a holder that knows its
    revision). Transient errors (a reconnect, a leader election, an API error) are retried for
    ``patience_s``, on a fresh read. JobNotFound when the record is gone.
    After ``attempts`` lost CASes (None: no limit) :class:`Conflict` is raised. Returns what
    is stored now."""
    deadline = time.monotonic() + patience_s
    lost = 0
    current = known
    while True:
        try:
            if current is None:
                current = await get_record(broker, job_id)
            wanted = change(current.record)
            if wanted is None:
                return None
            if wanted is current.record:
                return current
            revision = await cas(broker, wanted, current.revision)
        except (*TRANSIENT, nats.js.errors.Error):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(TRANSIENT_RETRY_S)
            current = None
            continue
        if revision is not None:
            return Stored(wanted, revision)
        lost += 1
        if attempts is not None and lost >= attempts:
            raise Conflict(f"job {job_id}: record kept changing; try again")
        current = None


# -- watch and history --------------------------------------------------------
@dataclass(frozen=True)
class RecordChange:
    """One write to the jobs bucket as a watch sees it; ``record`` is None for a delete."""

    job_id: str
    revision: int
    record: JobRecord | None


async def watch_records(
    broker: Broker, job_id: str | None = None, *, on_caught_up: Callable[[], None] | None = None
) -> AsyncIterator[RecordChange]:
    """Every record (or the one of ``job_id``) as it is now, then every change as it is written.

    ``on_caught_up`` is called once every record stored at the start has been yielded.
    Unreadable values are logged and skipped. Use under ``contextlib.aclosing`` so the
    watcher's consumer goes when the caller stops."""
    jobs = broker.jobs
    if job_id is None:
        watcher = await jobs.watchall(inactive_threshold=kv.WATCH_INACTIVE_S)
    else:
        watcher = await jobs.watch(job_id, inactive_threshold=kv.WATCH_INACTIVE_S)
    seen = False
    try:
        async for entry in watcher:
            if entry is None:  # nats-py's "caught up" marker: it may come before the stored values
                if on_caught_up is not None and not seen and (job_id is not None or not (await jobs.status()).values):
                    on_caught_up()  # nothing stored
                    on_caught_up = None
                continue
            seen = True
            change = _change(entry)
            if change is not None:
                yield change
            if on_caught_up is not None and not entry.delta:
                on_caught_up()  # that was the last stored value: nothing was pending after it
                on_caught_up = None
    finally:
        try:
            await watcher.stop()
        except Exception as exc:  # the connection may be gone already
            log.debug("stopping a record watch: %r", exc)


def _change(entry: KeyValue.Entry) -> RecordChange | None:
    revision = entry.revision or 0
    if entry.operation is not None or entry.value is None:
        return RecordChange(entry.key, revision, None)
    try:
        return RecordChange(entry.key, revision, decode(entry.value, JobRecord))
    except SchemaError as exc:
        log.debug("watch: record %s is unreadable: %s", entry.key, exc)
        return None


async def record_history(broker: Broker, job_id: str) -> list[KeyValue.Entry]:
    """Every revision of the record the jobs bucket keeps, oldest first ([] for no such job)."""
    return await kv.key_history(broker.js, broker.names.jobs_bucket, job_id)


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


def transition_key(rec: JobRecord) -> tuple[Any, ...]:
    """What a state change changes: two records with the same key differ at most in their
    heartbeat or progress."""
    return (rec.status, rec.claimed_by, rec.attempt, rec.generation, rec.reason, rec.artifact)


def transitions(entries: Iterable[KeyValue.Entry]) -> list[Transition]:
    """The state changes among a key's KV history entries (oldest first): a revision that only
    renewed the heartbeat or the progress of the one before is left out; deletes and unreadable
    values are skipped."""
    out: list[Transition] = []
    last: tuple[Any, ...] | None = None
    for entry in entries:
        if entry.value is None or entry.operation is not None:
            continue
        try:
            rec: JobRecord = decode(entry.value, JobRecord)
        except SchemaError:
            continue
        key = transition_key(rec)
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
    return out


def history_truncated(rows: Sequence[Transition]) -> bool:
    """Whether older revisions were already dropped (the bucket keeps the last few of each key):
    every record is born pending at generation 1, attempt 0, so a history that starts elsewhere
    lost its start."""
    return bool(rows) and (rows[0].status != JobStatus.PENDING.value or rows[0].generation != 1 or rows[0].attempt != 0)


async def job_history(broker: Broker, job_id: str) -> tuple[list[Transition], bool]:
    """The state transitions among the revisions the jobs KV keeps of ``job_id`` (oldest first),
    and whether older revisions were already dropped ([], False for no such job)."""
    rows = transitions(await record_history(broker, job_id))
    return rows, history_truncated(rows)
