"""What ``sync_interval: always`` costs: the shipped setting against the server default.

The shipped server fsyncs every stored message before it acks it (job state
must survive power loss). The same publishes and object puts run against a
server with the default sync interval (flushed to the OS at once, fsynced
every two minutes) in the same run.
"""

from __future__ import annotations

import asyncio
import time

from nats.js import api

from bench.env import fleet_env, make_file
from bench.report import Row
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import Bundle
from trainfleet.broker.objstore import DEFAULT_CHUNK_BYTES

PAYLOAD = b"x" * 256


async def _publish_rates(env, count: int) -> tuple[float, float]:
    """(sequential, 64-in-flight) acknowledged publishes per second to a file stream."""
    js = env.broker.js
    await js.add_stream(api.StreamConfig(name="BENCH_DUR", subjects=["bench.dur"], storage=api.StorageType.FILE))
    started = time.perf_counter()
    for _ in range(count):
        await js.publish("bench.dur", PAYLOAD)
    sequential = count / (time.perf_counter() - started)
    sem = asyncio.Semaphore(64)

    async def one() -> None:
        async with sem:
            await js.publish("bench.dur", PAYLOAD)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    pipelined = count / (time.perf_counter() - started)
    await js.delete_stream("BENCH_DUR")
    return sequential, pipelined


async def _put_rates(env, size: int) -> tuple[float, float]:
    """(artifact chunk size, ADR default 128 KiB chunks) object put MB/s."""
    src = env.workdir / "dur-src"
    sha = await asyncio.to_thread(make_file, src, size)
    started = time.perf_counter()
    artifacts = Artifacts(env.broker)
    await artifacts.put(Bundle(path=src, sha256=sha, size=size))
    big = size / 1e6 / (time.perf_counter() - started)
    store = artifacts.store
    started = time.perf_counter()
    await store.put_file("small-chunks", src, chunk_bytes=DEFAULT_CHUNK_BYTES)
    small = size / 1e6 / (time.perf_counter() - started)
    src.unlink()
    return big, small


async def run(publishes: int, put_bytes: int) -> list[Row]:
    results = {}
    for always in (True, False):
        async with fleet_env(sync_always=always) as env:
            results[always] = (*await _publish_rates(env, publishes), *await _put_rates(env, put_bytes))
    (seq_a, pipe_a, big_a, small_a), (seq_d, pipe_d, big_d, small_d) = results[True], results[False]
    base = "same, default sync_interval"
    mib = put_bytes >> 20
    return [
        Row("durability", "sync publishes/s, sequential (always)", seq_a, "msg/s", seq_d, base),
        Row("durability", "sync publishes/s, 64 in flight (always)", pipe_a, "msg/s", pipe_d, base),
        Row(
            "durability",
            f"object put {mib} MiB, 1 MiB chunks (always)",
            big_a,
            "MB/s",
            big_d,
            base,
            note="the artifact path's setting",
        ),
        Row(
            "durability",
            f"object put {mib} MiB, 128 KiB chunks (always)",
            small_a,
            "MB/s",
            small_d,
            base,
            note="ADR default chunk size",
        ),
    ]
