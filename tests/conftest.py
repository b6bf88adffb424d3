"""Shared fixtures: a real nats-server per test, settings with short leases, fleet helpers.

Every test server runs with the roles of `trainfleet auth init` (one set of identities per
session): the test itself acts as admin (it provisions and pokes at records), the harness's
controller and agents, spawned agents and the CLI each run under their own role."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest

from trainfleet.agent.agent import Agent, AgentOptions
from trainfleet.broker.connection import Broker
from trainfleet.broker.jobs import Job
from trainfleet.broker.records import load_records
from trainfleet.broker.schema import Capability, JobRecord, JobSpec, encode
from trainfleet.broker.server import EmbeddedServer
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import put_spec
from trainfleet.controller.auth import AuthFiles, init_auth
from trainfleet.controller.controller import Controller
from trainfleet.controller.manifest import Manifest, parse_manifest

REPO = Path(__file__).resolve().parent.parent
FLEET_AUTH: AuthFiles | None = None  # the session's identities (see fleet_auth)


@pytest.fixture(scope="session", autouse=True)
def fleet_auth(tmp_path_factory: pytest.TempPathFactory) -> AuthFiles:
    """One `trainfleet auth init` per session: every test server enforces these roles."""
    global FLEET_AUTH
    FLEET_AUTH = init_auth(tmp_path_factory.mktemp("auth"), Settings().names)
    return FLEET_AUTH


def role_env(name: str) -> dict[str, str]:
    """What a process running as identity ``name`` gets in its environment (NATS_NKEY...)."""
    assert FLEET_AUTH is not None
    return FLEET_AUTH.role_env(name)


def as_role(settings: Settings, name: str) -> Settings:
    """``settings`` for a client running as identity ``name`` (admin, controller, agent...)."""
    env = role_env(name)
    return settings.with_(
        nkey=env["NATS_NKEY"],
        inbox_prefix=env["TRAINFLEET_INBOX_PREFIX"],
        signing_key=env.get("TRAINFLEET_SIGNING_KEY"),
        trust_keys=(env["TRAINFLEET_TRUST_KEY"],) if "TRAINFLEET_TRUST_KEY" in env else None,
    )


@pytest.fixture
def nats_server(tmp_path: Path, fleet_auth: AuthFiles) -> Iterator[EmbeddedServer]:
    """A real JetStream server on a free loopback port, its store in tmp_path, roles enforced."""
    server = EmbeddedServer(tmp_path / "nats", extra_config=fleet_auth.server_include.read_text()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(nats_server: EmbeddedServer) -> Settings:
    """The test's own settings: the admin role (it provisions, and writes records as it likes)."""
    base = Settings(
        url=nats_server.url,
        lease_s=6.0,
        heartbeat_s=1.0,
        reconcile_s=0.5,
        nak_delay_s=0.5,
        fetch_timeout_s=0.5,
        drain_timeout_s=2.0,
        term_grace_s=2.0,
        worker_ttl_s=10.0,
    )
    return as_role(base, "admin")


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    b = await Broker.connect(settings, provision=True)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def role_controller(settings: Settings, broker: Broker) -> AsyncIterator[Controller]:
    """A started controller under the controller role's nkey (``broker``, the admin's, provisioned)."""
    controller = Controller(as_role(settings, "controller"), handle_signals=False)
    await controller.start()
    try:
        yield controller
    finally:
        await controller.stop()


def fake_capability(host_id: str, **overrides: Any) -> Capability:
    base: dict[str, Any] = dict(
        host_id=host_id,
        cores_physical=2,
        cores_logical=2,
        cores_usable=2.0,
        ram_total_gib=16.0,
        ram_available_gib=12.0,
        torch_version="2.13.0+cpu",
        torch_cuda=False,
        python="3.11",
        platform="Linux-x86_64",
        cuda_reason="no CUDA: test host",
    )
    base.update(overrides)
    return Capability(**base)


GBM_MODEL = """
[models.gbm]
command = ["{python}", "-m", "trainfleet.examples.sklearn_gbm"]
modes = ["classify", "regress"]
requires = ["sklearn"]
[models.gbm.hyper.max_iter]
type = "int"
default = 10
[models.gbm.hyper.learning_rate]
type = "float"
default = 0.1
[models.gbm.hyper.max_depth]
type = "int"
default = 3
[models.gbm.hyper.fail]
type = "bool"
default = false
"""


LINREG_MODEL = """
[models.linreg]
command = ["{python}", "-m", "trainfleet.examples.linreg"]
modes = ["gd", "sgd"]
[models.linreg.hyper.epochs]
type = "int"
default = 50
[models.linreg.hyper.n_samples]
type = "int"
default = 4000
"""


