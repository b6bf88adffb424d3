"""Ticket → claimed → trainer-start latency and per-job overhead, through the real Agent.

One agent (the shipped :class:`~trainfleet.agent.agent.Agent`, a stub
capability) serves jobs whose trainer is a no-op Python script that notes when
it started. Jobs are published one at a time and each is watched through the
jobs KV until it completes. Baselines, same run: a bare JetStream
publish → pull-fetch (the floor under any delivery); the claim floor (issue 17): plain
nats-py publish → fetch → KV get → KV update(last=revision), since a durable claim needs at
least one fsynced compare-and-swap after the fetch, and its variant whose ticket already
carries the record's revision (no get); and the same trainer spawned directly (the floor
under any trainer start and any job). The delivery and claim baselines are sampled in turns
with the agent's jobs (:func:`interleaved`), so the ratios compare the same minutes.

``python -m bench.fleet --profile`` adds where the time goes: each step of the agent's claim
and of the held job, timed from the ticket's publish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js import api

from bench.env import Env, bench_capability, fleet_env, machine_facts, noop_spec, publish_ticket
from bench.report import Row, format_table, percentile
from trainfleet.agent.agent import Agent, AgentOptions
from trainfleet.agent.trainer import build_argv
from trainfleet.broker.schema import JobRecord, JobStatus, decode, encode
from trainfleet.broker.specs import put_spec


@dataclass
class Sample:
    claimed_s: float
    started_s: float
    completed_s: float
    # --profile: each step's first mark after the ticket was sent, in seconds after it
    steps: dict[str, float] = field(default_factory=dict)


class StepLog:
    """Collects the agent's step marks (Claimer.on_step) for the job being timed."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def __call__(self, job_id: str, name: str) -> None:
        self.marks.append((name, time.time()))

    def since(self, sent: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, at in self.marks:
            if at >= sent:
                out.setdefault(name, at - sent)
        return out


async def _watch_job(env: Env, record: JobRecord, timeout_s: float = 60.0, steps: StepLog | None = None) -> Sample:
    """Publish the job's ticket and time the record's transitions as the KV reports them."""
    watcher = await env.broker.jobs.watch(record.job_id)
    seen: dict[JobStatus, float] = {}
    try:
        # As in the claim floor: the watcher's first delivery (the current, pending record) is
        # taken before the ticket is sent, so only the agent's own writes arrive while timing.
        while await watcher.updates(timeout=5) is None:
            pass
        if steps is not None:
            steps.marks.clear()
        sent = await publish_ticket(env.broker, record)
        acked = time.time()
        deadline = time.monotonic() + timeout_s
        while JobStatus.COMPLETED not in seen:
            entry = await watcher.updates(timeout=max(0.1, deadline - time.monotonic()))
            if entry is None or entry.value is None:
                continue
            current: JobRecord = decode(entry.value, JobRecord)
            seen.setdefault(current.status, time.time())
            if current.status in (JobStatus.FAILED, JobStatus.CANCELLED):
                raise RuntimeError(f"bench job {record.job_id[:12]} {current.status}: {current.reason}")
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
    started = float(current.metrics.get("t_start", "nan"))
    sample = Sample(
        claimed_s=seen.get(JobStatus.CLAIMED, seen[JobStatus.COMPLETED]) - sent,
        started_s=started - sent,
        completed_s=seen[JobStatus.COMPLETED] - sent,
    )
    if steps is not None:
        sample.steps = steps.since(sent)
        sample.steps["ticket PubAck (bench)"] = acked - sent
        for status, at in seen.items():
            sample.steps[f"{status.value} seen by the bench's watcher"] = at - sent
        sample.steps["running CAS sent (record's started_at)"] = (current.started_at or math.nan) - sent
        sample.steps["trainer's first line (its t_start)"] = started - sent
    return sample


async def fleet_samples(env: Env, *, profile: bool = False) -> AsyncIterator[Sample]:
    """One job through the real agent per step: the ticket → claimed → trainer start → completed
    timings (and with ``profile``, the steps of the claim and of the held job)."""
    agent = Agent(
        env.settings,
        AgentOptions(host_id="bench-agent", handle_signals=False, workdir=str(env.workdir / "agent")),
        capability=bench_capability("bench-agent"),
    )
    steps = StepLog() if profile else None
    agent.claimer.on_step = steps
    task = asyncio.create_task(agent.run())
    nonce = uuid.uuid4().hex
    try:
        for i in itertools.count():
            spec = noop_spec(i, nonce)
            await put_spec(env.broker, spec, None)
            record = JobRecord(
                job_id=spec.job_id,
                klass="cpu",
                offered=("cpu",),
                created_at=time.time(),
                queued_at=time.time(),
            )
            await env.broker.jobs.create(spec.job_id, encode(record))
            # A random gap over a whole poll cycle (one long-poll per class the agent
            # serves) so arrivals do not phase-lock with it.
            await asyncio.sleep(random.uniform(0.0, 2 * env.settings.fetch_timeout_s))
            yield await _watch_job(env, record, steps=steps)
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 60)


