"""`trainfleet monitor` in a real terminal: tmux runs it, sends keys and reads the screen back.

The pilot tests (test_tui.py) drive the app inside the test's process; this one runs the
command an operator types, under the viewer role, in a pseudo-terminal of a given size.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest

from .conftest import gbm_jobs, gbm_manifest, put_job, role_env

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True, timeout=10).stdout


def wait_screen(session: str, predicate: Callable[[str], bool], what: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if predicate(screen):
            return screen
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; the screen was:\n{screen}")


async def test_the_monitor_in_a_real_terminal(broker, settings, tmp_path):
    jobs = [await put_job(broker, spec) for spec in gbm_manifest(gbm_jobs(3, prefix="tmux")).jobs]
    env = {**role_env("viewer"), "NATS_URL": settings.url, "TERM": "xterm-256color", "COLUMNS": "", "LINES": ""}
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if v)
    trainfleet = shutil.which("trainfleet", path=os.path.dirname(sys.executable)) or "trainfleet"
    session = f"tf-{uuid.uuid4().hex[:8]}"
    status = tmp_path / "exit"
    # COLUMNS/LINES from the test's own environment would override the terminal's size
    monitor = f"env -u COLUMNS -u LINES {exports} {shlex.quote(trainfleet)} monitor"
    command = f"{monitor}; echo $? > {shlex.quote(str(status))}"
    tmux("new-session", "-d", "-s", session, "-x", "150", "-y", "40", command)
    try:
        # the jobs show, with the header's counts and the viewer's read-only mark
        screen = wait_screen(session, lambda s: all(j.spec.name in s for j in jobs), "the three jobs")
        assert "3 jobs" in screen and "pending 3" in screen and "read-only" in screen
        # / filters as it is typed
        # in one burst, as a fast typist or a paste sends them
        tmux("send-keys", "-t", session, "/", "tmux-1", "Enter")
        screen = wait_screen(session, lambda s: "filter: tmux-1" in s, "the filter")
        assert "tmux-1" in screen and "tmux-0" not in screen and "tmux-2" not in screen
        tmux("send-keys", "-t", session, "Escape")
        wait_screen(session, lambda s: all(j.spec.name in s for j in jobs), "all three again")
        # ? lists the keys; the viewer's footer offers no cancel
        tmux("send-keys", "-t", session, "?")
        screen = wait_screen(session, lambda s: "keys" in s and "jump to a job" in s, "the help")
        tmux("send-keys", "-t", session, "Escape")
        screen = wait_screen(session, lambda s: "jump to a job" not in s, "the help to close")
        assert "cancel" not in screen.splitlines()[-1]
        # q quits with 0
        tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 15
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
