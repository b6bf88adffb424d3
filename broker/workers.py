"""The worker registry: the workers KV bucket, one entry per agent, reaped by the bucket's TTL.

Roles: an agent writes and deletes its own entry; everyone else reads.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from trainfleet.broker import kv
from trainfleet.broker.errors import SchemaError
from trainfleet.broker.names import host_token
from trainfleet.broker.schema import WorkerRecord, decode, encode
from trainfleet.broker.settings import Settings

if TYPE_CHECKING:
    from trainfleet.broker.connection import Broker

log = logging.getLogger("trainfleet.workers")


def stale_after_s(settings: Settings) -> float:
    """A worker whose entry is older than this is stale (three missed heartbeats)."""
    return settings.heartbeat_s * 3


def is_alive(worker: WorkerRecord, settings: Settings, now: float | None = None) -> bool:
    return (time.time() if now is None else now) - worker.last_seen <= stale_after_s(settings)


async def load_workers(broker: Broker) -> list[WorkerRecord]:
    """Every readable worker entry, by host id (unreadable ones are logged and skipped)."""
    workers: list[WorkerRecord] = []
    for entry in await kv.snapshot(broker.workers):
        try:
            workers.append(decode(entry.value, WorkerRecord))
        except SchemaError as exc:
            log.warning("worker entry %s is unreadable: %s", entry.key, exc)
    return sorted(workers, key=lambda w: w.host_id)


def worker_key(host_id: str) -> str:
    """A host's key in the workers bucket: its subject token (``pi.lan`` → ``pi=lan``)."""
    return host_token(host_id)


async def put_worker(broker: Broker, worker: WorkerRecord) -> None:
    """Write (or refresh) an agent's own entry; the bucket's TTL reaps it if the agent dies."""
    await broker.workers.put(worker_key(worker.host_id), encode(worker))


async def remove_worker(broker: Broker, host_id: str) -> None:
    """An agent leaving on purpose deletes its entry at once."""
    await broker.workers.delete(worker_key(host_id))