async def bare_delivery(env: Env) -> AsyncIterator[float]:
    """Publish → a waiting pull fetch returns it, on a bare work-queue stream (no KV, no agent)."""
    js = env.broker.js
    await js.add_stream(
        api.StreamConfig(
            name="BENCH_BARE",
            subjects=["bench.bare"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
        )
    )
    sub = await js.pull_subscribe("bench.bare", durable="bare", stream="BENCH_BARE")
    try:
        while True:
            fetch = asyncio.create_task(sub.fetch(1, timeout=10))
            await asyncio.sleep(0.02)  # let the pull request reach the server first
            sent = time.time()
            await js.publish("bench.bare", b"ticket")
            msgs = await fetch
            elapsed = time.time() - sent
            await msgs[0].ack()
            yield elapsed
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream("BENCH_BARE")


async def claim_floor(env: Env, *, with_get: bool) -> AsyncIterator[float]:
    """The least a durable claim can cost, with plain nats-py on the same server: publish a
    ticket → a waiting pull fetch returns it → KV get of the record (skipped ``with_get=False``:
    the ticket carries the revision) → KV update(last=revision). Timed like ticket → claimed:
    until a watcher of the key sees the claimed value."""
    js = env.broker.js
    tag = "get" if with_get else "rev"
    stream, subject = f"BENCH_FLOOR_{tag.upper()}", f"bench.floor.{tag}"
    await js.add_stream(
        api.StreamConfig(
            name=stream,
            subjects=[subject],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
        )
    )
    kv = await js.create_key_value(
        api.KeyValueConfig(bucket=f"bench_floor_{tag}", history=1, storage=api.StorageType.FILE)
    )
    sub = await js.pull_subscribe(subject, durable=f"floor_{tag}", stream=stream)
    try:
        for i in itertools.count():
            key = f"job{i}"
            record = JobRecord(
                job_id=uuid.uuid4().hex, klass="cpu", offered=("cpu",), created_at=time.time(), queued_at=time.time()
            )
            rev = await kv.create(key, encode(record))
            claimed = encode(record.evolve(status=JobStatus.CLAIMED, claimed_by="bench-floor", attempt=1))
            watcher = await kv.watch(key)
            try:
                # The watcher first delivers the current value (the pending record).
                while (entry := await watcher.updates(timeout=5)) is None:
                    pass
                fetch = asyncio.create_task(sub.fetch(1, timeout=10))
                await asyncio.sleep(0.02)  # let the pull request reach the server first
                sent = time.time()
                await js.publish(subject, json.dumps({"key": key, "rev": rev}).encode())
                msgs = await fetch
                ticket = json.loads(msgs[0].data)
                last = (await kv.get(ticket["key"])).revision if with_get else ticket["rev"]
                await kv.update(ticket["key"], claimed, last=last)
                while True:
                    entry = await watcher.updates(timeout=5)
                    if entry is not None and entry.value == claimed:
                        break
                elapsed = time.time() - sent
                await msgs[0].ack()
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()
            yield elapsed
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
            await js.delete_key_value(f"bench_floor_{tag}")


async def interleaved(env: Env, count: int, *, profile: bool = False) -> dict[str, list[Any]]:
    """``count`` samples of each kind (after one warm-up each), taken in turns: one bare
    delivery, one claim floor, one revision-in-ticket floor, one job through the agent, again
    and again, so a change in the machine's load (other work, one fsync's jitter) falls on the
    baselines and on trainfleet alike instead of on whichever ran during it."""
    samplers: dict[str, AsyncIterator[Any]] = {
        "bare": bare_delivery(env),
        "floor": claim_floor(env, with_get=True),
        "floor_rev": claim_floor(env, with_get=False),
        "fleet": fleet_samples(env, profile=profile),
    }
    out: dict[str, list[Any]] = {name: [] for name in samplers}
    try:
        for i in range(count + 1):
            for name, sampler in samplers.items():
                value = await anext(sampler)
                if i:  # the first of each warms up its consumer, bucket or agent
                    out[name].append(value)
    finally:
        for sampler in samplers.values():
            await sampler.aclose()  # type: ignore[attr-defined]
    return out


async def direct_trainer(count: int) -> tuple[list[float], list[float]]:
    """The no-op trainer spawned directly: (spawn → its first line, spawn → exit)."""
    starts, totals = [], []
    nonce = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="bench-direct-") as tmp:
        for i in range(count):
            out = Path(tmp) / str(i)
            sent = time.time()
            # The same command line and output variable the agent gives it
            proc = await asyncio.create_subprocess_exec(
                *build_argv(noop_spec(i, nonce), out), env={**os.environ, "TRAINFLEET_OUTPUT_DIR": str(out)}
            )
            await proc.wait()
            totals.append(time.time() - sent)
            starts.append(json.loads((out / "metrics.json").read_text())["t_start"] - sent)
    return starts, totals


def _ms(values: list[float], pct: float) -> float:
    return percentile(values, pct) * 1000


