"""Object-store gets over a dedicated blocking connection, off the event loop.

nats-py reads the socket 32 KiB per event-loop turn and copies every payload
several times on its way to a subscription callback; for a large object that,
not the server, sets the pace (measured: 0.3-0.7x of what nats-server can send
on loopback). A get instead opens one plain connection of its own to the server
the client is connected to, and a worker thread asks the chunk consumer for
batches (``no_wait``, at most ``window`` chunks ahead) and reads each payload
straight from the socket into one of a few reused buffers, checking order and
size as it goes. Two more threads take each buffer in turn: one hashes it, one
writes it to the file (hashlib and file writes release the GIL), so the SHA-256
no longer sits between two socket reads; a buffer is read into again once both
are done with it, so memory is a few chunks whatever the object's size. The
event loop only waits for the threads.

Only what this path can do safely is attempted: plain ``nats://`` servers,
logging in as the client did (user/password or token, from the URL or the
client's settings; an nkey seed or creds file, signing the server's nonce) when
:meth:`Endpoint.for_client` is asked. A client on TLS gets no endpoint (this
path never downgrades it); when the server wants TLS or refuses the connection,
:class:`DirectUnavailable` is raised before any byte is written and the caller
falls back to the subscription path. No message carries a password or token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO
from urllib.parse import ParseResult

from trainfleet.broker import jsapi
from trainfleet.broker.errors import ArtifactError, DirectUnavailable
from trainfleet.broker.security import ClientSecurity, parse_creds, security_of

DEFAULT_PORT = 4222
DEFAULT_INBOX_PREFIX = "_INBOX"
# Our one subscription's sid: not a number, so a subclass's own SUB 1, 2... never collides.
SID = "tfdirect"
SETUP_TIMEOUT_S = 5.0
# Protocol lines are read through this much buffer; a payload goes straight from the socket into
# its chunk buffer, so only what one recv brought in beyond a line is copied.
LINE_BUFFER_BYTES = 32 * 1024
# Chunk buffers one get cycles through: the reader fills one while the hasher and the writer
# work on others (each is max_payload bytes).
CHUNK_BUFFERS = 4
# The file is written out (fdatasync) each time this much more was written, while the download
# goes on: the fsync after the last chunk then waits for the tail only. 0: only that fsync.
SYNC_EVERY_BYTES = 16 << 20
# "parallel": hashing and writing each on its own thread (the digest and the disk overlap);
# "serial": one thread does both, which measured as fast where there is no core to spare for
# the third thread (2 cores, nats-server using one of them).
STAGE_MODE = "parallel" if (os.cpu_count() or 1) >= 4 else "serial"
STATUS_HEARTBEAT = jsapi.STATUS_HEARTBEAT.encode()
STATUS_NO_RESPONDERS = jsapi.STATUS_NO_RESPONDERS.encode()


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom the direct connection logs in; secrets stay out of ``repr``."""

    host: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey: str | None = None  # an nkey seed file: we sign the server's nonce with it
    creds: str | None = None  # a creds file: its user JWT, and the nonce signed with its seed
    # Chunks arrive under the client's inbox prefix: a role may subscribe only below its own.
    inbox_prefix: str = DEFAULT_INBOX_PREFIX

    @classmethod
    def of(cls, url: ParseResult | None, security: ClientSecurity | None = None) -> Endpoint | None:
        """The plain-TCP endpoint of the client's current server, or None when it is not one.
        Credentials come from ``security`` (how the client connected), else from the URL."""
        if url is None or url.scheme not in ("nats", "") or not url.hostname:
            return None
        if security is not None and security.wants_tls:
            return None  # this path speaks plain TCP only; never downgrade a TLS client
        user, password, token = url.username, url.password, None
        if user is not None and password is None:
            user, token = None, user  # nats://TOKEN@host
        endpoint = cls(url.hostname, url.port or DEFAULT_PORT, user, password, token)
        if security is None:
            return endpoint
        # Which credential wins mirrors nats-py: creds, then nkey, then user/password, then token.
        return replace(
            endpoint,
            creds=security.creds,
            nkey=None if security.creds else security.nkey,
            user=security.user if security.user is not None else endpoint.user,
            password=security.password if security.user is not None else endpoint.password,
            token=security.token if security.token is not None else endpoint.token,
            inbox_prefix=security.inbox_prefix or DEFAULT_INBOX_PREFIX,
        )

    @classmethod
    def for_client(cls, client: Any) -> Endpoint | None:
        """The endpoint of ``client``'s current server, logging in as ``client`` did; None when
        this path cannot (TLS)."""
        security = security_of(client)
        if security is None and client.options.get("tls") is not None:
            return None  # a TLS client connect_nats did not open (nothing else is known of it but its URL)
        return cls.of(client.connected_url, security)

    def connect_options(self, nonce: str | None = None, name: str = "trainfleet-artifact-get") -> dict[str, Any]:
        """The CONNECT fields, with the server's ``nonce`` signed when we log in with an nkey."""
        opts: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "protocol": 1,
            "lang": "python",
            "version": "trainfleet-direct",
            "name": name,
        }
        if (self.creds or self.nkey) and nonce:
            opts.update(self._signed(nonce))
        elif self.user is not None and self.password is not None:
            opts.update(user=self.user, **{"pass": self.password})
        if self.token is not None:
            opts["auth_token"] = self.token
        return opts

    def _signed(self, nonce: str) -> dict[str, str]:
        import nkeys

        path = self.creds or self.nkey
        assert path is not None
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            jwt, seed = parse_creds(data) if self.creds else (None, data.strip())
            keys = nkeys.from_seed(bytearray(seed))
            signed = {"sig": base64.b64encode(keys.sign(nonce.encode())).decode()}
            signed.update({"jwt": jwt} if jwt else {"nkey": keys.public_key.decode()})
            keys.wipe()
        except Exception as exc:  # OSError, ValueError, and nkeys's own error types
            raise DirectUnavailable(f"cannot sign the server nonce with {path}: {type(exc).__name__}") from None
        return signed


