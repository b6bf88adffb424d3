"""The pipelined object-store path: wire-compatible with stock clients, bounded, verified."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import api
from nats.js.object_store import ObjectStore

from bench.proxy import LatencyProxy
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import Bundle
from trainfleet.broker.connection import settle
from trainfleet.broker.errors import ArtifactError, ObjectNotFound, StoreFull
from trainfleet.broker.objstore import ObjectInfo, ObjectStoreClient, TransferStats, encode_name
from trainfleet.broker.server import EmbeddedServer

BUCKET = "t"
CHUNK = 64 * 1024


@pytest.fixture
def nats_server(tmp_path) -> Iterator[EmbeddedServer]:
    """The object-store format is tested on a server without roles (test_roles covers who may
    put and get artifacts; the direct get path does its own handshake)."""
    server = EmbeddedServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_server: EmbeddedServer) -> AsyncIterator[Client]:
    conn = await nats.connect(nats_server.url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def stock(nc: Client) -> ObjectStore:
    """nats-py's own object store on the same bucket: the interop reference."""
    return await nc.jetstream().create_object_store(BUCKET, config=api.ObjectStoreConfig(bucket=BUCKET))


@pytest.fixture(params=["direct", "subscribed"])
def store(request, nc: Client, stock: ObjectStore) -> ObjectStoreClient:
    """Every test runs both get paths: the direct connection and the client's own subscription."""
    return ObjectStoreClient(
        nc, BUCKET, chunk_bytes=CHUNK, window_bytes=4 * CHUNK, direct_min_bytes=0 if request.param == "direct" else None
    )


