"""Tickets: the hints on ``<prefix>.jobs.<class>`` that tell agents a job may be claimable.

A ticket names a job and its generation; the record in the jobs KV decides
(records.py). This module owns everything about tickets:

* routing: which capability class a job's ticket goes to (:func:`ticket_class`,
  :func:`eventual_classes`), which classes a host serves (:func:`classes_served`),
  and the VRAM tier ladder behind ``gpu.<tier>``;
* publishing (:func:`publish_ticket`; the controller's sync pipelines its own), reading back what is
  still queued (:func:`scan_tickets`, :func:`get_ticket`; :class:`QueuedTickets` between
  reconcile passes) and deleting (:func:`delete_ticket`);
* pulling, one ticket at a time, from a class's durable consumer (:class:`TicketPuller`).

Roles: the controller publishes, scans and deletes tickets; an agent pulls and acks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from trainfleet.broker import jsapi
from trainfleet.broker.errors import TRANSIENT, BrokerError, ConsumerUnavailable, SchemaError
from trainfleet.broker.names import host_token, is_token
from trainfleet.broker.schema import Capability, JobRecord, JobSpec, Ticket, decode, encode
from trainfleet.broker.settings import seconds_to_ns

if TYPE_CHECKING:
    from trainfleet.broker.connection import Broker

log = logging.getLogger("trainfleet.tickets")

# -- routing --------------------------------------------------------------------
CPU_CLASS = "cpu"
# VRAM ladder (GiB) for gpu.<tier> classes: a job's min_vram_gib rounds up to
# the next rung, so a handful of consumers covers every card size.
VRAM_TIERS_GIB: tuple[int, ...] = (0, 4, 8, 12, 16, 24, 32, 48, 80, 96, 141, 192)


def vram_tier(min_vram_gib: float) -> int:
    """The smallest rung of the ladder that is >= ``min_vram_gib``."""
    for tier in VRAM_TIERS_GIB:
        if tier >= min_vram_gib:
            return tier
    return VRAM_TIERS_GIB[-1]


def tiers_served(vram_total_gib: float) -> list[int]:
    """Tiers a card of this size can serve, biggest first (best fit first)."""
    return sorted((t for t in VRAM_TIERS_GIB if t <= vram_total_gib), reverse=True)


def cpu_class() -> str:
    return CPU_CLASS


def gpu_class(tier: int) -> str:
    return f"gpu.{tier}"


def host_class(host_id: str) -> str:
    """``host.<token>``: a host id's dots become ``=`` (names.host_token), so the class is
    always two subject tokens and two hosts never share one."""
    return f"host.{host_token(host_id)}"


def is_gpu_class(klass: str) -> bool:
    return klass.startswith("gpu.")


def is_host_class(klass: str) -> bool:
    return klass.startswith("host.")


def ticket_class(spec: JobSpec) -> str:
    """The capability class a job's ticket is published under.

    A job pinned to exactly one host goes to that host's class; a CUDA job
    (required or preferred) to the GPU tier its ``min_vram_gib`` rounds up to;
    anything else to the CPU class.
    """
    c = spec.constraints
    if len(c.allowed_hosts) == 1:
        return host_class(c.allowed_hosts[0])
    if c.require_cuda or c.prefer_cuda:
        return gpu_class(vram_tier(c.min_vram_gib))
    return cpu_class()


def eventual_classes(spec: JobSpec, klass: str) -> tuple[str, ...]:
    """Every class a job is offered on in the end: prefer_cuda jobs reach cpu after the grace window."""
    if spec.constraints.prefer_cuda and klass != cpu_class() and not is_host_class(klass):
        return (klass, cpu_class())
    return (klass,)


def offered_classes(record: JobRecord) -> tuple[str, ...]:
    """The classes a record's current generation is ticketed on."""
    return record.offered or (record.klass,)


def missing_classes(record: JobRecord, have: set[tuple[int, str]]) -> list[str]:
    """Offered classes of this generation with no ticket among ``have`` ((generation, class) pairs)."""
    return [k for k in offered_classes(record) if (record.generation, k) not in have]


