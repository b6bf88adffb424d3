"""Pipelined, disk-streaming transfers in the standard JetStream object-store format.

nats-py's stock ``ObjectStore.put`` waits for one pub-ack per chunk, so its
speed is ``chunk / RTT``; its ``get`` appends chunks to a bytes object (or
hops to a thread per chunk when given a file). This module
speaks the same wire format (ADR-20) so ``nats object get``, the Go client and
nats-py's own store read what it writes and vice versa:

* stream ``OBJ_<bucket>``; chunks on ``$O.<bucket>.C.<nuid>``; the object's
  info as JSON on ``$O.<bucket>.M.<base64url(name)>``, published with
  ``Nats-Rollup: sub`` after every chunk is stored;
* ``digest`` is ``SHA-256=<base64url(sha256)>``; replacing an object purges
  the chunks of the old nuid.

A put keeps up to ``window_bytes`` of chunks unacknowledged (so it is bound by
bandwidth, not RTT) and fails fast on the first negative ack; a file of
``direct_min_bytes`` or more is sent over a connection of the put's own
(directget.push_object: file reads, hashing, sends and pub-acks each on a
thread), anything else through the client (reading and hashing on a worker
thread one chunk ahead). A get reads the info, then pulls the chunks through an
ephemeral in-memory consumer, never more than ``window_bytes`` requested ahead:
over a direct connection for large objects (directget.pull_object: the socket,
the hash and the disk each on a thread), else through a subscription whose
worker thread writes and hashes them, into a temp file beside the destination.
Size, chunk count and digest are checked before the file is fsynced and renamed
into place; on any failure no partial file is left. Memory is bounded by the
window (plus a few chunks), whatever the object's size.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import hashlib
import io
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.nuid import NUID

from trainfleet.broker import jsapi
from trainfleet.broker.directget import (
    DRAIN_S,
    NO_RESPONDERS_TRIES,
    AcksStopped,
    ChunkPull,
    ChunkPush,
    Endpoint,
    Pulled,
    Pushed,
    no_responders_error,
    no_responders_pause,
    pull_object,
    push_object,
)
from trainfleet.broker.errors import (
    ArtifactError,
    BrokerError,
    DirectUnavailable,
    ObjectNotFound,
    StoreFull,
    TrainfleetError,
)
from trainfleet.broker.provision import STORE_FULL_DOCS, storage_advice

log = logging.getLogger("trainfleet.objstore")

# The ADR's default; artifacts.py may choose bigger chunks (fewer fsyncs per byte).
DEFAULT_CHUNK_BYTES = 128 * 1024
# Bytes of chunks in flight (unacked on put, requested but not yet received on get).
# 16 MiB covers the bandwidth-delay product of ~800 MB/s at 20 ms RTT; measured
# through a 20 ms RTT proxy, 8 MiB gave ~215 MB/s, 16 MiB ~300, 32 MiB no more.
DEFAULT_WINDOW_BYTES = 16 * 1024 * 1024
# Smaller objects are fetched on the client's own connection: a direct connection's set-up
# (connect, handshake, a thread) costs more than it saves below a few chunks.
DIRECT_MIN_BYTES = 4 << 20
# Chunks a get may hand to its writer thread ahead of the disk.
WRITE_QUEUE_CHUNKS = 4
DEFAULT_TIMEOUT_S = 10.0
# A get fails when no chunk arrives for this long (a stalled or vanished server).
DEFAULT_IDLE_TIMEOUT_S = 30.0
DIGEST_PREFIX = "SHA-256="


class ObjectLink(msgspec.Struct, omit_defaults=True):
    bucket: str = ""
    name: str = ""


class ObjectOptions(msgspec.Struct, omit_defaults=True):
    link: ObjectLink | None = None
    max_chunk_size: int = 0


class ObjectInfo(msgspec.Struct, kw_only=True):
    """An object's info record (ADR-20 ``ObjectInfo``); lenient on decode, complete on encode."""

    name: str = ""
    bucket: str = ""
    nuid: str = ""
    size: int = 0
    chunks: int = 0
    mtime: str = ""
    digest: str = ""
    deleted: bool = False
    description: str | None = None
    # Kept as decoded: writers disagree on their shapes, and we only carry them along.
    headers: Any = None
    metadata: Any = None
    options: ObjectOptions | None = None

    def to_json(self) -> bytes:
        # size and chunks are always written: stock readers treat a missing size
        # as "has chunks" and would wait for chunks that never come.
        out: dict[str, Any] = {
            "name": self.name,
            "bucket": self.bucket,
            "nuid": self.nuid,
            "size": self.size,
            "chunks": self.chunks,
            "mtime": self.mtime or _now_rfc3339(),
        }
        if self.digest:
            out["digest"] = self.digest
        if self.deleted:
            out["deleted"] = True
        for key in ("description", "headers", "metadata"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.options is not None:
            out["options"] = msgspec.to_builtins(self.options)
        return msgspec.json.encode(out)


@dataclass
class TransferStats:
    """What one transfer did; filled in by put_file/get_file when passed."""

    bytes: int = 0
    chunks: int = 0
    max_in_flight: int = 0
    elapsed_s: float = 0.0
    # Where the time went, in seconds: steps on the caller's side (info, consumer, fsync...) and
    # each transfer thread's busy time (a direct get's socket, hash and write threads).
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _parse_rfc3339(stamp: str) -> datetime | None:
    """The server's message time (RFC 3339 with nanoseconds, ``Z``) as an aware datetime."""
    text = stamp.rstrip("Z")
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError:
        return None


def encode_name(name: str) -> str:
    """The meta subject token for an object name: padded base64url, as every client writes it."""
    return base64.urlsafe_b64encode(name.encode()).decode()


def digest_string(digest: bytes) -> str:
    return DIGEST_PREFIX + base64.urlsafe_b64encode(digest).decode()


def parse_digest(value: str) -> bytes | None:
    """The raw sha256 of a ``SHA-256=`` digest (either case of the prefix), or None if absent/garbled."""
    if not value.upper().startswith(DIGEST_PREFIX):
        return None
    text = value[len(DIGEST_PREFIX) :]
    try:
        # Some writers drop the padding; restore it before decoding.
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None


def store_full(stream: str, code: Any, description: str, what: str) -> StoreFull | None:
    """A refusal for lack of space (``what`` was refused with ``code``), as a StoreFull naming the
    bucket, the limit and what makes room; None when the error is not about storage."""
    limit = jsapi.storage_limit(code if isinstance(code, int) else None, description)
    if limit is None:
        return None
    bucket = stream.removeprefix(jsapi.object_stream(""))
    return StoreFull(
        f"no room in bucket {bucket} (stream {stream}): the server refused {what} "
        f"(err_code {code}, {description}); {limit} is reached. To make room, {storage_advice(limit)}; "
        f"trying again succeeds once there is room ({STORE_FULL_DOCS})"
    )


def _file_size(reader: BinaryIO) -> int:
    """The bytes left to read in ``reader`` when it is a regular file, else 0 (unknown)."""
    try:
        status = os.fstat(reader.fileno())
        return status.st_size - reader.tell() if stat.S_ISREG(status.st_mode) else 0
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


def completeness_problem(info: ObjectInfo, size: int, digest: Any) -> str | None:
    """Why the bytes received are not the object ``info`` describes (None: they are)."""
    if size != info.size:
        return f"got {size} bytes, info says {info.size}"
    if parse_digest(info.digest) != digest.digest():
        return f"digest mismatch: chunks hash to {digest_string(digest.digest())}, info says {info.digest or 'nothing'}"
    return None


def chunk_ack_problem(stream: str, status: str | None, data: bytes) -> str | StoreFull | None:
    """What is wrong with a chunk's pub-ack (``status``: its status code, if it has one): None
    (nothing), a StoreFull when the store has no room for it, else a description."""
    if status == jsapi.STATUS_NO_RESPONDERS:
        return f"no stream {stream} listens on the chunk subject (is the bucket provisioned?)"
    try:
        ack = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return f"unreadable pub-ack {status or ''} {data[:80]!r}"
    if not isinstance(ack, dict) or "error" in ack:
        err = ack.get("error", {}) if isinstance(ack, dict) else {}
        description, code = str(err.get("description", ack)), err.get("err_code", "?")
        return store_full(stream, code, description, "a chunk of the upload") or f"{description} (err_code {code})"
    if ack.get("stream") != stream or "seq" not in ack:
        return f"unexpected pub-ack {ack}"
    return None


def chunk_ack_error(stream: str, status: str | None, data: bytes) -> TrainfleetError | None:
    """:func:`chunk_ack_problem` as the error a put fails with."""
    problem = chunk_ack_problem(stream, status, data)
    if problem is None or isinstance(problem, TrainfleetError):
        return problem
    return ArtifactError(f"object store refused a chunk: {problem}")


def no_acks_error(stream: str, timeout_s: float, in_flight: int) -> BrokerError:
    # No answer at all: the server is not storing. A full disk under its store does this (the
    # stream then refuses every write until the server restarts), as does a server or cluster
    # in trouble: worth trying again later either way.
    return BrokerError(
        f"no pub-ack from {stream} for {timeout_s:g}s ({in_flight} chunks outstanding): "
        f"the server is not storing the chunks. A full disk under its JetStream store does this "
        f"(its log then says '{jsapi.NO_SPACE}'), as does an overloaded or leaderless server; "
        f"see {STORE_FULL_DOCS}"
    )


class _AckWindow:
    """Outstanding pub-acks of one put: at most ``limit``; the first negative ack fails the put."""

    def __init__(self, limit: int, stream: str, timeout_s: float):
        self.limit = max(1, limit)
        self.stream = stream
        self.timeout_s = timeout_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.error: TrainfleetError | None = None
        self._changed = asyncio.Event()

    def sent(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    async def on_ack(self, msg: Msg) -> None:
        """Subscription callback for the pub-acks of every chunk."""
        self.in_flight -= 1
        problem = self._problem(msg)
        if problem and self.error is None:
            self.error = (
                problem
                if isinstance(problem, TrainfleetError)
                else ArtifactError(f"object store refused a chunk: {problem}")
            )
        self._changed.set()

    def _problem(self, msg: Msg) -> str | StoreFull | None:
        return chunk_ack_problem(self.stream, jsapi.status_of(msg), msg.data)

    async def wait_below(self, count: int) -> None:
        """Wait until fewer than ``count`` chunks are unacked (0: all acked); raise the first failure."""
        while self.error is None and self.in_flight >= max(count, 1):
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), self.timeout_s)
            except TimeoutError:
                raise no_acks_error(self.stream, self.timeout_s, self.in_flight) from None
        if self.error is not None:
            raise self.error


