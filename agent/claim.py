"""Claiming: turn a fetched ticket into a held job, or answer the ticket.

The ticket is only a hint; the record decides (:func:`judge`): claim it (pending,
or a holder whose lease lapsed), drop it (stale generation, terminal, a duplicate
of the holder's own ticket), or wait (someone holds it: NAK until the lease could
lapse). Before claiming, the agent opens the job's spec (specs bucket) and runs it only when
its signature verifies against a controller key this agent trusts and its identity
hashes to the job id; otherwise it refuses, recording why. A claim is a CAS of the
record to ``claimed`` with ``attempt + 1``; losing the CAS means another write won,
and the record is judged again. An ineligible host declines: it records why (once)
and NAKs with a delay, never a hot loop.

Latency: the spec is read beside the record (one round trip, not two).

Role: agent (reads specs, reads and CASes records, answers the tickets it fetched).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

from nats.aio.msg import Msg

from trainfleet.agent.held import HeldJob, StepHook
from trainfleet.broker import tickets
from trainfleet.broker.connection import Broker
from trainfleet.broker.eligibility import ineligibility
from trainfleet.broker.errors import JobNotFound, SchemaError, UntrustedSpec
from trainfleet.broker.logs import Outbox
from trainfleet.broker.records import Stored, cas, get_record
from trainfleet.broker.schema import Capability, JobRecord, JobSpec, JobStatus, Ticket
from trainfleet.broker.specs import open_spec, read_spec

log = logging.getLogger("trainfleet.agent")

# Reads of a record a claim makes before giving the ticket back (each lost CAS costs one).
CLAIM_ROUNDS = 5
# How long a ticket waits when no slot is free after all (another claim took it meanwhile).
NO_SLOT_NAK_S = 1.0
# An unreadable record (a newer schema) is left for a newer agent this many NAK delays.
UNREADABLE_NAK_FACTOR = 6


class Verdict(enum.Enum):
    CLAIM = "claim"
    DROP = "drop"
    WAIT = "wait"


def judge(
    record: JobRecord, ticket: Ticket, seq: int, *, lease_s: float, held_here: bool, now: float
) -> tuple[Verdict, float]:
    """What a ticket means given the record (the truth): claim it, drop it, or wait (and how long).
    ``held_here``: this agent already runs the job (its own lease, never taken over by itself)."""
    if record.generation != ticket.generation or record.status.terminal:
        return Verdict.DROP, 0.0
    if record.status == JobStatus.PENDING:
        return Verdict.CLAIM, 0.0
    if record.lease_expired(lease_s, now) and not held_here:
        return Verdict.CLAIM, 0.0  # takeover: the holder stopped renewing
    if record.ticket_seq is not None and record.ticket_seq != seq:
        return Verdict.DROP, 0.0  # a duplicate: the holder's own ticket covers the job
    last = record.heartbeat_at or record.claimed_at or now
    return Verdict.WAIT, max(1.0, lease_s - (now - last) + 1.0)


class Seat(Protocol):
    """What a claim needs of the agent it claims for (agent.Agent)."""

    broker: Broker | None
    outbox: Outbox | None

    @property
    def host_id(self) -> str: ...

    def claim_capability(self, spec: JobSpec) -> Capability: ...
    def take_slot(self, record: JobRecord, spec: JobSpec) -> str | None: ...
    def release_slot(self, slot: str) -> None: ...
    def holds(self, job_id: str) -> bool: ...
    def job_workdir(self, job_id: str, attempt: int) -> Path: ...
    def trainer_threads(self) -> int: ...


def _hint(task: asyncio.Task[Any]) -> asyncio.Task[Any]:
    """``task``, whose failure is read by whoever awaits it, or by nobody (a read nobody needed)."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


