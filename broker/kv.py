"""Reading whole KV buckets and a key's kept revisions (nats-py's helpers race here, and its
watcher costs a task switch and a timeout per entry).

:class:`LatestWatch` is a KV watch over a plain subscription: the latest entry of every key,
then every write, each handed to a callback as it arrives; it notices when it missed
something (a gap in the consumer's sequence, silence past its heartbeats) and says so
instead of going on quietly. :func:`snapshot` is one, stopped once caught up.

Used by the job records (records.py: the controller's record cache), the specs (specs.py)
and the worker registry (workers.py). Roles: every role that may read a bucket may watch
it (broker/roles.py ``_kv_read``: an ephemeral consumer of the bucket's stream, its flow
control answers, its deletion; deliveries come to the reader's own inbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from trainfleet.broker import jsapi

log = logging.getLogger("trainfleet.kv")

# A KV watcher's ordered consumer is removed by the server this long after its subscription
# goes (nats-py's default is 5 minutes: a loop that snapshots the bucket every second would
# keep hundreds of dead consumers alive until the stream's consumer limit refuses new ones).
WATCH_INACTIVE_S = 10.0
# The server sends a watch an idle heartbeat this often when it has nothing else to send;
# three missed in a row and the watch counts as lost.
WATCH_HEARTBEAT_S = 2.0
WATCH_SILENCE_S = 3 * WATCH_HEARTBEAT_S


@dataclass(frozen=True, slots=True)
class Delivery:
    """One KV entry as a watch delivers it: ``value`` is b"" for a delete or a headers-only
    watch; ``operation`` DEL or PURGE for a delete mark, else None."""

    key: str
    revision: int
    value: bytes
    operation: str | None
    pending: int  # entries the consumer still has to deliver after this one


def _delivery_fields(reply: str) -> tuple[int, int, int]:
    """(stream sequence, consumer sequence, pending) from a delivery's reply subject (v1 or v2)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6]), int(tokens[8])
    if len(tokens) >= 12:
        return int(tokens[7]), int(tokens[8]), int(tokens[10])
    raise ValueError(f"not a JetStream delivery: {reply!r}")


