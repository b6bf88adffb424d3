"""A full store: every storage limit is named, nothing is left corrupt, and everything recovers
once there is room again.

Each server here runs with a small ``jetstream { max_file_store }``, so the store fills up
within a test, and with the roles of the other tests (the account-limit test alone runs an
account of its own, with a user and password)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js import api

from trainfleet.broker import kv
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import Bundle, build_bundle
from trainfleet.broker.connection import Broker
from trainfleet.broker.control import request
from trainfleet.broker.errors import RemoteError, StoreFull, StoreTooSmall
from trainfleet.broker.schema import JobRecord, JobStatus, decode
from trainfleet.broker.server import EmbeddedServer
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import load_specs
from trainfleet.broker.tickets import scan_tickets
from trainfleet.controller.controller import Controller
from trainfleet.controller.manifest import parse_manifest

from . import conftest
from .conftest import LINREG_MODEL, FleetHarness, as_role, records, role_env, wait_for, wait_terminal

MiB = 1 << 20
CLI = [sys.executable, "-m", "trainfleet.controller.cli"]
DOCS = "When the store is full"


def small_server(data_dir: Path, max_file_store: str | int, *, port: int | None = None) -> EmbeddedServer:
    """A server whose JetStream file storage is ``max_file_store`` ("8MB", or bytes), roles
    enforced. (This jetstream block replaces the one EmbeddedServer writes: the later one wins.)"""
    assert conftest.FLEET_AUTH is not None
    jetstream = (
        f"jetstream {{\n    store_dir: {str(data_dir / 'jetstream')!r}\n    sync_interval: always\n"
        f"    max_file_store: {max_file_store}\n}}\n"
    )
    return EmbeddedServer(data_dir, port=port, extra_config=jetstream + conftest.FLEET_AUTH.server_include.read_text())


@pytest.fixture
def small(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = small_server(tmp_path / "nats", "8MB").start()
    try:
        yield server
    finally:
        server.stop()


def admin(server: EmbeddedServer, **changes) -> Settings:
    base = Settings(
        url=server.url,
        lease_s=6.0,
        heartbeat_s=1.0,
        reconcile_s=0.5,
        nak_delay_s=0.5,
        fetch_timeout_s=0.5,
        drain_timeout_s=2.0,
        term_grace_s=2.0,
        worker_ttl_s=10.0,
    )
    return as_role(base, "admin").with_(**changes)


def random_bundle(tmp_path: Path, name: str, size: int) -> Bundle:
    """A bundle of ``size`` random (incompressible) bytes."""
    out = tmp_path / f"out-{name}"
    out.mkdir()
    (out / "blob.bin").write_bytes(os.urandom(size))
    return build_bundle(out, {"job": name}, tmp_path / f"{name}.tar.zst")


def run_cli(*args: str, role: str, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **role_env(role), "NATS_URL": url, **env},
    )


# -- provisioning ---------------------------------------------------------------------
async def test_a_logs_stream_bigger_than_the_server_allows_names_the_stream_the_limit_and_the_setting(small):
    # Given a server with 8 MB of file storage and the default 256 MiB logs stream
    with pytest.raises(StoreTooSmall) as err:
        await Broker.connect(admin(small), provision=True)
    # Then provisioning says which stream, how much it wants, which limit refuses it and what to change
    message = str(err.value)
    assert err.value.exit_code == 3
    for part in ("logs stream TRAINFLEET_LOGS", "256 MiB", "TRAINFLEET_LOGS_MAX_BYTES", "max_file_store", DOCS):
        assert part in message, (part, message)

    # And the command says so on one line, exit 3, no traceback
    result = run_cli("provision", role="admin", url=small.url)
    assert result.returncode == 3, result.stderr
    assert "TRAINFLEET_LOGS_MAX_BYTES" in result.stderr and "max_file_store" in result.stderr
    assert "Traceback" not in result.stderr

    # When the logs stream is given a size that fits, provisioning succeeds
    result = run_cli("provision", role="admin", url=small.url, TRAINFLEET_LOGS_MAX_BYTES=str(1 * MiB))
    assert result.returncode == 0, result.stderr
    assert "1 MiB" in result.stdout
    broker = await Broker.connect(admin(small, logs_max_bytes=1 * MiB))
    try:
        info = await broker.js.stream_info(broker.names.logs_stream)
        assert info.config.max_bytes == 1 * MiB
    finally:
        await broker.close()


async def test_provision_checks_the_sizes_against_the_accounts_limits_before_creating_anything(tmp_path):
    # Given an account allowed 8 MiB of file storage, 2 MiB of it reserved by another stream
    config = (
        f"jetstream {{\n    store_dir: {str(tmp_path / 'js')!r}\n}}\n"
        "accounts {\n  FLEET: {\n    jetstream: { max_file: 8MiB, max_mem: 1MiB }\n"
        '    users: [ { user: "admin", password: "s3cret" } ]\n  }\n}\n'
    )
    server = EmbeddedServer(tmp_path / "nats", extra_config=config).start()
    try:
        nc = await nats.connect(server.url, user="admin", password="s3cret")
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(name="OTHER", subjects=["other.>"], max_bytes=2 * MiB))
        settings = Settings(url=server.url, user="admin", password="s3cret", logs_max_bytes=7 * MiB)

        # When a fleet whose logs stream wants 7 MiB is provisioned there
        with pytest.raises(StoreTooSmall) as err:
            await Broker.connect(settings, provision=True)

        # Then the check names the stream, the account's limit, what others reserve, and the most that fits
        message = str(err.value)
        for part in ("TRAINFLEET_LOGS", "7 MiB", "the account allows 8 MiB", "2 MiB", "at most 5 MiB", "max_file"):
            assert part in message, (part, message)
        # and nothing was created before the check
        assert {s.config.name for s in await js.streams_info()} == {"OTHER"}

        # And what it says fits does
        broker = await Broker.connect(settings.with_(logs_max_bytes=5 * MiB), provision=True)
        await broker.close()
        await nc.close()
    finally:
        server.stop()


# -- artifacts ------------------------------------------------------------------------
async def test_an_artifact_that_does_not_fit_is_refused_naming_the_bucket_and_stored_once_space_is_freed(
    small, tmp_path
):
    # Given a provisioned fleet on an 8 MB store that already holds a 5 MiB artifact
    owner = await Broker.connect(admin(small, logs_max_bytes=256 * 1024), provision=True)
    agent = await Broker.connect(as_role(admin(small, logs_max_bytes=256 * 1024), "agent"))
    try:
        old = random_bundle(tmp_path, "old", 5 * MiB)
        await Artifacts(agent).put(old)

        # When an agent uploads a 4 MiB artifact: it does not fit
        new = random_bundle(tmp_path, "new", 4 * MiB)
        with pytest.raises(StoreFull) as err:
            await Artifacts(agent).put(new)

        # Then the error names the artifact, the bucket, the limit and what makes room
        message = str(err.value)
        assert err.value.exit_code == 3
        for part in (new.sha256[:12], "trainfleet-artifacts", "max_file_store", "artifacts sweep", DOCS):
            assert part in message, (part, message)
        assert "TRAINFLEET_LOGS" in message  # the logs stream to purge, by its name

        # And nothing is corrupted: the refused artifact is not there, the old one reads back whole
        artifacts = Artifacts(owner)
        assert await artifacts.info(new.sha256) is None
        assert [i.name for i in await artifacts.list()] == [old.sha256]
        got = await artifacts.get(old.sha256, tmp_path / "old-again.tar.zst")
        assert got.read_bytes() == old.path.read_bytes()

        # When space is freed: the old artifact's chunks purged (a delete marker is a write too, and
        # a full store refuses it: purge first), then the old artifact deleted, and the chunks the
        # refused upload left behind (an agent may not purge) swept
        stored = await artifacts.info(old.sha256)
        assert stored is not None
        await owner.js.purge_stream(artifacts.store.stream, subject=artifacts.store.chunk_subject(stored.nuid))
        await artifacts.store.delete(old.sha256)
        assert len(await artifacts.sweep(0)) == 1

        # Then the same upload succeeds and reads back verified
        assert await Artifacts(agent).put(new) == new.sha256
        got = await artifacts.get(new.sha256, tmp_path / "new-again.tar.zst")
        assert got.read_bytes() == new.path.read_bytes()
    finally:
        await agent.close()
        await owner.close()


BLOB_MANIFEST = """schema_version = 1
[settings]
max_attempts = 50
[models.blob]
command = ["{python}", "-c", "import os, sys; out = [a[6:] for a in sys.argv if a.startswith('--out=')][0]; \
os.makedirs(out, exist_ok=True); open(os.path.join(out, 'blob.bin'), 'wb').write(os.urandom(%d))"]
modes = ["write"]
[[jobs]]
name = "big"
model = "blob"
mode = "write"
"""


def blob_manifest(size: int):
    return parse_manifest(BLOB_MANIFEST % size, file="blob.toml")


async def test_a_job_whose_artifact_does_not_fit_its_bucket_is_handed_back_saying_why_and_completes_later(tmp_path):
    # Given a fleet whose artifacts bucket is capped at 4 MiB (discard new, so a full bucket
    # refuses uploads and nothing else), and a job whose output is 6 MiB of random bytes
    server = small_server(tmp_path / "nats", "64MB").start()
    settings = admin(server, logs_max_bytes=256 * 1024)
    broker = await Broker.connect(settings, provision=True)
    fleet = FleetHarness(settings, tmp_path / "agents")
    objects = f"OBJ_{broker.names.artifacts_bucket}"
    config = (await broker.js.stream_info(objects)).config
    config.max_bytes = 4 * MiB
    await broker.js.update_stream(config)
    await (await Broker.connect(settings, provision=True)).close()  # provisioning again keeps the cap
    assert (await broker.js.stream_info(objects)).config.max_bytes == 4 * MiB
    try:
        manifest = blob_manifest(6 * MiB)
        job_id = manifest.jobs[0].job_id
        ctl = await fleet.start_controller()
        await ctl.sync(manifest)
        fleet.start_agent("a1")

        # When its upload is refused, the job is handed back, pending, saying why
        async def refused() -> JobRecord | None:
            rec = (await records(broker)).get(job_id)
            return rec if rec is not None and "trainfleet-artifacts" in (rec.last_error or "") else None

        rec = await wait_for(refused, 120, what="the upload to be refused")
        assert "max_bytes" in (rec.last_error or "") and not rec.status.terminal, rec.last_error

        # And once the bucket has room (its cap raised)
        config.max_bytes = 32 * MiB
        await broker.js.update_stream(config)

        # Then the job completes, its artifact whole
        rec = (await wait_terminal(broker, [job_id], timeout_s=180))[job_id]
        assert rec.status == JobStatus.COMPLETED, (rec.reason, rec.last_error)
        got = await Artifacts(broker).get(rec.artifact, tmp_path / "big.tar.zst")
        assert got.stat().st_size == rec.artifact_bytes
    finally:
        await fleet.stop()
        await broker.close()
        server.stop()


async def test_a_job_whose_artifact_fills_the_whole_store_is_run_again_once_the_store_has_room(tmp_path, caplog):
    # Given a fleet on an 8 MB store and a job whose output (10 MiB, incompressible) cannot fit:
    # its upload fills the store, so the agent cannot write the job's record either
    server = small_server(tmp_path / "nats", "8MB").start()
    settings = admin(server, logs_max_bytes=256 * 1024)
    broker = await Broker.connect(settings, provision=True)
    fleet = FleetHarness(settings, tmp_path / "agents")
    try:
        manifest = blob_manifest(10 * MiB)
        job_id = manifest.jobs[0].job_id
        ctl = await fleet.start_controller()
        await ctl.sync(manifest)
        fleet.start_agent("a1")

        # When the upload is refused, the agent says which bucket and which limit
        def refused() -> bool:
            return any(
                "trainfleet-artifacts" in r.getMessage() and "max_file_store" in r.getMessage() for r in caplog.records
            )

        await wait_for(refused, 120, what="the upload to be refused")

        # And once the store has room (the server restarted with a bigger limit)
        server.stop()
        server = small_server(tmp_path / "nats", "64MB", port=server.port).start()

        # Then the job is run again and completes, its artifact whole; no record was corrupted
        rec = (await wait_terminal(broker, [job_id], timeout_s=180))[job_id]
        assert rec.status == JobStatus.COMPLETED, (rec.reason, rec.last_error)
        got = await Artifacts(broker).get(rec.artifact, tmp_path / "big.tar.zst")
        assert got.stat().st_size == rec.artifact_bytes
        assert all(decode(e.value or b"", JobRecord) for e in await kv.snapshot(broker.jobs))
    finally:
        await fleet.stop()
        await broker.close()
        server.stop()


# -- sync -----------------------------------------------------------------------------
def linreg_text(n: int) -> str:
    jobs = "".join(f'[[jobs]]\nname = "lr-{i}"\nmodel = "linreg"\nmode = "gd"\nseed = {7000 + i}\n' for i in range(n))
    return "schema_version = 1\n" + LINREG_MODEL + jobs


async def stream_bytes(broker: Broker, stream: str) -> int:
    return (await broker.js.stream_info(stream)).state.bytes


async def measure_sync(data_dir: Path, text: str) -> dict[str, int]:
    """Bytes a sync of the manifest ``text`` stores in each resource, on a server of its own."""
    server = small_server(data_dir, "1GB").start()
    try:
        settings = admin(server, logs_max_bytes=64 * 1024)
        broker = await Broker.connect(settings, provision=True)
        ctl = Controller(as_role(settings, "controller"), handle_signals=False)
        try:
            await ctl.start()
            await ctl.sync(parse_manifest(text, file="lr.toml"))
            names = broker.names
            return {
                "specs": await stream_bytes(broker, f"KV_{names.specs_bucket}"),
                "records": await stream_bytes(broker, f"KV_{names.jobs_bucket}"),
                "tickets": await stream_bytes(broker, names.jobs_stream),
            }
        finally:
            await ctl.stop()
            await broker.close()
    finally:
        server.stop()


async def fill(broker: Broker, room: int, limit: int) -> None:
    """Fill the store with a FILLER stream until only ``room`` bytes of ``limit`` are left."""
    js = broker.js
    await js.add_stream(api.StreamConfig(name="FILLER", subjects=["filler"]))
    used = (await js.account_info()).storage
    chunk = 64 * 1024
    while used + chunk + 200 < limit - room:
        await js.publish("filler", os.urandom(chunk))
        used = (await js.account_info()).storage
    last = limit - room - used - 60  # a stored message costs its subject and some 40 bytes more
    if last > 0:
        await js.publish("filler", os.urandom(last))


async def ticketed(broker: Broker, recs: dict[str, JobRecord]) -> int:
    """How many of ``recs`` have a ticket of their generation on each class they are offered on."""
    have = {(t.ticket.job_id, t.ticket.generation, t.ticket.klass) for t in await scan_tickets(broker) if t.ticket}
    return sum(1 for r in recs.values() if all((r.job_id, r.generation, k) in have for k in r.offered or (r.klass,)))


async def test_a_sync_that_runs_out_of_space_says_how_far_it_got_and_recovers_once_space_is_freed(tmp_path):
    # Given a store with room for every spec but only about half the records of a 300-job manifest
    text = linreg_text(300)
    sizes = await measure_sync(tmp_path / "measure", text)
    limit = 4 * MiB
    server = small_server(tmp_path / "nats", limit).start()
    settings = admin(server, logs_max_bytes=64 * 1024)
    broker = await Broker.connect(settings, provision=True)
    ctl = Controller(as_role(settings, "controller"), handle_signals=False)
    try:
        await ctl.start()  # its control service, no reconcile loop: the test reconciles when it wants to
        await fill(broker, sizes["specs"] + sizes["records"] // 2, limit)

        # When the manifest is synced through the control service, as `trainfleet sync` does
        with pytest.raises(RemoteError) as err:
            await request(broker.nc, broker.names, "sync", {"manifest": text, "file": "lr.toml"}, timeout_s=60)

        # Then it stops with exit 3, naming the bucket, the limit, and how far it got
        message = str(err.value)
        assert err.value.exit_code == 3, message
        recs = await records(broker)
        assert 0 < len(recs) < 300
        for part in (
            "sync stopped",
            "trainfleet-jobs",
            "max_file_store",
            "300 of 300 specs",
            f"{len(recs)} of 300 records",
            "reconcile",
            DOCS,
        ):
            assert part in message, (part, message)

        # And nothing is corrupt: every record and spec decodes, every record is pending
        entries = await kv.snapshot(broker.jobs)
        assert len(entries) == len(recs)
        assert all(decode(e.value or b"", JobRecord).status == JobStatus.PENDING for e in entries)
        assert len(await load_specs(broker)) == 300
        before = await ticketed(broker, recs)
        assert before < len(recs)

        # When space is freed and the controller reconciles
        await broker.js.purge_stream("FILLER")
        stats = await ctl.reconcile()

        # Then every pending record has its ticket
        assert stats.get("republished", 0) == len(recs) - before
        assert await ticketed(broker, recs) == len(recs)

        # And syncing again creates the rest, each with its ticket, and keeps what exists
        report = await ctl.sync(parse_manifest(text, file="lr.toml"))
        assert len(report.created) == 300 - len(recs) and len(report.unchanged) == len(recs)
        recs = await records(broker)
        assert len(recs) == 300 and await ticketed(broker, recs) == 300
    finally:
        await ctl.stop()
        await broker.close()
        server.stop()
