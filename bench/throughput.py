"""Claim → complete throughput with K simulated agents and no-op trainers.

Baseline, same run and same K: the bare work queue (fetch and ack each ticket,
no record read, no CAS), which is what JetStream alone costs per ticket.
"""

from __future__ import annotations

import uuid
from collections import Counter

from bench.env import create_jobs, fleet_env, noop_spec
from bench.report import Row
from bench.simagent import run_agents
from trainfleet.broker.provision import ensure_consumer
from trainfleet.broker.schema import Ticket, encode


async def _bare(env, jobs: int, agents: int) -> float:
    names = env.broker.names
    for i in range(jobs):
        ticket = Ticket(job_id=f"bare-{i}", generation=1, klass="cpu")
        await env.broker.js.publish(names.jobs_subject("cpu"), encode(ticket))
    elapsed, sims = await run_agents(env.settings, agents, jobs, bare=True)
    done = sum(len(a.completed) for a in sims)
    if done != jobs:
        raise RuntimeError(f"bare baseline: {done} of {jobs} tickets acked")
    return jobs / elapsed


async def _fleet(env, jobs: int, agents: int) -> tuple[float, int]:
    specs = [noop_spec(i, uuid.uuid4().hex) for i in range(jobs)]
    await create_jobs(env.broker, specs)
    elapsed, sims = await run_agents(env.settings, agents, jobs)
    done = Counter(job for a in sims for job in a.completed)
    doubled = sum(1 for n in done.values() if n > 1)
    if len(done) != jobs or doubled:
        raise RuntimeError(f"K={agents}: {len(done)} of {jobs} jobs completed, {doubled} completed twice")
    return jobs / elapsed, sum(a.dropped + a.lost_cas for a in sims)


async def run(ks: list[int], jobs: int) -> list[Row]:
    rows = []
    for k in ks:
        async with fleet_env() as env:
            await ensure_consumer(env.broker.js, env.broker.settings, "cpu")
            bare = await _bare(env, jobs, k)
            rate, dropped = await _fleet(env, jobs, k)
        rows.append(
            Row(
                "throughput",
                f"claim → complete, K={k} agents",
                rate,
                "jobs/s",
                bare,
                "bare fetch+ack, same K",
                note=f"{jobs} jobs, 0 lost, 0 doubled, {dropped} dup tickets",
            )
        )
    return rows
