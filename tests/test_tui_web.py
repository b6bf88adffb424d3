"""`trainfleet monitor --web`: the monitor served by textual-serve, read in a real headless Chromium."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from trainfleet.broker.settings import Settings
from trainfleet.tui.web import MonitorServer, child_env, is_loopback

from .conftest import gbm_jobs, gbm_manifest, put_job, role_env

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
NO_CHROMIUM = "no chromium binary on PATH (CI installs Debian's `chromium` when it runs as root)"

# The page's xterm.js draws on a canvas, so the text is not in the DOM; textual-serve keeps its
# Terminal object in a closure. Before the page's script runs, a setter for `terminal` on
# Object.prototype catches the object when textual.js stores it (`this.terminal = new Terminal`),
# leaves it where it was put, and keeps it on window, so the test reads the screen through
# xterm's buffer API, exactly what is drawn.
CATCH_TERMINAL = """
Object.defineProperty(Object.prototype, "terminal", {
  configurable: true,
  set(value) {
    Object.defineProperty(this, "terminal", {value, writable: true, configurable: true, enumerable: true});
    if (value && value.buffer && value.buffer.active) window.__terminal = value;
  },
});
"""
SCREEN_TEXT = """() => {
  const term = window.__terminal;
  if (!term) return null;
  const buffer = term.buffer.active, rows = [];
  for (let i = 0; i < term.rows; i++) {
    const line = buffer.getLine(buffer.viewportY + i);
    rows.push(line ? line.translateToString(true) : "");
  }
  return rows.join("\\n");
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebMonitor:
    """`trainfleet monitor --web` as a subprocess, as the viewer role (credentials in its env)."""

    def __init__(self, settings: Settings, tmp: Path, *flags: str, role: str = "viewer"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "TRAINFLEET_"))}
        env.update(role_env(role), NATS_URL=settings.url, PYTHONUNBUFFERED="1")
        self.out, self.err = tmp / "web.out", tmp / "web.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "trainfleet.controller.cli", "monitor", "--web", *flags],
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    async def url(self, timeout_s: float = 30.0) -> str:
        """The URL it says to open, once it listens."""
        deadline = time.monotonic() + timeout_s
        while not (found := re.search(r"open (http://\S+)", self.stdout())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no URL (exit {self.proc.poll()}): {self.stdout()} {self.stderr()}")
            await asyncio.sleep(0.05)
        return found.group(1)

    def interrupt(self, timeout_s: float = 15.0) -> int:
        """Ctrl-C; its exit code once it (and every monitor it started) is gone."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout_s)
        deadline = time.monotonic() + timeout_s
        while session_members(self.proc.pid):
            assert time.monotonic() < deadline, f"left running: {session_members(self.proc.pid)}"
            time.sleep(0.05)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in session_members(self.proc.pid):
            os.kill(pid, signal.SIGKILL)


def session_members(sid: int) -> list[int]:
    """The live processes of session ``sid`` (the server and the monitors it started)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def test_child_env_gives_the_subprocess_exactly_these_settings(monkeypatch):
    # Given settings from flags that differ from the parent's own environment
    parent = {
        "NATS_URL": "nats://elsewhere:4222",
        "NATS_TOKEN": "parents-token",
        "TRAINFLEET_LEASE_S": "60",
        "TRAINFLEET_PREFIX": "other",
        "TRAINFLEET_URL": "nats://wrong:4222",
    }
    wanted = Settings(
        url="nats://fleet:4222",
        prefix="tf",
        lease_s=120.0,
        heartbeat_s=7.5,
        user="ops",
        password="s3cret",
        tls_ca="/etc/ca.pem",
        inbox_prefix="_INBOX_viewer",
        trust_keys=("KEY1", "KEY2"),
        upload_patience_s=9.0,
    )
    env = dict(parent)
    for name, value in child_env(wanted).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    # Then the child builds exactly them (and no setting travels by argv: there is none to read)
    assert Settings.from_env(env) == wanted
    assert "NATS_TOKEN" not in env and "TRAINFLEET_URL" not in env


def test_loopback_names():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.1.2.3", "fleet.example.com"]))


def test_pages_of_other_sites_and_rebound_names_are_refused():
    loopback, wide = MonitorServer("127.0.0.1", 8000), MonitorServer("0.0.0.0", 8000)

    def refusal(server: MonitorServer, host: str, origin: str | None = None) -> str | None:
        headers = {"Host": host, **({"Origin": origin} if origin else {})}
        return server._refusal(make_mocked_request("GET", "/ws", headers=headers))

    # The page itself, and its own websocket (same origin), or a client that sends no Origin
    assert refusal(loopback, "127.0.0.1:8000", "http://127.0.0.1:8000") is None
    assert refusal(loopback, "localhost:8000") is None and refusal(loopback, "[::1]:8000") is None
    assert refusal(wide, "fleet.example.com:8000", "http://fleet.example.com:8000") is None
    # A page on another site may not open the websocket (it would drive the monitor as us)
    assert "may not open" in refusal(loopback, "127.0.0.1:8000", "http://evil.example")
    assert "may not open" in refusal(wide, "fleet.example.com:8000", "http://evil.example:8000")
    # On loopback, a name rebound to 127.0.0.1 (DNS rebinding) is refused even from its own page
    assert "loopback name" in refusal(loopback, "evil.example:8000", "http://evil.example:8000")


async def test_wider_bind_warns_port_in_use_fails_and_ctrl_c_stops(broker, settings, tmp_path):
    # Binding every address says what that means, and still serves
    port = free_port()
    wide = WebMonitor(settings, tmp_path, "--host", "0.0.0.0", "--port", str(port))
    try:
        await wide.url()
        warning = wide.stderr()
        assert "WARNING" in warning and f"0.0.0.0:{port}" in warning
        assert "THIS identity's rights" in warning and "viewer" in warning and "ssh -L" in warning
        # A second server on the same port fails at once, saying why
        (tmp_path / "second").mkdir()
        second = WebMonitor(settings, tmp_path / "second", "--port", str(port))
        assert second.proc.wait(30) == 2
        assert "already in use" in second.stderr() and "WARNING" not in second.stderr()
    finally:
        code = wide.interrupt() if wide.proc.poll() is None else wide.proc.returncode
        wide.kill()
    assert code == 0


async def screen_showing(page, texts: list[str], timeout_s: float = 30.0) -> str:
    """The page's terminal screen once it shows every one of ``texts``."""
    deadline = time.monotonic() + timeout_s
    screen = ""
    while not all(text in screen for text in texts):
        assert time.monotonic() < deadline, f"{texts} not shown; screen:\n{screen}"
        await asyncio.sleep(0.1)
        screen = await page.evaluate(SCREEN_TEXT) or ""
    return screen


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
async def test_browser_shows_the_fleets_jobs(broker, settings, tmp_path):
    from playwright.async_api import async_playwright

    # Given jobs in the fleet
    jobs = [await put_job(broker, spec) for spec in gbm_manifest(gbm_jobs(2, prefix="webjob")).jobs]
    names = sorted(job.spec.name for job in jobs)
    # When the monitor is served (as the viewer) and opened in two tabs of a headless Chromium
    web = WebMonitor(settings, tmp_path, "--port", str(free_port()))
    try:
        url = await web.url()
        assert url.startswith("http://127.0.0.1:") and "WARNING" not in web.stderr()
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
            )
            try:
                tabs = [await browser.new_page(viewport={"width": 1400, "height": 800}) for _ in range(2)]
                for tab in tabs:
                    # (the page links a web font: nothing leaves this machine)
                    await tab.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), lambda route: route.abort())
                    await tab.add_init_script(CATCH_TERMINAL)
                await asyncio.gather(*(tab.goto(url) for tab in tabs))
                # Then each tab's terminal shows the jobs table with both jobs, pending
                for screen in await asyncio.gather(*(screen_showing(tab, names) for tab in tabs)):
                    assert "pending" in screen
                # And keys typed in a tab reach its monitor: q quits it and ends that session only
                first, second = tabs
                await first.locator(".xterm-helper-textarea").focus()
                await first.keyboard.press("q")
                await first.wait_for_selector("body.-closed", state="attached", timeout=15_000)
                assert not await second.locator("body.-closed").count()
                # And Ctrl-C stops the server cleanly: the open session ends, nothing is left running
                assert web.interrupt() == 0
                await second.wait_for_selector("body.-closed", state="attached", timeout=15_000)
            finally:
                await browser.close()
        assert "Traceback" not in web.stdout() + web.stderr(), web.stdout() + web.stderr()
    finally:
        web.kill()
