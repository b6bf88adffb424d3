"""What every benchmark needs: a fresh embedded server, a connected broker, the machine's facts."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from trainfleet.broker import tickets
from trainfleet.broker.connection import Broker
from trainfleet.broker.provision import ensure_consumer
from trainfleet.broker.schema import Capability, JobRecord, JobSpec, encode
from trainfleet.broker.server import EmbeddedServer, nats_server_binary
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import job_id_for, put_spec

# A trainer that does nothing but note when it started and write metrics.json.
NOOP_TRAINER = (
    "import json, os, sys, time\n"
    "t = time.time()\n"
    "out = os.environ['TRAINFLEET_OUTPUT_DIR']\n"
    "os.makedirs(out, exist_ok=True)\n"
    "json.dump({'t_start': t}, open(os.path.join(out, 'metrics.json'), 'w'))\n"
)


@dataclass
class Env:
    """One benchmark's world: a server in a temp dir and a provisioned broker connection."""

    server: EmbeddedServer
    settings: Settings
    broker: Broker
    workdir: Path


@contextlib.asynccontextmanager
async def fleet_env(*, sync_always: bool = True, root: Path | None = None, **settings: Any) -> AsyncIterator[Env]:
    """Start a nats-server (``sync_interval: always`` unless told otherwise) and provision trainfleet."""
    workdir = Path(tempfile.mkdtemp(prefix="trainfleet-bench-", dir=root))
    server = EmbeddedServer(workdir / "nats", sync_always=sync_always)
    await asyncio.to_thread(server.start)
    try:
        conf = Settings(url=server.url, **settings)
        broker = await Broker.connect(conf, name="bench", provision=True)
        # As a controller would: agents bind to a class's consumer, never create it.
        await ensure_consumer(broker.js, conf, tickets.cpu_class())
        try:
            yield Env(server=server, settings=conf, broker=broker, workdir=workdir)
        finally:
            await broker.close()
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(workdir, ignore_errors=True)


def bench_capability(host_id: str) -> Capability:
    """A plain CPU host, so benchmarks never depend on what this machine has."""
    return Capability(
        host_id=host_id,
        cores_physical=2,
        cores_logical=2,
        cores_usable=2.0,
        ram_total_gib=16.0,
        ram_available_gib=12.0,
        python=platform.python_version(),
        platform="bench",
        cuda_reason="no CUDA: benchmark host",
    )


def noop_spec(index: int, nonce: str, *, name: str = "bench") -> JobSpec:
    """A job running NOOP_TRAINER; the nonce (in its data) makes its id new in every run."""
    spec = JobSpec(
        job_id="",
        name=f"{name}-{index}",
        model="noop",
        mode="run",
        hyper={},
        data={"nonce": nonce},
        seed=index,
        command=("{python}", "-c", NOOP_TRAINER),
    )
    return msgspec.structs.replace(spec, job_id=job_id_for(spec.identity()))


async def create_jobs(broker: Broker, specs: list[JobSpec], *, concurrency: int = 32) -> list[JobRecord]:
    """Pending records plus one ticket each, written the way the controller writes them."""
    now = time.time()
    records = [
        JobRecord(job_id=s.job_id, klass="cpu", offered=("cpu",), created_at=now, updated_at=now, queued_at=now)
        for s in specs
    ]
    sem = asyncio.Semaphore(concurrency)
    by_id = {s.job_id: s for s in specs}

    async def one(rec: JobRecord) -> None:
        async with sem:
            await put_spec(broker, by_id[rec.job_id], None)
            await broker.jobs.create(rec.job_id, encode(rec))
            await publish_ticket(broker, rec)

    await asyncio.gather(*(one(r) for r in records))
    return records


async def publish_ticket(broker: Broker, record: JobRecord) -> float:
    """Publish the record's ticket; returns the wall time it was sent."""
    sent = time.time()
    await tickets.publish_ticket(broker, record, record.klass)
    return sent


def make_file(path: Path, size: int) -> str:
    """Incompressible bytes (like a .tar.zst bundle) of ``size``; returns their sha256."""
    digest = hashlib.sha256()
    block = 8 << 20
    with open(path, "wb") as fh:
        left = size
        while left:
            data = os.urandom(min(block, left))
            fh.write(data)
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def plain_copy_mb_s(src: Path, dst: Path) -> float:
    """A plain file copy on the same disk, made durable (fsync) like the server's store."""
    size = src.stat().st_size
    started = time.perf_counter()
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    dst.unlink()
    return size / 1e6 / elapsed


def chunked_durable_copy_mb_s(src: Path, dst: Path, chunk: int) -> float:
    """A copy that fsyncs after every ``chunk``: what ``sync_interval: always`` asks of the disk
    for an object put with that chunk size (the hardware floor under a durable upload)."""
    size = src.stat().st_size
    started = time.perf_counter()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while data := fin.read(chunk):
            fout.write(data)
            fout.flush()
            os.fsync(fout.fileno())
    elapsed = time.perf_counter() - started
    dst.unlink()
    return size / 1e6 / elapsed


def rss_mib(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / (1 << 20)


def machine_facts() -> dict[str, Any]:
    """What a reader needs to compare these numbers with theirs."""
    import psutil

    try:
        version = subprocess.run(
            [nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError as exc:
        version = f"unknown ({exc})"
    disk = shutil.disk_usage(tempfile.gettempdir())
    cpu = platform.processor() or _cpu_model()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "disk_free_gib": round(disk.free / (1 << 30)),
        "tmp": tempfile.gettempdir(),
        "python": sys.version.split()[0],
        "nats_server": version,
        "nats_py": _version("nats-py"),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)
