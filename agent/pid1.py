"""The agent as PID 1 of a container: forward the stop signals, reap every orphan.

PID 1 of a PID namespace is special in two ways. The kernel delivers it only the signals it
has a handler for (a SIGTERM from ``podman stop`` or the kubelet is otherwise dropped), and
every process whose parent dies is re-parented to it, so it must reap them or they stay
zombies. The agent cannot simply ``waitpid(-1)``: that would steal the exit status of the
trainers asyncio waits for (and of any ``subprocess.run``), turning a failed job into a
success. So when the agent finds itself PID 1, :func:`become_init` forks: the child runs the
agent as usual (not PID 1, ordinary signal semantics, its trainers its own children) and
this process stays behind as a tiny init, as tini or dumb-init would be:

* it forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the agent (which
  drains: see agent.py's shutdown order);
* it reaps every child it gets: the orphaned grandchildren of trainers;
* it exits with the agent's exit status (128 + N when the agent died of signal N); the
  kernel then kills whatever is left in the namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType

from trainfleet.agent import hostos

# By name: Windows' signal module has no SIGHUP, SIGQUIT or SIGUSR*, and this module must import there.
_NAMES = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
FORWARDED = tuple(getattr(signal, name) for name in _NAMES if hasattr(signal, name))


def is_pid1() -> bool:
    """Whether this process is PID 1 of its namespace (never on Windows: no fork, no init)."""
    return not hostos.is_windows() and os.getpid() == 1


def become_init() -> None:
    """When this process is PID 1, fork: return in the child (run the agent there) and never
    return here (reap and forward until the agent exits, then exit with its status). Anywhere
    else, return at once. Call it before any thread is started."""
    if not is_pid1():
        return
    child: int | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)  # arrived before the fork returned: sent right after
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    # Handlers first, so a SIGTERM during the fork is not dropped (PID 1 has no default action).
    for sig in FORWARDED:
        signal.signal(sig, forward)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        for sig in FORWARDED:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        return
    for signum in pending:
        forward(signum, None)
    os._exit(_reap_until(child))


def _reap_until(agent: int) -> int:
    """Reap every child until ``agent`` exits; its exit code (128 + N for signal N)."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)  # signal handlers run in between (PEP 475)
        except ChildProcessError:
            return 1  # the agent is gone without us seeing its status: cannot happen, but not 0
        if pid == agent:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code
