"""The operator surface below the CLI, on a real nats-server: the control micro service (discovery,
queue group, replies), state history, logs and events, provenance and artifact listings."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import types
from pathlib import Path

import msgspec
import pytest
from nats.micro.service import ServiceVerb, control_subject

from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import Bundle, build_bundle
from trainfleet.broker.control import ENDPOINT_DOCS, request
from trainfleet.broker.errors import ArtifactError, BrokerError, TrainfleetError
from trainfleet.broker.logs import LiveProgress, LogEntry, read_logs
from trainfleet.broker.provision import JOBS_KV_HISTORY
from trainfleet.broker.records import get_record, history_truncated, record_history, transitions
from trainfleet.broker.schema import JobRecord, JobStatus, ProgressEvent, decode, encode
from trainfleet.controller import ops
from trainfleet.controller.controller import Controller

from .conftest import as_role, gbm_jobs, gbm_manifest, put_job, role_env, stock_artifacts, wait_for, wait_terminal


async def put_record(broker, name: str = "job-0", **changes) -> JobRecord:
    """A job record written straight to the KV (no controller needed)."""
    spec = gbm_manifest(gbm_jobs(1)).jobs[0]
    spec = msgspec.structs.replace(spec, name=name, job_id=hashlib.sha256(name.encode()).hexdigest())
    return (await put_job(broker, spec, created_at=1.0, updated_at=1.0, **changes)).record


async def write(broker, rec: JobRecord, **changes) -> JobRecord:
    """CAS the next revision of ``rec``."""
    stored = await get_record(broker, rec.job_id)
    new = stored.record.evolve(**changes)
    assert await broker.jobs.update(rec.job_id, encode(new), last=stored.revision)
    return new


async def publish_line(broker, job_id: str, line: str, *, attempt: int = 1, stream: str = "stdout") -> None:
    """A line of trainer output, as the agent publishes it."""
    await broker.js.publish(
        broker.names.logs_subject(job_id),
        line.encode() + b"\n",
        headers={"Trainfleet-Stream": stream, "Trainfleet-Attempt": str(attempt)},
    )


async def all_replies(nc, subject: str, count: int) -> list[dict]:
    """Every answer to one request that ``count`` responders answer (micro discovery fans out)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    try:
        return [json.loads((await sub.next_msg(timeout=10)).data) for _ in range(count)]
    finally:
        await sub.unsubscribe()


@pytest.fixture
async def controllers(settings, broker):
    """Two controller instances against one server: one queue group, one service name (the
    resources provisioned by the admin: a controller role may not create them)."""
    ctls = [Controller(as_role(settings, "controller"), handle_signals=False) for _ in range(2)]
    tasks = [asyncio.create_task(c.run()) for c in ctls]
    await wait_for(lambda: all(c._service is not None for c in ctls), what="both controllers serving")
    try:
        yield ctls
    finally:
        for c in ctls:
            c.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)


# -- the control service ---------------------------------------------------------
async def test_service_is_discoverable_the_way_nats_micro_finds_it(controllers, broker):
    names = broker.names
    # `nats micro ls` pings every service; both controllers answer as instances of one service
    pings = await all_replies(broker.nc, control_subject(ServiceVerb.PING, names.service), 2)
    assert {p["name"] for p in pings} == {names.service} and len({p["id"] for p in pings}) == 2
    # `nats micro info trainfleet`: every endpoint under <prefix>.ctl, in the controllers' queue group,
    # with metadata saying what it does and what to send
    info = (await all_replies(broker.nc, control_subject(ServiceVerb.INFO, names.service), 1))[0]
    assert info["description"] and info["metadata"]["prefix"] == names.prefix
    endpoints = {e["name"]: e for e in info["endpoints"]}
    assert {"sync", "reload", "cancel", "requeue", "status", "reconcile", "jobs", "show", "workers"} <= set(endpoints)
    for name, endpoint in endpoints.items():
        assert endpoint["subject"] == names.ctl_subject(name)
        assert endpoint["queue_group"] == names.ctl_queue_group
        if name in ENDPOINT_DOCS:
            assert endpoint["metadata"]["description"] and endpoint["metadata"]["request"]
    # `nats micro stats` answers too
    stats = await all_replies(broker.nc, control_subject(ServiceVerb.STATS, names.service), 2)
    assert all(s["name"] == names.service for s in stats)


