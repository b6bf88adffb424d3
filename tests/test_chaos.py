"""Chaos: hundreds of short jobs, agents SIGKILLed and restarted at random; every job completes once."""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from trainfleet.broker.schema import JobStatus

from .conftest import (
    FleetProc,
    KVAudit,
    as_role,
    linreg_manifest,
    records,
    stock_artifacts,
    trainer_starts,
    wait_terminal,
)

JOBS = int(os.environ.get("TRAINFLEET_CHAOS_JOBS", "200"))
AGENTS = 4
CHAOS_S = 40.0


async def chaos(agents: list[FleetProc], rng: random.Random, until: float, done: asyncio.Event) -> None:
    while time.monotonic() < until and not done.is_set():
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        victim = rng.choice(agents)
        victim.kill()
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        victim.start()


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_random_agent_kills_lose_nothing_and_train_nothing_twice(fleet, broker, settings, tmp_path):
    rng = random.Random(int(os.environ.get("TRAINFLEET_CHAOS_SEED", "20261123")))
    settings = settings.with_(lease_s=3.0, heartbeat_s=1.0)
    fleet.settings = settings
    # Kills cluster in time, so one job can be hit on two or three runs in a row: with the default
    # three attempts such a job fails on purpose (test_faults covers that). Here every job has
    # room enough that "lost" can only mean lost.
    manifest = linreg_manifest(JOBS, epochs=300, extra="[settings]\nmax_attempts = 10\n")
    ids = [s.job_id for s in manifest.jobs]
    from trainfleet.controller.controller import Controller

    fleet.controller = Controller(as_role(settings, "controller"), handle_signals=False)
    ctl = await fleet.start_controller()
    audit = await KVAudit(broker).start()
    await ctl.sync(manifest)
    agents = [FleetProc.agent(settings, f"c{i}", tmp_path) for i in range(AGENTS)]
    for agent in agents:
        agent.start()
    done = asyncio.Event()
    chaos_task = asyncio.create_task(chaos(agents, rng, time.monotonic() + CHAOS_S, done))
    try:
        recs = await wait_terminal(broker, ids, timeout_s=420)
    finally:
        done.set()
        await chaos_task
        for agent in agents:
            agent.stop()
        await audit.stop()
    completions = audit.completions()
    lost = [i for i in ids if recs[i].status != JobStatus.COMPLETED]
    doubled = [i for i in ids if completions.get((i, 1), 0) > 1]
    starts = await trainer_starts(broker, ids)
    referenced = {r.artifact for r in (await records(broker)).values()}
    stored = {o.name for o in await (await stock_artifacts(broker)).list()}
    print(
        f"\nchaos: {JOBS} jobs, {AGENTS} agents, {sum(a.kills for a in agents)} SIGKILLs | "
        f"lost={len(lost)} double-accepted={len(doubled)} "
        f"fenced={sum(a.log_count('fenced (lease lost)') for a in agents)} (orphan uploads={len(stored - referenced)}) "
        f"trainer-starts={sum(starts.values())} (re-runs={sum(starts.values()) - len(starts)}) "
        f"max attempts={max(r.attempt for r in recs.values())}"
    )
    assert sum(a.kills for a in agents) >= 5
    # Every agent the test did not SIGKILL exited cleanly on SIGTERM, without a word about the
    # connection it closed itself (the server never went away).
    assert {a.name: a.exits for a in agents if a.exits} == {}
    assert sum(a.log_count("disconnected from NATS") for a in agents) == 0
    assert lost == [] and doubled == [], {i[:12]: (recs[i].status.value, recs[i].attempt, recs[i].reason) for i in lost}
    assert all(completions.get((i, 1)) == 1 for i in ids)
    assert all(starts.get(i, 0) >= 1 for i in ids)