@dataclass
class Pulled:
    size: int
    chunks: int
    digest: Any  # hashlib sha256 object
    max_in_flight: int
    # Seconds each thread spent per step (see _Puller.timings): where a get's time goes.
    timings: dict[str, float] = field(default_factory=dict)


class SocketReader:
    """Buffered reads of a blocking socket: whole protocol lines, and payloads read straight into
    the caller's buffer (only what the last line's recv brought in beyond the line is copied)."""

    def __init__(self, sock: socket.socket, line_buffer_bytes: int = LINE_BUFFER_BYTES):
        self.sock = sock
        self.buf = bytearray(line_buffer_bytes)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    def _fill(self) -> int:
        """Receive more after what is buffered (compacting first when the buffer's end is reached)."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            kept = self.end - self.start
            self.buf[:kept] = self.buf[self.start : self.end]
            self.start, self.end = 0, kept
        got = self.sock.recv_into(self.view[self.end :])
        self.end += got
        return got

    def readline(self) -> bytes:
        """The next line, ending in ``\\n``; what is left (b"" at the end) when the connection ends
        before one. ValueError for a line longer than the buffer."""
        while True:
            eol = self.buf.find(b"\n", self.start, self.end)
            if eol >= 0:
                line = bytes(self.view[self.start : eol + 1])
                self.start = eol + 1
                return line
            if self.end - self.start == len(self.buf):
                raise ValueError(f"a protocol line longer than {len(self.buf)} bytes")
            if not self._fill():
                line = bytes(self.view[self.start : self.end])
                self.start = self.end
                return line

    def readinto(self, into: memoryview) -> int:
        """Fill ``into``; fewer bytes only when the connection ends first."""
        want = len(into)
        buffered = min(want, self.end - self.start)
        into[:buffered] = self.view[self.start : self.start + buffered]
        self.start += buffered
        got = buffered
        while got < want:
            n = self.sock.recv_into(into[got:])
            if not n:
                break
            got += n
        return got

    def read(self, size: int) -> bytes:
        out = bytearray(size)
        return bytes(out[: self.readinto(memoryview(out))])

    def close(self) -> None:
        self.start = self.end = 0  # (the socket is its owner's to close)


class DirectConnection:
    """One blocking NATS connection: handshake, then line-by-line reads of what the server sends."""

    def __init__(self, endpoint: Endpoint, idle_timeout_s: float, *, purpose: str = "get"):
        # What the connection is for: its name on the server, and whether its replies come on
        # the inbox itself (a get's chunks) or on inbox.<n> (a put's pub-ack per chunk).
        self.purpose = purpose
        try:
            self.sock = socket.create_connection((endpoint.host, endpoint.port), timeout=SETUP_TIMEOUT_S)
        except OSError as exc:
            raise DirectUnavailable(f"cannot reach {endpoint.host}:{endpoint.port}: {exc}") from exc
        # Small requests go out at once (Nagle plus delayed acks would add ~40 ms to each).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = SocketReader(self.sock)
        self.send_lock = threading.Lock()
        self.inbox = f"{endpoint.inbox_prefix}.tfdirect.{secrets.token_hex(8)}"
        try:
            self._handshake(endpoint)
        except BaseException:
            self.close()
            raise
        self.sock.settimeout(idle_timeout_s)

    def _handshake(self, endpoint: Endpoint) -> None:
        try:
            line = self.reader.readline()
            if not line.startswith(b"INFO "):
                raise DirectUnavailable(f"unexpected greeting {line[:60]!r}")
            info = json.loads(line[5:])
            if info.get("tls_required"):
                raise DirectUnavailable("the server wants TLS")
            self.max_payload = int(info.get("max_payload") or 1 << 20)
            options = endpoint.connect_options(info.get("nonce"), name=f"trainfleet-artifact-{self.purpose}")
            replies = f"{self.inbox}.*" if self.purpose == "put" else self.inbox
            # Subscribing in the handshake: a login or a subscription the server refuses (-ERR
            # before the PONG) is known before any byte is written, and the caller falls back.
            self.send(
                b"CONNECT " + json.dumps(options).encode() + b"\r\n",
                f"SUB {replies} {SID}\r\nPING\r\n".encode(),
            )
            line = self.reader.readline()
        except (OSError, ValueError) as exc:
            raise DirectUnavailable(f"handshake failed: {exc}") from exc
        if not line.startswith(b"PONG"):
            raise DirectUnavailable(f"server refused the connection: {line.decode(errors='replace').strip()}")

    def send(self, *parts: bytes | memoryview) -> None:
        """Send ``parts`` in order; whole, whatever other thread sends on this connection too."""
        with self.send_lock:
            for part in parts:
                self.sock.sendall(part)

    def send_gathered(self, *parts: bytes | memoryview) -> None:
        """Send ``parts`` in order with as few system calls as the socket allows (``sendmsg``
        gathers them: a chunk is never copied into one message first)."""
        if not hasattr(self.sock, "sendmsg"):  # (Windows)
            self.send(*parts)
            return
        views = [memoryview(part) for part in parts]
        with self.send_lock:
            while views:
                sent = self.sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views.pop(0))
                if sent:
                    views[0] = views[0][sent:]

    def abort(self) -> None:
        """From another thread: end the connection, waking a read blocked on it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.abort()
        self.reader.close()
        self.sock.close()


