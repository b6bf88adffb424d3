"""End to end on a real nats-server: sync, claim, train, upload, complete — exactly once."""

from __future__ import annotations

import hashlib
import json

import nats.js.errors

from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import extract
from trainfleet.broker.records import record_history
from trainfleet.broker.schema import JobRecord, JobStatus, decode
from trainfleet.broker.specs import get_spec
from trainfleet.broker.tickets import scan_tickets
from trainfleet.controller import ops
from trainfleet.controller.manifest import parse_manifest

from .conftest import REPO, KVAudit, gbm_jobs, gbm_manifest, records, wait_for, wait_terminal


async def status_history(broker, job_id: str) -> list[tuple[str, str | None, int]]:
    """(status, claimed_by, attempt) for every revision the KV keeps of a job."""
    out = []
    for entry in await record_history(broker, job_id):
        rec: JobRecord = decode(entry.value, JobRecord)
        out.append((rec.status.value, rec.claimed_by, rec.attempt))
    return out


async def test_two_agents_complete_every_job_exactly_once_with_verified_artifacts(fleet, broker, tmp_path):
    # Given the tiny example manifest (both real trainers, every mode) and two agents
    manifest = parse_manifest((REPO / "examples" / "tiny.toml").read_text(), file="tiny.toml")
    ctl = await fleet.start_controller()
    report = await ctl.sync(manifest)
    assert len(report.created) == len(manifest.jobs) == 4
    fleet.start_agent("a1")
    fleet.start_agent("a2")

    # When every job finishes
    recs = await wait_terminal(broker, [s.job_id for s in manifest.jobs], timeout_s=150)

    # Then each completed once, on one of our agents, at the first attempt
    for spec in manifest.jobs:
        rec = recs[spec.job_id]
        assert rec.status == JobStatus.COMPLETED, (spec.name, rec.reason, rec.last_error)
        assert rec.attempt == 1 and rec.claimed_by in ("a1", "a2")
        history = await status_history(broker, spec.job_id)
        assert [h[0] for h in history].count("completed") == 1
        # every held revision the KV keeps names one holder and one attempt
        assert {(h[1], h[2]) for h in history if h[0] != "pending"} == {(rec.claimed_by, 1)}
        # and its artifact downloads, verifies by sha256 and holds the trainer's output; `artifacts get
        # --extract` puts the run's provenance (its own object in the store) beside it
        bundle = await Artifacts(broker).get(rec.artifact, tmp_path / f"{spec.name}.tar.zst")
        assert hashlib.sha256(bundle.read_bytes()).hexdigest() == rec.artifact
        out = extract(bundle, tmp_path / spec.name)
        metrics = json.loads((out / "output" / "metrics.json").read_text())
        assert metrics[metrics["headline"]] == rec.metrics[metrics["headline"]]
        assert not (out / "provenance.json").exists()  # (not in the bundle: its bytes are the output's only)
        got = await ops.fetch_artifact(broker, spec.job_id, tmp_path / "get", extract=True)
        provenance = json.loads((tmp_path / "get" / spec.job_id / "provenance.json").read_text())
        assert got["provenance"] == str(tmp_path.resolve() / "get" / spec.job_id / "provenance.json")
        assert provenance["artifact"] == rec.artifact and provenance["attempt"] == 1
        assert provenance["job"]["job_id"] == spec.job_id and provenance["host"]["host_id"] == rec.claimed_by
        assert provenance["versions"]["python"]
    # And every ticket was acked: the work queue is empty
    assert await scan_tickets(broker) == []
    assert sum(a.counters["completed"] for a in fleet.agents.values()) == 4


async def test_failing_trainer_is_recorded_failed_with_its_stderr(fleet, broker):
    manifest = gbm_manifest(gbm_jobs(1, prefix="boom") + "hyper = { fail = true }\n")
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("a1")
    job_id = manifest.jobs[0].job_id
    rec = (await wait_terminal(broker, [job_id]))[job_id]
    assert rec.status == JobStatus.FAILED
    assert "requested failure" in (rec.last_error or "")
    assert rec.artifact is None and rec.attempt == 1
    assert await scan_tickets(broker) == []  # a failed job's ticket is acked, not redelivered


async def test_sync_is_idempotent_and_keeps_state(fleet, broker):
    manifest = gbm_manifest(gbm_jobs(2))
    ctl = await fleet.start_controller()
    first = await ctl.sync(manifest)
    assert len(first.created) == 2
    tickets_after_first = await scan_tickets(broker)
    # Syncing the same manifest again creates nothing and publishes no ticket
    second = await ctl.sync(manifest)
    assert second.created == [] and sorted(second.unchanged) == sorted(first.created)
    assert len(await scan_tickets(broker)) == len(tickets_after_first) == 2
    # Once trained, a re-sync leaves the records completed
    fleet.start_agent("a1")
    await wait_terminal(broker, first.created)
    third = await ctl.sync(manifest)
    assert third.created == []
    assert all(r.status == JobStatus.COMPLETED for r in (await records(broker)).values())
    assert await scan_tickets(broker) == []