async def test_two_controllers_handle_each_cancel_exactly_once(controllers, broker):
    # Given six pending jobs and two controller instances
    await controllers[0].sync(gbm_manifest(gbm_jobs(6)))
    # When an operator cancels each job once, through the service
    replies = [await request(broker.nc, broker.names, "cancel", {"job": f"job-{i}"}) for i in range(6)]
    # Then every request got one successful answer...
    assert [r["status"] for r in replies] == ["cancelled"] * 6
    # ...handled by exactly one instance: the endpoint counters of both add up to six
    stats = await all_replies(broker.nc, control_subject(ServiceVerb.STATS, broker.names.service), 2)
    handled = [e["num_requests"] for s in stats for e in s["endpoints"] if e["name"] == "cancel"]
    assert sum(handled) == 6 and len(handled) == 2
    # ...and each record went to cancelled in exactly one write
    for rec in replies:
        history, _ = await ops.job_history(broker, rec["job_id"])
        assert [t.status for t in history] == ["pending", "cancelled"]


async def test_service_errors_carry_the_cli_exit_code(controllers, broker):
    names = broker.names
    with pytest.raises(TrainfleetError) as missing:
        await request(broker.nc, names, "cancel", {"job": "no-such-job"})
    assert missing.value.exit_code == 4 and "no job matches" in str(missing.value)
    # The raw reply is a micro error too, readable from `nats req`
    raw = await broker.nc.request(names.ctl_subject("show"), b'{"job": "no-such-job"}', timeout=10)
    assert raw.headers["Nats-Service-Error-Code"] == "404"
    assert json.loads(raw.data) == {"ok": False, "error": json.loads(raw.data)["error"], "exit_code": 4}
    bad = await broker.nc.request(names.ctl_subject("jobs"), b"[1, 2]", timeout=10)
    assert json.loads(bad.data)["exit_code"] == 2 and bad.headers["Nats-Service-Error-Code"] == "400"
    with pytest.raises(TrainfleetError) as bad_state:
        await request(broker.nc, names, "jobs", {"state": "sleeping"})
    assert bad_state.value.exit_code == 2


async def test_read_endpoints_answer_what_the_cli_prints(controllers, broker):
    await controllers[0].sync(gbm_manifest(gbm_jobs(2) + "priority = 5\n"))
    names = broker.names
    assert await request(broker.nc, names, "jobs", {"state": "pending"}) == await ops.list_jobs(broker, state="pending")
    status = await request(broker.nc, names, "status")
    assert status["jobs"]["pending"] == 2 and status["total"] == 2 and status["workers"] == {"alive": 0, "stale": 0}
    shown = await request(broker.nc, names, "show", {"job": "job-1"})
    assert shown["spec"]["name"] == "job-1" and [t["status"] for t in shown["history"]] == ["pending"]
    assert await request(broker.nc, names, "workers") == []


async def test_request_without_a_controller_is_a_broker_error(broker):
    with pytest.raises(BrokerError, match="no controller is running"):
        await request(broker.nc, broker.names, "status", timeout_s=5)


# -- history -----------------------------------------------------------------------
async def test_history_keeps_transitions_and_collapses_heartbeats(broker):
    rec = await put_record(broker)
    rec = await write(broker, rec, status=JobStatus.CLAIMED, claimed_by="a1", attempt=1)
    rec = await write(broker, rec, status=JobStatus.RUNNING)
    for beat in range(3):
        rec = await write(broker, rec, heartbeat_at=100.0 + beat, progress={"step": beat, "total": 3})
    rec = await write(broker, rec, status=JobStatus.COMPLETED, artifact="f" * 64)
    history, truncated = await ops.job_history(broker, rec.job_id)
    assert [(t.status, t.host, t.attempt) for t in history] == [
        ("pending", None, 0),
        ("claimed", "a1", 1),
        ("running", "a1", 1),
        ("completed", "a1", 1),
    ]
    assert not truncated
    assert [t.revision for t in history] == sorted(t.revision for t in history)


