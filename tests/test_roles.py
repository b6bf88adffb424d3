"""The role matrix, on a real nats-server configured by `trainfleet auth init`: every role tries
every operation; what DESIGN.md's roles allow succeeds, everything else is refused by the
server with a permissions violation (or, for a client without credentials, not let in)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from trainfleet.broker import jsapi, logs, tickets
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import build_bundle
from trainfleet.broker.connection import Broker, settle
from trainfleet.broker.control import request
from trainfleet.broker.errors import RemoteError, Unreachable
from trainfleet.broker.records import cas, get_record
from trainfleet.broker.roles import ROLES, inbox_prefix
from trainfleet.broker.schema import Capability, JobRecord, WorkerRecord
from trainfleet.broker.server import EmbeddedServer
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import get_spec, put_spec
from trainfleet.broker.tickets import TicketPuller
from trainfleet.broker.workers import put_worker
from trainfleet.controller.auth import AuthFiles, init_auth
from trainfleet.controller.certs import write_cert_set
from trainfleet.controller.controller import Controller

from .conftest import gbm_jobs, gbm_manifest, wait_for

VERBS = (
    "sync",
    "reload",
    "cancel",
    "requeue",
    "reconcile",
    "status",
    "jobs",
    "show",
    "workers",
    "hostpolicy",
    "explain",
)
READ_VERBS = {"status", "jobs", "show", "workers", "explain"}

# DESIGN.md, Roles: what each role may do (every other operation must be refused).
ALLOWED: dict[str, set[str]] = {
    "admin": {"*"},
    "controller": {
        "read records",
        "read specs",
        "cas state",
        "write specs",
        "publish ticket",
        "delete ticket",
        "download artifact",
        "read logs",
        "join controllers",
        "purge artifacts",
    },
    "operator": {"read records", "read specs", "download artifact", "read logs"} | {f"ctl.{v}" for v in VERBS},
    "agent": {
        "read records",
        "read specs",
        "cas state",
        "pull ticket",
        "ack ticket",
        "upload artifact",
        "publish logs",
        "write worker entry",
        "ctl.hostpolicy",
    },
    "viewer": {"read records", "read specs", "download artifact", "read logs"} | {f"ctl.{v}" for v in READ_VERBS},
}


class World:
    """One secured fleet: a server with the auth include, provisioned by admin, a controller
    running as the controller role, one pending job, a delivered ticket and a stored artifact."""

    def __init__(self, server: EmbeddedServer, auth: AuthFiles, admin: Broker, tmp_path: Path):
        self.server = server
        self.auth = auth
        self.admin = admin
        self.tmp_path = tmp_path
        self.job_id = ""
        self.ack_subject = ""
        self.artifact = ""

    def settings(self, name: str) -> Settings:
        env = self.auth.role_env(name)
        return Settings(
            url=self.server.url,
            nkey=env["NATS_NKEY"],
            inbox_prefix=env["TRAINFLEET_INBOX_PREFIX"],
            signing_key=env.get("TRAINFLEET_SIGNING_KEY"),
            trust_keys=(env["TRAINFLEET_TRUST_KEY"],) if "TRAINFLEET_TRUST_KEY" in env else (),
        )


@pytest.fixture
async def world(tmp_path: Path):
    auth = init_auth(tmp_path / "auth", Settings().names)
    server = EmbeddedServer(tmp_path / "nats", extra_config=auth.server_include.read_text()).start()
    admin = await Broker.connect(
        Settings(url=server.url, nkey=str(auth.seed_path("admin")), inbox_prefix=inbox_prefix("admin")),
        provision=True,
    )
    w = World(server, auth, admin, tmp_path)
    controller = Controller(w.settings("controller"), handle_signals=False)
    task = asyncio.create_task(controller.run())
    try:
        await wait_for(lambda: controller._service is not None, 20, what="the controller to serve")
        manifest = gbm_manifest(gbm_jobs(2))
        await controller.sync(manifest)
        w.job_id = manifest.jobs[0].job_id
        # One delivered ticket, left unacked: its reply subject is what an ack publishes to
        puller = await TicketPuller(admin).start()
        msg = await puller.pull(admin.names.consumer("cpu"), wait_s=2)
        assert msg is not None and msg.reply
        w.ack_subject = msg.reply
        out = tmp_path / "out"
        out.mkdir()
        (out / "model.bin").write_bytes(b"weights")
        bundle = build_bundle(out, {"job": {}}, tmp_path / "b.tar.zst")
        w.artifact = await Artifacts(admin).put(bundle)
        yield w
    finally:
        controller.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
        await admin.close()
        server.stop()


Op = Callable[[Broker, World, str], Awaitable[Any]]


async def _cas_state(b: Broker, w: World, role: str) -> None:
    stored = await get_record(w.admin, w.job_id)
    assert await cas(b, stored.record.evolve(reason=f"written by {role}"), stored.revision) is not None


async def _write_spec(b: Broker, w: World, role: str) -> None:
    spec = await get_spec(w.admin, w.job_id)
    await put_spec(b, msgspec.structs.replace(spec, name=f"by-{role}"), None)


async def _publish_ticket(b: Broker, w: World, role: str) -> None:
    await tickets.publish_ticket(b, JobRecord(job_id=w.job_id), "host.nobody", dedupe_suffix=role)


async def _delete_ticket(b: Broker, w: World, role: str) -> None:
    seq = await tickets.publish_ticket(w.admin, JobRecord(job_id=w.job_id), "host.nobody", dedupe_suffix=f"d{role}")
    assert await tickets.delete_ticket(b, seq)


async def _pull_ticket(b: Broker, w: World, role: str) -> None:
    puller = await TicketPuller(b).start()
    try:
        await puller.pull(b.names.consumer("gpu.0"))  # an empty class: answered at once
    finally:
        await puller.stop()


async def _ack_ticket(b: Broker, w: World, role: str) -> None:
    await b.nc.publish(w.ack_subject, b"+WPI")  # in progress: harmless to repeat


async def _upload(b: Broker, w: World, role: str) -> None:
    out = w.tmp_path / f"up-{role}"
    out.mkdir()
    (out / "model.bin").write_bytes(role.encode() * 100)
    await Artifacts(b).put(build_bundle(out, {}, w.tmp_path / f"{role}.tar.zst"))


async def _download(b: Broker, w: World, role: str) -> None:
    await Artifacts(b).get(w.artifact, w.tmp_path / "dl" / f"{role}.tar.zst")


async def _read_logs(b: Broker, w: World, role: str) -> None:
    async with contextlib.aclosing(logs.read_logs(b, w.job_id)) as entries:
        async for _ in entries:
            pass


async def _publish_logs(b: Broker, w: World, role: str) -> None:
    await b.nc.publish(b.names.logs_subject(w.job_id), b"a line\n")


async def _worker_entry(b: Broker, w: World, role: str) -> None:
    await put_worker(b, WorkerRecord(host_id="w1", capability=Capability(host_id="w1"), classes=("cpu",)))


async def _join_controllers(b: Broker, w: World, role: str) -> None:
    sub = await b.nc.subscribe(f"{b.names.ctl_group}.>", queue=b.names.ctl_queue_group)
    await settle(b.nc, timeout_s=2)  # the server's refusal of the SUB is read before its PONG
    await sub.unsubscribe()  # (a member that never answers would take requests from the controller)


async def _read_other_inbox(b: Broker, w: World, role: str) -> None:
    other = "viewer" if role != "viewer" else "operator"
    sub = await b.nc.subscribe(f"{inbox_prefix(other)}.>")
    await settle(b.nc, timeout_s=2)
    await sub.unsubscribe()


async def _create_stream(b: Broker, w: World, role: str) -> None:
    await b.js.add_stream(name=f"EVIL_{role.upper()}", subjects=[f"evil.{role}.>"])


async def _delete_stream(b: Broker, w: World, role: str) -> None:
    name = f"SCRATCH_{role.upper()}"
    await w.admin.js.add_stream(name=name, subjects=[f"scratch.{role}"])
    await b.js.delete_stream(name)


async def _purge_artifacts(b: Broker, w: World, role: str) -> None:
    stream = jsapi.object_stream(b.names.artifacts_bucket)
    await b.nc.request(jsapi.stream_purge(stream), b'{"filter":"$O.nothing.C.x"}', timeout=5)


def _ctl(verb: str) -> Op:
    async def call(b: Broker, w: World, role: str) -> None:
        body: dict[str, Any] = {"job": "no-such-job", "host_id": "h"}
        if verb == "sync":
            body = {"manifest": "schema_version = 1\n", "file": "empty.toml"}
        with contextlib.suppress(RemoteError):  # the controller answered: the request got through
            await request(b.nc, b.names, verb, body, timeout_s=5)

    return call


OPS: dict[str, Op] = {
    "read records": lambda b, w, role: get_record(b, w.job_id),
    "read specs": lambda b, w, role: get_spec(b, w.job_id),
    "cas state": _cas_state,
    "write specs": _write_spec,
    "publish ticket": _publish_ticket,
    "delete ticket": _delete_ticket,
    "pull ticket": _pull_ticket,
    "ack ticket": _ack_ticket,
    "upload artifact": _upload,
    "download artifact": _download,
    "read logs": _read_logs,
    "publish logs": _publish_logs,
    "write worker entry": _worker_entry,
    "join controllers": _join_controllers,
    "read another role's inbox": _read_other_inbox,
    "create stream": _create_stream,
    "delete stream": _delete_stream,
    "purge artifacts": _purge_artifacts,
    **{f"ctl.{verb}": _ctl(verb) for verb in VERBS},
}


async def attempt(b: Broker, violations: list[str], op: Op, w: World, role: str) -> str:
    """'ok', or 'denied' (a permissions violation, seen within seconds), or 'failed: ...'."""
    seen = len(violations)
    task = asyncio.create_task(op(b, w, role))
    deadline = time.monotonic() + 10
    while not task.done() and len(violations) == seen and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if not task.done() or len(violations) > seen:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    else:
        with contextlib.suppress(Exception):
            await settle(b.nc, timeout_s=2)  # a refused core publish: its error is read before the PONG
    if len(violations) > seen:
        return "denied"
    if task.cancelled():
        return "failed: no answer within 10 s and no permissions violation"
    if task.exception() is not None:
        return f"failed: {task.exception()!r}"
    return "ok"


@pytest.mark.parametrize("role", ROLES)
async def test_each_role_can_do_exactly_what_design_allows(world: World, role: str):
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            violations.append(str(exc))

    b = await Broker.connect(world.settings(role), error_cb=on_error)
    try:
        results = {name: await attempt(b, violations, op, world, role) for name, op in OPS.items()}
    finally:
        await b.close()
    allowed = ALLOWED[role]
    expected = {name: "ok" if "*" in allowed or name in allowed else "denied" for name in OPS}
    wrong = {name: f"{results[name]} (expected {expected[name]})" for name in OPS if results[name] != expected[name]}
    assert wrong == {}, f"{role}: {wrong}"


async def test_no_anonymous_client_gets_in(world: World):
    with pytest.raises(Unreachable, match="(?i)authori[sz]ation"):
        await Broker.connect(Settings(url=world.server.url))


async def test_a_client_certificate_gets_exactly_its_roles_rights(tmp_path: Path):
    # Given a server that requires TLS and maps client certificates to the roles' permissions
    auth = init_auth(tmp_path / "auth", Settings().names)
    certs = write_cert_set(tmp_path / "certs", roles=["admin", "agent", "viewer"])
    server = EmbeddedServer(
        tmp_path / "nats", extra_config=certs.tls_conf.read_text() + auth.mtls_include.read_text()
    ).start()

    def by_cert(role: str) -> Settings:
        cert, key = certs.roles[role]
        return Settings(
            url=server.url, tls_ca=str(certs.ca), tls_cert=str(cert), tls_key=str(key), inbox_prefix=inbox_prefix(role)
        )

    try:
        admin = await Broker.connect(by_cert("admin"), provision=True)
        manifest = gbm_manifest(gbm_jobs(1))
        await put_spec(admin, manifest.jobs[0], None)
        await admin.jobs.create(manifest.jobs[0].job_id, msgspec.json.encode(JobRecord(job_id=manifest.jobs[0].job_id)))
        w = World(server, auth, admin, tmp_path)
        w.job_id = manifest.jobs[0].job_id
        for role, expected in (
            ("agent", {"read records": "ok", "cas state": "ok", "write specs": "denied", "create stream": "denied"}),
            ("viewer", {"read records": "ok", "cas state": "denied", "write specs": "denied"}),
        ):
            violations: list[str] = []

            async def on_error(exc: Exception, seen: list[str] = violations) -> None:
                if "permissions violation" in str(exc).lower():
                    seen.append(str(exc))

            b = await Broker.connect(by_cert(role), error_cb=on_error)
            try:
                got = {name: await attempt(b, violations, OPS[name], w, role) for name in expected}
            finally:
                await b.close()
            assert got == expected, role
        await admin.close()
    finally:
        server.stop()
