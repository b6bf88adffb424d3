"""Killing the node that leads the jobs store: how long record writes stall, how long a takeover takes.

A 3-node cluster on loopback, every resource R3; each figure is the worst of three kills
(elections take a random time). First a bare nats-py client writes one KV key every 50 ms
while the node leading that bucket is SIGKILLed (restarted 5 s later): its
longest gap between two successful writes is JetStream's own failover time (election plus
reconnect), the floor under anything built on it. Then a real fleet (the controller in
process, two agents as processes) runs 2-second jobs; at one moment one agent and the node
leading the jobs KV are SIGKILLed. Measured: the longest gap between record writes (from the
KV history's ``updated_at``), and the takeover time of the dead agent's jobs (kill → the
record claimed by the other agent), against the goal of one lease plus the bare failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
from nats.js import api

from bench.env import create_jobs
from bench.report import Row
from trainfleet.broker import jsapi
from trainfleet.broker.connection import Broker
from trainfleet.broker.records import get_record, record_history
from trainfleet.broker.schema import JobRecord, JobSpec, JobStatus, decode
from trainfleet.broker.server import EmbeddedServer, start_cluster
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import job_id_for
from trainfleet.controller.controller import Controller

LEASE_S = 6.0
DOWN_S = 5.0
JOB_S = 2.0
JOBS = 200  # more than the rounds need: the agents stay busy throughout
SLEEP_TRAINER = (
    "import json, os, time\n"
    f"time.sleep({JOB_S})\n"
    "out = os.environ['TRAINFLEET_OUTPUT_DIR']\n"
    "os.makedirs(out, exist_ok=True)\n"
    "json.dump({'slept': 1}, open(os.path.join(out, 'metrics.json'), 'w'))\n"
)


def sleep_spec(index: int, nonce: str) -> JobSpec:
    spec = JobSpec(
        job_id="",
        name=f"failover-{index}",
        model="sleep",
        mode="run",
        hyper={},
        data={"nonce": nonce},
        seed=index,
        command=("{python}", "-c", SLEEP_TRAINER),
    )
    return msgspec.structs.replace(spec, job_id=job_id_for(spec.identity()))


async def leader(broker: Broker, stream: str) -> str:
    while True:
        with contextlib.suppress(Exception):
            info = await asyncio.wait_for(broker.js.stream_info(stream), 3)
            if info.cluster and info.cluster.leader:
                return info.cluster.leader
        await asyncio.sleep(0.2)


async def all_current(broker: Broker, streams: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ok = True
        for stream in streams:
            try:
                info = await asyncio.wait_for(broker.js.stream_info(stream), 3)
            except Exception:
                ok = False
                break
            peers = (info.cluster.replicas or []) if info.cluster else []
            ok = ok and bool(info.cluster and info.cluster.leader) and all(p.current and not p.offline for p in peers)
        if ok:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"replicas of {streams} not current after {timeout_s}s")


async def kill_for(node: EmbeddedServer, down_s: float) -> None:
    await asyncio.to_thread(node.kill)
    await asyncio.sleep(down_s)
    await asyncio.to_thread(node.start)


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest stretch without a write within [start, end] (its edges count as writes)."""
    inside = sorted(t for t in times if start < t < end)
    points = [start, *inside, end]
    return max(b - a for a, b in zip(points, points[1:], strict=False))


async def bare_gaps(broker: Broker, nodes: dict[str, EmbeddedServer], rounds: int) -> list[float]:
    """A bare client's longest gap between KV writes across each kill of the bucket's leader."""
    kv = await broker.js.create_key_value(api.KeyValueConfig(bucket="BENCHGAP", replicas=3))
    done: list[float] = []
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            try:
                await kv.put("k", str(n).encode())
                done.append(time.time())
                n += 1
            except Exception:
                pass
            await asyncio.sleep(0.05)

    task = asyncio.create_task(writer())
    gaps = []
    for _ in range(rounds):
        await asyncio.sleep(2.0)
        killed_at = time.time()
        await kill_for(nodes[await leader(broker, jsapi.kv_stream("BENCHGAP"))], DOWN_S)
        await all_current(broker, [jsapi.kv_stream("BENCHGAP")])
        await asyncio.sleep(2.0)
        gaps.append(longest_gap(done, killed_at - 1.0, time.time()))
    stop.set()
    await task
    await broker.js.delete_key_value("BENCHGAP")
    return gaps


def start_agent(settings: Settings, host_id: str, workdir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NATS_URL": settings.url,
        "TRAINFLEET_LEASE_S": str(settings.lease_s),
        "TRAINFLEET_HEARTBEAT_S": str(settings.heartbeat_s),
        "TRAINFLEET_FETCH_TIMEOUT_S": str(settings.fetch_timeout_s),
        "TRAINFLEET_NAK_DELAY_S": str(settings.nak_delay_s),
    }
    argv = [sys.executable, "-m", "trainfleet.controller.cli", "agent", "--host-id", host_id]
    argv += ["--workdir", str(workdir / host_id), "--no-torch-probe", "--cpu-slots", "2"]
    with open(workdir / f"{host_id}.log", "ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def takeovers(
    broker: Broker, held: dict[str, int], dead: str, since: float, timeout_s: float = 120
) -> list[float]:
    """For each job the dead agent held (job → its attempt): kill → claimed by another agent."""
    out: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(out) < len(held) and time.monotonic() < deadline:
        for job_id, attempt in held.items():
            if job_id in out:
                continue
            with contextlib.suppress(Exception):
                rec = (await get_record(broker, job_id)).record
                if rec.attempt > attempt and rec.claimed_by not in (None, dead) and rec.claimed_at:
                    out[job_id] = rec.claimed_at - since
                elif rec.status == JobStatus.COMPLETED and rec.attempt > attempt:
                    out[job_id] = (rec.claimed_at or rec.finished_at or time.time()) - since
        await asyncio.sleep(0.2)
    if len(out) < len(held):
        raise RuntimeError(f"{len(held) - len(out)} job(s) of the killed agent were not taken over in {timeout_s}s")
    return list(out.values())


