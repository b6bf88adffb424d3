"""A simulated agent: the real claim protocol around a no-op trainer, cheap enough to run hundreds.

Per ticket it does what :class:`trainfleet.agent.agent.Agent` does minus the
trainer and the artifact: decode the ticket, read the record (the truth), drop
it if stale or already taken, CAS it to ``claimed`` with the ticket's stream
sequence, CAS it to ``completed``, ack. Every job it completes is listed, so a
run can prove that no job was lost or done twice.

It pulls one of these ways. ``fetch`` (the throughput bench's): nats-py's ``fetch(1,
timeout)``, a pull that waits. ``agent`` (the scale bench's): the real agent's pull path,
what :meth:`trainfleet.agent.agent.Agent.tick` does for one class: :class:`TicketPuller`
``no_wait`` pulls (answered at once) while tickets wait, and when the class is empty one pull
parked on it (:meth:`TicketPuller.park`, its own inbox) that waits up to the agent's PARK_S,
so the server hands each new ticket to one waiting agent; a ``409 Exceeded MaxWaiting``
sends it to the doorbell for MAX_WAITING_BACKOFF_S (with jitter), as the agent does.
``doorbell`` (the agent's path before parked pulls, kept to measure beside it): when the
class is empty, a sleep on the doorbell (a core subscription on the class's ticket subject)
that a new ticket rings, after which one pull waits up to RUNG_WAIT_S: every idle agent
pulls on every ticket. ``long`` (the design as first measured): a pull that waits up to
LONG_PULL_S, sent again as soon as it returns, never a no_wait pull. Status answers other
than "nothing waiting" / "expired" are counted per status, not retried in a tight loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from trainfleet.agent.agent import MAX_WAITING_BACKOFF_S, PARK_S, PULL_RETRY_S, RUNG_WAIT_S
from trainfleet.broker import jsapi
from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import ConsumerUnavailable
from trainfleet.broker.records import cas
from trainfleet.broker.schema import JobRecord, JobStatus, Ticket, decode, encode
from trainfleet.broker.settings import Settings
from trainfleet.broker.tickets import PULL_TIMEOUT_S, MaxWaitingExceeded, TicketPuller, is_max_waiting

T = TypeVar("T")
PULLS = ("fetch", "agent", "doorbell", "long")
# "long": how long an idle agent's one waiting pull stays parked on the consumer.
LONG_PULL_S = 5.0


@dataclass
class SimAgent:
    """One simulated host with its own connection and one slot."""

    settings: Settings
    host_id: str
    klass: str = "cpu"
    fetch_timeout_s: float = 1.0
    bare: bool = False  # baseline mode: fetch and ack only, no record reads or CASes
    pull: str = "fetch"  # or "agent": the real agent's no_wait and parked pulls (PULLS)
    completed: list[str] = field(default_factory=list)
    dropped: int = 0
    lost_cas: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # pull answers that were not tickets
    errors: Counter[str] = field(default_factory=Counter)  # requests that timed out, tickets handed back
    last_done: float = 0.0  # wall clock of its last completion
    broker: Broker | None = None

    async def connect(self) -> None:
        self.broker = await Broker.connect(self.settings, name=f"sim-{self.host_id}")
        names = self.broker.names
        if self.pull == "long":
            self._puller = await TicketPuller(self.broker).start()
        elif self.pull in ("agent", "doorbell"):
            self._puller = await TicketPuller(self.broker).start()
            self._bell = asyncio.Event()
            self._rung = False

            async def ring(msg: Msg) -> None:
                self._rung = True
                self._bell.set()

            self._ring_cb = ring
            self._bell_sub = None
            if self.pull == "doorbell":
                await self.broker.nc.subscribe(names.jobs_subject(self.klass), cb=ring)
        else:
            durable = names.consumer(self.klass)
            self._sub = await self.broker.js.pull_subscribe_bind(durable=durable, stream=names.jobs_stream)

    async def close(self) -> None:
        if self.broker is not None:
            await self.broker.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve tickets one at a time until ``stop`` is set."""
        if self.pull == "agent":
            return await self._run_parked(stop)
        if self.pull in ("doorbell", "long"):
            return await self._run_as_agent(stop)
        while not stop.is_set():
            try:
                msgs = await self._sub.fetch(1, timeout=self.fetch_timeout_s)
            except nats.errors.TimeoutError:
                continue
            except nats.errors.ConnectionClosedError:
                return
            for msg in msgs:
                await self._serve_guarded(msg)

    async def _run_as_agent(self, stop: asyncio.Event) -> None:
        assert self.broker is not None
        durable = self.broker.names.consumer(self.klass)
        long = self.pull == "long"
        while not stop.is_set():
            if long:
                wait_s = LONG_PULL_S
            else:
                rung, self._rung = self._rung, False
                self._bell.clear()
                wait_s = RUNG_WAIT_S if rung else 0.0
            try:
                msg = await self._puller.pull(durable, wait_s)
            except ConsumerUnavailable as exc:
                self.statuses[str(exc).split(": ", 1)[-1][:3]] += 1
                await asyncio.sleep(PULL_RETRY_S)
                continue
            except nats.errors.TimeoutError:
                self.statuses["no answer"] += 1
                continue
            except nats.errors.ConnectionClosedError:
                return
            if msg is None and long:
                continue
            if msg is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._bell.wait(), self.fetch_timeout_s)
                continue
            await self._serve_guarded(msg)

    async def _run_parked(self, stop: asyncio.Event) -> None:
        """The real agent's rounds for one class and one slot: a no_wait pull; when the class is
        empty, one pull parked on it until it brings a ticket or expires; on 409 Exceeded
        MaxWaiting, the doorbell (and a rung pull) for a jittered while."""
        assert self.broker is not None
        durable = self.broker.names.consumer(self.klass)
        answers: asyncio.Queue[Msg] = asyncio.Queue()
        no_park_until = 0.0

        async def land(_durable: str, msg: Msg) -> None:
            if stop.is_set() and jsapi.status_of(msg) is None:
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak()  # stopping: another agent's at once
                return
            answers.put_nowait(msg)

        try:
            while not stop.is_set():
                rung, self._rung = self._rung, False
                self._bell.clear()
                try:
                    msg = await self._puller.pull(durable, RUNG_WAIT_S if rung else 0.0)
                except MaxWaitingExceeded:
                    self.statuses["409 max waiting"] += 1
                    no_park_until = time.monotonic() + MAX_WAITING_BACKOFF_S * random.uniform(0.5, 1.5)
                    msg = None
                except ConsumerUnavailable as exc:
                    self.statuses[str(exc).split(": ", 1)[-1][:3]] += 1
                    await asyncio.sleep(PULL_RETRY_S)
                    continue
                except nats.errors.TimeoutError:
                    self.statuses["no answer"] += 1
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                if msg is not None:
                    await self._serve_guarded(msg)
                    continue
                if time.monotonic() < no_park_until:  # the doorbell, as the agent's fallback
                    await self._ring_on(True)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._bell.wait(), self.fetch_timeout_s)
                    continue
                await self._ring_on(False)
                await self._puller.park(durable, PARK_S, land)
                no_park_until = await self._parked_answer(answers, no_park_until)
        except nats.errors.ConnectionClosedError:
            return
        finally:
            with contextlib.suppress(Exception):
                await self._puller.stop()

    async def _parked_answer(self, answers: asyncio.Queue[Msg], no_park_until: float) -> float:
        """Wait for the parked pull's answer and act on it; until when not to park again."""
        try:
            msg = await asyncio.wait_for(answers.get(), PARK_S + PULL_TIMEOUT_S)
        except TimeoutError:
            return no_park_until
        status = jsapi.status_of(msg)
        if status is None:
            await self._serve_guarded(msg)
        elif is_max_waiting(msg):
            self.statuses["409 max waiting"] += 1
            return time.monotonic() + MAX_WAITING_BACKOFF_S * random.uniform(0.5, 1.5)
        elif status != jsapi.STATUS_TIMEOUT:
            self.statuses[status] += 1
            await asyncio.sleep(PULL_RETRY_S)
        return no_park_until

    async def _ring_on(self, on: bool) -> None:
        """The doorbell subscription exists only while the agent falls back to it."""
        assert self.broker is not None
        if on and self._bell_sub is None:
            self._bell_sub = await self.broker.nc.subscribe(
                self.broker.names.jobs_subject(self.klass), cb=self._ring_cb
            )
        elif not on and self._bell_sub is not None:
            sub, self._bell_sub = self._bell_sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _serve_guarded(self, msg: Msg) -> None:
        """Serve; a ticket it could not serve goes back (NAK with a delay), as an agent's does."""
        try:
            await (self._ack_only(msg) if self.bare else self.serve(msg))
        except (nats.errors.TimeoutError, nats.js.errors.Error, RuntimeError) as exc:
            self.errors[f"ticket handed back ({type(exc).__name__})"] += 1
            with contextlib.suppress(nats.errors.Error):
                await msg.nak(delay=1.0)

    async def _ack_only(self, msg: Msg) -> None:
        await msg.ack()
        self.completed.append(msg.subject)
        self.last_done = time.time()

    async def serve(self, msg: Msg) -> None:
        """Claim, no-op, complete, ack: two compare-and-swaps on the record. A write whose
        answer does not come (a request timeout under load) is read back: it may have landed."""
        assert self.broker is not None
        jobs = self.broker.jobs
        ticket: Ticket = decode(msg.data, Ticket)
        seq = msg.metadata.sequence.stream
        entry = await self._patiently(lambda: jobs.get(ticket.job_id))
        record: JobRecord = decode(entry.value, JobRecord)
        if record.generation != ticket.generation or record.status != JobStatus.PENDING:
            self.dropped += 1  # stale or a duplicate: the record says someone has (had) it
            await msg.ack()
            return
        now = time.time()
        claimed = record.evolve(
            status=JobStatus.CLAIMED,
            claimed_by=self.host_id,
            attempt=record.attempt + 1,
            claimed_at=now,
            heartbeat_at=now,
            started_at=now,
            ticket_seq=seq,
        )
        revision = await self._write(claimed, entry.revision or 0)
        if revision is None:
            self.lost_cas += 1
            await msg.ack()
            return
        done = claimed.evolve(status=JobStatus.COMPLETED, finished_at=time.time())
        if await self._write(done, revision) is not None:
            self.completed.append(ticket.job_id)
            self.last_done = time.time()
        else:
            self.lost_cas += 1
        await msg.ack()

    async def _write(self, record: JobRecord, revision: int, tries: int = 10) -> int | None:
        """CAS ``record`` on ``revision``: its new revision, or None when another write won. A
        timed-out CAS is read back (counted in ``errors``): landed, lost, or tried again."""
        assert self.broker is not None
        jobs = self.broker.jobs
        for _ in range(tries):
            try:
                return await cas(self.broker, record, revision)
            except nats.errors.TimeoutError:
                self.errors["CAS timed out"] += 1
            entry = await self._patiently(lambda: jobs.get(record.job_id))
            if entry.value == encode(record):
                return entry.revision
            if (entry.revision or 0) != revision:
                return None
        raise RuntimeError(f"{self.host_id}: {record.job_id[:12]} could not be written in {tries} tries")

    async def _patiently(self, read: Callable[[], Awaitable[T]], tries: int = 10) -> T:
        for _ in range(tries - 1):
            try:
                return await read()
            except nats.errors.TimeoutError:
                self.errors["read timed out"] += 1
        return await read()


