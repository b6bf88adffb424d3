"""Reading job records and tickets: the few queries the controller and CLI share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from trainfleet.broker.connection import WATCH_INACTIVE_S, Broker
from trainfleet.broker.errors import AmbiguousJob, BrokerError, JobNotFound, SchemaError
from trainfleet.broker.schema import JobRecord, Ticket, WorkerRecord, decode, encode

log = logging.getLogger("trainfleet.controller")


@dataclass(frozen=True)
class Stored:
    record: JobRecord
    revision: int


async def kv_snapshot(kv: KeyValue, timeout_s: float = 10.0, *, meta_only: bool = False) -> list[KeyValue.Entry]:
    """The latest entry of every live key (``meta_only``: keys and revisions, no values).

    nats-py's watcher may emit its "initial values done" marker (None) before the initial
    values themselves, so the marker is not trusted: the snapshot ends at the entry with
    nothing pending after it, and a marker only ends it when the bucket is really empty."""
    if not (await kv.status()).values:
        return []
    watcher = await kv.watchall(meta_only=meta_only, inactive_threshold=WATCH_INACTIVE_S)
    entries: list[KeyValue.Entry] = []
    try:
        while True:
            entry = await watcher.updates(timeout=timeout_s)
            if entry is None:
                if not entries and not (await kv.status()).values:
                    return []  # everything expired or was purged meanwhile
                continue
            if entry.operation is None and entry.value is not None:
                entries.append(entry)
            if not entry.delta:
                return entries
    finally:
        await watcher.stop()


async def load_records(broker: Broker) -> dict[str, Stored]:
    """Every readable job record with its KV revision (unreadable ones are logged and skipped)."""
    out: dict[str, Stored] = {}
    for entry in await kv_snapshot(broker.jobs):
        try:
            out[entry.key] = Stored(decode(entry.value, JobRecord), entry.revision or 0)
        except SchemaError as exc:
            log.warning("job record %s is unreadable: %s", entry.key, exc)
    return out


async def load_workers(broker: Broker) -> list[WorkerRecord]:
    workers: list[WorkerRecord] = []
    for entry in await kv_snapshot(broker.workers):
        try:
            workers.append(decode(entry.value, WorkerRecord))
        except SchemaError as exc:
            log.warning("worker entry %s is unreadable: %s", entry.key, exc)
    return sorted(workers, key=lambda w: w.host_id)


async def get_record(broker: Broker, job_id: str) -> Stored:
    try:
        entry = await broker.jobs.get(job_id)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError) as exc:
        raise JobNotFound(f"no job {job_id}") from exc
    return Stored(decode(entry.value, JobRecord), entry.revision or 0)


def resolve_job(records: dict[str, Stored], ref: str) -> Stored:
    """A job by full id, unique id prefix, or exact name."""
    if ref in records:
        return records[ref]
    by_name = [s for s in records.values() if s.record.spec.name == ref]
    if len(by_name) == 1:
        return by_name[0]
    by_prefix = [s for key, s in records.items() if key.startswith(ref)] if len(ref) >= 4 else []
    matches = {s.record.job_id: s for s in by_name + by_prefix}
    if len(matches) == 1:
        return next(iter(matches.values()))
    if not matches:
        raise JobNotFound(f"no job matches {ref!r} (give a name, an id, or an id prefix of 4+ characters)")
    listed = ", ".join(f"{s.record.job_id[:12]} ({s.record.spec.name})" for s in matches.values())
    raise AmbiguousJob(f"{ref!r} matches {len(matches)} jobs: {listed}; give more of the id")


async def cas(broker: Broker, record: JobRecord, revision: int) -> int | None:
    return await broker.cas_record(record, revision)


def ticket_message(
    broker: Broker, record: JobRecord, klass: str, dedupe_suffix: str = ""
) -> tuple[str, bytes, dict[str, str]]:
    """Subject, payload and headers of a ticket for ``record`` on ``klass``. The message id
    lets JetStream drop a re-publish of the same ticket inside its duplicate window."""
    ticket = Ticket(
        job_id=record.job_id,
        generation=record.generation,
        klass=klass,
        priority=record.spec.priority,
        published_at=time.time(),
    )
    msg_id = f"{record.job_id}.{record.generation}.{klass}{dedupe_suffix}"
    return broker.names.jobs_subject(klass), encode(ticket), {"Nats-Msg-Id": msg_id}


async def publish_ticket(broker: Broker, record: JobRecord, klass: str, *, dedupe_suffix: str = "") -> int:
    """Publish a ticket for ``record`` on ``klass``; returns its stream sequence."""
    subject, payload, headers = ticket_message(broker, record, klass, dedupe_suffix)
    ack = await broker.js.publish(subject, payload, headers=headers)
    return ack.seq


async def publish_tickets(broker: Broker, records: list[JobRecord]) -> None:
    """Tickets for many records, pipelined: one connection keeps them in this order in the stream."""
    futures = []
    for record in records:
        subject, payload, headers = ticket_message(broker, record, record.klass)
        futures.append(await broker.js.publish_async(subject, payload, headers=headers))
    await asyncio.gather(*futures)


async def job_ids(broker: Broker) -> set[str]:
    """Every live key of the jobs bucket, without reading the records."""
    return {entry.key for entry in await kv_snapshot(broker.jobs, meta_only=True)}


@dataclass(frozen=True)
class TicketRef:
    seq: int
    ticket: Ticket | None  # None: garbage


# Tickets read per batched direct get (one request answers with up to this many messages).
SCAN_BATCH = 1000


def _ticket_ref(seq: int, data: bytes) -> TicketRef:
    try:
        return TicketRef(seq, decode(data or b"", Ticket))
    except SchemaError:
        return TicketRef(seq, None)


def _batch_get_supported(broker: Broker) -> bool:
    """Batched direct gets arrived in nats-server 2.11."""
    try:
        version = broker.nc.connected_server_version
        return (version.major, version.minor) >= (2, 11)
    except (AttributeError, ValueError, TypeError):
        return False


async def scan_tickets(broker: Broker) -> list[TicketRef]:
    """Every message still in the jobs stream (unacked tickets), in order.

    Read with batched direct gets, SCAN_BATCH messages per request (a work-queue stream
    admits no second consumer); one get per message on servers older than 2.11."""
    if _batch_get_supported(broker):
        return await _scan_batched(broker)
    names = broker.names
    out: list[TicketRef] = []
    seq = 1
    while True:
        try:
            msg = await broker.js.get_msg(names.jobs_stream, seq=seq, subject=names.jobs_wildcard, next=True)
        except nats.js.errors.NotFoundError:
            return out
        out.append(_ticket_ref(msg.seq or seq, msg.data or b""))
        seq = (msg.seq or seq) + 1


async def _scan_batched(broker: Broker) -> list[TicketRef]:
    return [
        _ticket_ref(seq, data)
        async for seq, _, data in direct_scan(broker, broker.names.jobs_stream, broker.names.jobs_wildcard)
    ]


async def direct_scan(
    broker: Broker, stream: str, subject: str, *, batch: int = SCAN_BATCH, timeout_s: float = 10.0
) -> AsyncIterator[tuple[int, dict[str, str], bytes]]:
    """(sequence, headers, data) of every message of ``stream`` on ``subject``, oldest first,
    read with batched direct gets (nats-server >= 2.11; the stream must allow direct gets)."""
    inbox = broker.nc.new_inbox()
    answers: asyncio.Queue[Msg] = asyncio.Queue()

    async def answer(msg: Msg) -> None:
        answers.put_nowait(msg)

    sub = await broker.nc.subscribe(inbox, cb=answer)
    seq = 1
    try:
        while True:
            body = msgspec.json.encode({"seq": seq, "batch": batch, "next_by_subj": subject})
            await broker.nc.publish(f"$JS.API.DIRECT.GET.{stream}", body, reply=inbox)
            got = 0
            while True:
                try:
                    msg = await asyncio.wait_for(answers.get(), timeout_s)
                except TimeoutError:
                    raise nats.errors.TimeoutError from None
                headers = msg.headers or {}
                status = headers.get("Status")
                if status is not None:
                    if status not in ("204", "404"):  # 204: end of batch; 404: nothing (more) to read
                        raise BrokerError(f"reading {stream}: {status} {headers.get('Description', '')}")
                    break
                seq = int(headers["Nats-Sequence"])
                yield seq, headers, msg.data
                got += 1
                seq += 1
            if status != "204" or got == 0:
                return
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


def _kv_operation(headers: dict[str, str]) -> str | None:
    """DEL or PURGE for a delete mark (a server-placed expiry marker counts as a purge), else None."""
    if "KV-Operation" in headers:
        return headers["KV-Operation"]
    return "PURGE" if "Nats-Marker-Reason" in headers else None


async def key_history(broker: Broker, kv: KeyValue, key: str) -> list[KeyValue.Entry]:
    """Every revision the bucket keeps of ``key``, oldest first ([] when it has none).

    nats-py's ``history()`` can end before the first revision (its "no more" marker races
    the deliveries), so the revisions (a few: the bucket's history) are read one get each."""
    stream, subject = kv._stream, f"{kv._pre}{key}"  # the bucket's stream and the key's subject
    entries: list[KeyValue.Entry] = []
    seq = 1
    while True:
        try:
            msg = await broker.js.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return entries
        seq = msg.seq or seq
        entries.append(
            KeyValue.Entry(
                bucket=kv._name,
                key=key,
                value=msg.data,
                revision=seq,
                delta=None,
                created=None,
                operation=_kv_operation(msg.headers or {}),
            )
        )
        seq += 1