async def running(broker: Broker, ids: list[str]) -> list[JobRecord]:
    out = []
    for job_id in ids:
        with contextlib.suppress(Exception):
            rec = (await get_record(broker, job_id)).record
            if rec.status == JobStatus.RUNNING:
                out.append(rec)
    return out


async def fleet_failovers(
    settings: Settings, broker: Broker, nodes: dict[str, EmbeddedServer], workdir: Path, rounds: int
) -> tuple[list[float], list[float], int]:
    """Per round, (longest record-write gap, longest takeover) with an agent and the jobs-KV
    leader killed at once; and how many jobs were taken over in all."""
    controller = Controller(settings, handle_signals=False)
    ctl_task = asyncio.create_task(controller.run())
    agents = {name: start_agent(settings, name, workdir) for name in ("fa", "fb")}
    jobs_stream = jsapi.kv_stream(settings.names.jobs_bucket)
    windows, takeover, moved = [], [], 0
    try:
        nonce = uuid.uuid4().hex
        ids = [r.job_id for r in await create_jobs(broker, [sleep_spec(i, nonce) for i in range(JOBS)])]
        for _ in range(rounds):
            # Both agents busy (their jobs running), then the kill
            while not {"fa", "fb"} <= {r.claimed_by for r in await running(broker, ids)}:
                await asyncio.sleep(0.2)
            held = {r.job_id: r.attempt for r in await running(broker, ids) if r.claimed_by == "fa"}
            target = nodes[await leader(broker, jobs_stream)]
            killed_at = time.time()
            agents["fa"].send_signal(signal.SIGKILL)
            agents["fa"].wait()
            await kill_for(target, DOWN_S)
            taken = await takeovers(broker, held, "fa", killed_at)
            takeover.append(max(taken, default=float("nan")))
            moved += len(taken)
            await all_current(broker, [jobs_stream, settings.names.jobs_stream])
            await asyncio.sleep(2.0)
            windows.append((killed_at - 1.0, time.time()))
            agents["fa"] = start_agent(settings, "fa", workdir)
        writes = []
        for job_id in ids:
            with contextlib.suppress(Exception):
                history = await record_history(broker, job_id)
                writes += [decode(e.value, JobRecord).updated_at for e in history if e.value]
        return [longest_gap(writes, a, b) for a, b in windows], takeover, moved
    finally:
        for proc in agents.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
        controller.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ctl_task, 15)


async def connect(settings: Settings, timeout_s: float = 60) -> Broker:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await Broker.connect(settings, name="bench", provision=True)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def run(rounds: int = 3) -> list[Row]:
    workdir = Path(tempfile.mkdtemp(prefix="trainfleet-bench-failover-"))
    cluster = await asyncio.to_thread(start_cluster, workdir / "cluster")
    nodes = {f"trainfleet-{n.port}": n for n in cluster}
    try:
        settings = Settings(
            url=",".join(n.url for n in cluster),
            replicas=3,
            lease_s=LEASE_S,
            heartbeat_s=1.0,
            reconcile_s=1.0,
            fetch_timeout_s=0.5,
            nak_delay_s=0.5,
        )
        broker = await connect(settings)
        try:
            bare = await bare_gaps(broker, nodes, rounds)
            names = settings.names
            await all_current(broker, [jsapi.kv_stream(names.jobs_bucket), names.jobs_stream])
            gaps, takeover, moved = await fleet_failovers(settings, broker, nodes, workdir, rounds)
        finally:
            await broker.close()
    finally:
        for node in cluster:
            await asyncio.to_thread(node.stop)
        shutil.rmtree(workdir, ignore_errors=True)
    each = "; ".join
    return [
        Row(
            "failover",
            f"longest record-write gap, jobs-KV leader killed (worst of {rounds})",
            max(gaps),
            "s",
            max(bare),
            "bare client, same kills",
            note=f"each: {each(f'{g:.1f}' for g in gaps)} vs bare {each(f'{g:.1f}' for g in bare)}; "
            "a running job writes its record every heartbeat (1 s)",
        ),
        Row(
            "failover",
            f"takeover of a killed agent's jobs, leader killed too (worst of {rounds})",
            max(takeover),
            "s",
            LEASE_S + max(bare),
            "goal: one lease + the bare gap",
            note=f"each: {each(f'{t:.1f}' for t in takeover)}; {moved} job(s) taken over, lease {LEASE_S:g} s",
        ),
    ]
