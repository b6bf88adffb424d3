"""What nats-server itself can move on this machine: the ceiling any client's artifact transfer is under.

A bare NATS protocol client on a blocking socket in a worker thread, doing
only what a transfer cannot skip: reading the file into a reused buffer and
publishing it as chunks to the bucket's chunk subject (window of
``WINDOW`` unacked chunks), or pulling those chunks back and writing them to
a file that is fsynced at the end (written out while it arrives, as the shipped
get does, or, for comparison, only by that fsync). No hashing, no info record, no asyncio,
no protocol parser beyond header lines, no allocation per chunk. The client
spends a few percent of a core; what is left is the server's own work
(socket, store, fsync) — so ``shipped / ceiling`` says how much of what is
reachable the shipped path reaches, and ``ceiling / plain copy`` what no
client of this server on this machine can beat.

Bench-only: plain ``nats://`` URLs without auth or TLS (the embedded server).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from pathlib import Path

from trainfleet.broker import jsapi
from trainfleet.broker.directget import DirectConnection, Endpoint, WriteBack

MIB = 1 << 20
CHUNK = MIB
WINDOW = 16
IDLE_TIMEOUT_S = 60.0
ACK_INBOX = "_CEILING.ack"
PULL_INBOX = "_CEILING.pull"


class RawConnection(DirectConnection):
    """The direct-get path's blocking connection (same handshake), plus a reader for any MSG."""

    def __init__(self, url: str):
        endpoint = Endpoint.of(urllib.parse.urlparse(url))
        if endpoint is None:
            raise ConnectionError(f"the ceiling client speaks plain nats:// only, not {url}")
        super().__init__(endpoint, idle_timeout_s=IDLE_TIMEOUT_S)

    def next_message(self, into: memoryview) -> tuple[int, bytes]:
        """Read up to the next MSG/HMSG; its payload goes into ``into``. Returns (size, status or b'')."""
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line.startswith(b"PING"):
                self.send(b"PONG\r\n")
                continue
            if line.startswith(b"-ERR"):
                raise ConnectionError(line.decode(errors="replace").strip())
            fields = line.split()
            if fields[0] == b"MSG":
                size = int(fields[-1])
                self.reader.readinto(into[: size + 2])
                return size, b""
            if fields[0] == b"HMSG":
                header_size, size = int(fields[-2]), int(fields[-1])
                raw = self.reader.read(size + 2)
                status = raw[:header_size].split(b"\r\n")[0].split()[1:2]
                into[: size - header_size] = raw[header_size:size]
                return size - header_size, status[0] if status else b"?"

    def close(self, reading_thread: threading.Thread | None = None) -> None:  # type: ignore[override]
        self.abort()  # wakes a thread blocked reading (closing the reader would wait for it)
        if reading_thread is not None:
            reading_thread.join(10)
        super().close()


def raw_put(url: str, subject: str, path: Path) -> float:
    """Publish ``path`` as CHUNK-sized messages on ``subject``; seconds until every pub-ack is in."""
    conn = RawConnection(url)
    conn.send(f"SUB {ACK_INBOX} 1\r\n".encode())
    done = threading.Condition()
    state = {"sent": 0, "acked": 0, "error": ""}

    def read_acks() -> None:
        scratch = memoryview(bytearray(64 * 1024))
        try:
            while True:
                size, status = conn.next_message(scratch)
                reply = bytes(scratch[:size])
                with done:
                    state["acked"] += 1
                    if status or b'"error"' in reply:
                        state["error"] = state["error"] or f"refused: {status!r} {reply[:120]!r}"
                    done.notify_all()
        except (ConnectionError, OSError, ValueError) as exc:
            with done:
                state["error"] = state["error"] or f"connection lost: {exc!r}"
                done.notify_all()

    started = time.perf_counter()
    acks = threading.Thread(target=read_acks, daemon=True)
    acks.start()
    header = f"PUB {subject} {ACK_INBOX} ".encode()
    buffers = [bytearray(CHUNK) for _ in range(2)]
    try:
        with open(path, "rb", buffering=0) as fh:
            while True:
                buf = buffers[state["sent"] % 2]
                size = fh.readinto(buf)
                if not size:
                    break
                with done:
                    while state["sent"] - state["acked"] >= WINDOW and not state["error"]:
                        done.wait()
                conn.send(header + str(size).encode() + b"\r\n", memoryview(buf)[:size], b"\r\n")
                state["sent"] += 1
        with done:
            while state["acked"] < state["sent"] and not state["error"]:
                done.wait()
            error = state["error"]  # read before closing: the ack reader then fails on purpose
        elapsed = time.perf_counter() - started
    finally:
        conn.close(reading_thread=acks)
    if error:
        raise RuntimeError(f"ceiling put: {error}")
    return elapsed


def raw_get(url: str, stream: str, consumer: str, chunks: int, dest: Path, *, writeback: bool = True) -> float:
    """Pull ``chunks`` messages through an existing pull consumer into ``dest`` (fsynced); seconds taken.
    With ``writeback`` the file is written out while it is received (as the shipped get does,
    see directget.WriteBack), else only by the fsync at the end."""
    conn = RawConnection(url)
    conn.send(f"SUB {PULL_INBOX} 1\r\n".encode())
    next_subject = jsapi.consumer_next(stream, consumer).encode()

    def ask(count: int) -> None:
        body = json.dumps({"batch": count, "no_wait": True}).encode()
        conn.send(b"PUB %s %s %d\r\n%s\r\n" % (next_subject, PULL_INBOX.encode(), len(body), body))

    buf = memoryview(bytearray(4 * CHUNK))
    started = time.perf_counter()
    try:
        with open(dest, "wb", buffering=0) as out:
            early = WriteBack.of(out) if writeback else None
            requested = min(WINDOW, chunks)
            ask(requested)
            received = 0
            try:
                while received < chunks:
                    size, status = conn.next_message(buf)
                    if status:
                        raise RuntimeError(f"ceiling get: status {status!r} after {received} of {chunks} chunks")
                    out.write(buf[:size])
                    if early is not None:
                        early.wrote(size)
                    received += 1
                    if requested < chunks and requested - received <= WINDOW // 2:
                        more = min(WINDOW - (requested - received), chunks - requested)
                        ask(more)
                        requested += more
            finally:
                if early is not None:
                    early.finish()
            os.fsync(out.fileno())
        return time.perf_counter() - started
    finally:
        conn.close()
