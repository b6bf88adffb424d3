"""What keeps a trainer in its place: trainers are untrusted code.

* Its environment is an allowlist (trainer.trainer_base_env): never the agent's NATS
  credentials.
* It runs in a process group of its own and, where the agent may create one, in a cgroup
  (v2) of its own: when its job ends, on every outcome, everything it started is killed —
  the cgroup catches even processes that left the group with ``setsid``.
* Optionally it runs as another user (``--trainer-user``): the agent must then be root or
  hold CAP_SETUID/CAP_SETGID/CAP_CHOWN (the job's work dir is handed to that user).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainfleet.agent import hostos

log = logging.getLogger("trainfleet.agent")

CGROUP_KILL_WAIT_S = 5.0


def _unified_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (pure v2, or the hybrid's "unified")."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def _own_cgroup() -> str | None:
    """This process's cgroup v2 path ("/system.slice/trainfleet-agent.service")."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return None


class TrainerCgroup:
    """A cgroup v2 of its own for one trainer, beside the agent's (the agent's unit delegates
    its subtree: ``Delegate=yes``). Killing it kills every process the trainer started."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, name: str) -> TrainerCgroup | None:
        """A new cgroup named ``name`` under the agent's own, or None where that is not
        possible (no cgroup v2, no permission; Windows: its Job Object, agent/hostos.py)."""
        if hostos.is_windows():
            return None
        mount, own = _unified_mount(), _own_cgroup()
        if mount is None or own is None:
            return None
        path = mount / own.lstrip("/") / name
        try:
            path.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            log.debug("no cgroup for trainers here (%s): process groups only", exc)
            return None
        return cls(path)

    @staticmethod
    def sweep_stale() -> int:
        """Remove the empty cgroups of trainers whose agent died (SIGKILL leaves them); how many."""
        if hostos.is_windows():
            return 0
        mount, own = _unified_mount(), _own_cgroup()
        if mount is None or own is None:
            return 0
        removed = 0
        for path in (mount / own.lstrip("/")).glob("trainfleet-*-*"):
            try:
                agent_pid = int(path.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if agent_pid != os.getpid() and not Path(f"/proc/{agent_pid}").exists():
                with contextlib.suppress(OSError):
                    TrainerCgroup(path).kill()
                    removed += 1
        return removed

    def enter(self) -> None:
        """Move the calling process into the cgroup (run in the trainer, before exec)."""
        with open(self.path / "cgroup.procs", "w") as fh:
            fh.write("0")

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def kill(self) -> int:
        """Kill every process left in the cgroup and remove it; how many were left."""
        left = self.pids()
        if left:
            try:
                (self.path / "cgroup.kill").write_text("1")
            except OSError:  # kernels before 5.14: one by one
                for pid in left:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + CGROUP_KILL_WAIT_S
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.02)
        with contextlib.suppress(OSError):
            self.path.rmdir()
        return len(left)


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of a trainer's process group (it may have exited itself); on
    Windows, terminate and close its Job Object (agent/hostos.py)."""
    hostos.end_tree(pgid)


@dataclass(frozen=True)
class TrainerUser:
    """Another user to run trainers as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> TrainerUser:
        if hostos.is_windows():
            raise ValueError("--trainer-user is not supported on Windows: run the agent itself as that user")
        import pwd

        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ValueError(
                f"trainer user {name!r} does not exist (deploy/install.sh --trainer-user makes one)"
            ) from None
        return cls(name, entry.pw_uid, entry.pw_gid)

    def reclaim(self, workdir: Path) -> None:
        """Give the work dir back to the agent once the trainer is gone (it bundles the output)."""
        uid, gid = os.getuid(), os.getgid()
        for path in (workdir, *workdir.rglob("*")):
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, uid, gid, follow_symlinks=False)

    def hand_over(self, workdir: Path, output: Path) -> None:
        """Let the trainer write its output: the job's work dir (with ``output`` in it, made
        now) becomes its, and only its."""
        output.mkdir(parents=True, exist_ok=True)
        for path in (workdir, *workdir.rglob("*")):
            os.chown(path, self.uid, self.gid, follow_symlinks=False)


def _load_prctl() -> Any:
    """libc's prctl, looked up in the agent: a child that already dropped to the trainer user
    may not be able to read the modules ctypes would import."""
    if hostos.is_windows():
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
PR_SET_PDEATHSIG = 1
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4


def die_with_parent() -> None:
    """In the child before exec: if the agent is SIGKILLed, its trainer dies too (Linux)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class Confinement:
    """How one trainer is held: its cgroup (if any) and the user it runs as (if another)."""

    cgroup: TrainerCgroup | None = None
    user: TrainerUser | None = None
    workdir: Path | None = None  # the job's, handed to ``user`` while the trainer runs

    def preexec(self) -> None:
        """In the child, before exec: into the cgroup (with the agent's rights still), drop to
        the trainer user and drop every capability the agent holds to switch users (ambient
        ones would survive exec), then ask to die with the agent (a credential change clears
        that request)."""
        if self.cgroup is not None:
            self.cgroup.enter()
        if self.user is not None:
            os.setgroups([])
            os.setgid(self.user.gid)
            os.setuid(self.user.uid)
            if _PRCTL is not None:
                _PRCTL(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        os.umask(0o077)  # its output is for the agent to bundle, not for other users to read
        die_with_parent()

    def cleanup(self, pgid: int | None) -> int:
        """Kill everything the trainer left behind and take its work dir back; how many
        processes its cgroup still held."""
        if pgid is not None:
            kill_group(pgid)
        left = self.cgroup.kill() if self.cgroup is not None else 0
        if self.user is not None and self.workdir is not None:
            self.user.reclaim(self.workdir)
        return left