def linreg_text(n: int, *, epochs: int = 50, prefix: str = "lr", extra: str = "", job_extra: str = "") -> str:
    """The manifest text of ``n`` fast numpy jobs; ``epochs`` sets how long each trains (8000 ≈ 2 s here)."""
    # Seeds differ per prefix: name and constraints are not part of a job's identity.
    base = sum(map(ord, prefix)) * 1000
    jobs = "".join(
        f'[[jobs]]\nname = "{prefix}-{i}"\nmodel = "linreg"\nmode = "gd"\nseed = {base + i}\n'
        f"hyper = {{ epochs = {epochs} }}\n{job_extra}\n"
        for i in range(n)
    )
    return "schema_version = 1\n" + extra + LINREG_MODEL + jobs


def linreg_manifest(n: int, **kw: Any) -> Manifest:
    """``n`` fast numpy jobs (see linreg_text), parsed."""
    return parse_manifest(linreg_text(n, **kw), file="linreg.toml")


def gbm_manifest(jobs: str, extra: str = "") -> Manifest:
    """A manifest over the fast scikit-learn model with the given [[jobs]] text."""
    text = "schema_version = 1\n" + extra + GBM_MODEL + textwrap.dedent(jobs)
    return parse_manifest(text, file="test.toml")


def gbm_jobs(n: int, *, prefix: str = "job", **fields: Any) -> str:
    out = []
    for i in range(n):
        extra = "".join(
            f"{k} = {v!r}\n".replace("'", '"').replace("True", "true").replace("False", "false")
            for k, v in fields.items()
        )
        out.append(f'[[jobs]]\nname = "{prefix}-{i}"\nmodel = "gbm"\nmode = "classify"\nseed = {i}\n{extra}')
    return "\n".join(out)


class FleetHarness:
    """An in-process controller plus agents on one event loop, all against the real server."""

    def __init__(self, settings: Settings, workdir: Path):
        self.settings = settings
        self.workdir = workdir
        self.controller = Controller(as_role(settings, "controller"), handle_signals=False)
        self.agents: dict[str, Agent] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.ctl_task: asyncio.Task[None] | None = None

    async def start_controller(self) -> Controller:
        self.ctl_task = asyncio.create_task(self.controller.run())
        await wait_for(lambda: self.controller.broker is not None and self.controller._service is not None)
        return self.controller

    def start_agent(self, host_id: str, capability: Capability | None = None, **opts: Any) -> Agent:
        options = AgentOptions(host_id=host_id, handle_signals=False, workdir=str(self.workdir / host_id), **opts)
        agent = Agent(as_role(self.settings, "agent"), options, capability=capability or fake_capability(host_id))
        self.agents[host_id] = agent
        self.tasks[host_id] = asyncio.create_task(agent.run())
        return agent

    async def stop_agent(self, host_id: str) -> None:
        self.agents[host_id].request_stop()
        await asyncio.wait_for(self.tasks.pop(host_id), 30)

    async def stop(self) -> None:
        for host_id in list(self.tasks):
            with contextlib.suppress(Exception):
                await self.stop_agent(host_id)
        if self.ctl_task is not None:
            self.controller.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ctl_task, 15)


@pytest.fixture
async def fleet(settings: Settings, broker: Broker, tmp_path: Path) -> AsyncIterator[FleetHarness]:
    # (broker: provisioned by the admin; the controller's role may not create streams)
    harness = FleetHarness(settings, tmp_path / "agents")
    try:
        yield harness
    finally:
        await harness.stop()


async def wait_for(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout_s: float = 60.0,
    interval_s: float = 0.1,
    what: str = "condition",
) -> Any:
    """Poll until ``predicate`` (sync or async) is truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
        except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            # A failover or reconnect in progress: not ready yet (re-raised at the deadline).
            if time.monotonic() > deadline:
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


async def records(broker: Broker) -> dict[str, JobRecord]:
    return {k: s.record for k, s in (await load_records(broker)).items()}


async def wait_terminal(
    broker: Broker, job_ids: set[str] | list[str], timeout_s: float = 120.0
) -> dict[str, JobRecord]:
    wanted = set(job_ids)

    async def done() -> dict[str, JobRecord] | None:
        recs = await records(broker)
        if wanted <= set(recs) and all(recs[j].status.terminal for j in wanted):
            return recs
        return None

    return await wait_for(done, timeout_s, interval_s=0.25, what=f"{len(wanted)} jobs to finish")


class KVAudit:
    """Records every write to the jobs KV from the moment it starts: the ground truth for
    'completed exactly once' (a double accept would be two completed revisions)."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self.entries: list[JobRecord] = []
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None

    async def start(self) -> KVAudit:
        from trainfleet.broker.schema import decode

        self._watcher = await self.broker.jobs.watchall(include_history=True)

        async def collect() -> None:
            async for entry in self._watcher:
                if entry is not None and entry.value:
                    with contextlib.suppress(Exception):
                        self.entries.append(decode(entry.value, JobRecord))

        self._task = asyncio.create_task(collect())
        return self

    def completions(self) -> dict[tuple[str, int], int]:
        """(job_id, generation) → number of distinct completed revisions."""
        out: dict[tuple[str, int], int] = {}
        seen: set[tuple[str, int, str | None]] = set()
        for rec in self.entries:
            if rec.status.value == "completed" and (rec.job_id, rec.generation, rec.artifact) not in seen:
                seen.add((rec.job_id, rec.generation, rec.artifact))
                out[(rec.job_id, rec.generation)] = out.get((rec.job_id, rec.generation), 0) + 1
        return out

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()


