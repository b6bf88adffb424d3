"""The fast claim path (issue 17 item 1): an idle agent on its doorbell (the fallback for a class
it cannot park a pull on) reads a job's record and spec when the doorbell brings its ticket,
before the pull that fetches it is answered, and a claim reads the spec beside the record.
What was read ahead is a hint: these tests hold it to that.

Run under the roles: the agent connects as the agent identity (it trusts only the controller's
signing key); the test writes specs signed with that key, and records and tickets as admin.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from trainfleet.agent import claim
from trainfleet.agent.agent import Agent, AgentOptions
from trainfleet.agent.held import HeldJob
from trainfleet.broker import tickets
from trainfleet.broker.connection import Broker
from trainfleet.broker.logs import Outbox
from trainfleet.broker.provision import ensure_consumer
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import JobRecord, JobSpec, JobStatus, encode
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import Signer, job_id_for, put_spec, seal
from trainfleet.broker.tickets import TicketPuller

from .conftest import REPO, as_role, fake_capability, role_env, wait_for


def make_spec(seed: int, command: tuple[str, ...] = ("{python}", "-c", "pass")) -> JobSpec:
    spec = JobSpec(job_id="", name=f"fast-{seed}", model="m", mode="run", hyper={}, data={}, seed=seed, command=command)
    return msgspec.structs.replace(spec, job_id=job_id_for(spec.identity()))


@pytest.fixture
def signer() -> Signer:
    """The controller's signing key (the one agents trust)."""
    return Signer.from_file(role_env("controller")["TRAINFLEET_SIGNING_KEY"])


@pytest.fixture
async def agent(settings: Settings, broker: Broker, tmp_path: Path) -> AsyncIterator[Agent]:
    """An agent, connected as the agent role, whose rounds (tick) the test drives by hand."""
    await ensure_consumer(broker.js, broker.settings, tickets.cpu_class())
    a = Agent(
        as_role(settings, "agent"),
        AgentOptions(host_id="a1", handle_signals=False, workdir=str(tmp_path / "a1")),
        capability=fake_capability("a1"),
    )
    a.broker = await Broker.connect(a.settings)
    a.outbox = Outbox(a.broker)  # (not started: these claims never run their trainer)
    a._init_slots()
    a._puller = await TicketPuller(a.broker).start()
    await a._ring_on_new_tickets()
    # The read-ahead is the doorbell's: these rounds ring it as a class that cannot be parked on
    # (an idle agent parks a pull on each class it can: tests/test_parked_pulls.py).
    a._no_park[tickets.cpu_class()] = float("inf")
    try:
        yield a
    finally:
        await a._puller.stop()
        await a.broker.close()


async def put_signed_job(broker: Broker, spec: JobSpec, signer: Signer, **changes: object) -> JobRecord:
    await put_spec(broker, spec, signer)
    record = JobRecord(job_id=spec.job_id, klass="cpu", offered=("cpu",), **changes)  # type: ignore[arg-type]
    await broker.jobs.create(spec.job_id, encode(record))
    return record


async def pull(agent: Agent) -> object:
    assert agent._puller is not None
    msg = await agent._puller.pull(agent.names.consumer("cpu"), wait_s=2.0)
    assert msg is not None, "the ticket was not delivered"
    return msg


async def read_ahead_settled(agent: Agent) -> claim.ReadAhead:
    ahead = agent.claimer._ahead
    assert ahead is not None, "nothing was read ahead"
    await asyncio.wait({ahead.record, ahead.spec})
    return ahead


