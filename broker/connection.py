"""The connection to NATS: :class:`Broker` bundles it with the JetStream context and handles
to the jobs KV and the workers KV (artifacts.py reaches the object store).

``Broker.connect`` binds to existing resources; ``provision=True`` creates or updates them
first (provision.py). What is done over the connection lives in a module per concept:
records.py, tickets.py, workers.py, logs.py, artifacts.py, control.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from trainfleet.broker.settings import Settings

log = logging.getLogger("trainfleet.broker")


async def _reachable(servers: list[str], timeout_s: float) -> bool:
    for url in servers:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222), timeout_s
            )
        except (TimeoutError, OSError):
            continue
        writer.close()
        return True
    return False


async def wait_reachable(servers: list[str], wait_s: float) -> None:
    """Fail fast (or after ``wait_s``) when no server answers: nats-py would retry forever."""
    deadline = time.monotonic() + wait_s
    while not await _reachable(servers, 2.0):
        if time.monotonic() >= deadline:
            raise Unreachable(
                f"cannot connect to NATS at {','.join(servers)}: no server is listening"
                + (f" (waited {wait_s:g}s)" if wait_s else "")
            )
        await asyncio.sleep(1.0)


async def connect_nats(
    settings: Settings, *, name: str = "trainfleet", connect_timeout_s: float = 5.0, wait_s: float = 0.0, **options: Any
) -> Client:
    """Open a NATS connection that keeps reconnecting forever once up (servers restart, links
    drop). Long-running processes pass ``wait_s`` to wait for a server that is still starting."""

    async def on_error(exc: Exception) -> None:
        log.debug("nats error: %s", exc)

    async def on_disconnect() -> None:
        log.info("disconnected from NATS; reconnecting")

    async def on_reconnect() -> None:
        log.info("reconnected to NATS")

    servers = [u.strip() for u in settings.url.split(",") if u.strip()]
    await wait_reachable(servers, wait_s)
    opts: dict[str, Any] = dict(
        servers=servers,
        name=name,
        connect_timeout=connect_timeout_s,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        ping_interval=10,
        max_outstanding_pings=3,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    opts.update(options)
    try:
        return await nats.connect(**opts)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise Unreachable(f"cannot connect to NATS at {settings.url}: {exc or type(exc).__name__}") from exc


@dataclass
class Broker:
    """A live connection plus handles to every trainfleet resource."""

    nc: Client
    js: JetStreamContext
    settings: Settings
    jobs: KeyValue
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
            js = nc.jetstream(timeout=10.0)
            if provision:
                await provision_resources(js, settings)
            names = settings.names
            try:
                jobs = await js.key_value(names.jobs_bucket)
                workers = await js.key_value(names.workers_bucket)
                await js.stream_info(jsapi.object_stream(names.artifacts_bucket))
            except nats.js.errors.NotFoundError as exc:
                raise NotProvisioned(
                    f"trainfleet resources (prefix {settings.prefix!r}) are not provisioned on {settings.url}: "
                    "run `trainfleet provision` or start the controller first"
                ) from exc
            return cls(nc=nc, js=js, settings=settings, jobs=jobs, workers=workers)
        except BaseException:
            await nc.close()
            raise

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
