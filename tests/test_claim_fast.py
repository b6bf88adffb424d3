"""The claim path (issue 17 item 1): a claim reads the job's spec beside its record, and an idle
agent on its doorbell (the fallback for a class it cannot park a pull on: an idle agent parks a
pull on each class it can, tests/test_parked_pulls.py) claims the ticket that rang it.

Run under the roles: the agent connects as the agent identity (it trusts only the controller's
signing key); the test writes specs signed with that key, and records and tickets as admin.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from trainfleet.agent.agent import Agent, AgentOptions
from trainfleet.agent.held import HeldJob
from trainfleet.broker import tickets
from trainfleet.broker.connection import Broker
from trainfleet.broker.logs import Outbox
from trainfleet.broker.provision import ensure_consumer
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import JobRecord, JobSpec, JobStatus, encode
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import Signer, job_id_for, new_seed, put_spec
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


async def test_an_idle_agent_on_its_doorbell_claims_the_ringing_job_reading_spec_beside_record(broker, agent, signer):
    # Given an idle agent (every class empty: it waits on the doorbell)
    steps: list[str] = []
    agent.claimer.on_step = lambda job_id, name: steps.append(name)
    record = await put_signed_job(broker, make_spec(1), signer)
    idle = asyncio.create_task(agent.tick())
    await wait_for(lambda: agent._idle, 5, 0.01, what="the agent waiting on its doorbell")
    # When a ticket is published, the doorbell rings
    await tickets.publish_ticket(broker, record, "cpu")
    assert await asyncio.wait_for(idle, 5) is False
    assert "doorbell" in steps
    # Then the next round pulls the rung class first and claims the job with its opened spec
    claimed = asyncio.get_running_loop().create_future()
    agent._serve = lambda job: _hold(claimed, job)  # type: ignore[method-assign]
    assert await agent.tick() is True
    job: HeldJob = await asyncio.wait_for(claimed, 5)
    assert job.record.status == JobStatus.CLAIMED and job.record.claimed_by == "a1"
    assert job.spec == make_spec(1)
    assert (await get_record(broker, record.job_id)).record.status == JobStatus.CLAIMED
    assert steps.index("pull (rung cpu)") < steps.index("ticket in hand") < steps.index("record read")
    assert "spec opened" in steps


async def test_a_ticket_whose_spec_is_not_trusted_is_refused_and_its_record_left_pending(broker, agent):
    # A spec signed by a key the agent does not trust (read beside the record) is refused at the
    # first verdict to claim: nothing is claimed, and the ticket goes back for a while.
    spec = make_spec(2)
    await put_signed_job(broker, spec, Signer(new_seed()))
    await tickets.publish_ticket(broker, JobRecord(job_id=spec.job_id, klass="cpu", offered=("cpu",)), "cpu")
    assert await agent.claimer.claim(await pull(agent)) is None  # type: ignore[arg-type]
    stored = (await get_record(broker, spec.job_id)).record
    assert stored.status == JobStatus.PENDING and stored.attempt == 0


async def _hold(claimed: asyncio.Future[HeldJob], job: HeldJob) -> None:
    claimed.set_result(job)


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