async def run(samples: int) -> list[Row]:
    async with fleet_env() as env:
        taken = await interleaved(env, samples)
    bare, floor, floor_rev, fleet = taken["bare"], taken["floor"], taken["floor_rev"], taken["fleet"]
    direct_start, direct_total = await direct_trainer(samples)
    claimed = [s.claimed_s for s in fleet]
    started = [s.started_s for s in fleet]
    completed = [s.completed_s for s in fleet]
    rows = []
    for pct in (50, 99):
        rows.append(
            Row(
                "fleet",
                f"ticket → claimed p{pct}",
                _ms(claimed, pct),
                "ms",
                _ms(bare, pct),
                "bare JetStream publish → fetch",
                note=f"n={len(claimed)}",
            )
        )
    for pct in (50, 99):
        rows.append(
            Row(
                "fleet",
                f"claim floor p{pct}",
                _ms(floor, pct),
                "ms",
                _ms(bare, pct),
                "bare JetStream publish → fetch",
                note=f"nats-py publish → fetch → KV get → update(last=rev), n={len(floor)}",
            )
        )
    for pct in (50, 99):
        rows.append(
            Row(
                "fleet",
                f"claim floor, revision in ticket p{pct}",
                _ms(floor_rev, pct),
                "ms",
                _ms(bare, pct),
                "bare JetStream publish → fetch",
                note=f"nats-py publish → fetch → update(last=rev), n={len(floor_rev)}",
            )
        )
    for pct, target in ((50, 1.3), (99, 2.0)):
        rev_ratio = _ms(claimed, pct) / _ms(floor_rev, pct)
        rows.append(
            Row(
                "fleet",
                f"ticket → claimed p{pct} vs claim floor",
                _ms(claimed, pct),
                "ms",
                _ms(floor, pct),
                "claim floor: fetch → get → CAS",
                note=f"target ≤ {target}x; {rev_ratio:.2f}x the revision-in-ticket floor",
            )
        )
    for pct in (50, 99):
        rows.append(
            Row(
                "fleet",
                f"ticket → trainer start p{pct}",
                _ms(started, pct),
                "ms",
                _ms(direct_start, pct),
                "spawn → start, trainer run directly",
            )
        )
    mean_fleet = sum(completed) / len(completed) * 1000
    mean_direct = sum(direct_total) / len(direct_total) * 1000
    rows.append(
        Row(
            "fleet",
            "job end to end (ticket → completed), mean",
            mean_fleet,
            "ms",
            mean_direct,
            "same trainer run directly",
            note=f"overhead {mean_fleet - mean_direct:.0f} ms/job",
        )
    )
    return rows


def profile_table(samples: list[Sample]) -> str:
    """Where the time goes: each step's time after the ticket was sent (p50, max) and since
    the step before it (p50 over the jobs that passed both), in the order the steps happen."""
    names = {name for s in samples for name in s.steps}
    offsets = {n: [s.steps[n] for s in samples if n in s.steps and not math.isnan(s.steps[n])] for n in names}
    order = sorted((n for n in names if offsets[n]), key=lambda n: percentile(offsets[n], 50))
    lines = [
        "| step | jobs | after send p50 | max | since the step before p50 | max |",
        "|---|---|---|---|---|---|",
    ]
    for i, name in enumerate(order):
        gaps = []
        if i:
            prev = order[i - 1]
            gaps = [s.steps[name] - s.steps[prev] for s in samples if name in s.steps and prev in s.steps]
        gap = f"{_ms(gaps, 50):.2f} | {max(gaps) * 1000:.2f}" if gaps else "— | —"
        after = f"{_ms(offsets[name], 50):.2f} | {max(offsets[name]) * 1000:.2f}"
        lines.append(f"| {name} | {len(offsets[name])} | {after} | {gap} |")
    return "\n".join(lines)


async def profile(samples: int) -> None:
    """The rows of this bench plus the claim path's step profile (``python -m bench.fleet --profile``)."""
    async with fleet_env() as env:
        taken = await interleaved(env, samples, profile=True)
    floor, floor_rev, fleet = taken["floor"], taken["floor_rev"], taken["fleet"]
    claimed = [s.claimed_s for s in fleet]
    rows = [
        Row("fleet", f"ticket → claimed p{pct} vs claim floor", _ms(claimed, pct), "ms", _ms(floor, pct), "claim floor")
        for pct in (50, 99)
    ]
    rows += [
        Row(
            "fleet",
            f"ticket → claimed p{pct} vs revision-in-ticket floor",
            _ms(claimed, pct),
            "ms",
            _ms(floor_rev, pct),
            "claim floor, revision in ticket",
        )
        for pct in (50, 99)
    ]
    print(format_table(rows))
    print()
    print(f"Where the time goes (ms; ticket sent = 0; n={len(fleet)}):")
    print(profile_table(fleet))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=profile.__doc__)
    parser.add_argument("--profile", action="store_true", required=True, help="print the claim path's step profile")
    parser.add_argument("--samples", type=int, default=50, help="jobs timed (default 50, after one warm-up)")
    args = parser.parse_args(argv)
    facts = machine_facts()
    print("trainfleet fleet profile: " + ", ".join(f"{k}={v}" for k, v in facts.items()), flush=True)
    asyncio.run(profile(args.samples))


if __name__ == "__main__":
    main()