def classes_served(cap: Capability, *, gpu: bool, cpu: bool) -> list[str]:
    """Classes a host serves, best fit first: its own pinned class, its GPU tiers biggest
    first (``gpu``: it offers GPU slots), then cpu (``cpu``: it takes CPU-only jobs)."""
    out = [host_class(cap.host_id)]
    if gpu:
        out += [gpu_class(t) for t in tiers_served(cap.vram_total_gib)]
    if cpu:
        out.append(cpu_class())
    return out


# -- publish --------------------------------------------------------------------
def ticket_message(
    broker: Broker, record: JobRecord, klass: str, dedupe_suffix: str = ""
) -> tuple[str, bytes, dict[str, str]]:
    """Subject, payload and headers of a ticket for ``record`` on ``klass``. The message id
    lets JetStream drop a re-publish of the same ticket inside its duplicate window."""
    ticket = Ticket(
        job_id=record.job_id,
        generation=record.generation,
        klass=klass,
        priority=record.priority,
        published_at=time.time(),
    )
    msg_id = f"{record.job_id}.{record.generation}.{klass}{dedupe_suffix}"
    return broker.names.jobs_subject(klass), encode(ticket), {jsapi.MSG_ID: msg_id}


async def publish_ticket(broker: Broker, record: JobRecord, klass: str, *, dedupe_suffix: str = "") -> int:
    """Publish a ticket for ``record`` on ``klass``; returns its stream sequence."""
    subject, payload, headers = ticket_message(broker, record, klass, dedupe_suffix)
    ack = await broker.js.publish(subject, payload, headers=headers)
    return ack.seq


async def answer(reply: Awaitable[Any]) -> None:
    """Send an ack, NAK, term or in-progress for a delivered ticket, best effort: a lost answer
    means a redelivery the record will judge."""
    try:
        await reply
    except (*TRANSIENT, nats.errors.Error) as exc:
        log.debug("answering a ticket failed: %r", exc)


def read_ticket(msg: Msg) -> Ticket:
    """The ticket a delivered message carries (SchemaError for garbage or a bad job id)."""
    ticket: Ticket = decode(msg.data, Ticket)
    if not is_token(ticket.job_id):
        raise SchemaError(f"job id {ticket.job_id!r} is not a valid key")
    return ticket


# -- scan, get, delete ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
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
    names = broker.names
    if _batch_get_supported(broker):
        scan = _direct_scan(broker, names.jobs_stream, names.jobs_wildcard)
        return [_ticket_ref(seq, data) async for seq, data in scan]
    out: list[TicketRef] = []
    seq = 1
    while True:
        try:
            msg = await broker.js.get_msg(names.jobs_stream, seq=seq, subject=names.jobs_wildcard, next=True)
        except nats.js.errors.NotFoundError:
            return out
        out.append(_ticket_ref(msg.seq or seq, msg.data or b""))
        seq = (msg.seq or seq) + 1


