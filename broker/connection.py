"""The connection to NATS: :class:`Broker` bundles it with the JetStream context and handles
to the jobs, specs and workers KV buckets (artifacts.py reaches the object store).

``Broker.connect`` binds to existing resources; ``provision=True`` creates or updates them
first (provision.py). What is done over the connection lives in a module per concept:
records.py, tickets.py, workers.py, logs.py, artifacts.py, control.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from trainfleet.broker import jsapi
from trainfleet.broker.errors import NotProvisioned, Unreachable
from trainfleet.broker.names import Names
from trainfleet.broker.provision import provision_resources
from trainfleet.broker.retry import CLI_PATIENCE_S, patiently
from trainfleet.broker.security import ClientSecurity, failure_reason, redact_url, remember, resolve, server_mismatch
from trainfleet.broker.settings import Settings

# How long a JetStream API call (stream info, consumer create...) may take.
API_TIMEOUT_S = 10.0
# How long one read or write of a record (jobs, specs, workers KV) may take before it is
# tried again: a request sent into a leader election is never answered.
RECORD_TIMEOUT_S = 2.0

log = logging.getLogger("trainfleet.broker")


class _QuietSslEof(logging.Filter):
    """asyncio warns on every TLS connection the server closes, because nats-py's protocol
    asks to keep the transport half-open (which TLS cannot): noise, and nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietSslEof())


async def _reachable(servers: list[str], timeout_s: float, *, read_info: bool = True) -> dict[str, Any] | None:
    """The INFO of the first server that answers (``{}`` when it listens but sent none we could
    read, or ``read_info`` is off), or None when nobody listens at any of ``servers``."""
    for url in servers:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222), timeout_s
            )
        except (TimeoutError, OSError):
            continue
        try:
            return await _read_info(reader, timeout_s) if read_info else {}
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return None


