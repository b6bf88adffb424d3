"""A simulated agent: the real claim protocol around a no-op trainer, cheap enough to run hundreds.

Per ticket it does what :class:`trainfleet.agent.agent.Agent` does minus the
trainer and the artifact: decode the ticket, read the record (the truth), drop
it if stale or already taken, CAS it to ``claimed`` with the ticket's stream
sequence, CAS it to ``completed``, ack. Every job it completes is listed, so a
run can prove that no job was lost or done twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from trainfleet.broker.connection import Broker
from trainfleet.broker.records import cas
from trainfleet.broker.schema import JobRecord, JobStatus, Ticket, decode
from trainfleet.broker.settings import Settings


@dataclass
class SimAgent:
    """One simulated host with its own connection and one slot."""

    settings: Settings
    host_id: str
    klass: str = "cpu"
    fetch_timeout_s: float = 1.0
    bare: bool = False  # baseline mode: fetch and ack only, no record reads or CASes
    completed: list[str] = field(default_factory=list)
    dropped: int = 0
    lost_cas: int = 0
    broker: Broker | None = None

    async def connect(self) -> None:
        self.broker = await Broker.connect(self.settings, name=f"sim-{self.host_id}")
        durable = self.broker.names.consumer(self.klass)
        self._sub = await self.broker.js.pull_subscribe_bind(durable=durable, stream=self.broker.names.jobs_stream)

    async def close(self) -> None:
        if self.broker is not None:
            await self.broker.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve tickets one at a time until ``stop`` is set."""
        while not stop.is_set():
            try:
                msgs = await self._sub.fetch(1, timeout=self.fetch_timeout_s)
            except nats.errors.TimeoutError:
                continue
            except nats.errors.ConnectionClosedError:
                return
            for msg in msgs:
                await (self._ack_only(msg) if self.bare else self.serve(msg))

    async def _ack_only(self, msg: Msg) -> None:
        await msg.ack()
        self.completed.append(msg.subject)

    async def serve(self, msg: Msg) -> None:
        """Claim, no-op, complete, ack: two compare-and-swaps on the record."""
        assert self.broker is not None
        ticket: Ticket = decode(msg.data, Ticket)
        seq = msg.metadata.sequence.stream
        entry = await self.broker.jobs.get(ticket.job_id)
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
        revision = await cas(self.broker, claimed, entry.revision or 0)
        if revision is None:
            self.lost_cas += 1
            await msg.ack()
            return
        done = claimed.evolve(status=JobStatus.COMPLETED, finished_at=time.time())
        if await cas(self.broker, done, revision) is not None:
            self.completed.append(ticket.job_id)
        await msg.ack()


async def run_agents(
    settings: Settings, count: int, total: int, *, bare: bool = False, connect_concurrency: int = 50
) -> tuple[float, list[SimAgent]]:
    """Connect ``count`` simulated agents, then time how long they take to finish ``total`` tickets."""
    agents = [SimAgent(settings, f"sim-{i:04d}", bare=bare) for i in range(count)]
    sem = asyncio.Semaphore(connect_concurrency)

    async def connect(agent: SimAgent) -> None:
        async with sem:
            await agent.connect()

    await asyncio.gather(*(connect(a) for a in agents))
    stop = asyncio.Event()
    started = time.perf_counter()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents]
    try:
        while sum(len(a.completed) for a in agents) < total:
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for agent in agents:
            with contextlib.suppress(Exception):
                await agent.close()
    return elapsed, agents