class LatestWatch:
    """The latest entry of every key of a bucket, then every write, to ``on_entry``.

    ``caught_up`` is set once everything stored when the watch started was delivered.
    ``lost`` says why the watch can no longer be trusted (None while it can): a delivery
    or heartbeat showed a gap in the consumer's sequence (a reconnect dropped messages, the
    consumer was recreated), or nothing came for WATCH_SILENCE_S (the consumer is gone, say
    after a leader election). A lost watch never recovers: stop it and start another."""

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        on_entry: Callable[[Delivery], None],
        *,
        headers_only: bool = False,
        heartbeat_s: float = WATCH_HEARTBEAT_S,
    ):
        self.js = js
        self.nc = js._nc
        self.bucket = bucket
        self.stream = jsapi.kv_stream(bucket)
        self.prefix = f"$KV.{bucket}."
        self.on_entry = on_entry
        self.headers_only = headers_only
        self.heartbeat_s = heartbeat_s
        self.caught_up = asyncio.Event()
        self.lost: str | None = None
        self.last_seq = 0  # stream sequence of the last entry delivered
        self._start_seq = 0  # the stream's last sequence when the watch started
        self._cseq = 0
        self._heard = self._delivered = time.monotonic()
        self._sub: nats.aio.subscription.Subscription | None = None
        self._consumer: str | None = None

    async def start(self) -> LatestWatch:
        info = await self.js.stream_info(self.stream)
        self._start_seq = info.state.last_seq if info.state.messages else 0
        inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(inbox, cb=self._on_msg)
        config = api.ConsumerConfig(
            deliver_subject=inbox,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=f"{self.prefix}>",
            flow_control=True,
            idle_heartbeat=self.heartbeat_s,
            headers_only=self.headers_only or None,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=WATCH_INACTIVE_S,
        )
        try:
            consumer = await self.js.add_consumer(self.stream, config=config)
        except BaseException:
            await self._unsubscribe()
            raise
        self._consumer = consumer.name
        self._heard = self._delivered = time.monotonic()
        if not info.state.messages or (consumer.num_pending == 0 and self._cseq == 0):
            self.caught_up.set()
        return self

    @property
    def healthy(self) -> bool:
        """Neither a gap nor a silence seen (checks the silence now)."""
        if self.lost is None and time.monotonic() - self._heard > max(WATCH_SILENCE_S, 3 * self.heartbeat_s):
            self.lost = f"no delivery or heartbeat for {time.monotonic() - self._heard:.1f} s"
        return self.lost is None

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        headers = msg.headers
        status = headers.get(jsapi.STATUS) if headers else None
        if status is not None:
            if status == jsapi.STATUS_HEARTBEAT:
                if msg.reply:  # a flow control request: answer it, or the server stops sending
                    with contextlib.suppress(nats.errors.Error):
                        await self.nc.publish(msg.reply, b"")
                last = headers.get("Nats-Last-Consumer") if headers else None
                if last is not None and int(last) != self._cseq:
                    self._lose(f"heartbeat says consumer sequence {last}, last delivered {self._cseq}")
            return
        if self.lost is not None:
            return
        try:
            seq, cseq, pending = _delivery_fields(msg.reply)
        except ValueError:
            return
        if cseq != self._cseq + 1:
            self._lose(f"consumer sequence {cseq} after {self._cseq}")
            return
        self._cseq = cseq
        self.last_seq = seq
        self._delivered = self._heard
        operation = jsapi.kv_operation(headers) if headers else None
        value = b"" if operation is not None or self.headers_only else msg.data
        try:
            self.on_entry(Delivery(msg.subject[len(self.prefix) :], seq, value, operation, pending))
        except Exception as exc:  # an entry not taken in is a gap like any other
            self._lose(f"handling {msg.subject} failed: {exc!r}")
            return
        if pending == 0 or seq >= self._start_seq:
            self.caught_up.set()

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            log.info("watch of %s lost: %s", self.bucket, why)

    async def wait_caught_up(self, timeout_s: float) -> None:
        """Until everything stored at the start was delivered. nats.errors.TimeoutError when
        nothing was delivered for ``timeout_s``, or when the watch is lost meanwhile."""
        while not self.caught_up.is_set():
            if not self.healthy or time.monotonic() - self._delivered > timeout_s:
                raise nats.errors.TimeoutError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.caught_up.wait(), min(timeout_s, 0.5))

    async def stop(self) -> None:
        await self._unsubscribe()
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await self.js.delete_consumer(self.stream, consumer)

    async def _unsubscribe(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


async def read_latest(
    js: JetStreamContext,
    bucket: str,
    on_entry: Callable[[Delivery], None],
    *,
    headers_only: bool = False,
    timeout_s: float = 10.0,
) -> None:
    """Hand the latest entry of every key of ``bucket`` (deletes too) to ``on_entry``, once
    (a later write to a key may follow its first delivery). nats.errors.TimeoutError when
    the deliveries stop for ``timeout_s`` before all were made."""
    watch = LatestWatch(js, bucket, on_entry, headers_only=headers_only)
    await watch.start()
    try:
        await watch.wait_caught_up(timeout_s)
        if watch.lost is not None:
            raise nats.errors.TimeoutError
    finally:
        await watch.stop()


async def snapshot(kv: KeyValue, timeout_s: float = 10.0, *, meta_only: bool = False) -> list[KeyValue.Entry]:
    """The latest entry of every live key (``meta_only``: keys and revisions, no values).

    nats.errors.TimeoutError when the deliveries stop for ``timeout_s`` before it is complete."""
    entries: dict[str, KeyValue.Entry] = {}
    bucket = kv._name

    def keep(d: Delivery) -> None:
        if d.operation is None:
            entries[d.key] = KeyValue.Entry(bucket, d.key, d.value, d.revision, d.pending, None, None)
        else:
            entries.pop(d.key, None)

    await read_latest(kv._js, bucket, keep, headers_only=meta_only, timeout_s=timeout_s)
    return list(entries.values())


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