def test_transitions_collapse_heartbeats_and_skip_deletes_and_unreadable_values():
    # (the one collapsing `trainfleet show`/`history` and the monitor's detail screen use)
    def entry(revision, value, operation=None):
        return types.SimpleNamespace(revision=revision, value=value, operation=operation)

    born = JobRecord(job_id="j" * 64, updated_at=1.0)
    running = born.evolve(status=JobStatus.RUNNING, claimed_by="a1", attempt=1, updated_at=2.0)
    entries = [
        entry(1, encode(born)),
        entry(2, encode(running)),
        entry(3, encode(running.evolve(heartbeat_at=5.0, progress={"step": 1}))),  # heartbeat only
        entry(4, b"not a record"),
        entry(5, None, "DEL"),
        entry(6, encode(running.evolve(status=JobStatus.COMPLETED, reason="done", updated_at=9.0))),
    ]
    rows = transitions(entries)
    assert [(t.revision, t.status, t.host, t.attempt, t.reason) for t in rows] == [
        (1, "pending", None, 0, None),
        (2, "running", "a1", 1, None),
        (6, "completed", "a1", 1, "done"),
    ]
    assert [t.at for t in rows] == [1.0, 2.0, 9.0]
    assert not history_truncated(rows) and not history_truncated([])
    assert history_truncated(rows[1:])


async def test_history_says_when_older_revisions_were_dropped(broker):
    rec = await put_record(broker)
    rec = await write(broker, rec, status=JobStatus.RUNNING, claimed_by="a1", attempt=1)
    for beat in range(12):  # the bucket keeps 10 revisions per key
        rec = await write(broker, rec, heartbeat_at=float(beat))
    history, truncated = await ops.job_history(broker, rec.job_id)
    assert [t.status for t in history] == ["running"] and truncated


async def test_key_history_reads_every_kept_revision_and_marks_deletes(broker):
    # Read from the stream, not through nats-py's history(): its "done" marker can beat the
    # revisions, which once returned no history at all for a job with ten kept revisions.
    rec = await put_record(broker)
    for beat in range(12):
        rec = await write(broker, rec, heartbeat_at=float(beat))
    await broker.jobs.delete(rec.job_id)
    entries = await record_history(broker, rec.job_id)
    assert len(entries) == JOBS_KV_HISTORY
    assert [e.operation for e in entries] == [None] * (JOBS_KV_HISTORY - 1) + ["DEL"]
    assert [e.revision for e in entries] == sorted(e.revision for e in entries)
    assert decode(entries[-2].value, JobRecord).heartbeat_at == 11.0
    assert await record_history(broker, "no-such-job") == []
    assert await ops.job_history(broker, "no-such-job") == ([], False)


# -- logs and events ------------------------------------------------------------------
async def test_logs_read_every_line_in_order_and_filter_by_attempt(broker):
    rec = await put_record(broker, status=JobStatus.FAILED)
    for attempt in (1, 2):
        for i in range(3):
            await publish_line(
                broker, rec.job_id, f"a{attempt} line {i}", attempt=attempt, stream="stderr" if i == 2 else "stdout"
            )
    event = ProgressEvent(job_id=rec.job_id, step=1, total=2, metrics={"loss": 0.5}, at=1.0)
    await broker.js.publish(broker.names.events_subject(rec.job_id), encode(event))
    other = await put_record(broker, name="other")
    await publish_line(broker, other.job_id, "someone else's line")

    async def read(**kwargs) -> list[LogEntry]:
        async with contextlib.aclosing(read_logs(broker, rec.job_id, **kwargs)) as entries:
            return [e async for e in entries]

    lines = await read()
    assert [e.line for e in lines] == [f"a{a} line {i}" for a in (1, 2) for i in range(3)]
    assert [e.stream for e in lines[:3]] == ["stdout", "stdout", "stderr"]
    assert [e.line for e in await read(attempt=2)] == ["a2 line 0", "a2 line 1", "a2 line 2"]
    with_events = await read(events=True)
    assert [e.kind for e in with_events][-1] == "progress"
    # an event without an attempt belongs to the run whose output it follows
    assert with_events[-1].attempt == 2 and with_events[-1].event["metrics"] == {"loss": 0.5}
    as_json = json.loads(json.dumps(with_events[0].to_json()))
    assert as_json["kind"] == "log" and as_json["line"] == "a1 line 0" and as_json["attempt"] == 1
    # the reader leaves no consumer behind
    info = await broker.js.stream_info(broker.names.logs_stream)
    assert info.state.consumer_count == 0


