"""Provisioning: every stream, bucket, object store and consumer of DESIGN.md, created or
brought to the current config idempotently (running it twice, or from several processes
at once, is harmless).

Role: admin (creating streams, buckets and consumers needs JetStream admin rights).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from trainfleet.broker import jsapi
from trainfleet.broker.errors import StorageLimit, StoreFull, StoreTooSmall
from trainfleet.broker.names import Names
from trainfleet.broker.settings import Settings
from trainfleet.broker.tickets import is_host_class

log = logging.getLogger("trainfleet.provision")

JOBS_KV_HISTORY = 10
# Earlier versions of a spec stay readable (a command change is audited in the bucket itself).
SPECS_KV_HISTORY = 5
DUPLICATE_WINDOW_S = 120.0
# Pull requests a class consumer keeps waiting: one per agent pulling the class at that moment
# (a ticket's doorbell sends every idle agent's pull at once; a parked pull is one per idle
# agent). A pull past it is refused with "409 Exceeded MaxWaiting". The server preallocates
# 8 bytes per slot, so a class every host shares (cpu, gpu.N) has room for a large fleet and a
# host's own class (host.<id>: its agents only) little. The server cannot change it on an
# existing consumer: ensure_consumer keeps the value a consumer was created with (4096 before
# issue 17); deleting the consumer and provisioning again applies these.
MAX_WAITING_PULLS = 65_536
HOST_CLASS_MAX_WAITING = 64
# nats-server's answer to a consumer update that changes max_waiting.
ERR_MAX_WAITING_NOT_UPDATABLE = 10012
# Where an operator reads what to do when a storage limit is hit.
STORE_FULL_DOCS = 'docs/operations.md, "When the store is full"'
# The account-info request of the storage check: best effort, so it must not hold provisioning up.
ACCOUNT_INFO_TIMEOUT_S = 2.0


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
        max_waiting=HOST_CLASS_MAX_WAITING if is_host_class(klass) else MAX_WAITING_PULLS,
        num_replicas=settings.replicas if settings.replicas > 1 else None,
    )


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        # The stream exists with another config: bring it to ours.
        if exc.err_code != jsapi.ERR_STREAM_NAME_IN_USE:
            raise
        await js.update_stream(config)


async def provision_resources(js: JetStreamContext, settings: Settings) -> None:
    """Create or update every stream, bucket and object store of DESIGN.md.

    The configured sizes are checked against the account's storage limits first (see
    :func:`check_storage`), and a storage error from the server on any resource is raised as a
    :class:`StorageLimit` naming that resource, the limit and what fixes it."""
    names = settings.names
    await check_storage(js, settings)
    async with _named(js, settings, f"the jobs stream {names.jobs_stream}"):
        await _ensure_stream(js, jobs_stream_config(names, settings))
    async with _named(js, settings, f"the logs stream {names.logs_stream}", logs=True):
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
            bucket=names.specs_bucket,
            history=SPECS_KV_HISTORY,
            storage=api.StorageType.FILE,
            replicas=settings.replicas,
            description="trainfleet job specs, signed by the controller",
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
            async with _named(js, settings, f"the KV bucket {kv.bucket}"):
                await js.create_key_value(kv)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != jsapi.ERR_STREAM_NAME_IN_USE:
                raise
            log.debug("bucket %s exists with another config; keeping it", kv.bucket)
    try:
        async with _named(js, settings, f"the artifacts bucket {names.artifacts_bucket}"):
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
        if exc.err_code != jsapi.ERR_STREAM_NAME_IN_USE:
            raise


# -- storage limits -------------------------------------------------------------
def size_text(n: int) -> str:
    """Bytes as an operator reads them: ``256 MiB``, ``1.5 GiB``, ``900 bytes``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) or abs(value) >= 100 else f"{value:.1f} {unit}"
    return f"{n} bytes"


# storage_advice's name for the logs stream where a caller does not know the fleet's prefix.
LOGS_STREAM_PLACEHOLDER = "<PREFIX>_LOGS"


