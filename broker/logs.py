"""The logs stream: trainer output on ``<prefix>.logs.<job_id>``, progress and lifecycle events
on ``<prefix>.events.<job_id>``.

Agents write both through an :class:`Outbox` (JetStream publishes with acks, buffered and
retried across an election); operators read a job's
output in stream order (:func:`read_logs`) or follow every job's latest progress live
(:class:`LiveProgress`).

Roles: an agent publishes logs and events of the jobs it holds; operators and viewers read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from trainfleet.broker import jsapi
from trainfleet.broker.errors import TRANSIENT, BrokerError, NotProvisioned
from trainfleet.broker.names import LOG_ATTEMPT_HEADER, LOG_GENERATION_HEADER, LOG_STREAM_HEADER
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import JobRecord

if TYPE_CHECKING:
    from trainfleet.broker.connection import Broker

log = logging.getLogger("trainfleet.logs")

# Messages fetched per pull when reading a job's logs.
# Empty reads in a row, with messages still to read, before a reader gives up (and says so).
LOG_STALLS = 10
LOG_BATCH = 256


# -- write (agents) ------------------------------------------------------------------
# The outbox holds at most this much that the stream has not acknowledged yet.
OUTBOX_MAX_MESSAGES = 20_000
OUTBOX_MAX_BYTES = 32 * 1024 * 1024
# Messages published at once (pipelined) before waiting for their acks.
OUTBOX_BATCH = 64
OUTBOX_RETRY_S = 0.25
# How long a batch's acks are waited for before it is sent again.
OUTBOX_ACK_TIMEOUT_S = 5.0
OUTBOX_RETRY_MAX_S = 2.0


@dataclass
class _Outgoing:
    subject: str
    data: bytes
    headers: dict[str, str] | None
    essential: bool  # a lifecycle mark: never dropped to make room


class Outbox:
    """Trainer output and events on their way to the logs stream: JetStream publishes, each
    acknowledged by the stream, sent in order by one task, retried across an election.

    Bounded: past OUTBOX_MAX_MESSAGES / OUTBOX_MAX_BYTES the oldest log lines and progress
    reports are dropped (and counted in :attr:`dropped`); lifecycle marks never are."""

    def __init__(self, broker: Broker, *, max_messages: int = OUTBOX_MAX_MESSAGES, max_bytes: int = OUTBOX_MAX_BYTES):
        self.broker = broker
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.dropped = 0
        self._queue: collections.deque[_Outgoing] = collections.deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        # Every message carries an id of its own, so one sent again after a lost ack is
        # dropped by the stream's duplicate window instead of stored twice.
        self._id = uuid.uuid4().hex[:16]
        self._seq = 0

    def start(self) -> Outbox:
        self._task = asyncio.create_task(self._send_forever())
        return self

    def put(self, subject: str, data: bytes, headers: dict[str, str] | None = None, *, essential: bool = False) -> None:
        """Queue one message (never blocks); makes room by dropping the oldest droppable ones."""
        self._seq += 1
        headers = {**(headers or {}), jsapi.MSG_ID: f"{self._id}.{self._seq}"}
        self._queue.append(_Outgoing(subject, data, headers, essential))
        self._bytes += len(data)
        self._make_room()
        self._idle.clear()
        self._wake.set()

    def _make_room(self) -> None:
        if len(self._queue) <= self.max_messages and self._bytes <= self.max_bytes:
            return
        kept: collections.deque[_Outgoing] = collections.deque()
        while self._queue and (len(self._queue) + len(kept) > self.max_messages or self._bytes > self.max_bytes):
            item = self._queue.popleft()
            if item.essential:
                kept.append(item)
                continue
            self._bytes -= len(item.data)
            self.dropped += 1
        self._queue.extendleft(reversed(kept))

    async def flush(self, timeout_s: float) -> bool:
        """Wait until the stream has acknowledged everything queued so far (False: timed out)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout_s: float) -> None:
        """Send what is queued (for up to ``timeout_s``), then stop."""
        await self.flush(timeout_s)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._queue:
            log.warning("%d log line(s) and event(s) not sent at shutdown", len(self._queue))
        if self.dropped:
            log.warning(
                "%d log line(s) and progress report(s) were dropped while the stream was unreachable", self.dropped
            )

    async def _send_forever(self) -> None:
        pause = OUTBOX_RETRY_S
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._queue[i] for i in range(min(OUTBOX_BATCH, len(self._queue)))]
            sent = await self._send(batch)
            for _ in range(sent):
                self._bytes -= len(self._queue.popleft().data)
            if sent < len(batch):  # the stream did not take them all: an election; wait and resend
                await asyncio.sleep(pause)
                pause = min(pause * 2, OUTBOX_RETRY_MAX_S)
            else:
                pause = OUTBOX_RETRY_S

    async def _send(self, batch: list[_Outgoing]) -> int:
        """Publish ``batch`` pipelined; how many from its start the stream acknowledged."""
        js = self.broker.js
        try:
            futures = [await js.publish_async(m.subject, m.data, headers=m.headers) for m in batch]
        except (*TRANSIENT, nats.errors.Error, nats.js.errors.Error) as exc:
            log.debug("outbox: publishing failed: %r", exc)
            return 0
        # An ack lost with a dying leader never comes: wait a bounded time, then send again
        # (the message ids make a second copy of one that did land harmless).
        await asyncio.wait(futures, timeout=OUTBOX_ACK_TIMEOUT_S)
        acked = len(batch)
        for i, future in enumerate(futures):
            if not future.done():
                future.cancel()
                acked = min(acked, i)
            elif future.cancelled() or future.exception() is not None:  # (every exception is retrieved)
                if acked > i:
                    log.debug("outbox: not acknowledged: %r", None if future.cancelled() else future.exception())
                acked = min(acked, i)
        return acked