async def _direct_scan(
    broker: Broker, stream: str, subject: str, *, start: int = 1, batch: int = SCAN_BATCH, timeout_s: float = 10.0
) -> AsyncIterator[tuple[int, bytes]]:
    """(sequence, data) of every message of ``stream`` on ``subject`` from sequence ``start`` on,
    oldest first, read with batched direct gets (nats-server >= 2.11; the stream must allow
    direct gets).

    A batch's answers are collected by the subscription's callback and handed on once its
    end-of-batch status is in (one wait per batch, not one per message)."""
    nc = broker.nc
    inbox = nc.new_inbox()
    loop = asyncio.get_running_loop()
    got: list[tuple[int, bytes]] = []
    done: asyncio.Future[Msg] = loop.create_future()

    async def answer(msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(jsapi.STATUS) if headers else None
        if status is not None or headers is None or jsapi.SEQUENCE not in headers:
            if not done.done():
                done.set_result(msg)
            return
        got.append((int(headers[jsapi.SEQUENCE]), msg.data))

    sub = await nc.subscribe(inbox, cb=answer)
    seq = start
    try:
        while True:
            body = msgspec.json.encode({"seq": seq, "batch": batch, "next_by_subj": subject})
            await nc.publish(jsapi.direct_get(stream), body, reply=inbox)
            try:
                end = await asyncio.wait_for(done, timeout_s)
            except TimeoutError:
                raise nats.errors.TimeoutError from None
            status = jsapi.status_of(end)
            # end of batch, or nothing (more) to read
            if status not in (jsapi.STATUS_END_OF_BATCH, jsapi.STATUS_NOT_FOUND):
                raise BrokerError(f"reading {stream}: {status} {jsapi.description_of(end)}")
            answers, got[:] = list(got), []
            done = loop.create_future()
            for item in answers:
                yield item
            if status != jsapi.STATUS_END_OF_BATCH or not answers:
                return
            seq = answers[-1][0] + 1
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


# A pass of QueuedTickets asks for the jobs stream's interior deletes up to this many; beyond,
# it reads every ticket again (a list that long would cost about what it saves).
DELETED_DETAILS_MAX = 50_000


@dataclass(frozen=True, slots=True)
class StreamState:
    """Where a stream's messages are: every sequence from ``first_seq`` to ``last_seq`` is
    there but those in ``deleted`` (None when the state was read without them)."""

    first_seq: int
    last_seq: int
    num_deleted: int
    created: str
    deleted: frozenset[int] | None = None


async def stream_state(broker: Broker, stream: str, *, deleted: bool = False, timeout_s: float = 10.0) -> StreamState:
    """One stream info request: the stream's sequences, and its interior deletes if asked."""
    body = b'{"deleted_details":true}' if deleted else b""
    try:
        reply = await broker.nc.request(jsapi.stream_info(stream), body, timeout=timeout_s)
    except nats.errors.NoRespondersError:
        raise BrokerError(f"reading {stream}'s state: JetStream does not answer (no responders)") from None
    resp = msgspec.json.decode(reply.data or b"{}")
    if "error" in resp:
        code, description = jsapi.api_error(resp)
        raise BrokerError(f"reading {stream}'s state: {description} (err_code {code})")
    st = resp.get("state") or {}
    listed = st.get("deleted")
    return StreamState(
        first_seq=int(st.get("first_seq") or 0),
        last_seq=int(st.get("last_seq") or 0),
        num_deleted=int(st.get("num_deleted") or 0),
        created=str(resp.get("created") or ""),
        deleted=frozenset(listed or ()) if deleted else None,
    )


class QueuedTickets:
    """The tickets the jobs stream still holds, kept between the controller's reconcile passes.

    Each pass reads the stream's state (one stream info: its first and last sequence, and its
    interior deletes when it has some) and only the tickets published since the pass before:
    what was acked or deleted meanwhile is dropped by its sequence. Every ticket is read again
    (as :func:`scan_tickets` does) on the first pass, when the stream was made anew, on servers
    without batched direct gets, and past DELETED_DETAILS_MAX interior deletes. ``reads``
    counts how the passes read ("all", "new").

    Role: controller (stream info and direct gets on the jobs stream)."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self._refs: dict[int, TicketRef] = {}
        self._last_seq = 0
        self._created: str | None = None
        self.reads: dict[str, int] = {"all": 0, "new": 0}

    async def current(self) -> list[TicketRef]:
        """Every queued ticket, in stream order, as of this call."""
        names = self.broker.names
        stream = names.jobs_stream
        state = await stream_state(self.broker, stream)
        if 0 < state.num_deleted <= DELETED_DETAILS_MAX:
            state = await stream_state(self.broker, stream, deleted=True)
        follows = (
            self._created == state.created
            and state.last_seq >= self._last_seq
            and (state.num_deleted == 0 or state.deleted is not None)
            and _batch_get_supported(self.broker)
        )
        if not follows:
            refs = await scan_tickets(self.broker)
            self._refs = {ref.seq: ref for ref in refs}
            self._last_seq = max(state.last_seq, refs[-1].seq if refs else 0)
            self._created = state.created
            self.reads["all"] += 1
            return refs
        gone = state.deleted or frozenset()
        first = state.first_seq
        # (ticket sequences only grow: dropping some keeps the rest in stream order)
        refs = {seq: ref for seq, ref in self._refs.items() if seq >= first and seq not in gone}
        if state.last_seq > self._last_seq:
            async for seq, data in _direct_scan(self.broker, stream, names.jobs_wildcard, start=self._last_seq + 1):
                refs[seq] = _ticket_ref(seq, data)
        self._last_seq = max(state.last_seq, next(reversed(refs), 0))
        self._refs = refs
        self.reads["new"] += 1
        return list(refs.values())


async def get_ticket(broker: Broker, seq: int) -> TicketRef | None:
    """The ticket at stream sequence ``seq`` (None when it is gone: acked or deleted)."""
    try:
        raw = await broker.js.get_msg(broker.names.jobs_stream, seq)
    except nats.js.errors.NotFoundError:
        return None
    return _ticket_ref(seq, raw.data or b"")


async def delete_ticket(broker: Broker, seq: int) -> bool:
    """Remove the ticket at ``seq``; False when it was gone already."""
    try:
        await broker.js.delete_msg(broker.names.jobs_stream, seq)
        return True
    except nats.js.errors.NotFoundError:
        return False


# -- pull -----------------------------------------------------------------------
NO_WAIT_ONE = b'{"batch":1,"no_wait":true}'
# A no_wait pull is answered within a round trip; no answer this long means the server is gone.
PULL_TIMEOUT_S = 5.0


class MaxWaitingExceeded(BrokerError):
    """A pull refused with ``409 Exceeded MaxWaiting``: the consumer exists but already holds
    as many waiting pulls as it allows. Back off briefly and pull again; not ConsumerUnavailable."""


class TicketPuller:
    """Pulls one ticket at a time from the jobs stream's class consumers with ``no_wait`` requests:
    answered at once either way, so an empty class costs one round trip and never a wait.

    One inbox subscription serves every pull. JetStream delivers a message on the inbox under
    the message's own subject (only status answers carry the inbox as subject), so answers
    cannot be told apart by reply token: pulls run one at a time, and an answer that arrives
    after its pull timed out is taken by the next pull (a late ticket is still a delivered
    ticket, ack-pending on us; a late status is dropped)."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self.inbox = broker.nc.new_inbox()
        self._answers: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Any = None
        self._lock = asyncio.Lock()
        self._parked: dict[str, _Parked] = {}

    async def start(self) -> TicketPuller:
        async def answer(msg: Msg) -> None:
            self._answers.put_nowait(msg)

        self._sub = await self.broker.nc.subscribe(self.inbox, cb=answer)
        return self

    async def stop(self) -> None:
        """Stop listening; tickets that still arrive are never acked and come back after ack-wait.
        Parked pulls are withdrawn first (see :meth:`unpark`)."""
        for durable in list(self._parked):
            await self.unpark(durable)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    async def pull(
        self,
        durable: str,
        wait_s: float = 0.0,
        timeout_s: float = PULL_TIMEOUT_S,
    ) -> Msg | None:
        """The next ticket of consumer ``durable`` if one is waiting now (or, with ``wait_s``,
        arrives within it), else None. Raises ConsumerUnavailable when the consumer is gone or
        changed (ensure it again), and nats.errors.TimeoutError when the server does not answer
        within ``wait_s + timeout_s``."""
        async with self._lock:
            while not self._answers.empty():
                late = self._answers.get_nowait()
                if jsapi.status_of(late) is None:
                    return late
            subject = jsapi.consumer_next(self.broker.names.jobs_stream, durable)
            body = NO_WAIT_ONE if wait_s <= 0 else b'{"batch":1,"expires":%d}' % seconds_to_ns(wait_s)
            await self.broker.nc.publish(subject, body, reply=self.inbox)
            try:
                msg = await asyncio.wait_for(self._answers.get(), wait_s + timeout_s)
            except TimeoutError:
                raise nats.errors.TimeoutError from None
        status = jsapi.status_of(msg)
        if status is None:
            return msg
        if status in (jsapi.STATUS_NOT_FOUND, jsapi.STATUS_TIMEOUT):  # nothing waiting / the request expired
            return None
        if is_max_waiting(msg):
            raise MaxWaitingExceeded(f"consumer {durable}: {status} {jsapi.description_of(msg)}".strip())
        raise ConsumerUnavailable(f"consumer {durable}: {status} {jsapi.description_of(msg)}".strip())

    # -- parked pulls ----------------------------------------------------------
    async def park(self, durable: str, expires_s: float, land: Callable[[str, Msg], Awaitable[None]]) -> bool:
        """Leave one pull of one ticket waiting on consumer ``durable`` for up to ``expires_s``
        (unless one is waiting there already); True when a pull was sent. Its answer (the
        ticket, or a status: 408 expired, 409, 503 no consumer) goes to ``land(durable, msg)``,
        and nowhere else: each parked class has its own inbox, so a pull parked on one class
        never holds up pulls on the others (nor :meth:`pull`'s shared inbox).

        JetStream hands a new ticket to one waiting pull, so K idle agents parked on a class
        cost one delivery per ticket, not K. A pull cannot be cancelled on the server; it is
        withdrawn by :meth:`unpark` (the server skips waiting pulls nobody listens for)."""
        now = time.monotonic()
        parked = self._parked.get(durable)
        if parked is None:
            parked = _Parked(self.broker.nc.new_inbox())

            async def answered(msg: Msg) -> None:
                parked.until = 0.0  # a pull for one ticket ends with its ticket or its status
                await land(durable, msg)

            parked.sub = await self.broker.nc.subscribe(parked.inbox, cb=answered)
            self._parked[durable] = parked
        if self._waiting(parked, now):
            return False
        # Past its expiry (plus a round trip) with no answer, a pull is taken as gone (a
        # reconnect loses waiting pulls): a late answer would still reach ``land``.
        parked.until = now + expires_s + PULL_TIMEOUT_S
        parked.link = self._link()
        subject = jsapi.consumer_next(self.broker.names.jobs_stream, durable)
        body = b'{"batch":1,"expires":%d}' % seconds_to_ns(expires_s)
        await self.broker.nc.publish(subject, body, reply=parked.inbox)
        return True

    def parked(self, durable: str) -> bool:
        """Whether a pull is waiting on ``durable`` (sent, not answered, not past its expiry)."""
        parked = self._parked.get(durable)
        return parked is not None and self._waiting(parked, time.monotonic())

    def _link(self) -> int:
        return int(self.broker.nc.stats.get("reconnects", 0))

    def _waiting(self, parked: _Parked, now: float) -> bool:
        # A reconnect loses the server's waiting pulls (the inbox is subscribed again).
        return parked.until > now and parked.link == self._link()

    def parked_on(self) -> list[str]:
        """The consumers with a parked inbox (a pull waiting there or not)."""
        return list(self._parked)

    async def unpark(self, durable: str) -> None:
        """Withdraw the pull parked on ``durable``: its inbox is drained (unsubscribed, then what
        the server had sent before it saw that still reaches ``land``, which answers it), so the
        server delivers no ticket to that pull from then on."""
        parked = self._parked.pop(durable, None)
        if parked is None or parked.sub is None:
            return
        with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
            await parked.sub.drain()


@dataclass(eq=False)
class _Parked:
    inbox: str
    sub: Any = None
    until: float = 0.0  # monotonic: when the waiting pull is taken as gone; 0.0: none waiting
    link: int = 0  # the connection's reconnect count when it was sent


def is_max_waiting(msg: Msg) -> bool:
    """A pull refused because the consumer already holds its max_waiting pulls (the consumer
    exists: back off and come back, do not treat it as missing)."""
    return jsapi.status_of(msg) == jsapi.STATUS_CONFLICT and "maxwaiting" in jsapi.description_of(msg).lower().replace(
        " ", ""
    )