@dataclass(frozen=True)
class ChunkPull:
    """What to pull: the ``chunks`` chunks of object ``name`` through the consumer behind
    ``next_subject``, at most ``window`` requested ahead."""

    next_subject: str
    name: str
    expected_size: int
    chunks: int
    window: int


# How often a pull waiting for its consumer (``ready``) looks at ``cancelled``.
READY_POLL_S = 0.05


def pull_object(
    endpoint: Endpoint,
    pull: ChunkPull,
    fh: BinaryIO,
    *,
    idle_timeout_s: float,
    cancelled: threading.Event,
    on_connection: Any = None,
    ready: threading.Event | None = None,
) -> Pulled:
    """Pull every chunk of ``pull`` into ``fh``, hashing them.

    Connects first, then (when given ``ready``) waits for it to be set (the caller makes the
    consumer meanwhile, so the connection's set-up and the consumer's overlap) before asking
    for chunks. Raises DirectUnavailable before anything is written when the connection cannot
    be made, ArtifactError for a missing, out-of-order or oversized chunk, a silent server or a
    failed write. ``on_connection(conn)`` is called once connected, so a canceller can close it.
    """
    conn = DirectConnection(endpoint, idle_timeout_s)
    if on_connection is not None:
        on_connection(conn)
    name = pull.name
    try:
        while ready is not None and not ready.wait(READY_POLL_S):
            if cancelled.is_set():
                raise ArtifactError(f"object {name!r}: download cancelled")
        return _Puller(conn, pull, fh, cancelled).run()
    except TimeoutError:
        raise ArtifactError(f"object {name!r}: no chunk for {idle_timeout_s:g}s") from None
    except (OSError, ValueError) as exc:
        if cancelled.is_set():
            raise ArtifactError(f"object {name!r}: download cancelled") from exc
        raise ArtifactError(f"object {name!r}: connection failed mid-download: {exc}") from exc
    finally:
        conn.close()