class _DiskWriter:
    """Writes and hashes chunks in order on one worker thread, so the event loop only moves bytes.

    hashlib and file writes release the GIL, so on a multi-core host the digest and
    the disk overlap with parsing the next chunks. At most ``limit`` chunks wait
    for the thread: :meth:`write` blocks the caller beyond that (memory stays bounded).
    """

    def __init__(self, fh: BinaryIO, limit: int):
        self.fh = fh
        self.limit = max(1, limit)
        self.digest = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainfleet-objstore")
        self._queued: collections.deque[asyncio.Future[None]] = collections.deque()

    def _write(self, data: bytes) -> None:
        self.fh.write(data)
        self.digest.update(data)

    async def write(self, data: bytes) -> None:
        self._queued.append(asyncio.get_running_loop().run_in_executor(self._pool, self._write, data))
        while len(self._queued) > self.limit:
            await self._queued.popleft()

    async def drain(self) -> None:
        """Wait for every queued write; the first failure (disk full, say) is raised."""
        while self._queued:
            await self._queued.popleft()

    def close(self) -> None:
        """After a failure: drop queued writes (retrieving any error so none goes unreported)."""
        for fut in self._queued:
            if not fut.cancel() and not fut.cancelled():
                fut.exception()
        self._pool.shutdown(wait=True)


