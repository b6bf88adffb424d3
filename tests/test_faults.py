"""Leases, fencing and faults: nothing lost, nothing trained twice (against a real nats-server)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import nats.js.errors
import pytest

from bench.proxy import LatencyProxy
from trainfleet.agent.agent import Agent, AgentOptions
from trainfleet.broker import artifacts as artifacts_module
from trainfleet.broker.errors import TrainfleetError
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import JobRecord, JobStatus, Ticket, encode
from trainfleet.broker.tickets import scan_tickets
from trainfleet.controller.controller import Controller
from trainfleet.controller.manifest import parse_manifest

from .conftest import (
    KVAudit,
    as_role,
    fake_capability,
    linreg_manifest,
    records,
    role_env,
    stock_artifacts,
    trainer_starts,
    wait_for,
    wait_terminal,
)

LONG = 400_000  # linreg epochs: tens of seconds of real training, longer than any test waits
MEDIUM = 12_000  # a few seconds


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) no longer trains.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


async def wait_state(broker, job_id: str, *states: str, timeout_s: float = 60, **where) -> JobRecord:
    async def check():
        rec = (await records(broker)).get(job_id)
        if rec and rec.status.value in states and all(getattr(rec, k) == v for k, v in where.items()):
            return rec
        return None

    return await wait_for(check, timeout_s, what=f"{job_id[:8]} to be {states} {where}")


def spawn_agent(settings, host_id: str, workdir: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        **role_env("agent"),
        "NATS_URL": settings.url,
        "TRAINFLEET_LEASE_S": str(settings.lease_s),
        "TRAINFLEET_HEARTBEAT_S": str(settings.heartbeat_s),
        "TRAINFLEET_FETCH_TIMEOUT_S": "0.5",
        "TRAINFLEET_NAK_DELAY_S": "0.5",
    }
    with open(workdir / f"{host_id}.log", "ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainfleet.controller.cli",
                "agent",
                "--host-id",
                host_id,
                "--workdir",
                str(workdir / host_id),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def long_job_running(fleet, broker):
    """One long job running on agent a1: (controller, agent, job id, trainer pid)."""
    manifest = linreg_manifest(1, epochs=LONG)
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    agent = fleet.start_agent("a1")
    await wait_state(broker, job_id, "running")
    pid = await wait_for(
        lambda: agent.running.get(job_id) and agent.running[job_id].trainer and agent.running[job_id].trainer.pid,
        10,
        what="the trainer to start",
    )
    return ctl, agent, job_id, pid


async def test_cancelling_a_running_job_stops_its_trainer_and_records_nothing(fleet, broker, settings):
    ctl, agent, job_id, pid = await long_job_running(fleet, broker)
    # When the operator cancels it
    await ctl.cancel(job_id)
    # Then the trainer is gone within one heartbeat (+ the SIGTERM grace)
    await wait_for(
        lambda: not pid_alive(pid), settings.heartbeat_s + settings.term_grace_s + 2, what="the trainer to be stopped"
    )
    await wait_for(lambda: agent.counters["fenced"] == 1, 10, what="the agent to count a fenced job")
    rec = (await records(broker))[job_id]
    assert rec.status == JobStatus.CANCELLED and rec.artifact is None
    assert await scan_tickets(broker) == []  # a cancelled job's ticket is dropped, not redelivered
    assert job_id not in agent.running


async def test_a_record_taken_over_elsewhere_fences_the_old_holder(fleet, broker, settings):
    _, agent, job_id, pid = await long_job_running(fleet, broker)
    # Another agent takes the record over (as after a lapsed lease)
    stored = await get_record(broker, job_id)
    stolen = stored.record.evolve(claimed_by="intruder", attempt=stored.record.attempt + 1)
    await broker.jobs.update(job_id, encode(stolen), last=stored.revision)
    await wait_for(
        lambda: not pid_alive(pid), settings.heartbeat_s + settings.term_grace_s + 2, what="the fenced trainer to stop"
    )
    await wait_for(lambda: agent.counters["fenced"] == 1, 10)
    rec = (await records(broker))[job_id]
    # Nothing the fenced agent did is recorded, and its ticket is left for the new holder
    assert rec.claimed_by == "intruder" and rec.status == JobStatus.RUNNING and rec.artifact is None
    assert len(await scan_tickets(broker)) == 1


async def test_sigterm_hands_a_running_job_back_at_once(fleet, broker, settings, tmp_path):
    # A long lease: if the job waited for it, this test would time out
    fleet.settings = settings = settings.with_(lease_s=300.0, heartbeat_s=1.0, drain_timeout_s=0.5)
    fleet.controller = Controller(as_role(settings, "controller"), handle_signals=False)
    manifest = linreg_manifest(1, epochs=MEDIUM)
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("a1")
    await wait_state(broker, job_id, "running")
    await fleet.stop_agent("a1")
    rec = (await records(broker))[job_id]
    assert rec.status == JobStatus.PENDING and rec.claimed_by is None and "handed back" in (rec.reason or "")
    fleet.start_agent("a2")
    rec = (await wait_terminal(broker, [job_id], timeout_s=60))[job_id]
    assert rec.status == JobStatus.COMPLETED and rec.claimed_by == "a2" and rec.attempt == 2


async def kill_mid_run_then_rescue(fleet, broker, settings, tmp_path, job_id: str):
    """A real agent process starts the job and is SIGKILLed mid-run; an in-process agent comes up."""
    victim = spawn_agent(settings, "victim", tmp_path)
    try:
        await wait_state(broker, job_id, "running", timeout_s=90, claimed_by="victim")
        # The record says running a moment before the trainer is spawned: kill only once it trains.
        await wait_for(lambda: _started_once(broker, job_id), 30, what="the victim's trainer to start")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        victim.kill()
    # The rescuer only gets the ticket after ack-wait (the lease)
    fleet.start_agent("rescuer")
    return (await wait_terminal(broker, [job_id], timeout_s=120))[job_id]


async def _started_once(broker, job_id: str) -> bool:
    return (await trainer_starts(broker, [job_id])).get(job_id) == 1


@pytest.mark.slow
async def test_sigkilled_agent_is_taken_over_after_the_lease(fleet, broker, settings, tmp_path):
    manifest = linreg_manifest(1, epochs=MEDIUM * 2)
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    audit = await KVAudit(broker).start()
    try:
        rec = await kill_mid_run_then_rescue(fleet, broker, settings, tmp_path, job_id)
        assert rec.status == JobStatus.COMPLETED and rec.claimed_by == "rescuer" and rec.attempt == 2
        assert audit.completions() == {(job_id, 1): 1}
        assert (await trainer_starts(broker, [job_id]))[job_id] == 2
    finally:
        await audit.stop()


@pytest.mark.slow
async def test_job_fails_when_its_attempts_are_spent(fleet, broker, settings, tmp_path):
    manifest = linreg_manifest(1, epochs=MEDIUM * 2, extra="[settings]\nmax_attempts = 1\n")
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    rec = await kill_mid_run_then_rescue(fleet, broker, settings, tmp_path, job_id)
    assert rec.status == JobStatus.FAILED and "gave up after 1 attempts" in (rec.reason or "")
    await wait_for(lambda: _no_tickets(broker), 20, what="the ticket to be removed")


async def _no_tickets(broker) -> bool:
    return await scan_tickets(broker) == []


async def test_an_exhausted_ticket_is_removed_and_the_job_reoffered(fleet, broker, settings):
    # Given a consumer that gives up after 2 deliveries and an agent that can never run the job
    settings = settings.with_(max_deliver=2)
    fleet.settings = settings
    fleet.controller = Controller(as_role(settings, "controller"), handle_signals=False)
    manifest = linreg_manifest(1, job_extra="min_ram_gib = 4096\n")
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    first_seq = (await scan_tickets(broker))[0].seq
    fleet.start_agent("small")

    # Then the max-deliveries advisory makes the controller drop that ticket and publish a fresh one
    async def reoffered():
        seqs = [t.seq for t in await scan_tickets(broker)]
        return seqs and first_seq not in seqs

    await wait_for(reoffered, 60, what="the exhausted ticket to be replaced")
    rec = (await records(broker))[job_id]
    assert rec.status == JobStatus.PENDING and "min_ram_gib" in (rec.reason or "")


async def test_exhausted_ticket_of_a_job_with_no_attempts_left_fails_it(broker, settings):
    ctl = Controller(as_role(settings, "controller"), handle_signals=False)
    await ctl.start()
    try:
        manifest = linreg_manifest(1, extra="[settings]\nmax_attempts = 2\n")
        await ctl.sync(manifest)
        job_id = manifest.jobs[0].job_id
        stored = await get_record(broker, job_id)
        seq = (await scan_tickets(broker))[0].seq
        spent = stored.record.evolve(
            status=JobStatus.RUNNING,
            attempt=2,
            claimed_by="gone",
            ticket_seq=seq,
            heartbeat_at=time.time() - 3600,
            claimed_at=time.time() - 3600,
        )
        await broker.jobs.update(job_id, encode(spent), last=stored.revision)
        assert await ctl.exhausted_ticket(seq, deliveries=10) == "failed"
        rec = (await records(broker))[job_id]
        assert rec.status == JobStatus.FAILED and "delivered 10 times" in rec.reason
        assert await scan_tickets(broker) == []
    finally:
        await ctl.stop()


async def test_controller_restart_repairs_lost_tickets_and_duplicates_never_train_twice(fleet, broker, settings):
    manifest = linreg_manifest(6)
    ids = [s.job_id for s in manifest.jobs]
    ctl = Controller(as_role(settings, "controller"), handle_signals=False)
    await ctl.start()
    await ctl.sync(manifest)
    await ctl.stop()  # the controller dies
    # Tickets get lost for three jobs and duplicated for the others
    for ref in (await scan_tickets(broker))[:3]:
        await broker.js.delete_msg(broker.names.jobs_stream, ref.seq)
    for ref in await scan_tickets(broker):
        await broker.js.publish(broker.names.jobs_subject("cpu"), encode(ref.ticket))
    audit = await KVAudit(broker).start()
    # A new controller reconciles, agents train
    await fleet.start_controller()
    fleet.start_agent("a1")
    fleet.start_agent("a2")
    try:
        recs = await wait_terminal(broker, ids, timeout_s=90)
        assert all(recs[i].status == JobStatus.COMPLETED for i in ids)
        assert audit.completions() == {(i, 1): 1 for i in ids}
        assert await trainer_starts(broker, ids) == {i: 1 for i in ids}
        await wait_for(lambda: _no_tickets(broker), 20, what="duplicate tickets to be dropped")
    finally:
        await audit.stop()


async def test_nats_server_restart_mid_run_loses_nothing(fleet, broker, settings, nats_server):
    manifest = linreg_manifest(6, epochs=MEDIUM // 2)
    ids = [s.job_id for s in manifest.jobs]
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("a1")
    fleet.start_agent("a2")
    await wait_for(lambda: _count(broker, "running", 1), 60, what="a job to be running")
    # The server restarts with its file store (same port)
    await asyncio.to_thread(nats_server.restart)
    recs = await wait_terminal(broker, ids, timeout_s=180)
    assert all(recs[i].status == JobStatus.COMPLETED for i in ids), {r.job_id[:12]: r.status for r in recs.values()}
    starts = await trainer_starts(broker, ids)
    assert all(starts[i] >= 1 for i in ids)


async def _count(broker, state: str, n: int) -> bool:
    return sum(1 for r in (await records(broker)).values() if r.status.value == state) >= n


async def test_records_of_an_unknown_schema_version_are_left_alone(fleet, broker):
    manifest = linreg_manifest(1)
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    # A record written by a newer trainfleet, with a ticket pointing at it
    future = {
        **msgspec.to_builtins(JobRecord(job_id="f" * 64)),
        "schema_version": 99,
        "job_id": "f" * 64,
    }
    raw = msgspec.json.encode(future)
    await broker.jobs.create("f" * 64, raw)
    await broker.js.publish(
        broker.names.jobs_subject("cpu"), encode(Ticket(job_id="f" * 64, generation=1, klass="cpu"))
    )
    agent = fleet.start_agent("a1")
    job_id = manifest.jobs[0].job_id
    rec = (await wait_terminal(broker, [job_id]))[job_id]
    assert rec.status == JobStatus.COMPLETED
    assert (await broker.jobs.get("f" * 64)).value == raw  # untouched
    assert not fleet.tasks["a1"].done() and agent.counters["completed"] == 1
    await ctl.reconcile()  # the controller skips it too, without crashing


async def test_requeue_works_from_failed_and_cancelled(fleet, broker):
    manifest = linreg_manifest(2, job_extra="")
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    a, b = (s.job_id for s in manifest.jobs)
    await ctl.cancel(a)
    # b fails: make its record failed as an agent would
    stored = await get_record(broker, b)
    await broker.jobs.update(
        b, encode(stored.record.evolve(status=JobStatus.FAILED, last_error="boom")), last=stored.revision
    )
    for ref in (a, b):
        fresh = (await ctl.requeue(ref)).record
        assert fresh.status == JobStatus.PENDING and fresh.generation == 2 and fresh.attempt == 0
    fleet.start_agent("a1")

    async def both_done():
        recs = await records(broker)
        return all(recs[j].status == JobStatus.COMPLETED and recs[j].generation == 2 for j in (a, b))

    await wait_for(both_done, 60, what="requeued jobs to complete")
    await wait_for(lambda: _no_tickets(broker), 20, what="stale generation-1 tickets to be dropped")
    # A pending or running job cannot be requeued
    await ctl.requeue(a)
    with pytest.raises(TrainfleetError, match="only failed, cancelled or completed"):
        await ctl.requeue(a)


async def test_an_oversized_artifact_fails_the_job_with_a_clear_error(fleet, broker, settings):
    fleet.settings = settings.with_(max_artifact_bytes=100)
    manifest = linreg_manifest(1)
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("a1")
    rec = (await wait_terminal(broker, [job_id]))[job_id]
    assert rec.status == JobStatus.FAILED and "over max_artifact_bytes 100" in rec.last_error
    assert rec.artifact is None
    with pytest.raises(nats.js.errors.NotFoundError):  # nats-py's way of saying "no objects"
        await (await stock_artifacts(broker)).list()
    assert await scan_tickets(broker) == []


# A trainer whose output is a few MB of incompressible bytes (so the bundle is as big).
BIG_OUTPUT_MODEL = """
[models.bigout]
command = ["{python}", "-c", '''
import json, os
out = os.environ["TRAINFLEET_OUTPUT_DIR"]
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "weights.bin"), "wb").write(os.urandom(3 * 1024 * 1024))
json.dump({"headline": "size", "size": 3}, open(os.path.join(out, "metrics.json"), "w"))
''']
modes = ["run"]
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_the_lease_lives_through_an_upload_longer_than_three_leases(
    fleet, broker, settings, nats_server, monkeypatch, tmp_path
):
    # Given a short lease, and an agent whose only link to the server carries 0.5 MB/s
    settings = settings.with_(lease_s=1.5, heartbeat_s=0.5)
    fleet.settings = settings
    proxy = LatencyProxy("127.0.0.1", nats_server.port)
    proxy.rate_bytes_s = 512 * 1024
    await proxy.start()
    # (small chunks and window: a heartbeat waits behind at most 128 KiB of the upload)
    monkeypatch.setattr(artifacts_module, "ARTIFACT_CHUNK_BYTES", 64 * 1024)
    monkeypatch.setattr(artifacts_module, "ARTIFACT_WINDOW_BYTES", 128 * 1024)
    real_put, took = artifacts_module.Artifacts.put, []

    async def timed_put(store, bundle):
        started = time.monotonic()
        try:
            return await real_put(store, bundle)
        finally:
            took.append(time.monotonic() - started)

    monkeypatch.setattr(artifacts_module.Artifacts, "put", timed_put)
    manifest = parse_manifest(
        "schema_version = 1\n" + BIG_OUTPUT_MODEL + '[[jobs]]\nname = "big"\nmodel = "bigout"\nmode = "run"\n',
        file="big.toml",
    )
    job_id = manifest.jobs[0].job_id
    fleet.controller = Controller(as_role(settings, "controller"), handle_signals=False)
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    agent = Agent(
        as_role(settings.with_(url=proxy.url), "agent"),
        AgentOptions(host_id="slow", handle_signals=False, workdir=str(tmp_path / "slow")),
        capability=fake_capability("slow"),
    )
    fleet.agents["slow"] = agent
    fleet.tasks["slow"] = asyncio.create_task(agent.run())
    # ...and once it runs the job, a fast agent that would take over a lapsed lease
    await wait_state(broker, job_id, "running", claimed_by="slow")
    fleet.start_agent("fast")
    try:
        # When the bundle takes longer than three leases to upload
        rec = (await wait_terminal(broker, [job_id], timeout_s=120))[job_id]
    finally:
        await fleet.stop_agent("slow")
        await proxy.stop()
    # Then the job completed once, on its first attempt, never fenced
    assert took and took[0] > 3 * settings.lease_s, took
    assert rec.status == JobStatus.COMPLETED and rec.attempt == 1, rec.last_error
    assert rec.claimed_by == "slow" and agent.counters["fenced"] == 0 and agent.counters["completed"] == 1