async def test_logs_of_a_job_without_output_end_at_once(broker):
    rec = await put_record(broker, status=JobStatus.CANCELLED)
    async with contextlib.aclosing(read_logs(broker, rec.job_id, follow=True)) as entries:
        assert [e async for e in entries] == []


async def test_following_logs_streams_live_lines_until_the_job_is_terminal(broker):
    # Given a running job with one line of output so far
    rec = await put_record(broker, status=JobStatus.RUNNING, claimed_by="a1", attempt=1)
    await publish_line(broker, rec.job_id, "first")
    seen: list[str] = []
    first_seen = asyncio.Event()

    async def follow() -> None:
        async with contextlib.aclosing(read_logs(broker, rec.job_id, follow=True, poll_s=0.2)) as entries:
            async for entry in entries:
                seen.append(entry.line or "")
                first_seen.set()

    follower = asyncio.create_task(follow())
    # When more lines arrive while it follows, and then the job completes
    await asyncio.wait_for(first_seen.wait(), 10)
    for i in range(3):
        await publish_line(broker, rec.job_id, f"live {i}")
    await wait_for(lambda: len(seen) == 4, 10, what="live lines")
    assert not follower.done()  # still following a running job
    await write(broker, rec, status=JobStatus.COMPLETED)
    # Then the follower ends by itself, with every line in order
    await asyncio.wait_for(follower, 10)
    assert seen == ["first", "live 0", "live 1", "live 2"]


async def test_progress_events_of_a_real_trainer_arrive_in_order(fleet, broker):
    manifest = gbm_manifest(gbm_jobs(1) + "hyper = { max_iter = 30 }\n")
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("a1")
    job_id = manifest.jobs[0].job_id
    await wait_terminal(broker, [job_id])
    async with contextlib.aclosing(read_logs(broker, job_id, events=True)) as entries:
        events = [e for e in [e async for e in entries] if e.kind != "log"]
    progress = [e.event for e in events if e.kind == "progress"]
    steps = [p["step"] for p in progress]
    assert steps and steps == sorted(set(steps)) and steps[-1] == progress[-1]["total"] == 30
    assert all(set(p["metrics"]) >= {"accuracy", "loss"} for p in progress)
    # the agent's lifecycle marks: one start, and the finish after every report
    kinds = [e.kind for e in events]
    assert kinds.count("started") == 1 and kinds[-1] == "finished"
    assert events[-1].event["outcome"] == "completed"


async def test_live_progress_overlays_the_current_attempt_only(broker):
    live = await LiveProgress().start(broker)
    try:
        rec = await put_record(broker, status=JobStatus.RUNNING, claimed_by="a1", attempt=2)
        for attempt, step in ((1, 9), (2, 3)):
            event = ProgressEvent(job_id=rec.job_id, step=step, total=10, at=1.0)
            data = json.loads(encode(event))
            data["attempt"] = attempt
            await broker.nc.publish(broker.names.events_subject(rec.job_id), json.dumps(data).encode())
            await broker.nc.flush()
            await wait_for(lambda s=step: live.latest.get(rec.job_id, {}).get("step") == s, 10)
        assert live.apply(rec).progress["step"] == 3
        assert live.apply(rec.evolve(attempt=3)).progress == rec.progress  # stale: another attempt's event
        assert live.apply(rec.evolve(status=JobStatus.COMPLETED)).progress == rec.progress
    finally:
        await live.stop()


# -- provenance and artifacts --------------------------------------------------------
def make_bundle(tmp_path: Path, name: str, payload: bytes, provenance: dict) -> Bundle:
    out = tmp_path / name
    out.mkdir()
    (out / "model.bin").write_bytes(payload)
    return build_bundle(out, provenance, tmp_path / f"{name}.tar.zst")