def payload(size: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"x" * (size % 32)


async def chunk_subjects(nc: Client) -> dict[str, int]:
    info = await nc.jetstream().stream_info(f"OBJ_{BUCKET}", subjects_filter=f"$O.{BUCKET}.C.>")
    return dict(info.state.subjects or {})


# Sizes: empty, one partial chunk, and several chunks that do not divide evenly.
SIZES = [0, 1, 3 * CHUNK + 17]


@pytest.mark.parametrize("size", SIZES)
async def test_objects_we_put_are_read_by_stock_nats_py(store, stock, tmp_path, size):
    data = payload(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    info = await store.put_file("obj", src)
    assert (info.size, info.chunks) == (size, -(-size // CHUNK))

    got = await stock.get("obj")
    assert got.data == data
    stock_info = await stock.get_info("obj")
    assert (stock_info.size, stock_info.chunks, stock_info.digest) == (info.size, info.chunks, info.digest)


@pytest.mark.parametrize("size", SIZES)
async def test_objects_stock_nats_py_put_are_read_here(store, stock, tmp_path, size):
    data = payload(size, seed=1)
    await stock.put("obj", data)
    dest = tmp_path / "out"
    info = await store.get_file("obj", dest, expect_sha256_hex=hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data
    assert info.size == size


async def test_object_names_that_are_not_subject_tokens_round_trip(store, stock, tmp_path):
    # Given a name with characters a subject cannot hold, both sides agree on its meta subject
    name = "models/run 1/weights.bin"
    await stock.put(name, b"weights")
    assert store.meta_subject(name).endswith(encode_name(name))
    await store.get_file(name, tmp_path / "w")
    assert (tmp_path / "w").read_bytes() == b"weights"


async def test_replacing_an_object_leaves_no_stale_chunks(nc, store, stock, tmp_path):
    first = await store.put_bytes("obj", payload(3 * CHUNK, seed=2))
    second = await store.put_bytes("obj", payload(2 * CHUNK, seed=3))
    assert await chunk_subjects(nc) == {store.chunk_subject(second.nuid): 2}
    assert first.nuid != second.nuid

    # And across clients: a stock put replaces ours, ours replaces the stock one
    await stock.put("obj", payload(CHUNK, seed=4))
    stock_nuid = (await stock.get_info("obj")).nuid
    assert await chunk_subjects(nc) == {store.chunk_subject(stock_nuid): 1}
    third = await store.put_bytes("obj", payload(CHUNK + 1, seed=5))
    assert await chunk_subjects(nc) == {store.chunk_subject(third.nuid): 2}
    await store.get_file("obj", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == payload(CHUNK + 1, seed=5)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "client-connection"])
async def test_a_put_never_has_more_chunks_unacked_than_its_window(nats_server, stock, tmp_path, direct):
    # Given a 20 ms RTT link (so acks lag far behind publishes) and a window of 4 chunks,
    # an observer on the server side sees each chunk arrive and each pub-ack leave (the
    # direct put's connection goes through the proxy too: it connects where the client did).
    proxy = LatencyProxy("127.0.0.1", nats_server.port, delay_s=0.010)
    await proxy.start()
    observer = await nats.connect(nats_server.url)
    slow = await nats.connect(proxy.url)
    events: list[str] = []

    async def on_chunk(msg):
        events.append("chunk")

    async def on_inbox(msg):
        body = json.loads(msg.data)
        if isinstance(body, dict) and "seq" in body and "type" not in body:
            events.append("ack")

    try:
        await observer.subscribe(f"$O.{BUCKET}.C.>", cb=on_chunk)
        await observer.subscribe("_INBOX.>", cb=on_inbox)
        await settle(observer)
        client = ObjectStoreClient(
            slow, BUCKET, chunk_bytes=CHUNK, window_bytes=4 * CHUNK, direct_min_bytes=0 if direct else None
        )
        stats = TransferStats()
        src = tmp_path / "src"
        src.write_bytes(payload(40 * CHUNK))
        await client.put_file("obj", src, stats=stats)
        # (only the direct put reports its threads' timings)
        assert ("send (sendmsg)" in stats.timings) == direct
        await observer.flush()
    finally:
        await slow.close()
        await observer.close()
        await proxy.stop()

    unacked, worst = 0, 0
    for event in events:
        unacked += 1 if event == "chunk" else -1
        worst = max(worst, unacked)
    assert events.count("chunk") == 40
    assert worst <= 4 and stats.max_in_flight <= 4
    assert worst > 1, "chunks were not pipelined"


async def test_a_16_mib_object_crosses_a_20ms_rtt_link_byte_identical(nats_server, stock, tmp_path):
    proxy = LatencyProxy("127.0.0.1", nats_server.port, delay_s=0.010)
    await proxy.start()
    conn = await nats.connect(proxy.url)
    try:
        client = ObjectStoreClient(conn, BUCKET)
        src = tmp_path / "src"
        src.write_bytes(os.urandom(16 * 1024 * 1024))
        info = await client.put_file("big", src)
        await client.get_file("big", tmp_path / "dst")
    finally:
        await conn.close()
        await proxy.stop()
    assert info.size == 16 * 1024 * 1024
    assert hashlib.sha256((tmp_path / "dst").read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


async def _republish_info(nc: Client, store: ObjectStoreClient, name: str, **changes) -> None:
    info = await store.info(name)
    assert info is not None
    for key, value in changes.items():
        setattr(info, key, value)
    await nc.jetstream().publish(store.meta_subject(name), info.to_json(), headers={"Nats-Rollup": "sub"})


def assert_nothing_left(dest: Path) -> None:
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


async def assert_get_refused(store: ObjectStoreClient, tmp_path: Path, match: str, **kwargs) -> None:
    """Getting "obj" fails with an ArtifactError matching ``match`` and leaves no file behind."""
    dest = tmp_path / "dl" / "obj"
    dest.parent.mkdir()
    with pytest.raises(ArtifactError, match=match):
        await store.get_file("obj", dest, **kwargs)
    assert_nothing_left(dest)


async def test_a_digest_mismatch_is_an_artifact_error_and_leaves_no_file(nc, store, tmp_path):
    await store.put_bytes("obj", payload(2 * CHUNK + 5))
    await _republish_info(nc, store, "obj", digest="SHA-256=" + "A" * 43 + "=")
    await assert_get_refused(store, tmp_path, "digest mismatch")


async def test_a_wrong_content_address_is_refused_and_leaves_no_file(store, tmp_path):
    await store.put_bytes("obj", b"bytes")
    await assert_get_refused(store, tmp_path, "hash to", expect_sha256_hex="0" * 64)


@pytest.mark.parametrize("lost", ["first", "middle", "last"])
async def test_a_truncated_chunk_stream_is_an_artifact_error_and_leaves_no_file(nc, store, tmp_path, lost):
    # Given an object whose info promises 4 chunks, one of which is gone from the stream
    info = await store.put_bytes("obj", payload(4 * CHUNK - 3))
    js = nc.jetstream()
    seqs = []
    seq = 0
    while True:
        try:
            msg = await js.get_msg(store.stream, seq=seq + 1, subject=store.chunk_subject(info.nuid), next=True)
        except nats.js.errors.NotFoundError:
            break
        seq = msg.seq
        seqs.append(seq)
    assert len(seqs) == 4
    await js.delete_msg(store.stream, {"first": seqs[0], "middle": seqs[2], "last": seqs[-1]}[lost])
    await assert_get_refused(store, tmp_path, "3 of 4 chunks")


def consumer_made_late(store: ObjectStoreClient, delay_s: float | None) -> list[asyncio.Task]:
    """Make the chunks' consumer ``delay_s`` after the get asked for it (None: never), as a
    cluster does when the consumer leader's interest reaches this client's server late."""
    made_later: list[asyncio.Task] = []
    create = store._create_consumer

    async def late(name: str, subject: str) -> None:
        if delay_s is not None:

            async def later() -> None:
                await asyncio.sleep(delay_s)
                await create(name, subject)

            made_later.append(asyncio.create_task(later()))

    store._create_consumer = late  # type: ignore[method-assign]
    return made_later


async def test_pull_requests_that_reach_no_consumer_yet_are_asked_again(store, tmp_path):
    # Given a consumer whose pull requests get 503 no responders for the first 0.6 s
    data = payload(3 * CHUNK + 17)
    await store.put_bytes("obj", data)
    made_later = consumer_made_late(store, 0.6)
    # When the object is fetched, then it arrives whole (asked again, not "truncated")
    await store.get_file("obj", tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == data and made_later


async def test_a_consumer_that_never_answers_fails_the_get_with_a_clear_error(store, tmp_path, monkeypatch):
    from trainfleet.broker import directget, objstore

    monkeypatch.setattr(directget, "NO_RESPONDERS_TRIES", 3)
    monkeypatch.setattr(objstore, "NO_RESPONDERS_TRIES", 3)
    await store.put_bytes("obj", payload(2 * CHUNK))
    consumer_made_late(store, None)
    await assert_get_refused(store, tmp_path, r"did not answer 3 pull requests \(503 no responders\) after 0 of 2")


async def test_an_info_that_understates_the_size_is_refused(nc, store, tmp_path):
    await store.put_bytes("obj", payload(2 * CHUNK))
    await _republish_info(nc, store, "obj", size=CHUNK)
    await assert_get_refused(store, tmp_path, "more than the recorded")


async def test_a_missing_object_is_a_clear_error(store, tmp_path):
    assert await store.info("nope") is None
    with pytest.raises(ObjectNotFound, match="not in bucket"):
        await store.get_file("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()


async def test_a_deleted_object_is_missing_for_every_client(nc, store, stock):
    await store.put_bytes("obj", payload(2 * CHUNK))
    await store.delete("obj")
    assert await store.info("obj") is None
    assert (await store.info("obj", show_deleted=True)).deleted
    with pytest.raises(nats.js.errors.ObjectNotFoundError):
        await stock.get_info("obj")
    assert await chunk_subjects(nc) == {}


async def test_a_refused_chunk_fails_the_put_fast_and_leaves_no_chunks(nc, tmp_path):
    # Given a bucket capped at 256 KiB that refuses new messages once full
    capped = api.ObjectStoreConfig(bucket="small", max_bytes=256 * 1024)
    await nc.jetstream().create_object_store("small", config=capped)
    client = ObjectStoreClient(nc, "small", chunk_bytes=CHUNK, window_bytes=4 * CHUNK)
    src = tmp_path / "src"
    src.write_bytes(payload(64 * CHUNK))
    with pytest.raises(StoreFull, match="refused a chunk"):
        await client.put_file("obj", src)
    info = await nc.jetstream().stream_info("OBJ_small")
    assert info.state.messages == 0
    assert await client.info("obj") is None


async def test_a_put_into_a_missing_bucket_names_the_bucket(nc, tmp_path):
    client = ObjectStoreClient(nc, "absent")
    with pytest.raises(ArtifactError, match="'absent' does not exist"):
        await client.put_bytes("obj", b"data")


async def test_an_upload_whose_bytes_do_not_match_the_bundle_id_is_refused_and_removed(broker, tmp_path):
    # Given a bundle whose file changed after it was hashed (same size, other bytes)
    path = tmp_path / "b.tar.zst"
    path.write_bytes(b"original")
    bundle = Bundle(path=path, sha256=hashlib.sha256(b"original").hexdigest(), size=8)
    path.write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="changed on disk"):
        await Artifacts(broker).put(bundle)
    assert await Artifacts(broker).store.info(bundle.sha256) is None


async def test_the_latency_proxy_delays_cuts_and_restores_a_link(nats_server):
    proxy = LatencyProxy("127.0.0.1", nats_server.port, delay_s=0.005)
    await proxy.start()
    try:
        conn = await nats.connect(proxy.url, allow_reconnect=False)
        assert await conn.rtt() >= 0.010  # 2 x the one-way delay
        # When cut: the live connection drops and a new one is reset without a byte
        proxy.cut()
        await wait_closed(conn)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            assert await reader.read(100) == b""
        except ConnectionResetError:
            pass
        finally:
            writer.close()
        # When restored: connections work again, with the new delay
        proxy.restore()
        proxy.set_delay(0.0)
        conn = await nats.connect(proxy.url, allow_reconnect=False)
        assert await conn.rtt() < 0.010
        await conn.close()
    finally:
        await proxy.stop()


async def wait_closed(conn: Client, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if conn.is_closed:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("connection still open after the cut")


async def test_a_get_falls_back_to_the_client_connection_when_no_direct_one_can_be_made(
    nc, store, tmp_path, monkeypatch, caplog
):
    # Given a direct endpoint nobody listens on (as when the server wants TLS or refuses us)
    from trainfleet.broker import objstore
    from trainfleet.broker.directget import Endpoint
    from trainfleet.broker.server import free_port

    monkeypatch.setattr(objstore.Endpoint, "for_client", staticmethod(lambda c: Endpoint("127.0.0.1", free_port())))
    caplog.set_level(logging.INFO, logger="trainfleet.objstore")
    data = payload(5 * CHUNK + 1)
    await store.put_bytes("obj", data)
    dest = tmp_path / "obj"
    got = TransferStats()
    await store.get_file("obj", dest, stats=got)
    assert dest.read_bytes() == data and got.chunks == 6
    assert ("not possible" in caplog.text) == (store.direct_min_bytes is not None)


async def test_a_cancelled_direct_get_stops_its_thread_and_leaves_no_file(nc, tmp_path, monkeypatch):
    # Given a direct get onto a slow disk (10 ms per chunk), cancelled once the first chunk is written
    from trainfleet.broker import objstore

    js = nc.jetstream()
    await js.create_object_store(BUCKET, config=api.ObjectStoreConfig(bucket=BUCKET))
    store = ObjectStoreClient(nc, BUCKET, chunk_bytes=CHUNK, window_bytes=4 * CHUNK, direct_min_bytes=0)
    await store.put_bytes("big", payload(200 * CHUNK))
    first_write = threading.Event()
    outcome: list[str] = []
    real_pull = objstore.pull_object

    class SlowFile:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            first_write.set()
            time.sleep(0.01)
            return self.fh.write(data)

    def watched_pull(*args, **kwargs):
        try:
            real_pull(*args, **{**kwargs, "fh": SlowFile(kwargs["fh"])})
            outcome.append("finished")
        except ArtifactError as exc:
            outcome.append(str(exc))
            raise

    monkeypatch.setattr(objstore, "pull_object", watched_pull)
    dest = tmp_path / "dl" / "big"
    dest.parent.mkdir()
    task = asyncio.create_task(store.get_file("big", dest))
    assert await asyncio.to_thread(first_write.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Then the thread had already stopped, on the cancel, not at the end of the object
    assert len(outcome) == 1 and "cancelled" in outcome[0]
    assert_nothing_left(dest)


async def test_a_direct_get_authenticates_like_the_client_it_came_from(tmp_path, caplog):
    # Given a server that wants a user and password, and a client that gave them in its URL
    server = EmbeddedServer(tmp_path / "nats", extra_config="authorization {\n user: fleet\n password: s3cret\n}")
    await asyncio.to_thread(server.start)
    try:
        conn = await nats.connect(f"nats://fleet:s3cret@127.0.0.1:{server.port}")
        try:
            await conn.jetstream().create_object_store(BUCKET, config=api.ObjectStoreConfig(bucket=BUCKET))
            store = ObjectStoreClient(conn, BUCKET, chunk_bytes=CHUNK, direct_min_bytes=0)
            data = payload(3 * CHUNK + 5)
            await store.put_bytes("obj", data)
            caplog.set_level(logging.INFO, logger="trainfleet.objstore")
            await store.get_file("obj", tmp_path / "obj")
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(server.stop)
    # Then the direct connection was let in (no fallback) and the bytes are right
    assert (tmp_path / "obj").read_bytes() == data
    assert "not possible" not in caplog.text


# -- the direct put path ----------------------------------------------------------------------
async def test_a_put_falls_back_to_the_client_connection_when_no_direct_one_can_be_made(
    nc, stock, tmp_path, monkeypatch, caplog
):
    # Given a direct endpoint nobody listens on (as when the server wants TLS or refuses us)
    from trainfleet.broker import objstore
    from trainfleet.broker.directget import Endpoint
    from trainfleet.broker.server import free_port

    monkeypatch.setattr(objstore.Endpoint, "for_client", staticmethod(lambda c: Endpoint("127.0.0.1", free_port())))
    caplog.set_level(logging.INFO, logger="trainfleet.objstore")
    store = ObjectStoreClient(nc, BUCKET, chunk_bytes=CHUNK, window_bytes=4 * CHUNK, direct_min_bytes=0)
    src = tmp_path / "src"
    src.write_bytes(payload(5 * CHUNK + 1))
    # When a file is put, it is stored whole through the client's own connection
    await store.put_file("obj", src)
    assert "direct upload of 'obj' not possible" in caplog.text
    assert (await stock.get("obj")).data == src.read_bytes()


class SlowFile(io.FileIO):
    """A file whose reads take ``delay_s`` each and may fail after ``fail_after`` reads."""

    def __init__(self, path: Path, delay_s: float = 0.0, fail_after: int | None = None):
        super().__init__(path, "rb")
        self.delay_s, self.fail_after, self.reads = delay_s, fail_after, 0
        self.first_read = threading.Event()

    def readinto(self, buffer) -> int:
        self.reads += 1
        self.first_read.set()
        if self.fail_after is not None and self.reads > self.fail_after:
            raise OSError(5, "Input/output error (simulated)")
        time.sleep(self.delay_s)
        return super().readinto(buffer)


async def test_a_direct_put_whose_file_fails_to_read_raises_that_error_and_leaves_no_chunks(nc, stock, tmp_path):
    # Given a file that stops being readable after 3 chunks
    store = ObjectStoreClient(nc, BUCKET, chunk_bytes=CHUNK, window_bytes=4 * CHUNK, direct_min_bytes=0)
    src = tmp_path / "src"
    src.write_bytes(payload(20 * CHUNK))
    with SlowFile(src, fail_after=3) as fh:
        # When it is put over the direct path, the read error is what the put raises
        with pytest.raises(OSError, match="simulated"):
            await store.put_stream("obj", fh)
    # Then no object and no chunk are left
    assert await store.info("obj") is None
    assert await chunk_subjects(nc) == {}


async def test_a_cancelled_direct_put_stops_its_threads_and_leaves_no_chunks(nc, stock, tmp_path):
    # Given a direct put of a file read slowly (20 ms per chunk)
    store = ObjectStoreClient(nc, BUCKET, chunk_bytes=CHUNK, window_bytes=4 * CHUNK, direct_min_bytes=0)
    src = tmp_path / "src"
    src.write_bytes(payload(200 * CHUNK))
    before = {t.name for t in threading.enumerate()}
    with SlowFile(src, delay_s=0.02) as fh:
        task = asyncio.create_task(store.put_stream("obj", fh))
        assert await asyncio.to_thread(fh.first_read.wait, 30)
        await asyncio.sleep(0.1)
        # When it is cancelled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        reads = fh.reads
    # Then its threads are gone at once (not after the 200 chunks), and so are its chunks
    assert reads < 50
    assert not {t.name for t in threading.enumerate() if t.name.startswith("trainfleet-put")} - before
    assert await store.info("obj") is None
    assert await chunk_subjects(nc) == {}


async def test_a_direct_put_refused_for_lack_of_room_is_store_full(nc, tmp_path):
    # Given a bucket capped at 256 KiB, and a direct put of a 4 MiB file
    capped = api.ObjectStoreConfig(bucket="small", max_bytes=256 * 1024)
    await nc.jetstream().create_object_store("small", config=capped)
    client = ObjectStoreClient(nc, "small", chunk_bytes=CHUNK, window_bytes=4 * CHUNK, direct_min_bytes=0)
    src = tmp_path / "src"
    src.write_bytes(payload(64 * CHUNK))
    stats = TransferStats()
    # When it is put, the first refused chunk fails it as StoreFull, and nothing is left
    with pytest.raises(StoreFull, match="refused a chunk"):
        await client.put_file("obj", src, stats=stats)
    assert (await nc.jetstream().stream_info("OBJ_small")).state.messages == 0


async def test_chunks_that_carry_headers_arrive_without_them(nc, store, tmp_path):
    # Given an object some other writer stored with a header on every chunk (the direct get
    # reads such a chunk's headers into its buffer and must keep only the payload)
    data = payload(3 * CHUNK + 7)
    nuid = "withheaders"
    js = nc.jetstream()
    for offset in range(0, len(data), CHUNK):
        await js.publish(store.chunk_subject(nuid), data[offset : offset + CHUNK], headers={"X-Writer": "other"})
    digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
    info = ObjectInfo(name="obj", bucket=BUCKET, nuid=nuid, size=len(data), chunks=4, digest=digest)
    await js.publish(store.meta_subject("obj"), info.to_json(), headers={"Nats-Rollup": "sub"})
    # When it is fetched, then the file holds the payloads only
    await store.get_file("obj", tmp_path / "obj")
    assert (tmp_path / "obj").read_bytes() == data
