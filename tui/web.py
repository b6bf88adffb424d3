"""``trainfleet monitor --web``: the same monitor, served to a browser by textual-serve.

Each browser session gets its own ``trainfleet monitor`` subprocess, drawn into an xterm.js
terminal in the page over a websocket. The subprocess connects to NATS with exactly this
process's settings (URL, prefix, credentials, TLS, inbox prefix...), handed over in its
environment (``NATS_*`` and ``TRAINFLEET_*``, see Settings.from_env) and never on its command
line, which anyone on the host can read in ``ps``.

Anyone who can reach the port gets a monitor with this identity's rights (an operator's or
admin's can cancel and requeue), and the server asks for no password: it listens on loopback
unless told otherwise, and says so loudly when told. Page and websocket are refused to
other sites (a page elsewhere that the user happens to open cannot drive the monitor: the
websocket's Origin must be this server) and, on loopback, to any Host name but a loopback one
(DNS rebinding).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import shlex
import signal
import socket
import sys
from dataclasses import fields
from typing import Any
from urllib.parse import urlsplit

import aiohttp_jinja2
import jinja2
from aiohttp import web
from textual_serve.server import Server

from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import EXIT_OK, UsageError
from trainfleet.broker.settings import NATS_ENV, Settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
TITLE = "trainfleet monitor"
# How long open sessions get to quit their monitor once the server is told to stop.
SHUTDOWN_S = 5.0
LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


def child_env(settings: Settings) -> dict[str, str | None]:
    """The environment changes that make ``trainfleet monitor`` in a child process build exactly
    ``settings`` (Settings.from_env): every setting set explicitly, and every variable that would
    set one we left unset removed (``None``), so the parent's own environment cannot differ."""
    env: dict[str, str | None] = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        own = f"TRAINFLEET_{f.name.upper()}"
        if f.name in NATS_ENV:
            # The nats CLI's variable carries it; a TRAINFLEET_ one would win over it, so none.
            env[NATS_ENV[f.name]] = str(value) if value else None
            env[own] = None
        elif f.name == "trust_keys":
            env["TRAINFLEET_TRUST_KEY"] = ",".join(value) if value else None
            env[own] = None
        else:
            env[own] = None if value is None else str(value)
    return env


def monitor_command() -> str:
    """The shell command each browser session runs (textual-serve starts it with a shell):
    no settings on it, they travel in the environment."""
    return shlex.join([sys.executable, "-m", "trainfleet.controller.cli", "monitor"])


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int) -> str:
    """What binding ``host`` (not loopback) means, said before serving."""
    return (
        f"trainfleet: WARNING: serving the monitor on {host}:{port}, beyond this machine.\n"
        "  Anyone who can reach that port gets a live monitor with THIS identity's rights (an\n"
        "  operator's or admin's can cancel and requeue jobs), with no password asked and no TLS.\n"
        "  Run it with the viewer role's credentials (the viewer env file `trainfleet auth init`\n"
        "  wrote), or keep the default 127.0.0.1 and reach it through an SSH tunnel:\n"
        f"    ssh -L {port}:127.0.0.1:{port} <this host>   then open http://127.0.0.1:{port}/"
    )


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


class MonitorServer(Server):
    """textual-serve's server, with URLs taken from the request (so the page works under any
    name the server is reached by) and the Origin and Host checks above."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(monitor_command(), host=host, port=port, title=TITLE)
        self.loopback = is_loopback(host)
        self.sessions: set[asyncio.Task[Any]] = set()

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(self.templates_path))
        app.add_routes(
            [
                web.get("/", self.index, name="index"),
                web.get("/ws", self.websocket, name="websocket"),
                web.static("/static", self.statics_path, name="static"),
            ]
        )
        app.on_shutdown.append(self._close_sessions)
        return app

    def _refusal(self, request: web.Request) -> str | None:
        """Why a request is refused (None: it is not)."""
        hostname = urlsplit(f"//{request.host}").hostname or ""
        if self.loopback and not is_loopback(hostname):
            return f"this monitor answers only to a loopback name, not {request.host!r}"
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
            return f"a page from {origin!r} may not open this monitor"
        return None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        reason = self._refusal(request)
        if reason is not None:
            raise web.HTTPForbidden(text=reason + "\n")
        return await handler(request)

    async def index(self, request: web.Request) -> web.StreamResponse:
        base = f"{request.scheme}://{request.host}"
        context = {
            "font_size": max(6, min(48, _int(request.query.get("fontsize"), 16))),
            "app_websocket_url": ("wss" if request.scheme == "https" else "ws") + f"://{request.host}/ws",
            "config": {"static": {"url": f"{base}/static/"}},
            "application": {"name": self.title},
        }
        return aiohttp_jinja2.render_template("app_index.html", request, context)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        try:
            return await self.handle_websocket(request)
        finally:
            self.sessions.discard(task)

    async def _close_sessions(self, app: web.Application) -> None:
        """Stopping: each session closes its websocket and sends its monitor "quit" (textual-serve
        does both when its handler is cancelled), then waits for the monitor to exit."""
        for task in list(self.sessions):
            task.cancel()


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


async def _serve(settings: Settings, host: str, port: int) -> int:
    # A monitor that cannot connect says why here, once, not in every browser tab.
    broker = await Broker.connect(settings, name="trainfleet-monitor-web")
    await broker.close()
    server = MonitorServer(host, port)
    runner = web.AppRunner(server.make_app(), handle_signals=False, shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            why = "the port is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise UsageError(f"cannot serve the monitor on {host}:{port}: {why} (try another --port)") from None
        bound = runner.addresses[0][1] if runner.addresses else port
        print(
            f"trainfleet monitor: open http://{_url_host(host)}:{bound}/ in a browser "
            "(each tab runs its own monitor; Ctrl-C stops the server)",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        print("trainfleet monitor: stopping", flush=True)
    finally:
        await runner.cleanup()
    return EXIT_OK


def serve_monitor(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    """Serve the monitor on ``host``:``port`` (default 127.0.0.1:8000) until Ctrl-C or SIGTERM;
    0 when stopped so."""
    host = DEFAULT_HOST if host is None else host
    port = DEFAULT_PORT if port is None else port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0-65535, not {port}")
    if not is_loopback(host):
        print(exposure_warning(host, port), file=sys.stderr, flush=True)
    for name, value in child_env(settings).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return asyncio.run(_serve(settings, host, port))