def log_line_headers(stream: str, *, attempt: int, generation: int) -> dict[str, str]:
    """The headers of one line of trainer output on ``<prefix>.logs.<job_id>``."""
    return {LOG_STREAM_HEADER: stream, LOG_ATTEMPT_HEADER: str(attempt), LOG_GENERATION_HEADER: str(generation)}


# -- read (operators) ----------------------------------------------------------------
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
            attempt=_int_or_none(headers.get(LOG_ATTEMPT_HEADER)),
            generation=_int_or_none(headers.get(LOG_GENERATION_HEADER)),
            stream=headers.get(LOG_STREAM_HEADER, "stdout"),
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
        raise NotProvisioned(f"the logs stream {names.logs_stream} does not exist: run `trainfleet provision`") from exc
    pending = info.num_pending
    current: tuple[int | None, int | None] = (None, None)  # (generation, attempt) of the last line
    finishing = False
    empty_reads = 0
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
                empty_reads = 0
                continue
            if pending > 0:
                # A read came back empty with messages still stored for us (a busy server, a pull
                # that expired): never end there, or a cut log would read as the whole of it.
                pending = (await sub.consumer_info()).num_pending
                empty_reads += 1
                if pending > 0 and empty_reads > LOG_STALLS:
                    raise BrokerError(
                        f"reading the logs of {job_id[:12]} stalled with {pending} messages still to read"
                    )
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
        # Called with every progress event as it arrives (the monitor draws trends with it).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._sub: Any = None

    async def start(self, broker: Broker) -> LiveProgress:
        self._sub = await broker.nc.subscribe(broker.names.events_subject("*"), cb=self._on_event)
        return self

    async def _on_event(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            event = json.loads(msg.data)
            if isinstance(event, dict) and event.get("kind", "progress") == "progress" and event.get("job_id"):
                self.latest[str(event["job_id"])] = event
                for listener in self.listeners:
                    listener(event)

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