async def connect_agents(
    settings: Settings,
    count: int,
    *,
    first: int = 0,
    bare: bool = False,
    pull: str = "fetch",
    connect_concurrency: int = 50,
) -> list[SimAgent]:
    """``count`` connected simulated agents, named sim-<first>… ."""
    agents = [SimAgent(settings, f"sim-{first + i:04d}", bare=bare, pull=pull) for i in range(count)]
    sem = asyncio.Semaphore(connect_concurrency)

    async def connect(agent: SimAgent) -> None:
        async with sem:
            await agent.connect()

    await asyncio.gather(*(connect(a) for a in agents))
    return agents


async def drive(agents: list[SimAgent], done: Callable[[], Awaitable[bool]], poll_s: float = 0.01) -> float:
    """Run ``agents`` until ``done()``; the seconds that took. The agents are closed after."""
    stop = asyncio.Event()
    started = time.perf_counter()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents]
    try:
        while not await done():
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(poll_s)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        for agent, result in zip(agents, await asyncio.gather(*tasks, return_exceptions=True), strict=True):
            if isinstance(result, BaseException):
                agent.errors[f"agent stopped ({type(result).__name__}: {result})"[:120]] += 1
        for agent in agents:
            with contextlib.suppress(Exception):
                await agent.close()
    return elapsed


async def run_agents(
    settings: Settings,
    count: int,
    total: int,
    *,
    bare: bool = False,
    pull: str = "fetch",
    connect_concurrency: int = 50,
) -> tuple[float, list[SimAgent]]:
    """Connect ``count`` simulated agents, then time how long they take to finish ``total`` tickets."""
    agents = await connect_agents(settings, count, bare=bare, pull=pull, connect_concurrency=connect_concurrency)

    async def finished() -> bool:
        return sum(len(a.completed) for a in agents) >= total

    return await drive(agents, finished), agents
