"""The agent's health, for a probe: a small JSON file the running agent rewrites every
heartbeat, and ``trainfleet agent --health`` that judges it (exit 0 healthy, 1 not, with a
one-line reason either way).

Healthy means: written within :data:`STALE_HEARTBEATS` heartbeats, the agent connected to
NATS, and not stopped. A draining agent (SIGTERM received, jobs finishing or being handed
back) is still healthy, so a liveness probe does not kill it mid-drain.

The file: ``--health-file PATH`` (env ``TRAINFLEET_HEALTH_FILE``); by default
``<workdir>/agent-health.json``, or ``$TMPDIR/trainfleet-agent-<host id>.health.json``
when the agent has no ``--workdir``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

ENV = "TRAINFLEET_HEALTH_FILE"
FILE_NAME = "agent-health.json"
STALE_HEARTBEATS = 3
EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1


def default_path(workdir: str | None, host_id: str, env: Mapping[str, str] | None = None) -> Path:
    """Where the agent writes its health (and where ``--health`` looks) unless told otherwise."""
    env = os.environ if env is None else env  # read, never copied or passed on
    if env.get(ENV):
        return Path(env[ENV])
    if workdir:
        return Path(workdir) / FILE_NAME
    return Path(tempfile.gettempdir()) / f"trainfleet-agent-{host_id}.health.json"


@dataclass(frozen=True)
class Health:
    host_id: str
    pid: int
    state: str  # starting | serving | draining | stopped
    connected: bool
    running_jobs: int
    heartbeat_s: float
    written_at: float  # unix time


def write(path: Path, health: Health) -> None:
    """Replace the file atomically (a probe never reads half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(asdict(health), sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def check(path: Path, now: float | None = None) -> tuple[int, str]:
    """(exit code, one-line reason) for the health file at ``path``."""
    now = time.time() if now is None else now
    try:
        data = json.loads(path.read_text())
        health = Health(**{k: data[k] for k in Health.__dataclass_fields__})
    except FileNotFoundError:
        hint = "agent not started, or another --workdir/--health-file"
        return EXIT_UNHEALTHY, f"unhealthy: no health file at {path} ({hint})"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return EXIT_UNHEALTHY, f"unhealthy: health file {path} unreadable: {exc}"
    age = now - health.written_at
    who = f"agent {health.host_id} (pid {health.pid})"
    if health.state == "stopped":
        return EXIT_UNHEALTHY, f"unhealthy: {who} has stopped"
    limit = STALE_HEARTBEATS * health.heartbeat_s
    if age > limit:
        return EXIT_UNHEALTHY, (
            f"unhealthy: {who} last wrote its health {age:.0f} s ago "
            f"(more than {STALE_HEARTBEATS} heartbeats of {health.heartbeat_s:g} s)"
        )
    if not health.connected:
        return EXIT_UNHEALTHY, f"unhealthy: {who} is {health.state} but not connected to NATS"
    return EXIT_HEALTHY, (
        f"healthy: {who} {health.state}, connected, {health.running_jobs} job(s), written {max(age, 0):.1f} s ago"
    )
