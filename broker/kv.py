"""Reading whole KV buckets and a key's kept revisions (nats-py's helpers race here).

Used by the job records (records.py) and the worker registry (workers.py).
"""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from trainfleet.broker import jsapi

# A KV watcher's ordered consumer is removed by the server this long after its subscription
# goes (nats-py's default is 5 minutes: a loop that snapshots the bucket every second would
# keep hundreds of dead consumers alive until the stream's consumer limit refuses new ones).
WATCH_INACTIVE_S = 10.0


async def snapshot(kv: KeyValue, timeout_s: float = 10.0, *, meta_only: bool = False) -> list[KeyValue.Entry]:
    """The latest entry of every live key (``meta_only``: keys and revisions, no values).

    nats-py's watcher may emit its "initial values done" marker (None) before the initial
    values themselves, so the marker is not trusted: the snapshot ends at the entry with
    nothing pending after it, and a marker only ends it when the bucket is really empty."""
    if not (await kv.status()).values:
        return []
    watcher = await kv.watchall(meta_only=meta_only, inactive_threshold=WATCH_INACTIVE_S)
    entries: list[KeyValue.Entry] = []
    try:
        while True:
            entry = await watcher.updates(timeout=timeout_s)
            if entry is None:
                if not entries and not (await kv.status()).values:
                    return []  # everything expired or was purged meanwhile
                continue
            if entry.operation is None and entry.value is not None:
                entries.append(entry)
            if not entry.delta:
                return entries
    finally:
        await watcher.stop()


async def key_history(js: JetStreamContext, bucket: str, key: str) -> list[KeyValue.Entry]:
    """Every revision the bucket keeps of ``key``, oldest first ([] when it has none).

    nats-py's ``history()`` can end before the first revision (its "no more" marker races
    the deliveries), so the revisions (a few: the bucket's history) are read one get each."""
    stream, subject = jsapi.kv_stream(bucket), jsapi.kv_subject(bucket, key)
    entries: list[KeyValue.Entry] = []
    seq = 1
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return entries
        seq = msg.seq or seq
        operation = jsapi.kv_operation(msg.headers or {})
        entries.append(
            KeyValue.Entry(
                bucket=bucket, key=key, value=msg.data, revision=seq, delta=None, created=None, operation=operation
            )
        )
        seq += 1