class _ChunkSink:
    """Receives one object's chunks in order and hands them to the writer; fails on any gap."""

    def __init__(self, info: ObjectInfo, writer: _DiskWriter, request_more: Any, window_chunks: int):
        self.info = info
        self.writer = writer
        self.request_more = request_more
        self.window = max(1, window_chunks)
        self.received = 0
        self.size = 0
        self.requested = 0
        self.max_in_flight = 0
        self.last_seen = time.monotonic()
        self.unanswered = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def digest(self) -> Any:
        return self.writer.digest

    async def top_up(self) -> None:
        """Keep up to ``window`` chunks requested ahead; ask in half-window batches."""
        in_flight = self.requested - self.received
        want = min(self.window - in_flight, self.info.chunks - self.requested)
        if want > 0 and (want >= self.window // 2 or self.requested + want == self.info.chunks):
            self.requested += want
            self.max_in_flight = max(self.max_in_flight, self.requested - self.received)
            await self.request_more(want)

    def fail(self, message: str) -> None:
        if not self.done.done():
            self.done.set_exception(ArtifactError(f"object {self.info.name!r}: {message}"))

    async def on_msg(self, msg: Msg) -> None:
        """Subscription callback for every delivery of the pull consumer."""
        if self.done.done():
            return
        self.last_seen = time.monotonic()
        status = jsapi.status_of(msg)
        if status == jsapi.STATUS_HEARTBEAT:
            return
        if status == jsapi.STATUS_NO_RESPONDERS:
            await self._ask_again()
            return
        if status is not None:
            # 404/408/409: the consumer has nothing more although chunks are missing.
            description = msg.headers.get("Description", "") if msg.headers else ""
            self.fail(
                f"chunk stream ended after {self.received} of {self.info.chunks} chunks "
                f"({status} {description}); the object is truncated or was replaced"
            )
            return
        try:
            seq, _pending = jsapi.reply_fields(msg.reply)
        except ValueError as exc:
            self.fail(str(exc))
            return
        if seq != self.received + 1:
            self.fail(f"chunk {self.received + 1} missing (got consumer sequence {seq})")
            return
        self.received += 1
        self.size += len(msg.data)
        if self.size > self.info.size:
            self.fail(f"chunks hold more than the recorded {self.info.size} bytes")
            return
        try:
            await self.writer.write(msg.data)
        except OSError as exc:
            self.fail(f"writing the download failed: {exc}")
            return
        if self.received == self.info.chunks:
            await self._finish()
        else:
            await self.top_up()

    async def _ask_again(self) -> None:
        """A pull request reached no consumer: ask again after a pause (directget's NO_RESPONDERS_TRIES)."""
        if self.unanswered >= NO_RESPONDERS_TRIES:
            self.fail(no_responders_error(self.received, self.info.chunks))
            return
        await asyncio.sleep(no_responders_pause(self.unanswered))
        self.unanswered += 1
        self.last_seen = time.monotonic()
        self.requested = self.received  # what was asked and never delivered is asked again
        await self.top_up()

    async def _finish(self) -> None:
        try:
            await self.writer.drain()
        except OSError as exc:
            self.fail(f"writing the download failed: {exc}")
            return
        if self.done.done():
            return
        problem = completeness_problem(self.info, self.size, self.digest)
        if problem:
            self.fail(problem)
        else:
            self.done.set_result(None)


class ObjectStoreClient:
    """Put and get files in one object-store bucket over an existing NATS connection."""

    def __init__(
        self,
        nc: Client,
        bucket: str,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        api_prefix: str = jsapi.API,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        direct_min_bytes: int | None = DIRECT_MIN_BYTES,
    ):
        self.nc = nc
        # Gets of objects this big or bigger use a connection of their own where the server
        # allows it (see directget); None: never.
        self.direct_min_bytes = direct_min_bytes
        self.bucket = bucket
        self.stream = jsapi.object_stream(bucket)
        self.chunk_bytes = chunk_bytes
        self.window_bytes = window_bytes
        self.api = api_prefix
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._nuid = NUID()

    # -- names ---------------------------------------------------------------
    def chunk_subject(self, nuid: str) -> str:
        return jsapi.object_chunks_prefix(self.bucket) + nuid

    def meta_subject(self, name: str) -> str:
        return jsapi.object_meta_prefix(self.bucket) + encode_name(name)

    def _window_chunks(self, chunk_bytes: int) -> int:
        return max(1, self.window_bytes // max(1, chunk_bytes))

    # -- JetStream API -------------------------------------------------------
    async def _request(
        self,
        subject: str,
        payload: bytes,
        *,
        what: str,
        unanswered: TrainfleetError,
        headers: dict[str, str] | None = None,
        timeout_error: type[TrainfleetError] = BrokerError,
    ) -> dict[str, Any]:
        """One request answered with a JSON object (an API response or a pub-ack); ``unanswered``
        is raised when nothing listens on ``subject``. Errors come back as the answer's ``error``."""
        try:
            msg = await self.nc.request(subject, payload, timeout=self.timeout_s, headers=headers)
        except nats.errors.NoRespondersError as exc:
            raise unanswered from exc
        except nats.errors.TimeoutError as exc:
            raise timeout_error(
                f"{what} timed out after {self.timeout_s:g}s (an overloaded or leaderless server, or one that "
                f"cannot write: a full disk under its JetStream store stops its answers; see {STORE_FULL_DOCS})"
            ) from exc
        try:
            resp = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            resp = None
        if not isinstance(resp, dict):
            return {"error": {"description": f"{what}: unreadable answer {msg.data[:80]!r}"}}
        return resp

    async def _api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JetStream API request (a subject from jsapi); API errors come back as ``error``."""
        payload = msgspec.json.encode(body) if body is not None else b""
        verb = subject[len(self.api) + 1 :]
        unanswered = BrokerError(f"JetStream is not enabled on this NATS server (no responder for {verb})")
        return await self._request(subject, payload, what=f"JetStream API {verb}", unanswered=unanswered)

    def _api_error(self, resp: dict[str, Any], what: str) -> TrainfleetError:
        code, description = jsapi.api_error(resp)
        if code == jsapi.ERR_STREAM_NOT_FOUND:
            return self._no_bucket()
        full = store_full(self.stream, code, description, what)
        if full is not None:
            return full
        return ArtifactError(f"{what}: {description} (err_code {code if code is not None else '?'})")

    def _no_bucket(self) -> ArtifactError:
        return ArtifactError(f"object store bucket {self.bucket!r} does not exist (provision it first)")

    async def _purge(self, subject: str) -> None:
        resp = await self._api(jsapi.stream_purge(self.stream, self.api), {"filter": subject})
        if "error" in resp:
            raise self._api_error(resp, f"purging {subject}")

    # -- info ----------------------------------------------------------------
    async def info(self, name: str, *, show_deleted: bool = False) -> ObjectInfo | None:
        """The object's info, or None when it does not exist (or is deleted, unless asked)."""
        info = await self._info_at(self.meta_subject(name), name)
        return None if info is None or (info.deleted and not show_deleted) else info

    async def _info_at(self, meta_subject: str, name: str) -> ObjectInfo | None:
        """The latest info record on ``meta_subject`` (deleted ones too), or None when there is none."""
        found = await self._info_msg(meta_subject, name)
        return found[0] if found is not None else None

    async def info_and_seq(self, name: str) -> tuple[ObjectInfo, int] | None:
        """The object's info (deleted ones too) and the stream sequence of its info message, which
        :meth:`touch` needs; None when there is no info."""
        return await self._info_msg(self.meta_subject(name), name)

    async def _info_msg(self, meta_subject: str, name: str) -> tuple[ObjectInfo, int] | None:
        resp = await self._api(jsapi.stream_msg_get(self.stream, self.api), {"last_by_subj": meta_subject})
        if "error" in resp:
            if resp["error"].get("err_code") == jsapi.ERR_NO_MESSAGE:
                return None
            raise self._api_error(resp, f"reading the info of {name!r}")
        message = resp.get("message") or {}
        try:
            info = msgspec.json.decode(base64.b64decode(message.get("data") or b""), type=ObjectInfo)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            raise ArtifactError(f"object {name!r}: unreadable info record: {exc}") from exc
        # ADR-20: the modification time is the info message's time.
        info.mtime = message.get("time") or info.mtime
        return info, int(message.get("seq") or 0)

    async def chunk_count(self, nuid: str) -> int:
        """How many chunks the stream holds under ``nuid`` (one stream info request)."""
        return sum((await self._subject_counts(self.chunk_subject(nuid))).values())

    async def touch(self, info: ObjectInfo, seq: int) -> bool:
        """Store ``info`` again, unchanged but for its mtime, only while the info message at ``seq``
        is still the object's latest: its chunks are reused and its mtime is now. False when the
        object changed or went meanwhile (a prune purges the info before the chunks, so a touch
        never brings back an object whose chunks are going)."""
        fresh = msgspec.structs.replace(info, mtime=_now_rfc3339())
        ack = await self._request(
            self.meta_subject(info.name),
            fresh.to_json(),
            what=f"the pub-ack for the info of {info.name!r}",
            unanswered=self._no_bucket(),
            headers={**jsapi.ROLLUP_SUBJECT, jsapi.EXPECTED_LAST_SUBJECT_SEQ: str(seq)},
            timeout_error=ArtifactError,
        )
        if "error" not in ack:
            return True
        if jsapi.api_error(ack)[0] == jsapi.ERR_WRONG_LAST_SEQUENCE:
            return False
        raise self._api_error(ack, f"storing the info of {info.name!r} again")

    async def list(self) -> list[ObjectInfo]:
        """Every object in the bucket that is not deleted, by name."""
        infos = []
        for meta_subject in await self._subject_counts(jsapi.object_meta_prefix(self.bucket) + ">"):
            info = await self._info_at(meta_subject, meta_subject)
            if info is not None and not info.deleted:
                infos.append(info)
        return sorted(infos, key=lambda i: i.name)

    async def chunks(self, info: ObjectInfo, *, limit: int | None = None) -> AsyncIterator[bytes]:
        """The object's first ``limit`` chunks (all by default) in order, one stream get each:
        for reading the start of an object; :meth:`get_file` is the fast path for all of it."""
        subject = self.chunk_subject(info.nuid)
        seq = 1
        for _ in range(info.chunks if limit is None else min(limit, info.chunks)):
            resp = await self._api(jsapi.stream_msg_get(self.stream, self.api), {"seq": seq, "next_by_subj": subject})
            if "error" in resp:
                if jsapi.api_error(resp)[0] == jsapi.ERR_NO_MESSAGE:
                    return
                raise self._api_error(resp, f"reading a chunk of {info.name!r}")
            message = resp.get("message") or {}
            yield base64.b64decode(message.get("data") or b"")
            seq = int(message.get("seq") or seq) + 1

    # -- put -----------------------------------------------------------------
    async def put_file(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        chunk_bytes: int | None = None,
        stats: TransferStats | None = None,
        purge_previous: bool = True,
    ) -> ObjectInfo:
        """Store the file at ``path`` as object ``name``, replacing any previous version."""
        with open(path, "rb") as fh:
            return await self.put_stream(name, fh, chunk_bytes=chunk_bytes, stats=stats, purge_previous=purge_previous)

    async def put_bytes(
        self, name: str, data: bytes, *, chunk_bytes: int | None = None, purge_previous: bool = True
    ) -> ObjectInfo:
        """Store ``data`` as object ``name`` (small objects and tests)."""
        return await self.put_stream(name, io.BytesIO(data), chunk_bytes=chunk_bytes, purge_previous=purge_previous)

    async def put_stream(
        self,
        name: str,
        reader: BinaryIO,
        *,
        chunk_bytes: int | None = None,
        stats: TransferStats | None = None,
        purge_previous: bool = True,
    ) -> ObjectInfo:
        """Store everything ``reader`` yields as object ``name``: chunks pipelined, then the info.

        A previous version's chunks are purged once ours are in, and ours when the put fails;
        ``purge_previous`` False leaves both to the stray-chunk sweep (for an identity that may
        not purge: an agent)."""
        chunk_bytes = chunk_bytes or self.chunk_bytes
        if chunk_bytes > self.nc.max_payload:
            raise ArtifactError(f"chunk size {chunk_bytes} exceeds the server's max_payload {self.nc.max_payload}")
        started = time.perf_counter()
        # The previous version (whose chunks go once ours are in) is looked up while chunks flow.
        previous = asyncio.create_task(self.info(name))
        nuid = self._nuid.next().decode()
        subject = self.chunk_subject(nuid)
        try:
            sent = await self._send(name, reader, subject, chunk_bytes)
            sent.timings["chunks, all acknowledged"] = time.perf_counter() - started
            size, chunks, digest = sent.size, sent.chunks, sent.digest
            old = await previous
            info = ObjectInfo(
                name=name,
                bucket=self.bucket,
                nuid=nuid,
                size=size,
                chunks=chunks,
                digest=digest_string(digest.digest()),
                mtime=_now_rfc3339(),
                options=ObjectOptions(max_chunk_size=chunk_bytes),
            )
            info_started = time.perf_counter()
            await self._publish_info(info)
            sent.timings["info published (fsynced)"] = time.perf_counter() - info_started
        except BaseException as exc:
            await asyncio.wait([previous])
            # Chunks nobody's info points at are garbage: drop them, whatever went wrong. An
            # identity that may not purge (an agent: purge_previous False) leaves them to the
            # controller's stray-chunk sweep: its purge request would be refused by the server
            # and only answered by the request's timeout.
            if purge_previous:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._purge(subject))
            lookup_error = None if previous.cancelled() else previous.exception()
            if lookup_error is not None and isinstance(exc, Exception):
                raise lookup_error from exc  # e.g. "bucket does not exist" says more than a refused chunk
            raise
        if purge_previous and old is not None and old.nuid and old.nuid != nuid:
            await self._purge(self.chunk_subject(old.nuid))
        if stats is not None:
            stats.bytes, stats.chunks, stats.max_in_flight = size, chunks, sent.max_in_flight
            stats.elapsed_s = time.perf_counter() - started
            stats.timings = sent.timings
        return info

    async def _send(self, name: str, reader: BinaryIO, subject: str, chunk_bytes: int) -> Pushed:
        """Publish ``reader``'s bytes as chunks on ``subject``: over a direct connection for a file
        of at least ``direct_min_bytes`` where the server allows one, else through this client."""
        endpoint = None
        if self.direct_min_bytes is not None and _file_size(reader) >= max(1, self.direct_min_bytes):
            endpoint = Endpoint.for_client(self.nc)
        if endpoint is not None:
            try:
                return await self._send_direct(name, reader, subject, chunk_bytes, endpoint)
            except DirectUnavailable as exc:
                log.info("direct upload of %r not possible (%s); using the client connection", name, exc)
        return await self._send_chunks(reader, subject, chunk_bytes)

    async def _send_direct(
        self, name: str, reader: BinaryIO, subject: str, chunk_bytes: int, endpoint: Endpoint
    ) -> Pushed:
        stream = self.stream
        plan = ChunkPush(
            subject=subject,
            name=name,
            chunk_bytes=chunk_bytes,
            window=self._window_chunks(chunk_bytes),
            ack_timeout_s=self.timeout_s,
            check_ack=lambda status, body: chunk_ack_error(stream, status.split(b" ", 1)[0].decode() or None, body),
        )
        cancelled = threading.Event()
        connections: list[Any] = []
        push = functools.partial(
            push_object, endpoint, plan, reader, cancelled=cancelled, on_connection=connections.append
        )
        thread = asyncio.get_running_loop().run_in_executor(None, push)
        try:
            return await asyncio.shield(thread)
        except AcksStopped as exc:
            raise no_acks_error(stream, self.timeout_s, exc.in_flight) from None
        except asyncio.CancelledError:
            cancelled.set()  # it stops sending, and waits (DRAIN_S) for the acks of what it sent
            await asyncio.wait([thread], timeout=DRAIN_S + 1)
            for conn in connections:
                conn.abort()  # (a send blocked on a server that reads nothing)
            await asyncio.wait([thread])  # never leave the thread reading a file we are about to close
            if not thread.cancelled():
                thread.exception()
            raise

    async def _send_chunks(self, reader: BinaryIO, subject: str, chunk_bytes: int) -> Pushed:
        """The chunks through this client's connection (nats-py publishes)."""
        window = _AckWindow(self._window_chunks(chunk_bytes), self.stream, self.timeout_s)
        digest = hashlib.sha256()

        def read_chunk() -> bytes:
            data = reader.read(chunk_bytes)
            digest.update(data)
            return data

        loop = asyncio.get_running_loop()
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(f"{inbox}.*", cb=window.on_ack)
        size = chunks = 0
        # Reading and hashing run on a worker thread, one chunk ahead of the publishes.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainfleet-objstore") as pool:
            try:
                ahead = loop.run_in_executor(pool, read_chunk)
                while data := await ahead:
                    ahead = loop.run_in_executor(pool, read_chunk)
                    await window.wait_below(window.limit)
                    window.sent()
                    await self.nc.publish(subject, data, reply=f"{inbox}.{chunks}")
                    size += len(data)
                    chunks += 1
                await window.wait_below(0)
            finally:
                await asyncio.wait([ahead])  # never leave the thread reading a file we are about to close
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        return Pushed(size, chunks, digest, window.max_in_flight)

    async def _publish_info(self, info: ObjectInfo) -> None:
        ack = await self._request(
            self.meta_subject(info.name),
            info.to_json(),
            what=f"the pub-ack for the info of {info.name!r}",
            unanswered=self._no_bucket(),
            headers=jsapi.ROLLUP_SUBJECT,
            timeout_error=ArtifactError,
        )
        if "error" in ack:
            raise self._api_error(ack, f"storing the info of {info.name!r}")

    # -- get -----------------------------------------------------------------
    async def get_file(
        self,
        name: str,
        dest: str | os.PathLike[str],
        *,
        expect_sha256_hex: str | None = None,
        stats: TransferStats | None = None,
        max_bytes: int | None = None,
        info: ObjectInfo | None = None,
    ) -> ObjectInfo:
        """Write object ``name`` to ``dest`` (atomically, via a temp file beside it).

        Size, chunk count and the object's digest are verified, and with
        ``expect_sha256_hex`` the content address too; an object whose info says it
        is bigger than ``max_bytes`` is refused before anything is written (and its
        chunks can never hold more than the info says). Any failure raises
        ArtifactError (ObjectNotFound when there is no such object) and leaves
        no file behind. ``info``: the object's info, when the caller has just read it
        (saves a round trip).
        """
        started = time.perf_counter()
        if info is None or info.name != name:
            info = await self.info(name)
        looked_up = time.perf_counter()
        if info is None:
            raise ObjectNotFound(f"object {name!r} is not in bucket {self.bucket!r}")
        if info.options is not None and info.options.link is not None:
            raise ArtifactError(f"object {name!r} is a link to {info.options.link.bucket}; links are not followed")
        if max_bytes is not None and info.size > max_bytes:
            raise ArtifactError(f"object {name!r} is {info.size} bytes: over the download limit of {max_bytes} bytes")
        dest = Path(dest)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.part-")
        try:
            with os.fdopen(fd, "wb") as fh:
                receiving = time.perf_counter()
                got = await self._receive(info, fh)
                received = time.perf_counter()
                fh.flush()
                os.fsync(fh.fileno())
                fsync_s = time.perf_counter() - received
                got.timings.update(info=looked_up - started, receive=received - receiving, fsync=fsync_s)
            if expect_sha256_hex is not None and got.digest.hexdigest() != expect_sha256_hex:
                raise ArtifactError(
                    f"object {name!r}: downloaded bytes hash to {got.digest.hexdigest()}, "
                    f"not {expect_sha256_hex} (corrupt or tampered)"
                )
            os.replace(tmp_name, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        if stats is not None:
            stats.bytes, stats.chunks, stats.max_in_flight = got.size, got.chunks, got.max_in_flight
            stats.elapsed_s = time.perf_counter() - started
            stats.timings = got.timings
        return info

    async def _receive(self, info: ObjectInfo, fh: BinaryIO) -> Pulled:
        """Pull every chunk of ``info`` through an ephemeral consumer into ``fh``: over a direct
        connection where the server allows one, else through a subscription on this client."""
        direct = self.direct_min_bytes is not None and info.chunks and info.size >= self.direct_min_bytes
        endpoint = Endpoint.for_client(self.nc) if direct else None
        if endpoint is not None:
            try:
                return await self._receive_direct(info, fh, endpoint)
            except DirectUnavailable as exc:
                log.info("direct download of %r not possible (%s); using the client connection", info.name, exc)
        return await self._receive_subscribed(info, fh)

    def _chunk_bytes(self, info: ObjectInfo) -> int:
        return (info.options.max_chunk_size if info.options else 0) or self.chunk_bytes

    async def _receive_direct(self, info: ObjectInfo, fh: BinaryIO, endpoint: Endpoint) -> Pulled:
        """Pull the chunks over a connection of the direct path's own (a worker thread), made
        while this client creates the chunks' consumer: the two set-ups overlap."""
        consumer = self._nuid.next().decode()
        cancelled, ready = threading.Event(), threading.Event()
        connections: list[Any] = []
        plan = ChunkPull(
            next_subject=jsapi.consumer_next(self.stream, consumer, self.api),
            name=info.name,
            expected_size=info.size,
            chunks=info.chunks,
            window=self._window_chunks(self._chunk_bytes(info)),
        )
        pull = functools.partial(
            pull_object,
            endpoint,
            plan,
            fh=fh,
            idle_timeout_s=self.idle_timeout_s,
            cancelled=cancelled,
            on_connection=connections.append,
            ready=ready,
        )
        started = time.perf_counter()
        thread = asyncio.get_running_loop().run_in_executor(None, pull)
        created = False
        try:
            await self._create_consumer(consumer, self.chunk_subject(info.nuid))
            created = True
            consumer_s = time.perf_counter() - started
            ready.set()
            got = await asyncio.shield(thread)
        except BaseException:
            # Cancelled, or no consumer: stop the thread (it may be connecting, waiting for the
            # consumer or pulling) and wait for it, so nothing writes to fh after we return.
            cancelled.set()
            for conn in connections:
                conn.abort()  # wakes the thread's blocking read
            await asyncio.wait([thread])
            if not thread.cancelled():
                thread.exception()  # retrieved: what stopped it is the error raised here
            raise
        finally:
            if created:
                await self._delete_consumer(consumer)
        got.timings["consumer (overlaps the connection)"] = consumer_s
        problem = completeness_problem(info, got.size, got.digest)
        if problem:
            raise ArtifactError(f"object {info.name!r}: {problem}")
        return got

    async def _delete_consumer(self, consumer: str) -> None:
        # Fire and forget (its inactive_threshold is the backstop): no round trip on the way out.
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(jsapi.consumer_delete(self.stream, consumer, self.api), reply=self.nc.new_inbox())

    async def _receive_subscribed(self, info: ObjectInfo, fh: BinaryIO) -> Pulled:
        chunk_bytes = self._chunk_bytes(info)
        inbox = self.nc.new_inbox()
        consumer = self._nuid.next().decode()
        next_subject = jsapi.consumer_next(self.stream, consumer, self.api)

        async def request_more(count: int) -> None:
            # no_wait: every chunk is stored before the info is, so an empty answer means truncation.
            await self.nc.publish(next_subject, msgspec.json.encode({"batch": count, "no_wait": True}), reply=inbox)

        window_chunks = self._window_chunks(chunk_bytes)
        # A few chunks queued for the writer thread keep it busy; more would only add memory.
        writer = _DiskWriter(fh, min(window_chunks, WRITE_QUEUE_CHUNKS))
        try:
            sink = _ChunkSink(info, writer, request_more, window_chunks)
            if info.chunks == 0:
                await sink._finish()
            else:
                await self._pull_all(sink, consumer, inbox, window_chunks * chunk_bytes)
            await sink.done
        finally:
            writer.close()
        return Pulled(sink.size, sink.received, sink.digest, sink.max_in_flight)

    async def _pull_all(self, sink: _ChunkSink, consumer: str, inbox: str, window_bytes: int) -> None:
        sub = await self.nc.subscribe(inbox, cb=sink.on_msg, pending_bytes_limit=max(64 << 20, 4 * window_bytes))
        try:
            await self._create_consumer(consumer, self.chunk_subject(sink.info.nuid))
            try:
                await sink.top_up()
                await self._await_sink(sink)
            finally:
                await self._delete_consumer(consumer)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _create_consumer(self, name: str, subject: str) -> None:
        config = {
            "name": name,
            "filter_subject": subject,
            "deliver_policy": "all",
            "ack_policy": "none",
            "replay_policy": "instant",
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": int(self.idle_timeout_s * 1e9),
        }
        body = {"stream_name": self.stream, "config": config, "action": "create"}
        resp = await self._api(jsapi.consumer_create(self.stream, name, self.api), body)
        if "error" in resp:
            raise self._api_error(resp, "creating a consumer for the chunks")

    async def _await_sink(self, sink: _ChunkSink) -> None:
        """Wait for the last chunk; give up when none has arrived for ``idle_timeout_s``."""
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(sink.done), 1.0)
                return
            except TimeoutError:
                if time.monotonic() - sink.last_seen > self.idle_timeout_s:
                    sink.fail(f"no chunk for {self.idle_timeout_s:g}s after {sink.received} of {sink.info.chunks}")

    # -- stray chunks --------------------------------------------------------
    async def _subject_counts(self, subjects_filter: str) -> dict[str, int]:
        """Messages per subject matching ``subjects_filter`` in the bucket's stream (all pages)."""
        counts: dict[str, int] = {}
        while True:
            body = {"subjects_filter": subjects_filter, "offset": len(counts)}
            resp = await self._api(jsapi.stream_info(self.stream, self.api), body)
            if "error" in resp:
                raise self._api_error(resp, "listing the bucket's subjects")
            page = (resp.get("state") or {}).get("subjects") or {}
            counts.update(page)
            if not page or len(counts) >= int(resp.get("total") or 0):
                return counts

    async def stray_chunks(self, older_than_s: float, now: datetime | None = None) -> dict[str, int]:
        """Chunk sets no live object's info points at, whose newest chunk is older than
        ``older_than_s`` (a put still under way has fresh chunks and no info yet): nuid → chunks.

        They are what a put cut off mid-way (its process killed before it could purge) or a
        replacement that died before purging the old version leaves behind."""
        now = now or datetime.now(UTC)
        prefix = jsapi.object_chunks_prefix(self.bucket)
        chunk_sets = {subject[len(prefix) :]: n for subject, n in (await self._subject_counts(prefix + ">")).items()}
        if not chunk_sets:
            return {}
        live: set[str] = set()
        for meta_subject in await self._subject_counts(jsapi.object_meta_prefix(self.bucket) + ">"):
            try:
                info = await self._info_at(meta_subject, meta_subject)
            except ArtifactError:
                continue  # an unreadable info protects nothing
            if info is not None and not info.deleted:
                live.add(info.nuid)
        stray: dict[str, int] = {}
        for nuid, count in chunk_sets.items():
            if nuid in live:
                continue
            resp = await self._api(jsapi.stream_msg_get(self.stream, self.api), {"last_by_subj": prefix + nuid})
            newest = _parse_rfc3339((resp.get("message") or {}).get("time") or "")
            if newest is not None and (now - newest).total_seconds() >= older_than_s:
                stray[nuid] = count
        return stray

    async def sweep_stray_chunks(self, older_than_s: float) -> dict[str, int]:
        """Purge every stray chunk set (see :meth:`stray_chunks`); returns what was purged."""
        stray = await self.stray_chunks(older_than_s)
        for nuid in stray:
            await self._purge(self.chunk_subject(nuid))
        return stray

    # -- delete --------------------------------------------------------------
    async def delete(self, name: str) -> None:
        """Mark ``name`` deleted (an info with ``deleted: true``) and purge its chunks."""
        info = await self.info(name)
        if info is None:
            raise ObjectNotFound(f"object {name!r} is not in bucket {self.bucket!r}")
        tomb = ObjectInfo(name=name, bucket=self.bucket, nuid=info.nuid, deleted=True, mtime=_now_rfc3339())
        await self._publish_info(tomb)
        await self._purge(self.chunk_subject(info.nuid))