async def _read_info(reader: asyncio.StreamReader, timeout_s: float) -> dict[str, Any]:
    # A server greets every client with INFO in plaintext (unless it wants TLS first): it says
    # whether TLS is required before we send anything.
    try:
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        info = json.loads(line[5:]) if line.startswith(b"INFO ") else {}
    except (TimeoutError, OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


async def wait_reachable(servers: list[str], wait_s: float, *, read_info: bool = True) -> dict[str, Any]:
    """Fail fast (or after ``wait_s``) when no server answers: nats-py would retry forever.
    Returns the INFO the first server to answer greeted us with (``{}`` when none was read)."""
    deadline = time.monotonic() + wait_s
    while (info := await _reachable(servers, 2.0, read_info=read_info)) is None:
        if time.monotonic() >= deadline:
            raise Unreachable(
                f"cannot connect to NATS at {redact_url(','.join(servers))}: no server is listening"
                + (f" (waited {wait_s:g}s)" if wait_s else "")
            )
        await asyncio.sleep(1.0)
    return info


async def settle(nc: Client, timeout_s: float = 10.0) -> None:
    """Return once everything ``nc`` has written so far (subscriptions included) reached the
    server: a request another client sends after this finds them.

    nats-py's ``flush()`` alone does not promise that. Its PING goes straight onto the socket,
    while SUBs and PUBs wait in the client's buffer until its flusher task runs: right after
    ``subscribe()`` the PING is sent first and its PONG proves nothing. The flusher is woken
    before the first PING goes out, so by the time that PONG is read it has written the buffer,
    and the second PING goes out behind it (tests/test_settle.py reads the wire)."""
    await nc.flush(timeout=timeout_s)
    await nc.flush(timeout=timeout_s)


async def connect_nats(
    settings: Settings, *, name: str = "trainfleet", connect_timeout_s: float = 5.0, wait_s: float = 0.0, **options: Any
) -> Client:
    """Open a NATS connection with the credentials, TLS and context of ``settings`` that keeps
    reconnecting forever once up (servers restart, links drop). Long-running processes pass
    ``wait_s`` to wait for a server that is still starting; a refused login, a certificate that
    does not verify or a missing file fails at once with :class:`Unreachable` saying which."""
    try:
        security = resolve(settings)
    except Unreachable as exc:  # a context that cannot be read: we do not know the URL yet
        raise Unreachable(f"cannot connect to NATS: {exc}") from None
    try:
        security.check()
        secure = security.connect_options()
    except Unreachable as exc:
        raise Unreachable(f"cannot connect to NATS at {security.where}: {exc}") from None
    link = _LinkLog()
    opts: dict[str, Any] = dict(
        name=name,
        connect_timeout=connect_timeout_s,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        ping_interval=10,
        max_outstanding_pings=3,
        disconnected_cb=link.on_disconnect,
        reconnected_cb=link.on_reconnect,
    )
    opts.update(secure)
    opts.update(options)
    started = time.monotonic()
    info = await wait_reachable(list(security.servers), wait_s, read_info=not security.tls_first)
    problem = server_mismatch(info, security)
    if problem:
        raise Unreachable(f"cannot connect to NATS at {security.where}: {problem}")
    # What is left of wait_s, plus two connect timeouts: nats-py retries what may pass meanwhile.
    budget_s = max(0.0, wait_s - (time.monotonic() - started)) + 2 * connect_timeout_s
    nc = await _FirstConnect(security).run(opts, budget_s)
    link.nc = nc
    remember(nc, security)
    return nc


class _LinkLog:
    """Logs a lost connection and its return. nats-py calls the disconnect callback also when
    we close the connection ourselves (Broker.close, a SIGTERM's shutdown): only a disconnect
    that was not ours is news ("reconnecting"). Before the first connect succeeds there is no
    client yet (its failures are _FirstConnect's to report)."""

    def __init__(self) -> None:
        self.nc: Client | None = None

    async def on_disconnect(self) -> None:
        nc = self.nc
        if nc is None or nc.is_closed or nc.is_draining:
            log.debug("connection to NATS closed")
            return
        log.info("disconnected from NATS; reconnecting")

    async def on_reconnect(self) -> None:
        log.info("reconnected to NATS")


class _FirstConnect:
    """The first connect, bounded: nats-py (reconnecting forever) retries every failure, also
    those that will never pass. Its error callback tells us of each; a fatal one ends it."""

    def __init__(self, security: ClientSecurity):
        self.security = security
        self.connected = False
        self.fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.last: BaseException | None = None

    async def on_error(self, exc: Exception) -> None:
        log.debug("nats error: %s", exc)
        if self.connected or self.fatal.done():
            return
        self.last = exc
        reason = failure_reason(exc, self.security)
        if reason is not None:
            self.fatal.set_result(reason)

    async def run(self, opts: dict[str, Any], budget_s: float) -> Client:
        nc = Client()
        task = asyncio.ensure_future(nc.connect(**{"error_cb": self.on_error, **opts}))
        try:
            await asyncio.wait({task, self.fatal}, timeout=budget_s, return_when=asyncio.FIRST_COMPLETED)
            if task.done() and not task.cancelled() and task.exception() is None:
                self.connected = True
                return nc
            reason = self._reason(task, budget_s)
        except BaseException:
            await _abandon(nc, task)
            raise
        await _abandon(nc, task)
        raise Unreachable(f"cannot connect to NATS at {self.security.where}: {reason}")

    def _reason(self, task: asyncio.Future[Any], budget_s: float) -> str:
        if self.fatal.done():
            return self.fatal.result()
        if task.done() and not task.cancelled():
            exc = task.exception()
            assert exc is not None
            return failure_reason(exc, self.security) or f"{exc or type(exc).__name__}"
        last = f" (last error: {self.last or type(self.last).__name__})" if self.last is not None else ""
        return f"no connection within {budget_s:g}s{last}"


async def _abandon(nc: Client, task: asyncio.Future[Any]) -> None:
    """Stop a first connect that is still trying, and close what it opened.

    The cancel can land inside nats-py's own close of a refused attempt (it awaits between
    marking itself closed and closing its socket), and ``close()`` then returns at once, as
    for a client closed already: the socket stays open until the collector finds it, and its
    ResourceWarning fails whatever runs then. So what its transport holds is aborted here."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    with contextlib.suppress(Exception):
        await nc.close()
    transport = getattr(nc, "_transport", None)  # nats-py's TcpTransport: no public handle
    for attr in ("_io_writer", "_bare_io_writer"):  # the TLS stream, and the socket under it
        writer = getattr(transport, attr, None)
        if isinstance(writer, asyncio.StreamWriter) and not writer.transport.is_closing():
            writer.transport.abort()
    await asyncio.sleep(0)  # the aborted sockets close on the loop's next turn


@dataclass
class Broker:
    """A live connection plus handles to every trainfleet resource."""

    nc: Client
    js: JetStreamContext
    settings: Settings
    jobs: KeyValue
    specs: KeyValue
    workers: KeyValue

    @property
    def names(self) -> Names:
        return self.settings.names

    @classmethod
    async def connect(
        cls,
        settings: Settings,
        *,
        name: str = "trainfleet",
        provision: bool = False,
        wait_s: float = 0.0,
        **options: Any,
    ) -> Broker:
        nc = await connect_nats(settings, name=name, wait_s=wait_s, **options)
        try:
            # A long-running process waits out an election for as long as it takes (saying so
            # once); a command gives up after CLI_PATIENCE_S with exit 3.
            return await cls.bind(
                nc, settings, provision=provision, patience_s=math.inf if wait_s > 0 else CLI_PATIENCE_S
            )
        except BaseException:
            await nc.close()
            raise

    @classmethod
    async def bind(
        cls, nc: Client, settings: Settings, *, provision: bool = False, patience_s: float = CLI_PATIENCE_S
    ) -> Broker:
        """A Broker over a connection already open (it becomes the Broker's: ``close`` closes it)."""
        js = nc.jetstream(timeout=API_TIMEOUT_S)
        # Record reads and writes answer in milliseconds; one sent into an election is given
        # up soon and tried again (a CAS that landed is seen on the re-read), not waited on.
        js_records = nc.jetstream(timeout=RECORD_TIMEOUT_S)
        if provision:
            await patiently(lambda: provision_resources(js, settings), what="provisioning", limit_s=patience_s)
        names = settings.names

        async def bind() -> tuple[KeyValue, KeyValue, KeyValue]:
            buckets = [
                await js_records.key_value(b) for b in (names.jobs_bucket, names.specs_bucket, names.workers_bucket)
            ]
            await js.stream_info(jsapi.object_stream(names.artifacts_bucket))
            return buckets[0], buckets[1], buckets[2]

        try:
            jobs, specs, workers = await patiently(bind, what="binding to the fleet's streams", limit_s=patience_s)
        except nats.js.errors.NotFoundError as exc:
            raise NotProvisioned(
                f"trainfleet resources (prefix {settings.prefix!r}) are not provisioned on "
                f"{redact_url(settings.url)}: "
                "run `trainfleet provision` or start the controller first"
            ) from exc
        return cls(nc=nc, js=js, settings=settings, jobs=jobs, specs=specs, workers=workers)

    async def close(self) -> None:
        """Flush what we published (acks, final writes), then close. Not drain(): draining
        pull subscriptions waits out its whole timeout for fetches that will never finish."""
        if not self.nc.is_closed:
            try:
                await self.nc.flush(timeout=2)
            except (TimeoutError, nats.errors.Error, OSError):
                pass
            # A server that vanished leaves a broken pipe to flush on close: nothing to save then.
            with contextlib.suppress(OSError):
                await self.nc.close()
