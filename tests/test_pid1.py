"""One container = one well-behaved process: the agent as PID 1 (drain on SIGTERM, orphans
reaped, trainers' exit statuses intact), its health file and `--health`, `--log-format json`.

The PID-1 tests run the real CLI as PID 1 of a new PID namespace (`unshare --pid --fork
--mount-proc`, root only) against the test's nats-server: what a container runtime does,
without one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainfleet.agent import health, logfmt
from trainfleet.broker.schema import JobStatus
from trainfleet.controller.manifest import parse_manifest

from .conftest import LINREG_MODEL, linreg_manifest, records, role_env, wait_for, wait_terminal

CLI = [sys.executable, "-m", "trainfleet.controller.cli"]


def _unshare_works() -> str:
    if os.geteuid() != 0:
        return "needs root for unshare --pid (a new PID namespace)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --pid --fork --mount-proc fails here: {probe.stderr.strip()[:200]}"
    return ""


NO_UNSHARE = _unshare_works()
needs_pid_namespace = pytest.mark.skipif(bool(NO_UNSHARE), reason=NO_UNSHARE or "-")


# --------------------------------------------------------------------------- health file and --health


def _health(**changes) -> health.Health:
    base = dict(host_id="h1", pid=42, state="serving", connected=True, running_jobs=1, heartbeat_s=10.0)
    base.update(changes)
    return health.Health(written_at=1000.0, **base)


@pytest.mark.parametrize(
    ("changes", "now", "code", "reason"),
    [
        ({}, 1029.0, 0, "healthy: agent h1 (pid 42) serving, connected, 1 job(s), written 29.0 s ago"),
        ({"state": "draining"}, 1001.0, 0, "healthy: agent h1 (pid 42) draining"),
        ({}, 1031.0, 1, "unhealthy: agent h1 (pid 42) last wrote its health 31 s ago (more than 3 heartbeats"),
        ({"connected": False}, 1001.0, 1, "unhealthy: agent h1 (pid 42) is serving but not connected to NATS"),
        ({"state": "stopped"}, 1001.0, 1, "unhealthy: agent h1 (pid 42) has stopped"),
    ],
)
def test_health_is_fresh_connected_and_not_stopped(tmp_path, changes, now, code, reason):
    path = tmp_path / "agent-health.json"
    health.write(path, _health(**changes))
    got_code, got_reason = health.check(path, now=now)
    assert (got_code, got_reason[: len(reason)]) == (code, reason)
    assert "\n" not in got_reason


def test_health_without_a_file_or_with_garbage_is_unhealthy(tmp_path):
    code, reason = health.check(tmp_path / "none.json")
    assert code == 1 and reason.startswith(f"unhealthy: no health file at {tmp_path / 'none.json'}")
    (tmp_path / "bad.json").write_text("{not json")
    assert health.check(tmp_path / "bad.json")[1].startswith("unhealthy: health file")


def test_health_file_default_is_under_the_workdir(tmp_path):
    assert health.default_path(str(tmp_path), "h1", env={}) == tmp_path / "agent-health.json"
    assert health.default_path(None, "h1", env={}).name == "trainfleet-agent-h1.health.json"
    assert health.default_path(str(tmp_path), "h1", env={"TRAINFLEET_HEALTH_FILE": "/x/h.json"}) == Path("/x/h.json")
    # --health reads the same default the agent writes
    out = subprocess.run([*CLI, "agent", "--health", "--workdir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout.startswith("unhealthy: no health file at") and out.stdout.count("\n") == 1


# --------------------------------------------------------------------------- --log-format json


def test_json_log_lines_carry_time_level_logger_message_host_and_job(capsys):
    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        logfmt.use_json("h1")
        log = logging.getLogger("trainfleet.agent")
        log.warning("plain %s", "line")
        token = logfmt.JOB_ID.set("ab" * 32)
        try:
            raise ValueError("kaput")
        except ValueError:
            log.exception("job failed")
        finally:
            logfmt.JOB_ID.reset(token)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["message"] == "plain line" and first["level"] == "WARNING" and first["logger"] == "trainfleet.agent"
    assert first["host"] == "h1" and "job_id" not in first and first["time"].endswith("Z")
    assert second["job_id"] == "ab" * 32 and "ValueError: kaput" in second["exc"]


# --------------------------------------------------------------------------- the agent as PID 1


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) and st[0] == pid:
            out.append(int(entry))
    return out


def _tree(pid: int) -> dict[int, str]:
    """Every descendant of ``pid`` and its state (Z: a zombie)."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            st = _stat(child)
            if st:
                found[child] = st[1]
                todo.append(child)
    return found


class Pid1Agent:
    """`unshare --pid --fork --mount-proc trainfleet agent ...`: the agent is PID 1 inside."""

    def __init__(self, settings, host_id: str, root: Path):
        self.host_id, self.root = host_id, root
        self.health_file = root / f"{host_id}-health.json"
        self.log = root / f"{host_id}.out"
        env = {
            **os.environ,
            **role_env("agent"),
            "NATS_URL": settings.url,
            "TRAINFLEET_LEASE_S": str(settings.lease_s),
            "TRAINFLEET_HEARTBEAT_S": str(settings.heartbeat_s),
            "TRAINFLEET_FETCH_TIMEOUT_S": "0.5",
            "TRAINFLEET_NAK_DELAY_S": "0.5",
            "TRAINFLEET_DRAIN_TIMEOUT_S": str(settings.drain_timeout_s),
            "TRAINFLEET_TERM_GRACE_S": str(settings.term_grace_s),
        }
        argv = ["agent", "--host-id", host_id, "--workdir", str(root / host_id), "--no-torch-probe"]
        argv += ["--log-format", "json", "--health-file", str(self.health_file)]
        with open(self.log, "wb") as out, open(root / f"{host_id}.err", "wb") as err:
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount-proc", *CLI, *argv], env=env, stdout=out, stderr=err
            )

    async def init_pid(self) -> int:
        """The host's pid of the namespace's PID 1 (the agent, as a container runtime starts it)."""
        return (await wait_for(lambda: _children(self.proc.pid), 10, what="the namespace's PID 1"))[0]

    def health(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "agent", "--health", "--health-file", str(self.health_file)], capture_output=True, text=True
        )

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            for pid in _tree(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)