class Claimer:
    """Claims tickets for one agent (its host id, slots and capability come from the seat)."""

    def __init__(self, seat: Seat):
        self.seat = seat
        self.on_step: StepHook | None = None  # None in service: profiling only

    def step(self, job_id: str, name: str) -> None:
        if self.on_step is not None:
            self.on_step(job_id, name)

    @property
    def broker(self) -> Broker:
        assert self.seat.broker is not None
        return self.seat.broker

    async def _read_spec(self, job_id: str) -> JobSpec:
        """The job's spec, opened (signature, identity): UntrustedSpec, SchemaError or JobNotFound
        say why not."""
        raw = await read_spec(self.broker, job_id)
        self.step(job_id, "spec read")
        spec = open_spec(raw, job_id, self.broker.settings.trust_keys)
        self.step(job_id, "spec opened")
        return spec

    async def claim(self, msg: Msg, now: float | None = None) -> HeldJob | None:
        """The held job for this ticket, or None when the ticket was answered instead."""
        try:
            ticket = tickets.read_ticket(msg)
        except SchemaError as exc:
            log.warning("dropping garbage ticket on %s: %s", msg.subject, exc)
            await tickets.answer(msg.term())
            return None
        self.step(ticket.job_id, "ticket in hand")
        seq = msg.metadata.sequence.stream
        # The spec is read beside the first record read, and opened at the first verdict to claim.
        spec_read = _hint(asyncio.ensure_future(self._read_spec(ticket.job_id)))
        spec: JobSpec | None = None
        for _ in range(CLAIM_ROUNDS):
            judged = await self._judge(msg, ticket, seq, now)
            if judged is None:
                return None  # the ticket was answered
            stored, verdict, delay, at = judged
            if verdict is Verdict.DROP:
                await tickets.answer(msg.ack())
                return None
            if verdict is Verdict.WAIT:
                await tickets.answer(msg.nak(delay=delay))
                return None
            if spec is None:
                spec = await self._open_spec(msg, stored, spec_read)
                if spec is None:
                    return None  # refused: the ticket was answered
            result = await self._try_claim(msg, stored, spec, seq, at)
            if isinstance(result, HeldJob):
                return result
            if result:
                return None  # the ticket was answered (declined or failed)
            # Lost the CAS to another write: re-read and judge again.
        await tickets.answer(msg.nak(delay=self.broker.settings.nak_delay_s))
        return None

    async def _judge(
        self, msg: Msg, ticket: Ticket, seq: int, now: float | None
    ) -> tuple[Stored, Verdict, float, float] | None:
        """The record, the verdict on it, its delay and the time judged by; None when the ticket
        was answered (no such job, or a record this agent cannot read)."""
        settings = self.broker.settings
        try:
            stored = await get_record(self.broker, ticket.job_id)
            self.step(ticket.job_id, "record read")
        except JobNotFound:
            log.warning("dropping ticket for unknown job %s", ticket.job_id)
            await tickets.answer(msg.ack())
            return None
        except SchemaError as exc:
            log.warning("job %s: record unreadable (%s); leaving it for a newer agent", ticket.job_id, exc)
            await tickets.answer(msg.nak(delay=settings.nak_delay_s * UNREADABLE_NAK_FACTOR))
            return None
        at = time.time() if now is None else now
        held_here = self.seat.holds(ticket.job_id)
        verdict, delay = judge(stored.record, ticket, seq, lease_s=settings.lease_s, held_here=held_here, now=at)
        return stored, verdict, delay, at

    async def _open_spec(self, msg: Msg, stored: Stored, spec_read: asyncio.Task[JobSpec]) -> JobSpec | None:
        """The job's spec (read and opened by ``spec_read``) if this agent may run it; else record
        why and put the ticket back for long (an agent trusting other keys may take it)."""
        try:
            return await spec_read
        except (UntrustedSpec, SchemaError, JobNotFound) as exc:
            log.warning("job %s: refusing its spec: %s", stored.record.job_id[:12], exc)
            await self._note(stored, f"spec refused: {exc}")
            await tickets.answer(msg.nak(delay=self.broker.settings.nak_delay_s * UNREADABLE_NAK_FACTOR))
            return None

    async def _try_claim(self, msg: Msg, stored: Stored, spec: JobSpec, seq: int, now: float) -> HeldJob | bool:
        """CAS the record to claimed. Returns the held job, True when the ticket was answered
        (declined, or the job failed for too many attempts), False when another write won."""
        record, revision = stored.record, stored.revision
        capability = self.seat.claim_capability(spec)
        reasons = ineligibility(spec, capability, record=record)
        if reasons:
            await self._decline(msg, stored, reasons)
            return True
        if record.attempt >= record.max_attempts:
            failed = record.evolve(
                status=JobStatus.FAILED,
                finished_at=now,
                claimed_by=None,
                reason=f"gave up after {record.attempt} attempts (max_attempts="
                f"{record.max_attempts}); last error: {record.last_error or 'none'}",
            )
            if await cas(self.broker, failed, revision) is None:
                return False
            await tickets.answer(msg.ack())
            return True
        slot = self.seat.take_slot(record, spec)
        if slot is None:
            await tickets.answer(msg.nak(delay=NO_SLOT_NAK_S))
            return True
        claimed = record.evolve(
            status=JobStatus.CLAIMED,
            claimed_by=self.seat.host_id,
            attempt=record.attempt + 1,
            claimed_at=now,
            heartbeat_at=now,
            ticket_seq=seq,
            reason=None,
            started_at=None,
            progress={},
        )
        self.step(record.job_id, "claim CAS sent")
        new_rev = await cas(self.broker, claimed, revision)
        self.step(record.job_id, "claim CAS answered")
        if new_rev is None:
            self.seat.release_slot(slot)
            return False
        workdir = self.seat.job_workdir(record.job_id, claimed.attempt)
        shutil.rmtree(workdir, ignore_errors=True)
        assert self.seat.outbox is not None
        return HeldJob(
            broker=self.broker,
            outbox=self.seat.outbox,
            host=capability,
            msg=msg,
            spec=spec,
            record=claimed,
            revision=new_rev,
            slot=slot,
            workdir=workdir,
            threads=self.seat.trainer_threads(),
            on_step=self.on_step,
        )

    async def _decline(self, msg: Msg, stored: Stored, reasons: list[str]) -> None:
        """Ineligible: record why (once) and put the ticket back after a delay, never a hot loop."""
        await self._note(stored, "; ".join(reasons))
        await tickets.answer(msg.nak(delay=self.broker.settings.nak_delay_s))

    async def _note(self, stored: Stored, why: str) -> None:
        """Write why this host does not take a pending job into its record (once: not again
        while the same reason stands)."""
        record = stored.record
        reason = f"{self.seat.host_id}: {why}"
        if record.reason != reason and record.status == JobStatus.PENDING:
            await cas(self.broker, record.evolve(reason=reason), stored.revision)