async def test_provenance_comes_from_the_first_chunks_of_a_large_bundle(broker, tmp_path, monkeypatch):
    # Given a bundle of several MiB of incompressible output (several object-store chunks)
    provenance = {"job": {"job_id": "x"}, "code_commit": "abc123", "versions": {"python": "3.11"}}
    bundle = make_bundle(tmp_path, "big", os.urandom(4 << 20), provenance)
    await Artifacts(broker).put(bundle)
    chunks = (await (await stock_artifacts(broker)).get_info(bundle.sha256)).chunks
    reads = {"n": 0}
    real_request = broker.nc.request

    async def counting_request(subject, payload=b"", *args, **kwargs):
        reads["n"] += b"next_by_subj" in payload  # chunk reads (the object's info is read too)
        return await real_request(subject, payload, *args, **kwargs)

    monkeypatch.setattr(broker.nc, "request", counting_request)
    # When show reads its provenance
    assert await Artifacts(broker).provenance(bundle.sha256) == provenance
    # Then it read only the start of the bundle
    assert chunks > 1 and reads["n"] == 1


async def test_provenance_of_a_missing_or_foreign_object_is_an_artifact_error(broker, tmp_path):
    with pytest.raises(ArtifactError, match="not in the object store"):
        await Artifacts(broker).provenance("0" * 64)
    await (await stock_artifacts(broker)).put("f" * 64, b"definitely not zstd")
    with pytest.raises(ArtifactError):
        await Artifacts(broker).provenance("f" * 64)


async def test_artifact_listing_marks_orphans_and_missing_bundles(broker, tmp_path):
    kept = make_bundle(tmp_path, "kept", b"model", {"job": {}})
    orphan = make_bundle(tmp_path, "orphan", b"fenced agent's model", {"job": {}})
    for bundle in (kept, orphan):
        await Artifacts(broker).put(bundle)
    await put_record(
        broker, name="done", status=JobStatus.COMPLETED, claimed_by="a1", artifact=kept.sha256, artifact_bytes=kept.size
    )
    await put_record(
        broker, name="lost", status=JobStatus.COMPLETED, claimed_by="a2", artifact="e" * 64, artifact_bytes=10
    )
    await put_record(broker, name="pending")
    rows = {r["artifact"]: r for r in await ops.list_artifacts(broker)}
    assert set(rows) == {kept.sha256, orphan.sha256, "e" * 64}
    assert rows[kept.sha256] | {"mtime": None} == {
        "artifact": kept.sha256,
        "name": "done",
        "job_id": rows[kept.sha256]["job_id"],
        "host": "a1",
        "state": "completed",
        "bytes": kept.size,
        "stored": True,
        "orphan": False,
        "mtime": None,
    }
    assert rows[orphan.sha256]["orphan"] and rows[orphan.sha256]["job_id"] is None
    assert rows["e" * 64]["stored"] is False and not rows["e" * 64]["orphan"]


async def test_job_detail_has_record_history_and_provenance(broker, tmp_path):
    bundle = make_bundle(tmp_path, "b", b"m", {"job": {"name": "done"}, "attempt": 1})
    await Artifacts(broker).put(bundle)
    rec = await put_record(broker, name="done")
    await write(broker, rec, status=JobStatus.COMPLETED, artifact=bundle.sha256, attempt=1, claimed_by="a1")
    detail = await ops.job_detail(broker, "done")
    assert detail["status"] == "completed" and detail["revision"] > 0
    assert [t["status"] for t in detail["history"]] == ["pending", "completed"]
    assert detail["provenance"] == {"job": {"name": "done"}, "attempt": 1} and detail["provenance_error"] is None
    assert (await ops.job_detail(broker, "done", provenance=False))["provenance"] is None


UPLOADER = """
import asyncio, sys
from trainfleet.broker.connection import Broker
from trainfleet.broker.settings import Settings
from trainfleet.broker.artifacts import Artifacts

async def main():
    broker = await Broker.connect(Settings.from_env(url=sys.argv[1]))
    store = Artifacts(broker).store
    store.window_bytes = 1 << 20  # a slow, steady upload: easy to cut off mid-way
    await store.put_file("cut-off", sys.argv[2])

asyncio.run(main())
"""


