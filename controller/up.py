"""``trainfleet up``: a whole fleet on one machine, for demos and first contact.

Starts an embedded nats-server (unless ``--url``), provisions resources,
starts the controller and N agents as separate processes, shows live progress
until every job of the manifest is terminal, prints a summary, and tears the
fleet down (unless ``--keep``). Exit 0 only when every job completed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from trainfleet.broker import display
from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import EXIT_OK, FleetError, ManifestError, Unsatisfied
from trainfleet.broker.logs import LiveProgress
from trainfleet.broker.records import load_records
from trainfleet.broker.schema import JobRecord, JobStatus
from trainfleet.broker.security import redact_url
from trainfleet.broker.server import EmbeddedServer
from trainfleet.broker.settings import NATS_ENV, Settings, connection_env
from trainfleet.controller import view
from trainfleet.controller.auth import AuthFiles, init_auth
from trainfleet.controller.manifest import Manifest, load_manifest


@dataclass
class Fleet:
    """The processes ``up`` started, so they can be watched and stopped in order."""

    data_dir: Path
    server: EmbeddedServer | None = None
    controller: subprocess.Popen[bytes] | None = None
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.data_dir / f"{name}.log", "ab")
        self.logs.append(log)
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )

    def dead(self) -> list[str]:
        out = [] if self.controller is None or self.controller.poll() is None else ["controller"]
        out += [f"agent {i + 1}" for i, p in enumerate(self.agents) if p.poll() is not None]
        return out

    def stop(self) -> None:
        """Agents first (they hand back running jobs), then the controller, then the server."""
        for proc in [*self.agents, self.controller]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.agents, self.controller]:
            if proc is None:
                continue
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.server is not None:
            self.server.stop()
        for log in self.logs:
            log.close()


# Variables of the caller's environment that a child must not inherit: each child gets exactly
# the identity its role needs (connection_env), never the caller's.
IDENTITY_VARS = (*NATS_ENV.values(), "TRAINFLEET_INBOX_PREFIX", "TRAINFLEET_SIGNING_KEY", "TRAINFLEET_TRUST_KEY")


def _child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in IDENTITY_VARS}
    env.update(connection_env(settings))
    env.update(
        {
            "TRAINFLEET_PREFIX": settings.prefix,
            "TRAINFLEET_LEASE_S": str(settings.lease_s),
            "TRAINFLEET_HEARTBEAT_S": str(settings.heartbeat_s),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@dataclass
class Identities:
    """Who each process of a local fleet is: the settings of ``up`` itself (it provisions, then
    watches), of the controller and of the agents."""

    admin: Settings
    watcher: Settings
    controller: Settings
    agent: Settings


def _as(settings: Settings, auth: AuthFiles, name: str) -> Settings:
    env = auth.role_env(name)
    return settings.with_(
        nkey=env["NATS_NKEY"],
        inbox_prefix=env["TRAINFLEET_INBOX_PREFIX"],
        signing_key=env.get("TRAINFLEET_SIGNING_KEY"),
        trust_keys=(env["TRAINFLEET_TRUST_KEY"],) if "TRAINFLEET_TRUST_KEY" in env else None,
    )


def identities(settings: Settings, auth: AuthFiles | None) -> Identities:
    """Every role its own identity from ``auth``; without it, the caller's own for all."""
    if auth is None:
        return Identities(settings, settings, settings, settings)
    return Identities(
        _as(settings, auth, "admin"),
        _as(settings, auth, "viewer"),
        _as(settings, auth, "controller"),
        _as(settings, auth, "agent"),
    )


def start_fleet(
    manifest_path: str, settings: Settings, *, agents: int, data_dir: Path, embed: bool, auth_dir: str | None = None
) -> tuple[Fleet, Identities]:
    data_dir.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(data_dir=data_dir)
    auth = None
    if embed:
        # Per-run identities (files mode 0600 in a 0700 dir): no other local user can connect,
        # and each process gets only its own role's rights.
        server = EmbeddedServer(data_dir / "nats")
        auth = init_auth(data_dir / "auth", settings.names, url=server.url)
        server.extra_config = auth.server_include.read_text()
        fleet.server = server.start()
        settings = settings.with_(url=server.url)
    elif auth_dir:
        auth = init_auth(auth_dir, settings.names, url=settings.url)  # existing keys are kept
    who = identities(settings, auth)
    asyncio.run(_provision(who.admin))
    cli = [sys.executable, "-m", "trainfleet.controller.cli"]
    # Local agents share this machine's cores: each offers its share, so trainers don't oversubscribe.
    cores_each = max(1.0, (os.cpu_count() or 1) / max(1, agents))
    env = _child_env(who.agent)
    fleet.controller = fleet.spawn(
        "controller", [*cli, "controller", "--manifest", manifest_path], _child_env(who.controller)
    )
    for i in range(1, agents + 1):
        argv = [
            *cli,
            "agent",
            "--host-id",
            f"demo-{i}",
            "--workdir",
            str(data_dir / f"agent-{i}"),
            "--max-cores",
            f"{cores_each:g}",
        ]
        fleet.agents.append(fleet.spawn(f"agent-{i}", argv, env))
    return fleet, who


