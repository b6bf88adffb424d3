"""Control verbs at fleet size: `trainfleet requeue`'s request, by full id and by name, at 1k and 100k jobs.

A fresh server per size is seeded straight through NATS (every job completed, so each can
be requeued once: spec and record writes pipelined, as a sync would leave them, without
running one). A controller in this process serves ``ctl.*`` (no reconcile loop: only the
verbs are measured); the requests go through the service as an operator's would
(``ctl.requeue`` → resolve → CAS → ticket → reply). Beside them, in the same run and on the
same server, the baseline: a bare KV get + update(last=revision) of one record, what a
requeue must do at least. And what each requeue read before issue 17 item 6: every spec
and every record (``resolve_job`` over ``load_jobs``), timed alone.

Run as ``python -m bench --only control`` (sizes: 1k and the scale run's job count).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field

from bench.env import fleet_env, noop_spec, rss_mib
from bench.report import Row, median, percentile
from trainfleet.broker.connection import Broker
from trainfleet.broker.control import request
from trainfleet.broker.jobs import load_jobs, resolve_job
from trainfleet.broker.schema import JobRecord, JobStatus, encode
from trainfleet.broker.specs import put_spec
from trainfleet.controller.controller import Controller


async def seed(broker: Broker, n: int, *, concurrency: int = 512) -> list[tuple[str, str]]:
    """``n`` completed jobs (spec + record), many writes in flight; their (name, id)."""
    nonce, now = uuid.uuid4().hex, time.time()
    specs = [noop_spec(i, nonce, name="ctl") for i in range(n)]
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        spec = specs[i]
        rec = JobRecord(
            job_id=spec.job_id,
            status=JobStatus.COMPLETED,
            attempt=1,
            offered=("cpu",),
            created_at=now,
            updated_at=now,
            started_at=now - 2,
            finished_at=now - 1,
        )
        async with sem:
            await put_spec(broker, spec, None)
            await broker.jobs.create(spec.job_id, encode(rec))

    await asyncio.gather(*(one(i) for i in range(n)))
    return [(s.name, s.job_id) for s in specs]


async def _timed(samples: list[float], op: Awaitable[object]) -> None:
    started = time.perf_counter()
    await op
    samples.append((time.perf_counter() - started) * 1000)


@dataclass
class Measured:
    """One fleet size's samples, in ms."""

    n: int
    seed_s: float = 0.0
    by_id: list[float] = field(default_factory=list)
    by_name: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    before: list[float] = field(default_factory=list)
    first_name_ms: float = 0.0
    index_rss_mib: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.n // 1000}k" if self.n >= 1000 else str(self.n)


async def measure(n: int, samples: int, before_samples: int) -> Measured:
    out = Measured(n)
    async with fleet_env() as env:
        broker = env.broker
        started = time.perf_counter()
        jobs = await seed(broker, n)
        out.seed_s = time.perf_counter() - started
        ctl = Controller(env.settings, handle_signals=False)
        await ctl.start()
        try:
            names = broker.names
            # The baseline's record: the last job's, written back as it is each time.
            base_id = jobs[-1][1]
            # Requeue each job once (a requeued job is pending: not requeueable again).
            first_name = jobs[0][0]
            rss_before = rss_mib()
            started = time.perf_counter()
            await request(broker.nc, names, "requeue", {"job": first_name})
            out.first_name_ms = (time.perf_counter() - started) * 1000
            out.index_rss_mib = rss_mib() - rss_before
            cursor = 1
            for _ in range(samples):
                await _timed(out.by_id, request(broker.nc, names, "requeue", {"job": jobs[cursor][1]}))
                await _timed(out.by_name, request(broker.nc, names, "requeue", {"job": jobs[cursor + 1][0]}))
                cursor += 2

                async def get_update() -> None:
                    entry = await broker.jobs.get(base_id)
                    await broker.jobs.update(base_id, entry.value or b"", last=entry.revision)

                await _timed(out.bare, get_update())
            # What each requeue read before: every spec and every record, then a lookup.
            for i in range(before_samples):
                await _timed(out.before, _resolve_over_every_job(broker, jobs[cursor + i][1]))
        finally:
            await ctl.stop()
    return out


async def _resolve_over_every_job(broker: Broker, ref: str) -> None:
    resolve_job(await load_jobs(broker), ref)


async def run(sizes: list[int], samples: int = 200, before_samples: int = 3) -> list[Row]:
    results = [await measure(n, samples, before_samples) for n in sizes]
    rows: list[Row] = []
    for r in results:
        for what, got in (("full id", r.by_id), ("name", r.by_name)):
            for pct in (50, 99):
                rows.append(
                    Row(
                        "control",
                        f"requeue by {what} p{pct}, {r.label} jobs",
                        percentile(got, pct),
                        "ms",
                        baseline=percentile(r.bare, pct),
                        baseline_label="KV get + update",
                        note=f"ctl.requeue through the service, {len(got)} requests; seeded in {r.seed_s:.1f} s",
                    )
                )
        rows.append(
            Row(
                "control",
                f"requeue by name, first (builds the name index), {r.label} jobs",
                r.first_name_ms,
                "ms",
                note=f"every spec read once; process RSS +{r.index_rss_mib:.0f} MiB",
            )
        )
        rows.append(
            Row(
                "control",
                f"before: every spec and record read per requeue, {r.label} jobs",
                median(r.before),
                "ms",
                baseline=percentile(r.by_id, 50),
                baseline_label="requeue by id p50 now",
                note=f"resolve_job over load_jobs alone, median of {len(r.before)}",
            )
        )
    if len(results) > 1:
        small, big = results[0], results[-1]
        for what, attr in (("full id", "by_id"), ("name", "by_name")):
            rows.append(
                Row(
                    "control",
                    f"requeue by {what} p50, {big.label} / {small.label} jobs",
                    percentile(getattr(big, attr), 50) / percentile(getattr(small, attr), 50),
                    "×",
                    baseline=percentile(big.bare, 50) / percentile(small.bare, 50),
                    baseline_label="same for KV get + update",
                    note="1.0: no growth with the fleet",
                )
            )
    return rows
