"""Artifact upload and download MB/s against a plain file copy on the same disk.

The measured path is the shipped one (``trainfleet.broker.artifacts.Artifacts.put`` /
``download``: pipelined chunks, streamed and verified gets). Baselines, same
run: a plain durable copy (copy + fsync) of the same file on the same disk,
and, for context, nats-py's stock object store on the same object.
Through the latency proxy the same transfers run over a 20 ms RTT link.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench import ceiling
from bench.env import Env, chunked_durable_copy_mb_s, fleet_env, make_file, plain_copy_mb_s, rss_mib
from bench.report import Row, median
from trainfleet.broker.artifacts import ARTIFACT_CHUNK_BYTES, Artifacts
from trainfleet.broker.bundle import Bundle
from trainfleet.broker.connection import Broker
from trainfleet.broker.objstore import TransferStats

MIB = 1 << 20


def _label(size: int) -> str:
    return f"{size // (1 << 30)} GiB" if size >= 1 << 30 else f"{size // MIB} MiB"


class RssSampler:
    """Samples this process's RSS while a transfer runs: how far above the start it peaked."""

    def __init__(self, period_s: float = 0.02):
        self.period_s = period_s
        self.start = self.peak = rss_mib()
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mib())
            await asyncio.sleep(self.period_s)

    async def __aenter__(self) -> RssSampler:
        self.start = self.peak = rss_mib()
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.peak = max(self.peak, rss_mib())

    @property
    def grew_mib(self) -> float:
        return self.peak - self.start


async def _timed(coro) -> float:
    started = time.perf_counter()
    await coro
    return time.perf_counter() - started


async def fleet_transfer(broker: Broker, bundle: Bundle, dest: Path, reps: int) -> tuple[float, float, float]:
    """Median (plain copy, upload, download) MB/s; the three interleave so load hits all alike."""
    artifacts = Artifacts(broker)
    store = artifacts.store
    copies, ups, downs = [], [], []
    for _ in range(reps):
        copies.append(await asyncio.to_thread(plain_copy_mb_s, bundle.path, dest))
        ups.append(bundle.size / 1e6 / await _timed(artifacts.put(bundle)))
        downs.append(bundle.size / 1e6 / await _timed(artifacts.get(bundle.sha256, dest)))
        dest.unlink()
        await store.delete(bundle.sha256)  # so the next upload is not deduplicated away
    return median(copies), median(ups), median(downs)