async def _provision(settings: Settings) -> None:
    broker = await Broker.connect(settings, name="trainfleet-up", provision=True)
    await broker.close()


async def watch(
    settings: Settings, manifest: Manifest, fleet: Fleet, console: Console, *, live: bool, timeout_s: float
) -> dict[str, JobRecord]:
    """Poll job records until every manifest job is terminal; show a live table meanwhile."""
    broker = await Broker.connect(settings, name="trainfleet-up")
    live_progress = await LiveProgress().start(broker)
    wanted = {s.job_id for s in manifest.jobs}
    deadline = time.monotonic() + timeout_s
    seen: dict[str, str] = {}
    records: dict[str, JobRecord] = {}
    try:
        with (
            Live(view.render_table(manifest, records), console=console, refresh_per_second=4, transient=True)
            if live
            else contextlib.nullcontext() as display
        ):
            while True:
                records = {
                    k: live_progress.apply(s.record) for k, s in (await load_records(broker)).items() if k in wanted
                }
                if display is not None:
                    display.update(view.render_table(manifest, records))
                else:
                    view.print_changes(console, manifest, records, seen)
                if len(records) == len(wanted) and all(r.status.terminal for r in records.values()):
                    return records
                if dead := fleet.dead():
                    raise FleetError(f"{', '.join(dead)} exited early; see logs in {fleet.data_dir}")
                if time.monotonic() > deadline:
                    raise FleetError(f"jobs still unfinished after {timeout_s:g}s")
                await asyncio.sleep(0.5)
    finally:
        await live_progress.stop()
        await broker.close()


def run_up(args: argparse.Namespace, settings: Settings) -> int:
    console = Console(stderr=False)
    if not console.is_terminal:
        console = Console(stderr=False, width=max(console.width, 150))
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        for problem in exc.problems:
            console.print(f"[red]error[/] {problem}", highlight=False)
        return exc.exit_code
    data_dir = Path(args.data_dir or f".trainfleet/up-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    embed = not args.url
    # The manifest's name, when it has one, heads every summary (as text: never read as markup).
    named = f"{display.safe_text(manifest.name, newlines=False)}: " if manifest.name else ""
    console.print(
        Text(f"trainfleet up: {named}{len(manifest.jobs)} jobs, {args.agents} agents, state in {data_dir}"),
        highlight=False,
    )
    # The fleet runs in its own sessions, so a closed terminal (SIGHUP) or a SIGTERM would orphan it:
    # treat both like Ctrl-C, which unwinds through fleet.stop() below.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    fleet, who = start_fleet(
        str(Path(args.manifest).resolve()),
        settings,
        agents=args.agents,
        data_dir=data_dir,
        embed=embed,
        auth_dir=args.auth_dir,
    )
    url = redact_url(who.admin.url)
    console.print(f"NATS at {url}" + (" (embedded, credentials in {})".format(data_dir / "auth") if embed else ""))
    if not embed and not args.auth_dir:
        console.print("every process of this fleet runs with your credentials (--auth-dir DIR gives each its role)")
    started = time.monotonic()
    try:
        live = console.is_terminal and not args.no_live
        records = asyncio.run(watch(who.watcher, manifest, fleet, console, live=live, timeout_s=args.timeout_s))
        elapsed = time.monotonic() - started
        if args.json:
            print(json.dumps(view.summary_json(manifest, records), indent=2, default=str))
        else:
            console.print(view.render_table(manifest, records, final=True))
        ok = all(r.status == JobStatus.COMPLETED for r in records.values())
        counts = {s.value: sum(1 for r in records.values() if r.status == s) for s in JobStatus}
        console.print(
            Text(
                f"{named}{'all jobs completed' if ok else 'not every job completed'} in {elapsed:.1f}s: "
                + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
            ),
            highlight=False,
        )
        names = {spec.job_id: spec.name for spec in manifest.jobs}
        for rec in records.values():
            if rec.status == JobStatus.FAILED:
                console.print(
                    Text.assemble(
                        (names[rec.job_id], "red"),
                        ": ",
                        display.safe_text(rec.reason or "", newlines=False),
                        "\n",
                        display.safe_text(rec.last_error or ""),
                    ),
                    highlight=False,
                )
        if args.keep:
            console.print(f"fleet still running at {url}; Ctrl-C to stop it")
            if embed:
                console.print(
                    f"connect as an operator: trainfleet status --context {data_dir / 'auth/context/operator.json'}"
                )
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    signal.pause()
        return EXIT_OK if ok else Unsatisfied.exit_code
    finally:
        fleet.stop()