# A pull request can reach no consumer (503) just after the consumer was made: in a cluster
# its leader's interest takes a moment to reach the server this client talks to, more so
# right after a node restart. Nothing was delivered for it, so it is asked again, this many
# times, after these pauses (about 10 s in all), before the download fails.
NO_RESPONDERS_TRIES = 20


def no_responders_pause(tries: int) -> float:
    return min(1.0, 0.05 * 2**tries)


def no_responders_error(received: int, chunks: int) -> str:
    return (
        f"the chunks' consumer did not answer {NO_RESPONDERS_TRIES} pull requests (503 no responders) after "
        f"{received} of {chunks} chunks: a JetStream election may be under way; try again"
    )


class _Buffers:
    """CHUNK_BUFFERS reused chunk buffers shared by a transfer's threads: ``free`` hands out the
    index of one nobody holds; whoever fills it sets ``holders[index]`` to how many threads will
    read it, and each calls :meth:`release` when done (the last one frees it)."""

    def __init__(self, size: int):
        self.buffers = [memoryview(bytearray(size)) for _ in range(CHUNK_BUFFERS)]
        self.free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        for index in range(CHUNK_BUFFERS):
            self.free.put(index)
        self.holders = [0] * CHUNK_BUFFERS
        self._lock = threading.Lock()

    def release(self, index: int) -> None:
        with self._lock:
            self.holders[index] -= 1
            free = self.holders[index] == 0
        if free:
            self.free.put(index)


class _Stage(threading.Thread):
    """One step every chunk goes through in order (hashing, or writing), on its own thread.

    Chunks come as (buffer index, length); each is handed back through ``release`` once done,
    also after a failure (the stage then only drains, so the reader never waits on it forever).
    """

    def __init__(
        self, name: str, work: Any, buffers: list[memoryview], release: Any, stop: threading.Event, *, of: str = "get"
    ):
        super().__init__(name=f"trainfleet-{of}-{name}", daemon=True)
        self.step = name
        self.work = work
        self.buffers = buffers
        self.release = release
        self.stop = stop
        self.inbox: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.busy_s = 0.0

    def run(self) -> None:
        while (item := self.inbox.get()) is not None:
            index, length = item
            try:
                if self.error is None and not self.stop.is_set():
                    started = time.perf_counter()
                    self.work(self.buffers[index][:length])
                    self.busy_s += time.perf_counter() - started
            except BaseException as exc:  # a full disk, say: reported by the reader
                self.error = exc
                self.stop.set()
            finally:
                self.release(index)


_fdatasync = getattr(os, "fdatasync", os.fsync)  # (macOS and Windows have no fdatasync)


class WriteBack(threading.Thread):
    """Has the kernel write a file out while it is still being written: ``fdatasync`` of what
    is there so far, on this thread, each time ``every_bytes`` more were written (:meth:`wrote`),
    so the fsync after the last byte has only the tail left to wait for (a 1 GiB download spent
    ~0.3 s in that fsync with nothing else to do). Errors are left to that final fsync."""

    def __init__(self, fd: int, every_bytes: int):
        super().__init__(name="trainfleet-writeback", daemon=True)
        self.fd = fd
        self.every_bytes = every_bytes
        self.unsynced = 0
        self.wanted = threading.Event()
        self.done = False
        self.busy_s = 0.0

    @classmethod
    def of(cls, fh: Any, every_bytes: int = 0) -> WriteBack | None:
        """A started WriteBack for ``fh``'s descriptor; None when ``every_bytes`` is 0 or ``fh``
        has no descriptor (nothing to write out early)."""
        every_bytes = every_bytes or SYNC_EVERY_BYTES
        try:
            writeback = cls(fh.fileno(), every_bytes) if every_bytes > 0 else None
        except (AttributeError, OSError, ValueError):
            return None
        if writeback is not None:
            writeback.start()
        return writeback

    def wrote(self, size: int) -> None:
        """The writer wrote ``size`` more bytes (called from the one writing thread)."""
        self.unsynced += size
        if self.unsynced >= self.every_bytes:
            self.unsynced = 0
            self.wanted.set()

    def run(self) -> None:
        while True:
            self.wanted.wait()
            if self.done:
                return
            self.wanted.clear()
            started = time.perf_counter()
            try:
                _fdatasync(self.fd)
            except OSError:
                return
            self.busy_s += time.perf_counter() - started

    def finish(self) -> None:
        """Stop (after the fdatasync under way, if any); the caller's fsync does the rest."""
        self.done = True
        self.wanted.set()
        self.join()


