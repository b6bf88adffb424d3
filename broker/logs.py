"""The logs stream: trainer output on ``<prefix>.logs.<job_id>``, progress and lifecycle events
on ``<prefix>.events.<job_id>``.

Agents write both (:func:`publish_log_line`, :func:`publish_event`); operators read a job's
output in stream order (:func:`read_logs`) or follow every job's latest progress live
(:class:`LiveProgress`).

Roles: an agent publishes logs and events of the jobs it holds; operators and viewers read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from trainfleet.broker.errors import TRANSIENT, BrokerError, NotProvisioned
from trainfleet.broker.names import LOG_ATTEMPT_HEADER, LOG_GENERATION_HEADER, LOG_STREAM_HEADER
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import JobRecord, ProgressEvent, encode

if TYPE_CHECKING:
    from trainfleet.broker.connection import Broker

log = logging.getLogger("trainfleet.logs")

# Messages fetched per pull when reading a job's logs.
LOG_BATCH = 256


# -- write (agents) ------------------------------------------------------------------
async def publish_log_line(
    broker: Broker, job_id: str, stream: str, line: bytes, *, attempt: int, generation: int
) -> None:
    """One line of trainer output (best effort: a lost line never fails the job)."""
    headers = {LOG_STREAM_HEADER: stream, LOG_ATTEMPT_HEADER: str(attempt), LOG_GENERATION_HEADER: str(generation)}
    with contextlib.suppress(*TRANSIENT, nats.errors.Error):
        await broker.nc.publish(broker.names.logs_subject(job_id), line, headers=headers)


async def publish_event(broker: Broker, event: ProgressEvent, *, flush: bool = False) -> None:
    """A progress or lifecycle event (best effort); ``flush`` waits until the server has it."""
    with contextlib.suppress(*TRANSIENT, nats.errors.Error):
        await broker.nc.publish(broker.names.events_subject(event.job_id), encode(event))
        if flush:
            await broker.nc.flush(timeout=2)


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