async def stored_chunk_sets(broker) -> dict[str, int]:
    store = Artifacts(broker).store
    prefix = f"$O.{store.bucket}.C."
    return {s[len(prefix) :]: n for s, n in (await store._subject_counts(prefix + ">")).items()}


async def settled_chunk_sets(broker, quiet_s: float = 0.3, limit_s: float = 15.0) -> dict[str, int]:
    """The chunk sets once no chunk has been added for ``quiet_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    last = await stored_chunk_sets(broker)
    while loop.time() < deadline:
        await asyncio.sleep(quiet_s)
        now = await stored_chunk_sets(broker)
        if now == last:
            return now
        last = now
    raise AssertionError(f"chunks still arriving after {limit_s} s: {last}")


async def test_an_upload_killed_mid_way_leaves_chunks_that_the_sweep_purges_and_nothing_else(
    broker, settings, tmp_path
):
    # Given a stored artifact, and an upload whose process is SIGKILLed after some chunks are in
    kept = make_bundle(tmp_path, "kept", b"k" * 300_000, {"job_id": "kept"})
    await Artifacts(broker).put(kept)
    store = Artifacts(broker).store
    kept_nuid = (await store.info(kept.sha256)).nuid
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(256 << 20))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", UPLOADER, settings.url, str(big), env={**os.environ, **role_env("agent")}
    )
    try:
        await wait_for(
            lambda: _upload_under_way(broker, kept_nuid), 60, interval_s=0.01, what="the upload to store chunks"
        )
    finally:
        proc.kill()
        await proc.wait()
    # What the killed process had already written to its socket is still stored after its death
    # (its upload streams a window of chunks ahead): the chunks left are the ones stored once the
    # server has read the dead connection to its end.
    sets = await settled_chunk_sets(broker)
    cut = {nuid: n for nuid, n in sets.items() if nuid != kept_nuid}
    assert len(cut) == 1 and kept_nuid in sets and await store.info("cut-off") is None
    # When the sweep runs: chunks younger than the age limit are left alone (an upload may be under way)
    assert await store.sweep_stray_chunks(older_than_s=3600) == {}
    assert await stored_chunk_sets(broker) == sets
    # ... and once they are old enough, exactly the cut-off upload's chunks go
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trainfleet.controller.cli",
        "artifacts",
        "sweep",
        "--older-than",
        "0",
        "--json",
        # Purging chunks is the controller's (or the admin's) right, not an operator's
        env={**os.environ, **role_env("admin"), "NATS_URL": settings.url},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await cli.communicate()
    report = json.loads(out)
    assert cli.returncode == 0
    assert (report["chunk_sets"], report["chunks"], report["nuids"]) == (1, *cut.values(), list(cut))
    assert await stored_chunk_sets(broker) == {kept_nuid: sets[kept_nuid]}
    # Then the stored artifact still downloads, verified
    dest = await Artifacts(broker).get(kept.sha256, tmp_path / "dl" / "kept.tar.zst")
    assert dest.read_bytes() == kept.path.read_bytes()


async def _upload_under_way(broker, kept_nuid: str) -> bool:
    return any(n >= 3 for nuid, n in (await stored_chunk_sets(broker)).items() if nuid != kept_nuid)


async def test_the_controller_sweeps_stray_chunks_on_its_own(broker, settings):
    # Given chunks no info points at (as a cut-off upload leaves them)
    store = Artifacts(broker).store
    for _ in range(3):
        await broker.js.publish(store.chunk_subject("strayNUID"), b"s" * 1000)
    assert await stored_chunk_sets(broker) == {"strayNUID": 3}
    # When a controller runs with a short sweep cadence and age limit
    ctl = Controller(
        as_role(settings.with_(artifact_sweep_s=0.2, stray_chunk_age_s=0.0), "controller"), handle_signals=False
    )
    task = asyncio.create_task(ctl.run())
    try:
        # Then they are purged without anyone asking
        await wait_for(lambda: _no_chunk_sets(broker), 30, what="the controller to purge the stray chunks")
    finally:
        ctl.request_stop()
        await asyncio.wait_for(task, 15)


async def _no_chunk_sets(broker) -> bool:
    return not await stored_chunk_sets(broker)