async def trainer_starts(broker: Broker, job_ids: list[str] | set[str] | None = None) -> dict[str, int]:
    """How many times a trainer started per job, from the agents' lifecycle events in the logs stream."""
    from trainfleet.broker.schema import ProgressEvent, decode

    names = broker.names
    counts: dict[str, int] = {}
    seq = 1
    while True:
        try:
            msg = await broker.js.get_msg(names.logs_stream, seq=seq, subject=names.events_subject("*"), next=True)
        except Exception:
            break
        seq = (msg.seq or seq) + 1
        with contextlib.suppress(Exception):
            event = decode(msg.data or b"", ProgressEvent)
            if event.kind == "started" and (job_ids is None or event.job_id in job_ids):
                counts[event.job_id] = counts.get(event.job_id, 0) + 1
    return counts


async def stock_artifacts(broker: Broker) -> Any:
    """The artifacts bucket through nats-py's own object store (a stock client, for interop)."""
    return await broker.js.object_store(broker.names.artifacts_bucket)


async def put_job(broker: Broker, spec: JobSpec, **changes: Any) -> Job:
    """A job written straight to NATS, as a controller would (unsigned spec, then its record)."""
    await put_spec(broker, spec, None)
    rec = JobRecord(job_id=spec.job_id, priority=spec.priority, **changes)
    revision = await broker.jobs.create(spec.job_id, encode(rec))
    return Job(spec, rec, revision)


class FleetProc:
    """One trainfleet process (an agent, a controller) run as the real CLI under its role, for
    tests that SIGKILL and restart it. ``exits`` keeps every exit the test did not cause."""

    def __init__(self, settings: Settings, role: str, name: str, argv: list[str], root: Path):
        self.settings, self.role, self.name, self.argv, self.root = settings, role, name, argv, root
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.kill_times: list[float] = []  # wall clock, to match against records
        self.exits: list[int] = []

    @classmethod
    def agent(cls, settings: Settings, host_id: str, root: Path) -> FleetProc:
        argv = ["agent", "--host-id", host_id, "--workdir", str(root / host_id), "--no-torch-probe"]
        return cls(settings, "agent", host_id, argv, root)

    @classmethod
    def controller(cls, settings: Settings, manifest: Path, root: Path, name: str = "controller") -> FleetProc:
        return cls(settings, "controller", name, ["controller", "--manifest", str(manifest)], root)

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    def start(self) -> None:
        s = self.settings
        env = {
            **os.environ,
            **role_env(self.role),
            "NATS_URL": s.url,
            "TRAINFLEET_LEASE_S": str(s.lease_s),
            "TRAINFLEET_HEARTBEAT_S": str(s.heartbeat_s),
            "TRAINFLEET_RECONCILE_S": str(s.reconcile_s),
            "TRAINFLEET_FETCH_TIMEOUT_S": str(s.fetch_timeout_s),
            "TRAINFLEET_NAK_DELAY_S": str(s.nak_delay_s),
            "TRAINFLEET_WORKER_TTL_S": str(s.worker_ttl_s),
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "trainfleet.controller.cli", *self.argv],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check(self) -> None:
        """Note an exit nobody asked for (the process is then started again)."""
        if self.proc is not None and self.proc.poll() is not None:
            self.exits.append(self.proc.returncode)
            self.start()

    def kill(self) -> None:
        self.check()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1
            self.kill_times.append(time.time())

    def stop(self) -> None:
        """SIGTERM (a clean exit is expected: a non-zero code is kept in ``exits``)."""
        self.check()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = -9
            if code not in (0, -signal.SIGTERM):  # (-SIGTERM: stopped before its handlers were set)
                self.exits.append(code)
        self.proc = None

    def log_count(self, text: str) -> int:
        return self.log_path.read_text(errors="replace").count(text)


async def pilot_until(pilot: Any, predicate: Callable[[], Any], what: str, timeout_s: float = 20.0) -> None:
    """Let a Textual app under its pilot run until ``predicate`` holds (fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)
