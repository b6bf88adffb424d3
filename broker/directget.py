"""Object-store gets over a dedicated blocking connection, off the event loop.

nats-py reads the socket 32 KiB per event-loop turn and copies every payload
several times on its way to a subscription callback; for a large object that,
not the server, sets the pace (measured: 0.3-0.7x of what nats-server can send
on loopback). A get instead opens one plain connection of its own to the server
the client is connected to, and a worker thread asks the chunk consumer for
batches (``no_wait``, at most ``window`` chunks ahead), reads each payload
into one reused buffer, hashes it and writes it to the file, checking order
and size as it goes. The event loop only waits for the thread.

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
import secrets
import socket
import threading
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
READ_BUFFER_BYTES = 4 << 20
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

    def connect_options(self, nonce: str | None = None) -> dict[str, Any]:
        """The CONNECT fields, with the server's ``nonce`` signed when we log in with an nkey."""
        opts: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "protocol": 1,
            "lang": "python",
            "version": "trainfleet-direct",
            "name": "trainfleet-artifact-get",
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


class DirectConnection:
    """One blocking NATS connection: handshake, then line-by-line reads of what the server sends."""

    def __init__(self, endpoint: Endpoint, idle_timeout_s: float):
        try:
            self.sock = socket.create_connection((endpoint.host, endpoint.port), timeout=SETUP_TIMEOUT_S)
        except OSError as exc:
            raise DirectUnavailable(f"cannot reach {endpoint.host}:{endpoint.port}: {exc}") from exc
        # Small requests go out at once (Nagle plus delayed acks would add ~40 ms to each).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb", buffering=READ_BUFFER_BYTES)
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
            options = endpoint.connect_options(info.get("nonce"))
            # Subscribing in the handshake: a login or a subscription the server refuses (-ERR
            # before the PONG) is known before any byte is written, and the caller falls back.
            self.send(
                b"CONNECT " + json.dumps(options).encode() + b"\r\n",
                f"SUB {self.inbox} {SID}\r\nPING\r\n".encode(),
            )
            line = self.reader.readline()
        except (OSError, ValueError) as exc:
            raise DirectUnavailable(f"handshake failed: {exc}") from exc
        if not line.startswith(b"PONG"):
            raise DirectUnavailable(f"server refused the connection: {line.decode(errors='replace').strip()}")

    def send(self, *parts: bytes | memoryview) -> None:
        for part in parts:
            self.sock.sendall(part)

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


def pull_object(
    endpoint: Endpoint,
    pull: ChunkPull,
    fh: BinaryIO,
    *,
    idle_timeout_s: float,
    cancelled: threading.Event,
    on_connection: Any = None,
) -> Pulled:
    """Pull every chunk of ``pull`` into ``fh``, hashing them.

    Raises DirectUnavailable before anything is written when the connection cannot be made,
    ArtifactError for a missing, out-of-order or oversized chunk or a silent server.
    ``on_connection(conn)`` is called once connected, so a canceller can close it.
    """
    conn = DirectConnection(endpoint, idle_timeout_s)
    if on_connection is not None:
        on_connection(conn)
    name = pull.name
    try:
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


class _Puller:
    def __init__(self, conn: DirectConnection, pull: ChunkPull, fh: BinaryIO, cancelled: threading.Event):
        self.conn = conn
        self.next_subject = pull.next_subject.encode()
        self.name = pull.name
        self.expected_size = pull.expected_size
        self.chunks = pull.chunks
        self.fh = fh
        self.window = max(1, pull.window)
        self.cancelled = cancelled
        self.buffer = memoryview(bytearray(conn.max_payload + 2))
        self.digest = hashlib.sha256()
        self.received = self.requested = self.size = self.max_in_flight = 0
        self.unanswered = 0

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
        self.ask()
        while self.received < self.chunks:
            if self.cancelled.is_set():
                raise self.fail("download cancelled")
            payload = self.next_chunk()
            self.received += 1
            self.size += len(payload)
            if self.size > self.expected_size:
                raise self.fail(f"chunks hold more than the recorded {self.expected_size} bytes")
            self.digest.update(payload)
            self.fh.write(payload)
            self.ask()
        return Pulled(self.size, self.received, self.digest, self.max_in_flight)

    def next_chunk(self) -> memoryview:
        """The next chunk's payload (valid until the next call); statuses and pings handled here."""
        reader = self.conn.reader
        while True:
            line = reader.readline()
            if not line:
                raise self.fail(f"server closed the connection after {self.received} of {self.chunks} chunks")
            op = line[:4]
            if op == b"MSG ":
                fields = line.split()
                if len(fields) != 5:
                    raise self.fail(f"unexpected delivery {line[:120]!r}")
                size = int(fields[4])
                self._check_sequence(fields[3])
                return self._read_payload(size, 0)
            if op == b"HMSG":
                fields = line.split()
                header_size, total = int(fields[-2]), int(fields[-1])
                if len(fields) == 6:  # a chunk that carries headers
                    self._check_sequence(fields[3])
                    return self._read_payload(total, header_size)
                status = self._status(bytes(self._read_payload(total, 0)[:header_size]))
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

    def _read_payload(self, total: int, skip: int) -> memoryview:
        if total + 2 > len(self.buffer):
            raise self.fail(f"a {total}-byte message exceeds the server's max_payload")
        view = self.buffer[: total + 2]
        if self.conn.reader.readinto(view) != total + 2:
            raise self.fail("connection closed inside a chunk")
        return view[skip:total]

    def _check_sequence(self, reply: bytes) -> None:
        seq, _pending = jsapi.reply_fields(reply.decode())
        if seq != self.received + 1:
            raise self.fail(f"chunk {self.received + 1} missing (got consumer sequence {seq})")

    @staticmethod
    def _status(header: bytes) -> bytes:
        parts = header.split(b"\r\n", 1)[0].split()
        return b" ".join(parts[1:]) if len(parts) > 1 else b"?"