async def test_an_idle_agent_reads_the_ringing_job_ahead_and_claims_it_with_that(broker, agent, signer):
    # Given an idle agent (every class empty: it waits on the doorbell)
    steps: list[str] = []
    agent.claimer.on_step = lambda job_id, name: steps.append(name)
    record = await put_signed_job(broker, make_spec(1), signer)
    idle = asyncio.create_task(agent.tick())
    await wait_for(lambda: agent._idle, 5, 0.01, what="the agent waiting on its doorbell")
    # When a ticket is published, the doorbell rings with a copy of it
    await tickets.publish_ticket(broker, record, "cpu")
    assert await asyncio.wait_for(idle, 5) is False
    # Then the next round reads the job's record and spec as soon as its pull is sent, and claims
    # the job with them (no read after the fetch)
    claimed = asyncio.get_running_loop().create_future()
    agent._serve = lambda job: _hold(claimed, job)  # type: ignore[method-assign]
    assert await agent.tick() is True
    job: HeldJob = await asyncio.wait_for(claimed, 5)
    assert job.record.status == JobStatus.CLAIMED and job.record.claimed_by == "a1"
    assert (await get_record(broker, record.job_id)).record.status == JobStatus.CLAIMED
    assert "record read (ahead)" in steps and "spec opened (ahead)" in steps
    assert "record read" not in steps and "spec read" not in steps
    assert steps.index("doorbell: reads started") > steps.index("pull (rung cpu)")
    assert agent.claimer._ahead is None


async def _hold(claimed: asyncio.Future[HeldJob], job: HeldJob) -> None:
    claimed.set_result(job)


async def test_a_spec_replaced_after_an_unused_read_ahead_is_never_served_stale(
    broker, agent, signer, monkeypatch, settings
):
    # (however long a read-ahead may last, only the end of its round drops it here)
    monkeypatch.setattr(claim, "READ_AHEAD_FRESH_S", 3600.0)
    spec = make_spec(2, ("{python}", "-c", "print('old')"))
    record = await put_signed_job(broker, spec, signer)
    read_ahead: list[claim.ReadAhead] = []
    start_reading = agent.claimer.read_ahead

    def reading(doorbell: object) -> None:
        start_reading(doorbell)  # type: ignore[arg-type]
        assert agent.claimer._ahead is not None
        read_ahead.append(agent.claimer._ahead)

    agent.claimer.read_ahead = reading  # type: ignore[method-assign]
    # Given an idle agent whose doorbell rang for a job's ticket
    idle = asyncio.create_task(agent.tick())
    await wait_for(lambda: agent._idle, 5, 0.01, what="the agent waiting on its doorbell")
    await tickets.publish_ticket(broker, record, "cpu")
    await asyncio.wait_for(idle, 5)
    # ...but another agent fetches that ticket first, so the round that read the job's record
    # and spec ahead claims nothing
    other = await Broker.connect(as_role(settings, "agent"))
    try:
        thief = await TicketPuller(other).start()
        stolen = await thief.pull(agent.names.consumer("cpu"), wait_s=2.0)
        assert stolen is not None
        assert await agent.tick() is False
        assert [ahead.job_id for ahead in read_ahead] == [spec.job_id]
        await asyncio.wait({read_ahead[0].record, read_ahead[0].spec})
        # When the controller replaces the spec under the same id (a sync allowing a command
        # change) and the ticket comes back to this agent
        await put_spec(broker, msgspec.structs.replace(spec, command=("{python}", "-c", "print('new')")), signer)
        await stolen.nak()
        await thief.stop()
    finally:
        await other.close()
    msg = await pull(agent)
    job = await agent.claimer.claim(msg)  # type: ignore[arg-type]
    # Then the claim runs the spec stored now, not the one read ahead a round before
    assert isinstance(job, HeldJob)
    assert job.spec.command == ("{python}", "-c", "print('new')")


async def test_a_read_ahead_that_is_too_old_is_not_used(broker, agent, signer, monkeypatch):
    spec = make_spec(3, ("{python}", "-c", "print('old')"))
    record = await put_signed_job(broker, spec, signer)
    await tickets.publish_ticket(broker, record, "cpu")
    msg = await pull(agent)
    agent.claimer.read_ahead(msg)  # type: ignore[arg-type]
    await read_ahead_settled(agent)
    await put_spec(broker, msgspec.structs.replace(spec, command=("{python}", "-c", "print('new')")), signer)
    monkeypatch.setattr(claim, "READ_AHEAD_FRESH_S", 0.05)
    await asyncio.sleep(0.1)
    job = await agent.claimer.claim(msg)  # type: ignore[arg-type]
    assert isinstance(job, HeldJob) and job.spec.command == ("{python}", "-c", "print('new')")