async def ceiling_transfer(broker: Broker, url: str, src: Path, dest: Path, reps: int) -> tuple[float, float, float]:
    """Median (put, get, get with the fsync only at the end) MB/s of the bare client in
    bench.ceiling: what the server alone can move, through ``url`` (the server, or the proxy)."""
    store = Artifacts(broker).store
    size = src.stat().st_size
    chunks = -(-size // ceiling.CHUNK)
    puts, gets, late_gets = [], [], []
    for rep in range(reps):
        subject = store.chunk_subject(f"ceiling{rep}{time.time_ns()}")
        puts.append(size / 1e6 / await asyncio.to_thread(ceiling.raw_put, url, subject, src))
        for writeback, into in ((True, gets), (False, late_gets)):
            consumer = f"ceiling{rep}{time.time_ns()}"
            await store._create_consumer(consumer, subject)
            get = functools.partial(ceiling.raw_get, url, store.stream, consumer, chunks, dest, writeback=writeback)
            into.append(size / 1e6 / await asyncio.to_thread(get))
            dest.unlink()
        await store._purge(subject)
    return median(puts), median(gets), median(late_gets)


async def stock_transfer(broker: Broker, bundle: Bundle, dest: Path) -> tuple[float, float]:
    """nats-py's own ObjectStore.put / get(writeinto=file) of the same bytes (the 'before')."""
    name = "stock-" + bundle.sha256
    stock = await broker.js.object_store(broker.names.artifacts_bucket)
    with open(bundle.path, "rb") as fh:
        up = bundle.size / 1e6 / await _timed(stock.put(name, fh))
    with open(dest, "wb") as fh:
        down = bundle.size / 1e6 / await _timed(stock.get(name, writeinto=fh))
    dest.unlink()
    await stock.delete(name)
    return up, down


def _rows(where: str, size: int, up: float, down: float, copy: float, extra: str = "") -> list[Row]:
    label = f"{_label(size)}{where}"
    return [
        Row("artifacts", f"artifact upload {label}", up, "MB/s", copy, "plain copy + fsync", note=extra),
        Row("artifacts", f"artifact download {label}", down, "MB/s", copy, "plain copy + fsync", note=extra),
    ]


async def _one_size(env: Env, broker: Broker, size: int, *, url: str, where: str, stock: bool, reps: int) -> list[Row]:
    src = env.workdir / f"src-{size}"
    sha = await asyncio.to_thread(make_file, src, size)
    bundle = Bundle(path=src, sha256=sha, size=size)
    async with RssSampler() as rss:
        copy, up, down = await fleet_transfer(broker, bundle, env.workdir / "dl", reps)
    rows = _rows(where, size, up, down, copy, extra=f"median of {reps}; RSS peak +{rss.grew_mib:.0f} MiB")
    c_up, c_down, c_late = await ceiling_transfer(broker, url, src, env.workdir / "dl", reps)
    rows[0].note += f"; {up / c_up:.2f}x of the server ceiling"
    rows[1].note += f"; {down / c_down:.2f}x of the server ceiling"
    through = "through the proxy: its own limit and the server's" if where else "nats-server's own limit"
    rows += [
        Row(
            "artifacts",
            f"  server ceiling put {_label(size)}{where}",
            c_up,
            "MB/s",
            copy,
            "plain copy + fsync",
            note=f"bare client, no hashing: {through}",
        ),
        Row(
            "artifacts",
            f"  server ceiling get {_label(size)}{where}",
            c_down,
            "MB/s",
            copy,
            "plain copy + fsync",
            note=f"bare client, no hashing, file fsynced (written out as it arrives; fsync only at the end: "
            f"{c_late:,.0f} MB/s)",
        ),
    ]
    if not where:
        chunk = ARTIFACT_CHUNK_BYTES
        durable = await asyncio.to_thread(chunked_durable_copy_mb_s, src, env.workdir / "copy", chunk)
        rows.append(
            Row(
                "artifacts",
                f"  copy with fsync per {chunk >> 20} MiB chunk, {_label(size)}",
                durable,
                "MB/s",
                copy,
                "plain copy + fsync",
                note="the disk's floor under a sync_interval: always put",
            )
        )
    if stock:
        s_up, s_down = await stock_transfer(broker, bundle, env.workdir / "dl")
        rows += [
            Row(
                "artifacts",
                f"  stock nats-py put {_label(size)}{where}",
                s_up,
                "MB/s",
                copy,
                "plain copy + fsync",
                note="before: one pub-ack per 128 KiB chunk",
            ),
            Row(
                "artifacts",
                f"  stock nats-py get {_label(size)}{where}",
                s_down,
                "MB/s",
                copy,
                "plain copy + fsync",
                note="before: get(writeinto=file)",
            ),
        ]
    src.unlink()
    return rows


async def run(sizes: list[int], *, stock_max: int, reps: int) -> list[Row]:
    rows: list[Row] = []
    async with fleet_env() as env:
        for size in sorted(sizes):
            rows += await _one_size(
                env, env.broker, size, url=env.server.url, where="", stock=size <= stock_max, reps=reps
            )
    return rows


async def run_rtt(sizes: list[int], *, rtt_s: float, stock_size: int, reps: int) -> list[Row]:
    """The same transfers through a TCP proxy adding ``rtt_s`` of round-trip time."""
    rows: list[Row] = []
    async with fleet_env() as env, proxy_process(env.server.port, rtt_s / 2) as url:
        slow = await Broker.connect(env.settings.with_(url=url), name="bench-rtt")
        try:
            measured = await slow.nc.rtt()
            where = f" @{rtt_s * 1000:.0f} ms RTT"
            for size in sorted(sizes):
                rows += await _one_size(env, slow, size, url=url, where=where, stock=False, reps=reps)
            rows[1].note += f"; measured RTT {measured * 1000:.1f} ms"
            if stock_size:
                rows += await _stock_rtt(env, slow, stock_size, where)
        finally:
            await slow.close()
    return rows


@contextlib.asynccontextmanager
async def proxy_process(port: int, delay_s: float) -> AsyncIterator[str]:
    """A LatencyProxy in its own process, so its byte shuffling does not share our GIL and loop
    (a real network costs the endpoints nothing); yields the URL to connect through."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.proxy",
        "127.0.0.1",
        str(port),
        "--delay-s",
        str(delay_s),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        yield f"nats://127.0.0.1:{int(line)}"
    finally:
        proc.terminate()
        await proc.wait()


async def _stock_rtt(env: Env, slow: Broker, size: int, where: str) -> list[Row]:
    src = env.workdir / "stock-src"
    sha = await asyncio.to_thread(make_file, src, size)
    copy = await asyncio.to_thread(plain_copy_mb_s, src, env.workdir / "copy")
    up, down = await stock_transfer(slow, Bundle(path=src, sha256=sha, size=size), env.workdir / "dl")
    src.unlink()
    return [
        Row(
            "artifacts",
            f"  stock nats-py put {_label(size)}{where}",
            up,
            "MB/s",
            copy,
            "plain copy + fsync",
            note="before",
        ),
        Row(
            "artifacts",
            f"  stock nats-py get {_label(size)}{where}",
            down,
            "MB/s",
            copy,
            "plain copy + fsync",
            note="before",
        ),
    ]


# -- where the time goes ------------------------------------------------------------------------
async def profile(size: int, reps: int) -> None:
    """Print, per upload and download of ``size`` bytes, the wall time, the client's and
    nats-server's CPU time and each step's time (TransferStats.timings: the threads' busy
    time, so steps on different threads overlap)."""
    import psutil

    async with fleet_env() as env:
        src = env.workdir / "src"
        sha = await asyncio.to_thread(make_file, src, size)
        store = Artifacts(env.broker).store
        server = psutil.Process(env.server.proc.pid) if env.server.proc else None
        for rep in range(reps):
            for what in ("upload", "download"):
                dest = env.workdir / "dl"
                stats = TransferStats()
                cpu, server_cpu = time.process_time(), _cpu_s(server)
                started = time.perf_counter()
                if what == "upload":
                    await store.put_file(sha, src, stats=stats)
                else:
                    await store.get_file(sha, dest, expect_sha256_hex=sha, stats=stats)
                    dest.unlink()
                wall = time.perf_counter() - started
                print(
                    f"{what} {_label(size)} #{rep + 1}: {size / 1e6 / wall:,.0f} MB/s, {wall * 1000:.0f} ms; "
                    f"CPU: client {(time.process_time() - cpu) * 1000:.0f} ms, "
                    f"nats-server {(_cpu_s(server) - server_cpu) * 1000:.0f} ms"
                )
                for step, seconds in getattr(stats, "timings", {}).items():
                    print(f"    {step:56s} {seconds * 1000:8.1f} ms")
            await store.delete(sha)


def _cpu_s(process: Any) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bench.transfer", description="where an artifact transfer's time goes"
    )
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(profile(args.size_mib * MIB, args.reps))