def storage_advice(limit: str, logs_stream: str = LOGS_STREAM_PLACEHOLDER) -> str:
    """What makes room under ``limit`` (a ``jsapi.LIMIT_*`` phrase), for an error message."""
    if limit == jsapi.LIMIT_DISK:
        return (
            "free disk space on the server outside JetStream (or grow the volume), then restart nats-server: "
            "a stream that hit a write error refuses every write, purges included, until the server restarts"
        )
    if limit == jsapi.LIMIT_STREAM_MAX_BYTES:
        return "delete what the stream holds, or raise its max_bytes"
    raise_it = "the account's max_file" if limit == jsapi.LIMIT_ACCOUNT_FILE else "max_file_store"
    return (
        f"free space (`trainfleet artifacts sweep`, delete artifacts no job needs, purge old logs with "
        f"`nats stream purge {logs_stream}`) or raise {raise_it}"
    )


async def check_storage(js: JetStreamContext, settings: Settings) -> None:
    """Compare the configured sizes with the account's JetStream limits before creating anything:
    StoreTooSmall names the setting that does not fit. Only account limits can be read by a
    client (a server's own max_file_store is not reported); a logs stream that does not fit
    that is refused at creation with err_code 10047, which :func:`provision_resources` names."""
    limits = await _account_limits(js, settings)
    if limits is None:
        return
    names = settings.names
    if limits.get("max_bytes_required"):
        raise StoreTooSmall(
            f"this account requires every stream to set max_bytes ({jsapi.LIMIT_MAX_BYTES_REQUIRED}), but "
            f"trainfleet's jobs stream {names.jobs_stream}, its KV buckets and its artifacts bucket "
            f"{names.artifacts_bucket} have no size limit (they grow with the fleet): run trainfleet in an "
            f"account without max_bytes_required ({STORE_FULL_DOCS})"
        )
    per_stream = int(limits.get("storage_max_stream_bytes") or -1)
    if 0 < per_stream < settings.logs_max_bytes:
        raise StoreTooSmall(
            f"the logs stream {names.logs_stream} wants {size_text(settings.logs_max_bytes)} "
            f"(TRAINFLEET_LOGS_MAX_BYTES) but the account lets one stream reserve at most {size_text(per_stream)} "
            f"({jsapi.LIMIT_ACCOUNT_STREAM_BYTES}): lower TRAINFLEET_LOGS_MAX_BYTES to at most "
            f"{size_text(per_stream)} or raise the account's max_stream_bytes ({STORE_FULL_DOCS})"
        )
    max_storage = int(limits.get("max_storage") or -1)
    if max_storage > 0:
        reserved = await _reserved_by_others(js, names.logs_stream)
        # Strictly less: every stream created after it (the buckets) must still find a byte to reserve.
        if settings.logs_max_bytes * settings.replicas + (reserved or 0) >= max_storage:
            raise _logs_too_big(settings, max_storage, reserved)


def _logs_too_big(settings: Settings, account_max: int | None, reserved: int | None, cause: str = "") -> StoreTooSmall:
    """The logs stream's max_bytes cannot be reserved: say how much it wants, how much there is,
    and which setting to change."""
    names = settings.names
    want = settings.logs_max_bytes * settings.replicas
    replicas = f" × {settings.replicas} replicas" if settings.replicas > 1 else ""
    wants = (
        f"the logs stream {names.logs_stream} wants {size_text(want)} of file storage "
        f"(TRAINFLEET_LOGS_MAX_BYTES={settings.logs_max_bytes}{replicas})"
    )
    others = f", {size_text(reserved)} of it already reserved by other streams" if reserved else ""
    cause = f" ({cause})" if cause else ""
    if account_max is not None and account_max > 0:
        room = max(0, account_max - (reserved or 0) - 1) // max(1, settings.replicas)
        if room >= 1 << 20:
            room -= room % (1 << 20)  # a round number that fits
        return StoreTooSmall(
            f"{wants} but the account allows {size_text(account_max)}{others}{cause}: "
            f"{jsapi.LIMIT_ACCOUNT_FILE}. Lower TRAINFLEET_LOGS_MAX_BYTES to at most {size_text(room)} "
            f"or raise the account's max_file ({STORE_FULL_DOCS})"
        )
    plus = f" plus the {size_text(reserved)} other streams already reserve" if reserved else ""
    return StoreTooSmall(
        f"{wants} but the server cannot reserve that much{cause}: {jsapi.LIMIT_SERVER_FILE_STORE}, "
        f"by default 75% of the disk free when the server started, is below {size_text(want)}{plus}. "
        f"Lower TRAINFLEET_LOGS_MAX_BYTES or raise max_file_store ({STORE_FULL_DOCS})"
    )


