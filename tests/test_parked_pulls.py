"""Parked pulls (issue 17 item 5): an idle agent leaves one pull waiting on each class it serves,
so a published ticket is handed to one waiting agent instead of ringing every idle agent's
doorbell and drawing a pull from each (the herd: its cost per ticket grew with the fleet).

Roles: the agents run as the agent identity (pulls and acks on the class consumers, record
CASes, spec reads: all in its grants); the test provisions, writes signed specs, records and
tickets, and listens on ``$JS.API.CONSUMER.MSG.NEXT.>`` as admin.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from trainfleet.agent import agent as agent_mod
from trainfleet.broker import tickets
from trainfleet.broker.connection import Broker, settle
from trainfleet.broker.provision import ensure_consumer
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import JobRecord, JobStatus, encode
from trainfleet.broker.specs import Signer, put_spec

from .conftest import FleetHarness, wait_for
from .test_claim_fast import make_spec, put_signed_job, signer  # noqa: F401 (signer: a fixture)


async def waiting(broker: Broker, durable: str) -> int:
    return (await broker.js.consumer_info(broker.names.jobs_stream, durable)).num_waiting or 0


async def ticket_for(broker: Broker, signer: Signer, seed: int) -> JobRecord:  # noqa: F811
    spec = make_spec(seed)
    record = await put_signed_job(broker, spec, signer)
    await tickets.publish_ticket(broker, record, "cpu")
    return record


async def status_of(broker: Broker, job_id: str) -> JobRecord:
    return (await get_record(broker, job_id)).record


async def claimed_by(broker: Broker, job_id: str, timeout_s: float) -> str:
    async def holder() -> str | None:
        rec = await status_of(broker, job_id)
        return rec.claimed_by if rec.status != JobStatus.PENDING and rec.claimed_by else None

    return await wait_for(holder, timeout_s, 0.02, what=f"job {job_id[:12]} claimed")


class PullCounter:
    """Pull requests on one consumer, seen by an admin subscription on the JetStream API."""

    def __init__(self, broker: Broker, durable: str):
        self.broker = broker
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{broker.names.jobs_stream}.{durable}"
        self.bodies: Counter[str] = Counter()
        self.sub = None

    async def start(self) -> PullCounter:
        async def seen(msg) -> None:
            self.bodies["no_wait" if b"no_wait" in msg.data else "waits"] += 1

        self.sub = await self.broker.nc.subscribe(self.subject, cb=seen)
        await settle(self.broker.nc)
        return self

    @property
    def total(self) -> int:
        return sum(self.bodies.values())


@pytest.fixture
async def cpu(broker: Broker) -> str:
    return await ensure_consumer(broker.js, broker.settings, tickets.cpu_class())


async def idle_fleet(fleet: FleetHarness, broker: Broker, durable: str, n: int) -> list[str]:
    hosts = [f"idle-{i}" for i in range(n)]
    for host in hosts:
        fleet.start_agent(host)
        # one at a time, so the order of their waiting pulls is known
        await wait_for(lambda k=len(fleet.agents): _at_least(broker, durable, k), 10, 0.02, what="parked pulls")
    return hosts


async def _at_least(broker: Broker, durable: str, k: int) -> bool:
    return await waiting(broker, durable) >= k


async def test_one_ticket_to_an_idle_fleet_draws_a_bounded_number_of_pulls(fleet, broker, cpu, signer):  # noqa: F811
    # Given 8 idle agents serving cpu, each with a pull parked there
    n = 8
    for i in range(n):
        fleet.start_agent(f"idle-{i}")
    await wait_for(lambda: all(a._idle for a in fleet.agents.values()), 10, 0.02, what="an idle fleet")
    await asyncio.sleep(0.3)
    counter = await PullCounter(broker, cpu).start()
    # When one ticket is published
    record = await ticket_for(broker, signer, 1)
    winner = await claimed_by(broker, record.job_id, 5)
    await asyncio.sleep(1.0)  # what the idle agents do about it (with a doorbell: one pull each)
    # Then one agent took it, and the fleet sent a bounded number of pulls (the winner's
    # re-pull once its job is done), not one per idle agent
    assert winner.startswith("idle-")
    assert counter.total <= 4, counter.bodies
    assert await waiting(broker, cpu) >= n - 1


async def test_a_ticket_on_a_parked_pull_of_a_full_agent_is_naked_to_the_next_waiting_agent_at_once(
    fleet,
    broker,
    cpu,
    signer,  # noqa: F811
):
    # Given agent A parked on cpu first, then its only slot taken (a claim from another class
    # racing the parked pull), and agent B parked after it
    a = fleet.start_agent("full-a")
    await wait_for(lambda: _at_least(broker, cpu, 1), 10, 0.02, what="A parked")
    a.slots.free_cpu = 0

    async def not_yet() -> None:  # the ticket lands before A's round withdraws the pull
        return None

    a._unpark_full = not_yet  # type: ignore[method-assign]
    fleet.start_agent("free-b")
    await wait_for(lambda: _at_least(broker, cpu, 2), 10, 0.02, what="B parked")
    # When a ticket comes: the server hands it to A's pull (the oldest waiting)
    started = time.monotonic()
    record = await ticket_for(broker, signer, 2)
    # Then A NAKs it at once and B claims it, well before a lease / ack-wait (6 s) or a NAK delay
    assert await claimed_by(broker, record.job_id, 5) == "free-b"
    assert time.monotonic() - started < 2.0
    info = await broker.js.consumer_info(broker.names.jobs_stream, cpu)
    assert info.num_redelivered == 1  # A's NAK: the path was taken
    a.slots.free_cpu = 1


async def test_a_stopped_agent_withdraws_its_parked_pull_and_strands_nothing(fleet, broker, cpu, signer):  # noqa: F811
    # Given agent A parked first, then B
    fleet.start_agent("stop-a")
    await wait_for(lambda: _at_least(broker, cpu, 1), 10, 0.02, what="A parked")
    fleet.start_agent("stay-b")
    await wait_for(lambda: _at_least(broker, cpu, 2), 10, 0.02, what="B parked")
    # When A stops (its parked pull, 15 s long, would still be the oldest waiting one)
    await fleet.stop_agent("stop-a")
    started = time.monotonic()
    record = await ticket_for(broker, signer, 3)
    # Then the ticket goes to B at once, on its first delivery: nothing waits for A's pull to
    # expire or for ack-wait
    assert await claimed_by(broker, record.job_id, 5) == "stay-b"
    assert time.monotonic() - started < 2.0
    info = await broker.js.consumer_info(broker.names.jobs_stream, cpu)
    assert info.num_redelivered == 0


async def test_a_crashed_agents_parked_pull_swallows_no_ticket(fleet, broker, cpu, signer):  # noqa: F811
    # Given agent A parked first, then B; A's connection dies without a word (a crash)
    a = fleet.start_agent("crash-a")
    await wait_for(lambda: _at_least(broker, cpu, 1), 10, 0.02, what="A parked")
    fleet.start_agent("live-b")
    await wait_for(lambda: _at_least(broker, cpu, 2), 10, 0.02, what="B parked")
    task = fleet.tasks.pop("crash-a")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert a.broker is not None
    await a.broker.nc.close()
    # When a ticket comes, then B gets it at once (a dead connection's pulls are skipped)
    started = time.monotonic()
    record = await ticket_for(broker, signer, 4)
    assert await claimed_by(broker, record.job_id, 5) == "live-b"
    assert time.monotonic() - started < 2.0


async def test_a_consumer_full_of_waiting_pulls_sends_an_agent_to_its_doorbell_not_away(
    fleet,
    broker,
    settings,
    signer,  # noqa: F811
):
    # Given a cpu consumer that holds one waiting pull at most, and agent A parked on it
    durable = broker.names.consumer("cpu")
    from nats.js.api import AckPolicy, ConsumerConfig

    await broker.js.add_consumer(
        broker.names.jobs_stream,
        ConsumerConfig(
            durable_name=durable,
            filter_subject=broker.names.jobs_subject("cpu"),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.lease_s,
            max_deliver=settings.max_deliver,
            max_waiting=1,
        ),
    )
    fleet.start_agent("first-a")
    await wait_for(lambda: _at_least(broker, durable, 1), 10, 0.02, what="A parked")
    # When B starts: its pull is refused with 409 Exceeded MaxWaiting
    b = fleet.start_agent("second-b")

    def refused() -> bool:
        return "cpu" in b._no_park and "cpu" in b._bells

    await wait_for(refused, 10, 0.02, what="B refused and on its doorbell")
    # Then B knows the consumer exists (it is not skipped as missing) and rings on its doorbell
    assert "cpu" not in b._absent or b._absent["cpu"] <= time.monotonic()
    # and both agents take tickets: the first goes to A's parked pull, the second (A busy for
    # a moment, or B's doorbell) is claimed too, by either, at once
    first = await ticket_for(broker, signer, 5)
    second = await ticket_for(broker, signer, 6)
    holders = {await claimed_by(broker, first.job_id, 5), await claimed_by(broker, second.job_id, 5)}
    assert holders <= {"first-a", "second-b"}


def test_the_parked_pull_expiry_is_bounded():
    assert 5.0 <= agent_mod.PARK_S <= 30.0


async def test_tickets_landing_at_once_on_two_classes_are_both_claimed_when_there_is_room(
    fleet,
    broker,
    cpu,
    signer,  # noqa: F811
):
    # Given an idle agent with two slots, a pull parked on each of its classes (cpu, its host's)
    klass = tickets.host_class("two")
    pinned = await ensure_consumer(broker.js, broker.settings, klass)
    fleet.start_agent("two", cpu_slots=2)
    for durable in (cpu, pinned):
        await wait_for(lambda d=durable: _at_least(broker, d, 1), 10, 0.02, what=f"a pull parked on {durable}")
    # When a ticket comes to each class at the same moment
    first = await put_signed_job(broker, make_spec(31), signer)
    spec = make_spec(32)
    await put_spec(broker, spec, signer)
    second = JobRecord(job_id=spec.job_id, klass=klass, offered=(klass,))
    await broker.jobs.create(spec.job_id, encode(second))
    await asyncio.gather(tickets.publish_ticket(broker, first, "cpu"), tickets.publish_ticket(broker, second, klass))
    # Then the agent claims both, and hands neither back to be delivered again
    assert await claimed_by(broker, first.job_id, 5) == "two"
    assert await claimed_by(broker, second.job_id, 5) == "two"
    for durable in (cpu, pinned):
        info = await broker.js.consumer_info(broker.names.jobs_stream, durable)
        assert info.num_redelivered == 0, durable
