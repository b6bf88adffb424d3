"""Connect to NATS and provision every trainfleet resource idempotently.

:class:`Broker` bundles the connection, the JetStream context and handles to
the jobs KV, workers KV and artifacts object store. ``Broker.connect`` binds
to existing resources; ``provision=True`` creates or updates them first, so
running it twice (or from several processes at once) is harmless.
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
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from trainfleet.broker.errors import BrokerError
from trainfleet.broker.names import Names
from trainfleet.broker.objstore import status_of
from trainfleet.broker.settings import Settings, seconds_to_ns

JS_API = "$JS.API"
# A KV watcher's ordered consumer is removed by the server this long after its subscription
# goes (nats-py's default is 5 minutes: a loop that snapshots the bucket every second would
# keep hundreds of dead consumers alive until the stream's consumer limit refuses new ones).
WATCH_INACTIVE_S = 10.0
NO_WAIT_ONE = b'{"batch":1,"no_wait":true}'
# A no_wait pull is answered within a round trip; no answer this long means the server is gone.
PULL_TIMEOUT_S = 5.0


class ConsumerUnavailable(BrokerError):
    """A pull consumer is gone or was changed under us; ensure it again before the next pull."""


log = logging.getLogger("trainfleet.broker")

JOBS_KV_HISTORY = 10
DUPLICATE_WINDOW_S = 120.0


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
            raise BrokerError(
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
        raise BrokerError(f"cannot connect to NATS at {settings.url}: {exc or type(exc).__name__}") from exc


def jobs_stream_config(names: Names, settings: Settings) -> api.StreamConfig:
    return api.StreamConfig(
        name=names.jobs_stream,
        description="trainfleet job tickets (hints; the jobs KV is the truth)",
        subjects=[names.jobs_wildcard],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        num_replicas=settings.replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        allow_direct=True,
    )


def logs_stream_config(names: Names, settings: Settings) -> api.StreamConfig:
    return api.StreamConfig(
        name=names.logs_stream,
        description="trainer output and progress events per job",
        subjects=names.logs_wildcards,
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=settings.replicas,
        max_bytes=settings.logs_max_bytes,
        max_age=settings.logs_max_age_s,
        discard=api.DiscardPolicy.OLD,
        allow_direct=True,
    )


def jobs_consumer_config(names: Names, settings: Settings, klass: str) -> api.ConsumerConfig:
    """One durable pull consumer per class; its ack-wait is the lease."""
    durable = names.consumer(klass)
    return api.ConsumerConfig(
        name=durable,
        durable_name=durable,
        description=f"tickets of class {klass}",
        filter_subject=names.jobs_subject(klass),
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=settings.lease_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=-1,
        max_waiting=4096,
        num_replicas=settings.replicas if settings.replicas > 1 else None,
    )


@dataclass
class Broker:
    """A live connection plus handles to every trainfleet resource."""

    nc: Client
    js: JetStreamContext
    settings: Settings
    jobs: KeyValue
    workers: KeyValue
    artifacts: ObjectStore

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
                artifacts = await js.object_store(names.artifacts_bucket)
            except nats.js.errors.NotFoundError as exc:
                raise BrokerError(
                    f"trainfleet resources (prefix {settings.prefix!r}) are not provisioned on {settings.url}: "
                    "run `trainfleet provision` or start the controller first"
                ) from exc
            return cls(nc=nc, js=js, settings=settings, jobs=jobs, workers=workers, artifacts=artifacts)
        except BaseException:
            await nc.close()
            raise

    async def ensure_consumer(self, klass: str) -> str:
        """Create (or update to the current lease settings) the durable consumer of ``klass``."""
        config = jobs_consumer_config(self.names, self.settings, klass)
        await self.js.add_consumer(self.names.jobs_stream, config=config)
        return config.durable_name or ""

    async def cas_record(self, record: Any, revision: int) -> int | None:
        """Compare-and-swap a job record on its KV revision: the new revision, or None when
        another write got there first (the caller re-reads and decides again)."""
        from trainfleet.broker.schema import encode

        try:
            return await self.jobs.update(record.job_id, encode(record), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

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


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        # 10058: the stream exists with another config; bring it to ours.
        if exc.err_code != 10058:
            raise
        await js.update_stream(config)


async def provision_resources(js: JetStreamContext, settings: Settings) -> None:
    """Create or update every stream, bucket and object store of DESIGN.md."""
    names = settings.names
    await _ensure_stream(js, jobs_stream_config(names, settings))
    await _ensure_stream(js, logs_stream_config(names, settings))
    kv_specs = [
        api.KeyValueConfig(
            bucket=names.jobs_bucket,
            history=JOBS_KV_HISTORY,
            storage=api.StorageType.FILE,
            replicas=settings.replicas,
            description="trainfleet job records",
        ),
        api.KeyValueConfig(
            bucket=names.workers_bucket,
            history=1,
            ttl=settings.worker_ttl_s,
            storage=api.StorageType.FILE,
            replicas=settings.replicas,
            description="trainfleet worker registry",
        ),
    ]
    for kv in kv_specs:
        try:
            await js.create_key_value(kv)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:
                raise
            log.debug("bucket %s exists with another config; keeping it", kv.bucket)
    try:
        await js.create_object_store(
            names.artifacts_bucket,
            config=api.ObjectStoreConfig(
                bucket=names.artifacts_bucket,
                storage=api.StorageType.FILE,
                replicas=settings.replicas,
                description="trainfleet artifact bundles by sha256",
            ),
        )
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != 10058:
            raise


class TicketPuller:
    """Pulls one ticket at a time from the jobs stream's class consumers with ``no_wait`` requests:
    answered at once either way, so an empty class costs one round trip and never a wait.

    One inbox subscription serves every pull. JetStream delivers a message on the inbox under
    the message's own subject (only status answers carry the inbox as subject), so answers
    cannot be told apart by reply token: pulls run one at a time, and an answer that arrives
    after its pull timed out is taken by the next pull (a late ticket is still a delivered
    ticket, ack-pending on us; a late status is dropped)."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self.inbox = broker.nc.new_inbox()
        self._answers: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Any = None
        self._lock = asyncio.Lock()

    async def start(self) -> TicketPuller:
        async def answer(msg: Msg) -> None:
            self._answers.put_nowait(msg)

        self._sub = await self.broker.nc.subscribe(self.inbox, cb=answer)
        return self

    async def stop(self) -> None:
        """Stop listening; tickets that still arrive are never acked and come back after ack-wait."""
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    async def pull(self, durable: str, wait_s: float = 0.0, timeout_s: float = PULL_TIMEOUT_S) -> Msg | None:
        """The next ticket of consumer ``durable`` if one is waiting now (or, with ``wait_s``,
        arrives within it), else None. Raises ConsumerUnavailable when the consumer is gone or
        changed (ensure it again), and nats.errors.TimeoutError when the server does not answer
        within ``wait_s + timeout_s``."""
        async with self._lock:
            while not self._answers.empty():
                late = self._answers.get_nowait()
                if status_of(late) is None:
                    return late
            subject = f"{JS_API}.CONSUMER.MSG.NEXT.{self.broker.names.jobs_stream}.{durable}"
            body = NO_WAIT_ONE if wait_s <= 0 else b'{"batch":1,"expires":%d}' % seconds_to_ns(wait_s)
            await self.broker.nc.publish(subject, body, reply=self.inbox)
            try:
                msg = await asyncio.wait_for(self._answers.get(), wait_s + timeout_s)
            except TimeoutError:
                raise nats.errors.TimeoutError from None
        status = status_of(msg)
        if status is None:
            return msg
        if status in ("404", "408"):  # nothing waiting / the request expired
            return None
        description = (msg.headers.get("Description") or "").split("\n")[0] if msg.headers else ""
        raise ConsumerUnavailable(f"consumer {durable}: {status} {description}".strip())