async def _account_limits(js: JetStreamContext, settings: Settings) -> dict[str, Any] | None:
    """The account's storage limits for our replica count (None: unknown, or none set)."""
    try:
        info = await asyncio.wait_for(js.account_info(), ACCOUNT_INFO_TIMEOUT_S)
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
        log.debug("account info unavailable (%r): storage limits not checked before provisioning", exc)
        return None
    limits: Any = info.limits
    tier = (info.tiers or {}).get(f"R{settings.replicas}")
    if tier is not None:
        limits = tier.get("limits") if isinstance(tier, dict) else getattr(tier, "limits", limits)
    if limits is None:
        return None
    return dict(limits) if isinstance(limits, dict) else dict(vars(limits))


async def _reserved_by_others(js: JetStreamContext, stream: str) -> int | None:
    """File storage the account's other streams reserve (max_bytes × replicas), or None if unknown."""
    reserved = 0
    try:
        offset = 0
        while page := await js.streams_info(offset=offset):
            offset += len(page)
            for info in page:
                cfg = info.config
                if cfg.name != stream and cfg.storage != api.StorageType.MEMORY and (cfg.max_bytes or 0) > 0:
                    reserved += (cfg.max_bytes or 0) * (cfg.num_replicas or 1)
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
        log.debug("stream list unavailable (%r)", exc)
        return None
    return reserved


@contextlib.asynccontextmanager
async def _named(js: JetStreamContext, settings: Settings, what: str, *, logs: bool = False) -> AsyncIterator[None]:
    """Raise a storage error of the server inside as a StorageLimit naming ``what``; anything
    else passes through unchanged."""
    try:
        yield
    except nats.js.errors.APIError as exc:
        description = exc.description or ""
        limit = jsapi.storage_limit(exc.err_code, description)
        if limit is None:
            raise
        raise await _storage_error(js, settings, what, exc.err_code, description, limit, logs=logs) from exc


async def _storage_error(
    js: JetStreamContext, settings: Settings, what: str, code: int | None, description: str, limit: str, *, logs: bool
) -> StorageLimit:
    cause = f"err_code {code}, {description}"
    if logs and code == jsapi.ERR_STORAGE_RESOURCES_EXCEEDED:
        limits = await _account_limits(js, settings)
        account_max = int(limits.get("max_storage") or -1) if limits else None
        return _logs_too_big(settings, account_max, await _reserved_by_others(js, settings.names.logs_stream), cause)
    if limit == jsapi.LIMIT_MAX_BYTES_REQUIRED:
        return StoreTooSmall(
            f"{what} cannot be created ({cause}): {limit}, and trainfleet's jobs stream, KV buckets and "
            f"artifacts bucket set none: run trainfleet in an account without max_bytes_required ({STORE_FULL_DOCS})"
        )
    if limit == jsapi.LIMIT_ACCOUNT_STREAM_BYTES:
        return StoreTooSmall(
            f"{what} wants {size_text(settings.logs_max_bytes)} (TRAINFLEET_LOGS_MAX_BYTES) ({cause}): {limit}: "
            f"lower TRAINFLEET_LOGS_MAX_BYTES or raise the account's max_stream_bytes ({STORE_FULL_DOCS})"
        )
    return StoreFull(
        f"{what} cannot be created or updated ({cause}): {limit} is used up: "
        f"{storage_advice(limit, settings.names.logs_stream)} ({STORE_FULL_DOCS})"
    )


async def ensure_consumer(js: JetStreamContext, settings: Settings, klass: str) -> str:
    """Create (or update to the current lease settings) the durable consumer of ``klass``; its name."""
    config = jobs_consumer_config(settings.names, settings, klass)
    stream = settings.names.jobs_stream
    try:
        await js.add_consumer(stream, config=config)
    except nats.js.errors.APIError as exc:
        if exc.err_code != ERR_MAX_WAITING_NOT_UPDATABLE:
            raise
        # An existing consumer made with another max_waiting: keep it, update the rest.
        info = await js.consumer_info(stream, config.durable_name or "")
        config.max_waiting = info.config.max_waiting
        await js.add_consumer(stream, config=config)
    return config.durable_name or ""