async def test_sync_refreshes_name_and_priority_and_keeps_jobs_removed_from_manifest(fleet, broker):
    ctl = await fleet.start_controller()
    await ctl.sync(gbm_manifest(gbm_jobs(3)))
    # Rename job-0 and raise its priority: same id, record updated; drop job-2 from the manifest
    edited = gbm_jobs(2).replace('name = "job-0"', 'name = "renamed"\npriority = 5')
    report = await ctl.sync(gbm_manifest(edited))
    recs = await records(broker)
    assert report.created == [] and len(report.updated) == 1 and len(report.not_in_manifest) == 1
    renamed = await get_spec(broker, report.updated[0])
    assert renamed.name == "renamed" and renamed.priority == 5 and recs[renamed.job_id].priority == 5
    assert recs[report.not_in_manifest[0]].status == JobStatus.PENDING  # stays until cancelled


async def test_reload_rereads_the_manifest_file(fleet, broker, tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text("schema_version = 1\n" + gbm_manifest_text(gbm_jobs(1)))
    fleet.controller.manifest_path = str(path)
    ctl = await fleet.start_controller()
    path.write_text("schema_version = 1\n" + gbm_manifest_text(gbm_jobs(3)))
    report = await ctl.reload()
    assert len(report.created) == 2 and len(report.unchanged) == 1
    assert len(await records(broker)) == 3


def gbm_manifest_text(jobs: str) -> str:
    from .conftest import GBM_MODEL

    return GBM_MODEL + jobs


async def test_cancelled_pending_job_is_never_claimed_and_requeue_runs_it_again(fleet, broker):
    manifest = gbm_manifest(gbm_jobs(2))
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    cancelled = (await ctl.cancel("job-0")).record
    assert cancelled.status == JobStatus.CANCELLED
    fleet.start_agent("a1")
    ids = [s.job_id for s in manifest.jobs]
    recs = await wait_terminal(broker, ids)
    assert recs[ids[0]].status == JobStatus.CANCELLED and recs[ids[0]].attempt == 0
    assert recs[ids[1]].status == JobStatus.COMPLETED
    # Requeue the completed job: a new generation runs again
    again = (await ctl.requeue("job-1")).record
    assert again.generation == 2 and again.status == JobStatus.PENDING

    async def rerun_done():
        rec = (await records(broker))[ids[1]]
        return rec.status == JobStatus.COMPLETED and rec.generation == 2

    await wait_for(rerun_done, 60, what="requeued job to complete")


async def test_garbage_and_unknown_tickets_are_dropped_and_the_agent_keeps_working(fleet, broker):
    names = broker.names
    ctl = await fleet.start_controller()
    await broker.js.publish(names.jobs_subject("cpu"), b"\x00not json")
    await broker.js.publish(names.jobs_subject("cpu"), b'{"job_id": "0" , "generation": 1, "klass": "cpu"}')
    await broker.js.publish(names.jobs_subject("cpu"), b'{"job_id": "a.b>", "generation": 1, "klass": "cpu"}')
    manifest = gbm_manifest(gbm_jobs(1))
    await ctl.sync(manifest)
    fleet.start_agent("a1")
    recs = await wait_terminal(broker, [manifest.jobs[0].job_id])
    assert recs[manifest.jobs[0].job_id].status == JobStatus.COMPLETED
    await wait_for(lambda: _empty_queue(broker), 20, what="garbage tickets to be dropped")


async def _empty_queue(broker) -> bool:
    return await scan_tickets(broker) == []


def flaky_put(monkeypatch, failures: int) -> dict[str, int]:
    """Artifacts.put failing its first ``failures`` calls (as during an election); the count."""
    real_upload = Artifacts.put
    calls = {"n": 0}

    async def flaky_upload(store, bundle):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise nats.js.errors.ServiceUnavailableError(description="injected upload failure")
        return await real_upload(store, bundle)

    monkeypatch.setattr(Artifacts, "put", flaky_upload)
    return calls


async def test_an_upload_that_fails_a_while_is_tried_again_within_the_attempt(fleet, broker, monkeypatch):
    # Given an upload that fails twice (an election), well within the upload patience
    manifest = gbm_manifest(gbm_jobs(1))
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    calls = flaky_put(monkeypatch, failures=2)
    fleet.start_agent("a1")
    job_id = manifest.jobs[0].job_id
    rec = (await wait_terminal(broker, [job_id]))[job_id]
    # Then the job completes on its first attempt: waited out, not re-run
    assert rec.status == JobStatus.COMPLETED and rec.attempt == 1 and calls["n"] == 3


async def test_upload_failure_leaves_the_job_retryable(fleet, broker, monkeypatch):
    # Given an upload that fails for longer than the agent's upload patience
    fleet.settings = fleet.settings.with_(upload_patience_s=0.1)
    manifest = gbm_manifest(gbm_jobs(1))
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    calls = flaky_put(monkeypatch, failures=1)
    audit = await KVAudit(broker).start()
    fleet.start_agent("a1")
    job_id = manifest.jobs[0].job_id
    try:
        rec = (await wait_terminal(broker, [job_id]))[job_id]
    finally:
        await audit.stop()
    assert rec.status == JobStatus.COMPLETED and rec.attempt == 2 and calls["n"] == 2
    # handed back as pending (with the reason) after the failed upload, then claimed again
    assert any(
        r.status == JobStatus.PENDING and "artifact upload failed" in (r.last_error or "") for r in audit.entries
    )