@needs_pid_namespace
async def test_agent_as_pid1_drains_on_sigterm_and_exits_0(fleet, broker, settings, tmp_path):
    fleet.settings = settings = settings.with_(lease_s=300.0, drain_timeout_s=0.5)
    manifest = linreg_manifest(1, epochs=400_000)
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    agent = Pid1Agent(settings, "p1", tmp_path)
    try:
        init = await agent.init_pid()
        await wait_for(lambda: _running(broker, job_id), 60, what="the job to run")
        # Healthy while serving: --health says so on one line, exit 0
        # (the file is rewritten each heartbeat: the one after the claim counts the job)
        ok = await wait_for(
            lambda: (h := agent.health()).returncode == 0 and "1 job(s)" in h.stdout and h,
            10,
            what=f"health: {agent.health()}",
        )
        assert ok.stdout.startswith("healthy: agent p1") and "serving, connected, 1 job(s)" in ok.stdout
        # When the runtime stops the container: SIGTERM to PID 1 (dropped unless it has a handler)
        started = time.monotonic()
        os.kill(init, signal.SIGTERM)
        await wait_for(lambda: agent.proc.poll() is not None, 30, what="the agent to exit")
        # Then it drains in the documented order and exits 0 well within a stop timeout
        assert agent.proc.returncode == 0, (tmp_path / "p1.err").read_text()[-2000:]
        assert time.monotonic() - started < 10
        rec = (await records(broker))[job_id]
        assert rec.status == JobStatus.PENDING and "handed back" in (rec.reason or "")
        # Nothing of the namespace is left (the trainer went with its agent), and it says it stopped
        assert _tree(agent.proc.pid) == {}
        stopped = agent.health()
        assert stopped.returncode == 1 and "has stopped" in stopped.stdout
        lines = agent.log_lines()
        assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
        assert all(line.get("host") == "p1" for line in lines)
        assert any(line.get("job_id") == job_id and "handed back" in line["message"] for line in lines)
    finally:
        agent.kill()


async def _running(broker, job_id: str) -> bool:
    rec = (await records(broker)).get(job_id)
    return rec is not None and rec.status == JobStatus.RUNNING


# A trainer that double-forks: its grandchild outlives the middle process (so it is re-parented
# to PID 1) and exits 0.5 s later while the trainer still runs. The trainer then looks for it:
# reaped (gone from /proc) or a zombie; it exits 9 if it found a zombie, else as its mode says.
FORKER = textwrap.dedent(
    """
    import os, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    os.makedirs(args["out"], exist_ok=True)
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        grandchild = os.fork()
        if grandchild == 0:
            time.sleep(0.5)
            os._exit(0)
        os.write(w, str(grandchild).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(middle, 0)
    grandchild = int(os.read(r, 32))
    time.sleep(2.5)
    try:
        with open(f"/proc/{grandchild}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "reaped"
    print(f"grandchild {grandchild}: {state}", flush=True)
    with open(os.path.join(args["out"], "result.txt"), "w") as fh:
        fh.write(state + "\\n")
    sys.exit(9 if state != "reaped" else 0 if args["mode"] == "ok" else 3)
    """
)


@needs_pid_namespace
async def test_agent_as_pid1_reaps_orphaned_grandchildren_and_keeps_trainer_exit_statuses(
    fleet, broker, settings, tmp_path
):
    script = tmp_path / "forker.py"
    script.write_text(FORKER)
    text = (
        "schema_version = 1\n[settings]\nmax_attempts = 1\n"
        + LINREG_MODEL
        + f'[models.forker]\ncommand = ["{{python}}", "{script}"]\nmodes = ["ok", "fail"]\n'
        + '[[jobs]]\nname = "ok"\nmodel = "forker"\nmode = "ok"\nseed = 1\n'
        + '[[jobs]]\nname = "fail"\nmodel = "forker"\nmode = "fail"\nseed = 2\n'
    )
    manifest = parse_manifest(text, file="forker.toml")
    ids = {s.name: s.job_id for s in manifest.jobs}
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    agent = Pid1Agent(settings, "p2", tmp_path)
    try:
        init = await agent.init_pid()
        recs = await wait_terminal(broker, set(ids.values()), timeout_s=90)
        ok, fail = recs[ids["ok"]], recs[ids["fail"]]
        # The grandchild was reaped (exit 9 otherwise), and each trainer's own status was seen:
        # 0 completed the job, 3 failed it (a stolen status would read as 0 or be lost)
        assert ok.status == JobStatus.COMPLETED, ok.reason
        assert fail.status == JobStatus.FAILED and "exited with 3" in (fail.reason or ""), fail.reason
        assert not [pid for pid, state in _tree(agent.proc.pid).items() if state == "Z"]
        os.kill(init, signal.SIGTERM)
        assert await wait_for(lambda: agent.proc.poll() is not None, 30, what="the agent to exit")
        assert agent.proc.returncode == 0
    finally:
        agent.kill()
