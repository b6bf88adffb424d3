"""Provisioning: every stream, bucket, object store and consumer of DESIGN.md, created or
brought to the current config idempotently (running it twice, or from several processes
at once, is harmless).

Role: admin (creating streams, buckets and consumers needs JetStream admin rights).
"""

from __future__ import annotations

import logging

import nats.js.errors
from nats.js import JetStreamContext, api

from trainfleet.broker import jsapi
from trainfleet.broker.names import Names
from trainfleet.broker.settings import Settings

log = logging.getLogger("trainfleet.provision")

JOBS_KV_HISTORY = 10
# Earlier versions of a spec stay readable (a command change is audited in the bucket itself).
SPECS_KV_HISTORY = 5
DUPLICATE_WINDOW_S = 120.0
# Pull requests a class consumer keeps waiting (one per fetching agent at most).
MAX_WAITING_PULLS = 4096


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
        max_waiting=MAX_WAITING_PULLS,
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
            await js.create_key_value(kv)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != jsapi.ERR_STREAM_NAME_IN_USE:
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
        if exc.err_code != jsapi.ERR_STREAM_NAME_IN_USE:
            raise


async def ensure_consumer(js: JetStreamContext, settings: Settings, klass: str) -> str:
    """Create (or update to the current lease settings) the durable consumer of ``klass``; its name."""
    config = jobs_consumer_config(settings.names, settings, klass)
    await js.add_consumer(settings.names.jobs_stream, config=config)
    return config.durable_name or ""