class _Puller:
    def __init__(self, conn: DirectConnection, pull: ChunkPull, fh: BinaryIO, cancelled: threading.Event):
        self.conn = conn
        self.next_subject = pull.next_subject.encode()
        self.name = pull.name
        self.expected_size = pull.expected_size
        self.chunks = pull.chunks
        self.window = max(1, pull.window)
        self.cancelled = cancelled
        self.digest = hashlib.sha256()
        self.received = self.requested = self.size = self.max_in_flight = 0
        self.unanswered = 0
        # The chunk buffers, and which are free: each goes to both stages, free again when both are done.
        pool = _Buffers(conn.max_payload + 2)
        self.buffers, self.free, self.holders, self._release = pool.buffers, pool.free, pool.holders, pool.release
        self.stop = threading.Event()
        self.fh = fh
        self.syncer: WriteBack | None = None
        if STAGE_MODE == "parallel":
            self.stages = [
                _Stage("hash", self.digest.update, self.buffers, self._release, self.stop),
                _Stage("write", self._write, self.buffers, self._release, self.stop),
            ]
        else:
            self.stages = [_Stage("hash+write", self._hash_write, self.buffers, self._release, self.stop)]
        self.socket_s = self.buffer_wait_s = 0.0

    def _hash_write(self, data: memoryview) -> None:
        self.digest.update(data)
        self._write(data)

    def _write(self, data: memoryview) -> None:
        self.fh.write(data)
        if self.syncer is not None:
            self.syncer.wrote(len(data))

    def fail(self, message: str) -> ArtifactError:
        return ArtifactError(f"object {self.name!r}: {message}")

    def ask(self) -> None:
        """Keep up to ``window`` chunks requested ahead, in half-window batches."""
        in_flight = self.requested - self.received
        want = min(self.window - in_flight, self.chunks - self.requested)
        if want > 0 and (want >= self.window // 2 or self.requested + want == self.chunks):
            body = b'{"batch":%d,"no_wait":true}' % want
            self.conn.send(b"PUB %s %s %d\r\n%s\r\n" % (self.next_subject, self.conn.inbox.encode(), len(body), body))
            self.requested += want
            self.max_in_flight = max(self.max_in_flight, self.requested - self.received)

    def run(self) -> Pulled:
        for stage in self.stages:
            stage.start()
        self.syncer = WriteBack.of(self.fh)
        read_all = False
        try:
            self._read_all()
            read_all = True
        finally:
            if not read_all:
                self.stop.set()  # failed or cancelled: the stages only drain what is queued
            for stage in self.stages:
                stage.inbox.put(None)
            for stage in self.stages:
                stage.join()
            if self.syncer is not None:
                self.syncer.finish()
        self._check_stages()
        timings = {
            "socket": self.socket_s,
            "waiting for a free buffer": self.buffer_wait_s,
            **{stage.step: stage.busy_s for stage in self.stages},
            "early writeback (fdatasync, overlaps)": self.syncer.busy_s if self.syncer else 0.0,
        }
        return Pulled(self.size, self.received, self.digest, self.max_in_flight, timings)

    def _check_stages(self) -> None:
        for stage in self.stages:
            if stage.error is not None:
                raise self.fail(f"{stage.step} failed: {stage.error}") from stage.error

    def _read_all(self) -> None:
        self.ask()
        clock = time.perf_counter
        while self.received < self.chunks:
            if self.cancelled.is_set():
                raise self.fail("download cancelled")
            if self.stop.is_set():
                self._check_stages()
            started = clock()
            index = self.free.get()
            got_buffer = clock()
            length = self.next_chunk(index)
            self.buffer_wait_s += got_buffer - started
            self.socket_s += clock() - got_buffer
            self.received += 1
            self.size += length
            if self.size > self.expected_size:
                self.free.put(index)
                raise self.fail(f"chunks hold more than the recorded {self.expected_size} bytes")
            self.holders[index] = len(self.stages)  # (no stage holds a free buffer: no lock needed)
            for stage in self.stages:
                stage.inbox.put((index, length))
            self.ask()

    def next_chunk(self, index: int) -> int:
        """Read the next chunk's payload into buffer ``index`` (its length is returned, the payload
        starts the buffer); statuses and pings are handled here."""
        reader = self.conn.reader
        while True:
            line = reader.readline()
            if not line:
                if self.cancelled.is_set():  # the canceller closed the connection under us
                    raise self.fail("download cancelled")
                raise self.fail(f"server closed the connection after {self.received} of {self.chunks} chunks")
            op = line[:4]
            if op == b"MSG ":
                fields = line.split()
                if len(fields) != 5:
                    raise self.fail(f"unexpected delivery {line[:120]!r}")
                self._check_sequence(fields[3])
                return self._read_payload(index, int(fields[4]), 0)
            if op == b"HMSG":
                fields = line.split()
                header_size, total = int(fields[-2]), int(fields[-1])
                if len(fields) == 6:  # a chunk that carries headers
                    self._check_sequence(fields[3])
                    return self._read_payload(index, total, header_size)
                length = self._read_payload(index, total, 0)
                status = self._status(bytes(self.buffers[index][: min(header_size, length)]))
                if status.startswith(STATUS_HEARTBEAT):
                    continue
                if status.startswith(STATUS_NO_RESPONDERS):
                    self._ask_again()
                    continue
                raise self.fail(
                    f"chunk stream ended after {self.received} of {self.chunks} chunks "
                    f"({status.decode(errors='replace')}); the object is truncated or was replaced"
                )
            if op == b"PING":
                self.conn.send(b"PONG\r\n")
            elif op == b"-ERR":
                raise self.fail(f"server error: {line.decode(errors='replace').strip()}")
            # INFO updates, +OK and PONG need nothing.

    def _ask_again(self) -> None:
        """A pull request reached no consumer: ask again after a pause (see NO_RESPONDERS_TRIES)."""
        if self.unanswered >= NO_RESPONDERS_TRIES:
            raise self.fail(no_responders_error(self.received, self.chunks))
        if self.cancelled.wait(no_responders_pause(self.unanswered)):
            raise self.fail("download cancelled")
        self.unanswered += 1
        self.requested = self.received  # what was asked and never delivered is asked again
        self.ask()

    def _read_payload(self, index: int, total: int, skip: int) -> int:
        """Read a ``total``-byte payload (and its CRLF) into buffer ``index``, dropping its first
        ``skip`` bytes (headers); returns the length kept."""
        buffer = self.buffers[index]
        if total + 2 > len(buffer) or skip > total:
            raise self.fail(f"a {total}-byte message exceeds the server's max_payload")
        if self.conn.reader.readinto(buffer[: total + 2]) != total + 2:
            raise self.fail("connection closed inside a chunk")
        if skip:
            buffer[: total - skip] = buffer[skip:total]
        return total - skip

    def _check_sequence(self, reply: bytes) -> None:
        seq, _pending = jsapi.reply_fields(reply.decode())
        if seq != self.received + 1:
            raise self.fail(f"chunk {self.received + 1} missing (got consumer sequence {seq})")

    @staticmethod
    def _status(header: bytes) -> bytes:
        parts = header.split(b"\r\n", 1)[0].split()
        return b" ".join(parts[1:]) if len(parts) > 1 else b"?"


# -- puts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkPush:
    """What to publish: a file's bytes as ``chunk_bytes`` chunks on ``subject``, at most
    ``window`` unacknowledged; ``check_ack(status, body)`` says what is wrong with a chunk's
    pub-ack (an exception to fail the put with) or None; ``ack_timeout_s``: how long the acks
    may stay away while chunks are unacknowledged."""

    subject: str
    name: str
    chunk_bytes: int
    window: int
    ack_timeout_s: float
    check_ack: Callable[[bytes, bytes], BaseException | None]


@dataclass
class Pushed:
    size: int
    chunks: int
    digest: Any  # hashlib sha256 object
    max_in_flight: int
    timings: dict[str, float] = field(default_factory=dict)


# How long a failed or cancelled put waits for the pub-acks of the chunks it had sent.
DRAIN_S = 2.0


class AcksStopped(Exception):
    """No pub-ack came for ``ChunkPush.ack_timeout_s`` while ``in_flight`` chunks waited for one."""

    def __init__(self, in_flight: int):
        super().__init__(f"no pub-ack for {in_flight} chunks")
        self.in_flight = in_flight


def push_object(
    endpoint: Endpoint,
    push: ChunkPush,
    reader: BinaryIO,
    *,
    cancelled: threading.Event,
    on_connection: Any = None,
) -> Pushed:
    """Publish everything ``reader`` yields as the chunks ``push`` describes, hashing them.

    Three threads: this one sends (the header, the chunk and its CRLF in one ``sendmsg``, no
    copy), one reads the file and hashes it into a few reused buffers ahead of the sends, one
    reads the pub-acks. Raises DirectUnavailable before anything is read when the connection
    cannot be made; what ``check_ack`` returns for the first bad pub-ack; AcksStopped; an
    ArtifactError when the connection fails or the put is cancelled; OSError reading the file.
    """
    conn = DirectConnection(endpoint, push.ack_timeout_s, purpose="put")
    if on_connection is not None:
        on_connection(conn)
    pusher = _Pusher(conn, push, reader, cancelled)
    try:
        return pusher.run()
    except _FileReadError as exc:
        assert isinstance(exc.__cause__, OSError)
        raise exc.__cause__ from None  # the file's own error, as a read on the event loop would raise it
    except TimeoutError:
        raise AcksStopped(pusher.in_flight) from None  # a send blocked that long: the server takes nothing
    except (OSError, ValueError) as exc:
        if cancelled.is_set():
            raise ArtifactError(f"object {push.name!r}: upload cancelled") from exc
        raise ArtifactError(f"object {push.name!r}: connection failed mid-upload: {exc}") from exc
    finally:
        conn.close()


class _FileReadError(Exception):
    """The file could not be read (the OSError is its cause): not the connection's fault."""


class _Pusher:
    def __init__(self, conn: DirectConnection, push: ChunkPush, reader: BinaryIO, cancelled: threading.Event):
        self.conn = conn
        self.push = push
        self.reader = reader
        self.cancelled = cancelled
        self.subject = push.subject.encode()
        self.inbox = conn.inbox.encode()
        self.window = max(1, push.window)
        self.digest = hashlib.sha256()
        pool = _Buffers(push.chunk_bytes)
        self.buffers, self.free, self.holders, self._release = pool.buffers, pool.free, pool.holders, pool.release
        # (index, length) per chunk read, None at the end of the file, or what the read raised.
        self.ready: queue.SimpleQueue[tuple[int, int] | BaseException | None] = queue.SimpleQueue()
        self.acks = threading.Condition()
        self.in_flight = self.max_in_flight = 0
        self.failure: BaseException | None = None  # the first bad ack, or the ack reader's failure
        self.closing = False
        self.read_s = self.send_s = self.window_wait_s = self.chunk_wait_s = 0.0
        # A chunk is hashed while it is sent (both only read its buffer): the buffer is free
        # again once both are done with it (its holders: 2).
        self.stop = threading.Event()
        self.hasher = _Stage("hash", self.digest.update, self.buffers, self._release, self.stop, of="put")

    def run(self) -> Pushed:
        file_reader = threading.Thread(target=self._read_file, name="trainfleet-put-read", daemon=True)
        ack_reader = threading.Thread(target=self._read_acks, name="trainfleet-put-acks", daemon=True)
        file_reader.start()
        ack_reader.start()
        self.hasher.start()
        try:
            size, chunks = self._send_all()
        except BaseException:
            self.stop.set()  # the hasher only drains
            self._drain_acks()
            raise
        finally:
            self.free.put(None)  # the file reader stops at its next buffer (or has already)
            with self.acks:
                self.closing = True
            self.conn.abort()  # wakes the ack reader
            file_reader.join()
            ack_reader.join()
            self.hasher.inbox.put(None)
            self.hasher.join()
        if self.hasher.error is not None:
            raise ArtifactError(f"object {self.push.name!r}: hashing failed: {self.hasher.error}")
        timings = {
            "read file": self.read_s,
            "hash (overlaps the sends)": self.hasher.busy_s,
            "waiting for the file reader": self.chunk_wait_s,
            "send (sendmsg)": self.send_s,
            "waiting for pub-acks (window full, and the last ones)": self.window_wait_s,
        }
        return Pushed(size, chunks, self.digest, self.max_in_flight, timings)

    def _send_all(self) -> tuple[int, int]:
        size = chunks = 0
        clock = time.perf_counter
        while True:
            started = clock()
            item = self.ready.get()
            self.chunk_wait_s += clock() - started
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            index, length = item
            self._wait_for_room(self.window)
            header = b"PUB %s %s.%d %d\r\n" % (self.subject, self.inbox, chunks, length)
            started = clock()
            self.conn.send_gathered(header, self.buffers[index][:length], b"\r\n")
            self.send_s += clock() - started
            self._release(index)
            size += length
            chunks += 1
        self._wait_for_room(1)  # every chunk acknowledged
        return size, chunks

    def _drain_acks(self) -> None:
        """After a failure of ours (the file, a cancel): wait a little for the chunks already
        sent to be acknowledged, so they are stored before the caller purges what this put left
        (this connection's chunks are not ordered with the caller's purge request)."""
        deadline = time.monotonic() + min(self.push.ack_timeout_s, DRAIN_S)
        with self.acks:
            while self.in_flight > 0 and self.failure is None and (left := deadline - time.monotonic()) > 0:
                self.acks.wait(left)

    def _wait_for_room(self, limit: int) -> None:
        """Wait until fewer than ``limit`` chunks are unacknowledged (then count one more sent,
        unless ``limit`` is 1: the final wait); raise the first failure."""
        started = time.perf_counter()
        with self.acks:
            while self.failure is None and self.in_flight >= limit:
                if self.cancelled.is_set():
                    raise ArtifactError(f"object {self.push.name!r}: upload cancelled")
                self.acks.wait(READY_POLL_S)
            if self.failure is not None:
                raise self.failure
            if self.cancelled.is_set():
                raise ArtifactError(f"object {self.push.name!r}: upload cancelled")
            if limit > 1:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.window_wait_s += time.perf_counter() - started

    def _read_file(self) -> None:
        """Thread: fill free buffers with the file's next chunks, hand each to the sender and the hasher."""
        chunk_bytes, clock = self.push.chunk_bytes, time.perf_counter
        try:
            while (index := self.free.get()) is not None:
                view = self.buffers[index]
                started = clock()
                length = 0
                while length < chunk_bytes:  # whole chunks, as other writers cut them
                    got = self._read_into(view[length:])
                    if not got:
                        break
                    length += got
                self.read_s += clock() - started
                if length:
                    self.holders[index] = 2  # (a free buffer: nobody else holds it)
                    self.hasher.inbox.put((index, length))
                    self.ready.put((index, length))
                if length < chunk_bytes:
                    self.ready.put(None)
                    return
        except OSError as exc:
            failure = _FileReadError()
            failure.__cause__ = exc
            self.ready.put(failure)
        except BaseException as exc:
            self.ready.put(exc)

    def _read_into(self, view: memoryview) -> int:
        readinto = getattr(self.reader, "readinto", None)
        if readinto is not None:
            return readinto(view) or 0
        data = self.reader.read(len(view))
        view[: len(data)] = data
        return len(data)

    def _read_acks(self) -> None:
        """Thread: read what the server sends (pub-acks, pings) until the sender is done."""
        reader = self.conn.reader
        while True:
            try:
                line = reader.readline()
            except TimeoutError:
                with self.acks:
                    if self.closing:
                        return
                    if self.in_flight:
                        self._fail(AcksStopped(self.in_flight))
                        return
                continue  # nothing was waiting for an ack: the file reader is slow, not the server
            except (OSError, ValueError) as exc:
                self._fail(ArtifactError(f"object {self.push.name!r}: connection failed mid-upload: {exc}"))
                return
            if not line:
                self._fail(ArtifactError(f"object {self.push.name!r}: the server closed the connection mid-upload"))
                return
            op = line[:4]
            if op in (b"MSG ", b"HMSG"):
                fields = line.split()
                try:
                    header_size = int(fields[-2]) if op == b"HMSG" else 0
                    total = int(fields[-1])
                    raw = reader.read(total + 2)
                except (OSError, ValueError, IndexError) as exc:
                    self._fail(ArtifactError(f"object {self.push.name!r}: unreadable pub-ack: {exc}"))
                    return
                status = _Puller._status(raw[:header_size]) if header_size else b""
                self._acked(status, raw[header_size:total])
            elif op == b"PING":
                self.conn.send(b"PONG\r\n")
            elif op == b"-ERR":
                self._fail(
                    ArtifactError(f"object {self.push.name!r}: server error: {line.decode(errors='replace').strip()}")
                )
                return

    def _acked(self, status: bytes, body: bytes) -> None:
        problem = self.push.check_ack(status, body)
        with self.acks:
            self.in_flight -= 1
            if problem is not None and self.failure is None:
                self.failure = problem
            self.acks.notify_all()

    def _fail(self, failure: BaseException) -> None:
        with self.acks:
            if not self.closing and self.failure is None:
                self.failure = failure
            self.acks.notify_all()
