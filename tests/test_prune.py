"""Storage stays bounded: `trainfleet artifacts prune` (and the controller, on a schedule) removes
the stored bundles no job record points at, once past a grace period; a clean close of the
connection is not reported as a lost one. All on a real nats-server with roles enforced."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import msgspec

from trainfleet.broker import artifacts as artifacts_module
from trainfleet.broker.artifacts import Artifacts, parse_provenance_object_name
from trainfleet.broker.bundle import Bundle, build_bundle
from trainfleet.broker.connection import Broker
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import JobStatus, encode
from trainfleet.controller.controller import Controller

from .conftest import as_role, gbm_jobs, gbm_manifest, linreg_manifest, put_job, records, role_env, wait_for

CLI = [sys.executable, "-m", "trainfleet.controller.cli"]


def make_bundle(tmp_path: Path, name: str, payload: bytes | None = None) -> Bundle:
    out = tmp_path / name
    out.mkdir()
    (out / "model.bin").write_bytes(payload if payload is not None else os.urandom(5000))
    return build_bundle(out, {"job": {"name": name}}, tmp_path / f"{name}.tar.zst")


async def put_completed(broker: Broker, name: str, artifact: str) -> str:
    """A completed job record pointing at ``artifact``, written straight to the KV; its job id."""
    spec = gbm_manifest(gbm_jobs(1)).jobs[0]
    spec = msgspec.structs.replace(spec, name=name, job_id=hashlib.sha256(name.encode()).hexdigest())
    await put_job(broker, spec, status=JobStatus.COMPLETED, artifact=artifact, created_at=1.0, updated_at=1.0)
    return spec.job_id


async def stored(broker: Broker) -> set[str]:
    """The stored objects' names, runs' provenance objects aside."""
    return {info.name for info in await Artifacts(broker).list() if parse_provenance_object_name(info.name) is None}


async def chunk_sets(broker: Broker) -> set[str]:
    store = Artifacts(broker).store
    prefix = f"$O.{store.bucket}.C."
    return {s[len(prefix) :] for s in await store._subject_counts(prefix + ">")}


async def cli(url: str, role: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "artifacts",
        "prune",
        *args,
        env={**os.environ, **role_env(role), "NATS_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_after_requeues_prune_leaves_only_the_referenced_bundle(fleet, broker, tmp_path):
    # Given a job that completed, was requeued and completed again, twice (each run its own bundle)
    manifest = linreg_manifest(1, epochs=20, prefix="prune")
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("a1")
    for generation in (1, 2, 3):
        if generation > 1:
            await ctl.requeue(job_id)

        async def completed(generation: int = generation) -> bool:
            rec = (await records(broker))[job_id]
            return rec.status == JobStatus.COMPLETED and rec.generation == generation

        await wait_for(completed, 90, what=f"generation {generation} to complete")
    referenced = (await get_record(broker, job_id)).record.artifact
    assert referenced is not None
    before = await stored(broker)
    assert len(before) == 3 and referenced in before  # two bundles nothing points at any more
    # When it is pruned with no grace period
    report = await Artifacts(broker).prune(0.0)
    # Then exactly the referenced bundle is left, chunks and all, and it still downloads verified
    assert sorted(report.removed) == sorted(before - {referenced})
    assert report.kept_referenced == 1 and report.bytes > 0
    assert await stored(broker) == {referenced}
    # (each run's provenance object stays with its job; no chunk set is left that no object uses)
    assert report.kept_provenance == 3
    assert await chunk_sets(broker) == {info.nuid for info in await Artifacts(broker).list()}
    dest = await Artifacts(broker).get(referenced, tmp_path / "dl.tar.zst")
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == referenced
    # ... and a second prune finds nothing more
    assert (await Artifacts(broker).prune(0.0)).removed == []
    # And the agent's work dir keeps nothing of the three runs, not even an empty folder
    await wait_for(lambda: not fleet.agents["a1"].running, 30, what="the agent to let go of the job")
    jobs_dir = tmp_path / "agents" / "a1" / "jobs"
    assert [p.relative_to(jobs_dir) for p in jobs_dir.rglob("*")] == []


async def test_an_unreferenced_bundle_within_the_grace_period_is_kept(broker, tmp_path):
    # Given a bundle just stored that no record points at yet (its upload's record on the way)
    young = make_bundle(tmp_path, "young")
    await Artifacts(broker).put(young)
    # When pruned with the default grace period (artifact_prune_age_s)
    report = await Artifacts(broker).prune(broker.settings.artifact_prune_age_s)
    # Then it stays
    assert (report.removed, report.kept_recent) == ([], 1)
    assert await stored(broker) == {young.sha256}


async def test_a_job_completing_during_the_prune_keeps_its_bundle(broker, tmp_path, monkeypatch):
    # Given two old unreferenced bundles, and a job that completes with one of them while the
    # prune is deciding (after its first read of the records)
    late, orphan = make_bundle(tmp_path, "late"), make_bundle(tmp_path, "orphan")
    for b in (late, orphan):
        await Artifacts(broker).put(b)
    real = artifacts_module.referenced_artifacts
    reads = 0

    async def records_then_a_completion(b: Broker) -> set[str]:
        nonlocal reads
        reads += 1
        found = await real(b)
        if reads == 1:
            await put_completed(broker, "late-job", late.sha256)
        return found

    monkeypatch.setattr(artifacts_module, "referenced_artifacts", records_then_a_completion)
    # When pruned
    report = await Artifacts(broker).prune(0.0)
    # Then the records were read again before removing, and the completed job's bundle stays
    assert reads == 2
    assert report.removed == [orphan.sha256] and report.kept_referenced == 1
    assert await stored(broker) == {late.sha256}


async def test_a_bundle_stored_again_during_the_prune_stays(broker, tmp_path, monkeypatch):
    # Given an unreferenced bundle past a 1 s grace period, stored again while the prune decides
    again = make_bundle(tmp_path, "again")
    await Artifacts(broker).put(again)
    await asyncio.sleep(1.2)
    real = artifacts_module.referenced_artifacts
    reads = 0

    async def records_then_a_new_upload(b: Broker) -> set[str]:
        nonlocal reads
        reads += 1
        if reads == 2:
            await Artifacts(broker).store.put_file(again.sha256, again.path)
        return await real(b)

    monkeypatch.setattr(artifacts_module, "referenced_artifacts", records_then_a_new_upload)
    # When pruned
    report = await Artifacts(broker).prune(1.0)
    # Then the fresh copy is not removed, and it downloads verified
    assert (report.removed, report.kept_recent) == ([], 1)
    assert await stored(broker) == {again.sha256}
    await Artifacts(broker).get(again.sha256, tmp_path / "dl.tar.zst")


async def test_records_it_cannot_read_and_objects_that_are_not_bundles_are_never_pruned(broker, tmp_path):
    # Given a bundle named only by a record of a newer schema, and an object not named by a sha256
    kept = make_bundle(tmp_path, "newer")
    await Artifacts(broker).put(kept)
    future = {"schema_version": 99, "job_id": "f" * 64, "status": "completed", "artifact": kept.sha256}
    await broker.jobs.put("f" * 64, json.dumps(future).encode())
    await Artifacts(broker).store.put_bytes("notes.txt", b"someone else's")
    # When pruned with no grace period
    report = await Artifacts(broker).prune(0.0)
    # Then both stay
    assert (report.removed, report.kept_referenced, report.foreign) == ([], 1, 1)
    assert await stored(broker) == {kept.sha256, "notes.txt"}


async def test_cli_prune_dry_run_reports_and_removes_nothing(broker, settings, tmp_path):
    # Given an old unreferenced bundle and a referenced one
    orphan, used = make_bundle(tmp_path, "orphan"), make_bundle(tmp_path, "used")
    for b in (orphan, used):
        await Artifacts(broker).put(b)
    await put_completed(broker, "used-job", used.sha256)
    # When an operator asks what a prune would remove (reading is everyone's right)
    code, out, err = await cli(settings.url, "operator", "--older-than", "0", "--dry-run", "--json")
    # Then it says, and nothing is removed
    assert code == 0, err
    report = json.loads(out)
    assert report["dry_run"] is True and report["older_than_s"] == 0
    assert report["removed"] == [orphan.sha256] and report["bytes"] == orphan.size
    assert report["kept_referenced"] == 1
    assert await stored(broker) == {orphan.sha256, used.sha256}


async def test_cli_prune_removes_with_admin_credentials_and_refuses_an_operator(broker, settings, tmp_path):
    # Given an old unreferenced bundle and a referenced one
    orphan, used = make_bundle(tmp_path, "orphan"), make_bundle(tmp_path, "used")
    for b in (orphan, used):
        await Artifacts(broker).put(b)
    await put_completed(broker, "used-job", used.sha256)
    # When an operator prunes: the server refuses it the purge, and the CLI says what it needs
    code, out, err = await cli(settings.url, "operator", "--older-than", "0")
    assert code == 3, (out, err)
    assert "controller's or the admin's credentials" in err and "Traceback" not in err
    assert await stored(broker) == {orphan.sha256, used.sha256}
    # When the admin prunes
    code, out, err = await cli(settings.url, "admin", "--older-than", "0")
    # Then it exits 0 with one line of counts and bytes, and only the referenced bundle is left
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("removed 1 unreferenced artifact(s), ")
    assert "KiB" in lines[0] and "kept 1 referenced" in lines[0]
    assert await stored(broker) == {used.sha256}


async def test_the_controller_prunes_on_its_own_when_configured(broker, settings, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainfleet.controller")
    # Given an old unreferenced bundle and a referenced one
    orphan, used = make_bundle(tmp_path, "orphan"), make_bundle(tmp_path, "used")
    for b in (orphan, used):
        await Artifacts(broker).put(b)
    await put_completed(broker, "used-job", used.sha256)
    # When a controller runs with a prune cadence (and no grace period)
    configured = settings.with_(artifact_prune_s=0.2, artifact_prune_age_s=0.0)
    ctl = Controller(as_role(configured, "controller"), handle_signals=False)
    task = asyncio.create_task(ctl.run())
    try:
        # Then the unreferenced bundle goes without anyone asking, and it says so
        async def pruned() -> bool:
            return await stored(broker) == {used.sha256}

        await wait_for(pruned, 30, what="the controller to prune the unreferenced bundle")
    finally:
        ctl.request_stop()
        await asyncio.wait_for(task, 15)
    assert any(
        "artifact prune: removed 1" in r.getMessage() and orphan.sha256 in r.getMessage() for r in caplog.records
    )


async def test_a_clean_close_is_not_logged_as_a_lost_connection(settings, nats_server, caplog):
    caplog.set_level(logging.DEBUG, logger="trainfleet.broker")
    b = await Broker.connect(settings, provision=True)
    try:
        # A server that goes away is a lost connection: reported, and reconnected
        await asyncio.to_thread(nats_server.restart)
        await wait_for(lambda: b.nc.is_connected and _logged(caplog, "reconnected to NATS"), 30, what="a reconnect")
        assert _logged(caplog, "disconnected from NATS; reconnecting")
        caplog.clear()
        await b.js.key_value(b.names.jobs_bucket)  # (the connection works)
    finally:
        # Closing it ourselves (Broker.close: what SIGTERM does) is not
        await b.close()
    assert b.nc.is_closed
    assert not _logged(caplog, "disconnected from NATS; reconnecting")


def _logged(caplog, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_a_requeued_jobs_bundles_are_not_pruned_while_referenced(broker, tmp_path):
    # Given a requeued job's record that now points at nothing, and its next run's bundle
    first, second = make_bundle(tmp_path, "first"), make_bundle(tmp_path, "second")
    for b in (first, second):
        await Artifacts(broker).put(b)
    job_id = await put_completed(broker, "requeued", first.sha256)
    current = await get_record(broker, job_id)
    rerun = current.record.evolve(generation=2, artifact=second.sha256)
    assert await broker.jobs.update(job_id, encode(rerun), last=current.revision)
    # When pruned: the first bundle (only the record's old revision names it) goes, the current stays
    report = await Artifacts(broker).prune(0.0)
    assert report.removed == [first.sha256]
    assert await stored(broker) == {second.sha256}
