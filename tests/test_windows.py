"""The agent's Windows path (agent/hostos.py and its call sites), run on Linux.

Nothing here runs on Windows. Each test forces the Windows branch (``sys.platform`` set to
``win32``) and replaces the Windows-only primitives (``hostos.WIN``: Job Objects through
kernel32, pipes through ``_winapi``, ``msvcrt``) with a recording fake, then checks what the
branch does with them: which signal handlers are installed, which flags start a trainer,
which call kills its tree, which handle carries its progress. A last test imports the agent
under a Python made to look like Windows' (no ``pwd``/``fcntl``/``termios``/``resource``,
no SIGHUP/SIGKILL/``killpg``/``fork``). deploy/windows/*.ps1 are checked as text (and by
PowerShell's parser where ``pwsh`` is installed)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from trainfleet.agent import agent as agent_mod
from trainfleet.agent import capability, cli, hostos, pid1, progress, sandbox, trainer
from trainfleet.agent.capability import detect
from trainfleet.broker.schema import JobSpec
from trainfleet.broker.settings import Settings

from .test_capability import MEMINFO, FakeNvml, cgroup_tree, proc_tree

REPO = Path(__file__).resolve().parents[1]
SIGBREAK = 21  # Windows' value (signal.h); Linux's signal module has none


class FakeWin:
    """hostos.WIN for tests: records every Windows call; ``fail`` names the calls that raise."""

    def __init__(self, *, fail: tuple[str, ...] = (), real_pipe: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail
        self.real_pipe = real_pipe
        self._next_job = 900
        self._fds: set[int] = set()  # real_pipe: the fds standing in for pipe handles

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise OSError(5, f"{name} failed (fake)")

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def new_kill_job(self) -> int:
        self._call("new_kill_job")
        self._next_job += 1
        return self._next_job

    def assign(self, job: int, pid: int) -> None:
        self._call("assign", job, pid)

    def terminate_job(self, job: int) -> None:
        self._call("terminate_job", job)

    def close(self, handle: int) -> None:
        self._call("close", handle)
        if handle in self._fds:
            self._fds.discard(handle)
            os.close(handle)

    def run(self, argv: list[str]) -> None:
        self._call("run", argv)

    def pipe(self) -> tuple[int, int]:
        self._call("pipe")
        if not self.real_pipe:
            return 101, 102
        read_fd, write_fd = os.pipe()
        self._fds.update((read_fd, write_fd))
        return read_fd, write_fd

    def set_inheritable(self, handle: int) -> None:
        self._call("set_inheritable", handle)

    def startupinfo(self, handles: list[int]) -> Any:
        self._call("startupinfo", list(handles))
        return SimpleNamespace(lpAttributeList={"handle_list": list(handles)})

    def pipe_handle(self, handle: int) -> Any:
        self._call("pipe_handle", handle)
        self._fds.discard(handle)  # the reader owns it now
        return os.fdopen(handle, "rb", buffering=0) if self.real_pipe else SimpleNamespace(handle=handle)

    def open_osfhandle(self, handle: int) -> int:
        self._call("open_osfhandle", handle)
        return handle  # the fake's handles are fds already


@pytest.fixture
def win(monkeypatch: pytest.MonkeyPatch) -> FakeWin:
    """Force the Windows branch everywhere with a recording fake for the Windows primitives.
    ``signal.signal`` and ``os.kill``/``os.killpg`` are recorded, never really called."""
    fake = FakeWin()
    monkeypatch.setattr(hostos, "WIN", fake)
    monkeypatch.setattr(hostos, "_JOBS", {})
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(signal, "SIGBREAK", SIGBREAK, raising=False)

    def record_signal(sig: int, handler: Any) -> None:
        fake.calls.append(("signal.signal", sig, handler))

    def record_kill(pid: int, sig: int) -> None:
        fake.calls.append(("os.kill", pid, sig))

    def no_killpg(pid: int, sig: int) -> None:
        raise AssertionError("os.killpg does not exist on Windows")

    monkeypatch.setattr(signal, "signal", record_signal)
    monkeypatch.setattr(os, "kill", record_kill)
    monkeypatch.setattr(os, "killpg", no_killpg)
    return fake


class FakeLoop:
    """A Proactor-like loop: no add_signal_handler; records call_soon_threadsafe."""

    def __init__(self) -> None:
        self.scheduled: list[Any] = []
        self.added: list[int] = []

    def add_signal_handler(self, sig: int, callback: Any) -> None:
        if sys.platform == "win32":
            raise NotImplementedError  # what ProactorEventLoop does
        self.added.append(sig)

    def call_soon_threadsafe(self, callback: Any) -> None:
        self.scheduled.append(callback)


# -- signals ------------------------------------------------------------------------------
def test_windows_stop_handlers_use_signal_signal_and_wake_the_loop(win: FakeWin) -> None:
    loop, stops = FakeLoop(), []
    assert hostos.install_stop_handlers(loop, lambda: stops.append(1)) == (signal.SIGINT, SIGBREAK)  # type: ignore[arg-type]
    installed = {c[1]: c[2] for c in win.calls if c[0] == "signal.signal"}
    assert set(installed) == {signal.SIGINT, SIGBREAK}  # no SIGTERM: nothing outside sends one there
    assert loop.added == []
    installed[SIGBREAK](SIGBREAK, None)  # Ctrl+Break (or console close/logoff/shutdown)
    assert len(loop.scheduled) == 1 and not stops  # handed to the loop thread-safely, not called
    loop.scheduled[0]()
    assert stops == [1]


def test_posix_stop_handlers_stay_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(signal, "signal", lambda *_: pytest.fail("signal.signal on POSIX"))
    loop = FakeLoop()
    assert hostos.install_stop_handlers(loop, lambda: None) == (signal.SIGTERM, signal.SIGINT)  # type: ignore[arg-type]
    assert loop.added == [signal.SIGTERM, signal.SIGINT]


def test_cli_early_handlers_on_windows(win: FakeWin) -> None:
    sigs = hostos.set_stop_handlers(cli._stop_before_serving)
    assert sigs == (signal.SIGINT, SIGBREAK)
    assert [c[1:] for c in win.calls] == [
        (signal.SIGINT, cli._stop_before_serving),
        (SIGBREAK, cli._stop_before_serving),
    ]


# -- process group and tree ---------------------------------------------------------------------
def test_process_group_kwargs(win: FakeWin, monkeypatch: pytest.MonkeyPatch) -> None:
    def preexec() -> None:
        pass

    assert hostos.new_process_group_kwargs(preexec) == {"creationflags": 0x00000200}  # CREATE_NEW_PROCESS_GROUP
    monkeypatch.setattr(sys, "platform", "linux")
    assert hostos.new_process_group_kwargs(preexec) == {"start_new_session": True, "preexec_fn": preexec}
    monkeypatch.setattr(sys, "platform", "darwin")
    assert hostos.new_process_group_kwargs(preexec) == {"start_new_session": True, "preexec_fn": None}


def test_job_object_holds_and_kills_the_tree(win: FakeWin) -> None:
    assert hostos.attach_tree(4242)
    assert win.calls == [("new_kill_job",), ("assign", 901, 4242)]
    hostos.signal_tree(4242, hard=False)  # the gentle stop: Ctrl+Break to the trainer's group
    assert win.calls[-1] == ("os.kill", 4242, hostos.CTRL_BREAK_EVENT)
    hostos.signal_tree(4242, hard=True)  # past the grace: the whole job
    assert win.calls[-1] == ("terminate_job", 901)
    hostos.end_tree(4242)  # after it exited: whatever is left, and the handle
    assert win.calls[-2:] == [("terminate_job", 901), ("close", 901)]
    assert "run" not in win.names()  # no taskkill while a job holds the tree
    assert hostos._JOBS == {}


@pytest.mark.parametrize("failing", ["new_kill_job", "assign"])
def test_without_a_job_object_taskkill_kills_the_tree(win: FakeWin, failing: str) -> None:
    win.fail = (failing,)
    assert not hostos.attach_tree(77)
    if failing == "assign":
        assert ("close", 901) in win.calls  # the unused job is not leaked
    hostos.signal_tree(77, hard=True)
    assert win.calls[-1] == ("run", ["taskkill", "/T", "/F", "/PID", "77"])
    hostos.end_tree(77)
    assert win.calls[-1] == ("run", ["taskkill", "/T", "/F", "/PID", "77"])


def test_terminate_failure_falls_back_to_taskkill(win: FakeWin) -> None:
    hostos.attach_tree(5)
    win.fail = ("terminate_job",)
    hostos.kill_tree(5)
    assert win.names()[-2:] == ["terminate_job", "run"]


def test_posix_tree_kill_is_killpg(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(hostos, "WIN", None)  # never touched on POSIX
    assert not hostos.attach_tree(9)
    hostos.signal_tree(9, hard=False)
    hostos.signal_tree(9, hard=True)
    hostos.end_tree(9)
    assert sent == [(9, signal.SIGTERM), (9, signal.SIGKILL), (9, signal.SIGKILL)]


def test_job_object_struct_layout() -> None:
    """JOBOBJECT_EXTENDED_LIMIT_INFORMATION is 144 bytes on 64-bit Windows, LimitFlags at 16."""
    import ctypes

    if ctypes.sizeof(ctypes.c_void_p) != 8:
        pytest.skip("the layout checked is the 64-bit one")
    assert ctypes.sizeof(hostos.JobObjectBasicLimitInformation) == 64
    assert ctypes.sizeof(hostos.JobObjectExtendedLimitInformation) == 144
    assert hostos.JobObjectBasicLimitInformation.LimitFlags.offset == 16


# -- the progress pipe ---------------------------------------------------------------------------
def test_progress_pipe_passes_an_inheritable_handle(win: FakeWin) -> None:
    pipe = hostos.progress_pipe()
    assert win.calls == [("pipe",), ("set_inheritable", 102), ("startupinfo", [102])]
    assert pipe.env == {"TRAINFLEET_PROGRESS_HANDLE": "102"}  # no TRAINFLEET_PROGRESS_FD
    assert pipe.popen_kwargs["close_fds"] is True and "pass_fds" not in pipe.popen_kwargs
    assert pipe.popen_kwargs["startupinfo"].lpAttributeList == {"handle_list": [102]}
    assert pipe.reader().handle == 101
    pipe.child_started()
    assert win.calls[-1] == ("close", 102)
    pipe.abandon()
    assert win.calls[-1] == ("close", 101)


def test_trainer_side_opens_the_handle(win: FakeWin, monkeypatch: pytest.MonkeyPatch) -> None:
    read_fd, write_fd = os.pipe()
    monkeypatch.delenv(progress.PROGRESS_FD_ENV, raising=False)
    monkeypatch.setenv(progress.PROGRESS_HANDLE_ENV, str(write_fd))
    progress._reset()
    try:
        progress.report(step=2, total=5, loss=0.5)
        assert ("open_osfhandle", write_fd) in win.calls
        events = progress.read_progress_lines(os.read(read_fd, 4096))
        assert [(e["step"], e["total"], e["metrics"]) for e in events] == [(2, 5, {"loss": 0.5})]
    finally:
        progress._reset()
        os.close(read_fd)
        os.close(write_fd)


# -- a trainer started, stopped and cleaned up on the Windows path ------------------------------
class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdout, self.stderr = asyncio.StreamReader(), asyncio.StreamReader()
        self._exited = asyncio.Event()

    def exit(self, code: int) -> None:
        self.returncode = code
        self.stdout.feed_eof()
        self.stderr.feed_eof()
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode


async def test_trainer_process_on_windows(win: FakeWin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    win.real_pipe = True  # real fds behind the fake handles, so progress really flows
    started: dict[str, Any] = {}
    proc = FakeProc(pid=3131)

    async def fake_exec(*argv: str, **kwargs: Any) -> FakeProc:
        started.update(kwargs, argv=argv)
        handle = int(kwargs["env"]["TRAINFLEET_PROGRESS_HANDLE"])
        os.write(handle, b'{"step": 1, "total": 3, "metrics": {"loss": 1.5}}\n')  # the trainer reports
        return proc

    monkeypatch.setattr(trainer.asyncio, "create_subprocess_exec", fake_exec)
    spec = JobSpec(
        job_id="j" * 64, name="demo", model="m", mode="m", hyper={}, data={}, seed=0, command=("{python}", "-c", "pass")
    )
    events: list[dict[str, Any]] = []

    async def on_progress(event: dict[str, Any]) -> None:
        events.append(event)

    tp = trainer.TrainerProcess(spec, tmp_path / "out", on_progress=on_progress)
    await tp.start()
    # Started in a group of its own (for Ctrl+Break), its progress handle inherited, no POSIX-only kwargs.
    assert started["creationflags"] == hostos.CREATE_NEW_PROCESS_GROUP
    assert started["close_fds"] is True
    for posix_only in ("pass_fds", "start_new_session", "preexec_fn"):
        assert posix_only not in started
    handle = int(started["env"]["TRAINFLEET_PROGRESS_HANDLE"])
    assert started["startupinfo"].lpAttributeList == {"handle_list": [handle]}
    assert "TRAINFLEET_PROGRESS_FD" not in started["env"]
    assert ("assign", 901, 3131) in win.calls  # into its Job Object right after the start
    assert ("close", handle) in win.calls  # the agent's copy of the write end is closed
    # The agent stops it: Ctrl+Break first; past the grace, the job is terminated.
    stopping = asyncio.create_task(tp.stop(grace_s=0.05))
    await asyncio.sleep(0.2)
    assert ("os.kill", 3131, hostos.CTRL_BREAK_EVENT) in win.calls
    assert ("terminate_job", 901) in win.calls
    proc.exit(1)
    assert await stopping == 1
    assert await tp.wait() == 1
    assert win.calls[-1] == ("close", 901)  # the job handle let go once the tree is dead
    assert [(e["step"], e["metrics"]) for e in events] == [(1, {"loss": 1.5})]
    assert "run" not in win.names()


def test_trainer_env_keeps_windows_essentials() -> None:
    environ = {"SYSTEMROOT": r"C:\Windows", "USERPROFILE": r"C:\Users\a", "APPDATA": "x", "NATS_CREDS": "secret"}
    env = trainer.trainer_base_env(environ)
    assert env == {"SYSTEMROOT": r"C:\Windows", "USERPROFILE": r"C:\Users\a", "APPDATA": "x"}


# -- sandbox, pid1 ---------------------------------------------------------------------------------
def test_sandbox_on_windows(win: FakeWin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_unified_mount", lambda: pytest.fail("reads /proc on Windows"))
    assert sandbox.TrainerCgroup.create("trainfleet-1-x") is None
    assert sandbox.TrainerCgroup.sweep_stale() == 0
    with pytest.raises(ValueError, match="not supported on Windows"):
        sandbox.TrainerUser.lookup("someone")
    assert sandbox._load_prctl() is None
    hostos.attach_tree(55)
    assert sandbox.Confinement().cleanup(55) == 0
    assert win.names()[-2:] == ["terminate_job", "close"]


def test_no_init_on_windows(win: FakeWin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getpid", lambda: 1)
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked on Windows"), raising=False)
    assert not pid1.is_pid1()
    pid1.become_init()  # returns at once


# -- capability ----------------------------------------------------------------------------------
def test_detect_on_windows_uses_psutil_and_no_cgroups(
    win: FakeWin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(capability, "_cpu_counts", lambda: (8, 4))
    monkeypatch.setattr(capability, "_affinity_count", lambda: None)
    fake_psutil = SimpleNamespace(
        virtual_memory=lambda: SimpleNamespace(total=32 * 1024**3, available=20 * 1024**3), Error=Exception
    )
    monkeypatch.setattr(capability, "psutil", fake_psutil)
    # A /proc and a cgroup limit that must NOT be read, and a /.dockerenv that must not count.
    proc = proc_tree(tmp_path, MEMINFO)
    cg = cgroup_tree(tmp_path, {"cpu.max": "100000 100000\n", "memory.max": str(1024**3)})
    (tmp_path / "dockerenv").write_text("")
    cap = detect(
        "win-host",
        proc_root=str(proc),
        cgroup_root=str(cg),
        env={},
        nvml=FakeNvml([]),
        probe_torch=False,
        code_commit="abc",
        dockerenv_path=str(tmp_path / "dockerenv"),
    )
    assert (cap.cores_logical, cap.cores_usable) == (8, 8.0)
    assert (cap.ram_total_gib, cap.ram_available_gib) == (32.0, 20.0)
    assert not cap.in_container
    assert not [n for n in cap.notes if "meminfo" in n or "cgroup" in n]


# -- the stop file -------------------------------------------------------------------------------
def test_stop_file_path(win: FakeWin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cli.stop_file_path(None, str(tmp_path), "h", env={}) == tmp_path / "agent.stop"
    assert cli.stop_file_path(None, None, "h", env={}).name == "trainfleet-agent-h.stop"
    assert cli.stop_file_path("X:/s", str(tmp_path), "h", env={}) == Path("X:/s")
    assert cli.stop_file_path(None, None, "h", env={"TRAINFLEET_STOP_FILE": "e"}) == Path("e")
    monkeypatch.setattr(sys, "platform", "linux")
    assert cli.stop_file_path(None, str(tmp_path), "h", env={}) is None  # POSIX: SIGTERM, as before
    assert cli.stop_file_path("f", None, "h", env={}) == Path("f")


async def test_stop_file_drains_the_agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(agent_mod, "STOP_FILE_POLL_S", 0.02)
    stop = tmp_path / "agent.stop"
    stop.write_text("")  # left over from an earlier stop: must not stop this run
    a = agent_mod.Agent(Settings(), agent_mod.AgentOptions(stop_file=str(stop)))
    watcher = asyncio.create_task(a._watch_stop_file(stop))
    await asyncio.sleep(0.1)
    assert not stop.exists() and not a._stopping.is_set() and not watcher.done()
    stop.write_text("")
    await asyncio.wait_for(watcher, 2.0)
    assert a._stopping.is_set()
    assert not stop.exists()  # consumed, so the next start is not stopped by it


# -- the agent imports under a Windows-like Python ---------------------------------------------
WINDOWS_LIKE = textwrap.dedent(
    """
    import asyncio, ctypes, os, signal, subprocess, sys
    import msgspec, nats, nats.js, psutil  # third-party: imported as they are
    for name in ("pwd", "grp", "fcntl", "termios", "resource", "pty"):
        sys.modules[name] = None  # absent on Windows: importing them fails
    for name in ("SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGKILL", "SIGCHLD"):
        delattr(signal, name)
    signal.SIGBREAK = 21
    for name in ("killpg", "setsid", "fork", "getuid", "getgid", "setuid", "setgid", "setgroups", "sched_getaffinity"):
        if hasattr(os, name):
            delattr(os, name)
    sys.platform = "win32"
    import trainfleet.controller.cli  # the `trainfleet` command: `trainfleet agent` starts here
    import trainfleet.agent.cli, trainfleet.agent.agent, trainfleet.agent.trainer, trainfleet.agent.held
    from trainfleet.agent import capability, hostos, pid1, sandbox
    assert not pid1.is_pid1()
    assert hostos.stop_signals() == (signal.SIGINT, 21)
    assert hostos.new_process_group_kwargs(print) == {"creationflags": 0x200}
    cap = capability.detect("w", probe_torch=False, code_commit="x")
    assert cap.cores_logical >= 1 and cap.ram_total_gib > 0, cap
    assert not cap.in_container
    print("ok", pid1.FORWARDED)
    """
)


def test_agent_imports_where_posix_calls_are_missing() -> None:
    run = subprocess.run([sys.executable, "-c", WINDOWS_LIKE], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok")


# -- deploy/windows ------------------------------------------------------------------------------
WIN_DIR = REPO / "deploy" / "windows"


def test_install_script_registers_the_task() -> None:
    text = (WIN_DIR / "install-agent.ps1").read_text()
    # Parameters: NATS URL, credentials file, host id, work dir, the user it runs as.
    for param in ("NatsUrl", "CredsFile", "HostId", "WorkDir", "RunAsUser", "TaskName", "Python"):
        assert re.search(rf"\[[\w\[\]]+\]\s*\${param}\b", text), param
    # A Scheduled Task: at startup, restarted on failure, no time limit, as the chosen user.
    for needle in (
        "Register-ScheduledTask",
        "New-ScheduledTaskTrigger -AtStartup",
        "-RestartCount",
        "-RestartInterval",
        "-ExecutionTimeLimit ([TimeSpan]::Zero)",
        "New-ScheduledTaskPrincipal",
        "-LogonType Password",
        "-RunLevel Limited",
    ):
        assert needle in text, needle
    # What the agent needs, as its flags in the task's action (a task has no environment of its own).
    action = re.search(r"\$arguments = @\((.*?)\)\n(.*?)\$argumentLine =", text, re.S)
    assert action is not None
    for flag in ("'--url', $NatsUrl", "'--creds', $CredsFile", "'--host-id', $HostId", "'--workdir', $WorkDir"):
        assert flag in action.group(0), flag
    assert "'--stop-file', $stopFile" in action.group(0) and "'--log-file', $logFile" in action.group(0)
    assert "'-m', 'trainfleet.controller.cli', 'agent'" in action.group(0)
    assert "New-ScheduledTaskAction -Execute $Python -Argument $argumentLine" in text
    assert "://[^/]*@" in text  # refuses a URL with credentials in it (the action is readable)
    # Every flag the script passes exists on `trainfleet agent`.
    helptext = subprocess.run(
        [sys.executable, "-m", "trainfleet.controller.cli", "agent", "--help"], capture_output=True, text=True
    ).stdout
    for flag in re.findall(r"'(--[a-z-]+)'", text):
        assert flag in helptext, flag
    assert "--detect" in text  # checks the capability before registering, as the predecessor did
    assert "Set-StrictMode" in text and "$ErrorActionPreference = 'Stop'" in text
    assert "#Requires -RunAsAdministrator" in text


def test_uninstall_and_stop_scripts_stop_gently_first() -> None:
    stop = (WIN_DIR / "stop-agent.ps1").read_text()
    uninstall = (WIN_DIR / "uninstall-agent.ps1").read_text()
    # A graceful stop is the stop file (the agent drains); Stop-ScheduledTask kills, so only after a wait.
    assert stop.index("New-Item -ItemType File") < stop.index("Stop-ScheduledTask -TaskName")
    assert "agent.stop" in stop and "DrainSeconds" in stop
    assert "stop-agent.ps1" in uninstall and "Unregister-ScheduledTask" in uninstall
    assert "-Confirm:$false" in uninstall
    assert cli.STOP_FILE_NAME == "agent.stop"


@pytest.mark.skipif(shutil.which("pwsh") is None, reason="pwsh (PowerShell) is not installed here: syntax unchecked")
@pytest.mark.parametrize("script", ["install-agent.ps1", "uninstall-agent.ps1", "stop-agent.ps1"])
def test_scripts_parse_in_powershell(script: str) -> None:
    check = (
        "$e = $null; [void][System.Management.Automation.Language.Parser]::ParseFile("
        f"'{WIN_DIR / script}', [ref]$null, [ref]$e); if ($e) {{ $e | Out-String; exit 1 }}"
    )
    run = subprocess.run(["pwsh", "-NoProfile", "-Command", check], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_log_file_gets_the_agents_records(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        cli._log_to_file(tmp_path / "logs" / "agent.log")
        (added,) = [h for h in root.handlers if h not in before]
        logging.getLogger("trainfleet.agent").warning("hello from the agent")
        added.flush()
        assert "hello from the agent" in (tmp_path / "logs" / "agent.log").read_text()
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