@pytest.mark.parametrize("forgery", ["unsigned", "rogue key"])
async def test_a_tampered_spec_read_ahead_is_still_refused(broker, agent, signer, forgery):
    # Given a job whose stored spec was rewritten by someone without the controller's key
    spec = make_spec(4)
    record = await put_signed_job(broker, spec, signer)
    evil = msgspec.structs.replace(spec, command=("{python}", "-c", "print('pwned')"))
    from trainfleet.broker.specs import new_seed

    await broker.specs.put(spec.job_id, seal(evil, None if forgery == "unsigned" else Signer(new_seed())))
    await tickets.publish_ticket(broker, record, "cpu")
    # When the agent reads it ahead and then claims the ticket
    msg = await pull(agent)
    agent.claimer.read_ahead(msg)  # type: ignore[arg-type]
    await read_ahead_settled(agent)
    assert await agent.claimer.claim(msg) is None  # type: ignore[arg-type]
    # Then it refuses the spec as a claim that read it after the fetch would, and claims nothing
    stored = (await get_record(broker, spec.job_id)).record
    assert stored.status == JobStatus.PENDING and stored.attempt == 0
    assert "spec refused" in (stored.reason or "")


async def test_a_record_cancelled_after_the_read_ahead_is_not_claimed(broker, agent, signer):
    spec = make_spec(5)
    record = await put_signed_job(broker, spec, signer)
    await tickets.publish_ticket(broker, record, "cpu")
    msg = await pull(agent)
    agent.claimer.read_ahead(msg)  # type: ignore[arg-type]
    await read_ahead_settled(agent)
    # Given the record cancelled after it was read ahead (still pending there)
    current = await get_record(broker, spec.job_id)
    await broker.jobs.update(spec.job_id, encode(current.record.evolve(status=JobStatus.CANCELLED)), current.revision)
    # When the agent claims the ticket, its CAS on the read-ahead revision fails, and it judges again
    assert await agent.claimer.claim(msg) is None  # type: ignore[arg-type]
    stored = (await get_record(broker, spec.job_id)).record
    assert stored.status == JobStatus.CANCELLED and stored.attempt == 0 and stored.claimed_by is None


async def test_a_job_held_when_read_ahead_but_pending_at_the_claim_is_claimed(broker, agent, signer):
    # Given a job another agent held with a live lease when this agent read it ahead
    spec = make_spec(6)
    now = time.time()
    record = await put_signed_job(
        broker, spec, signer, status=JobStatus.RUNNING, claimed_by="a2", attempt=1, claimed_at=now, heartbeat_at=now
    )
    await tickets.publish_ticket(broker, record, "cpu")
    msg = await pull(agent)
    agent.claimer.read_ahead(msg)  # type: ignore[arg-type]
    await read_ahead_settled(agent)
    # ...and handed back to pending (same generation) before this agent judges the ticket
    current = await get_record(broker, spec.job_id)
    back = current.record.evolve(status=JobStatus.PENDING, claimed_by=None, claimed_at=None, heartbeat_at=None)
    await broker.jobs.update(spec.job_id, encode(back), current.revision)
    # When it claims: only a verdict to claim may rest on what was read ahead, so the "someone
    # holds it, wait" the read-ahead record says is judged again on a fresh read, and it claims
    job = await agent.claimer.claim(msg)  # type: ignore[arg-type]
    assert isinstance(job, HeldJob) and job.record.attempt == 2
    assert (await get_record(broker, spec.job_id)).record.claimed_by == "a1"


@pytest.mark.slow
def test_the_claim_profile_names_every_step_of_the_claim_and_the_job():
    # (behaviour only: which steps it reports, never how long they took)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--profile", "--samples", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("Where the time goes", 1)[1]
    for step in (
        "pull (parked cpu)",  # the idle agent's parked pull brings the ticket
        "ticket in hand",
        "record read",
        "spec opened",
        "claim CAS answered",
        "claimed seen by the bench's watcher",
        "running CAS answered",
        "trainer spawned",
        "provenance and bundle uploaded",
        "completed seen by the bench's watcher",
    ):
        assert f"| {step}" in table, step
