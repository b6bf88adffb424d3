"""Scale: a 100k-job manifest, hundreds of simulated agents, and proof that no job is lost or doubled.

The controller's sync and the agents run as separate processes (so each one's
memory is its own): first ``controller`` syncs the manifest into an empty
server, then ``agents`` opens one connection per simulated agent and drains
the backlog through the real claim protocol. Afterwards every record is read
back: each job must be completed, claimed exactly once (attempt 1), and named
exactly once in the agents' completion lists.

Roles run as ``python -m bench.scale controller|agents --url URL ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.env import fleet_env, rss_mib
from bench.report import Row
from bench.simagent import run_agents
from bench.sync import manifest_text
from trainfleet.broker.connection import Broker
from trainfleet.broker.provision import ensure_consumer
from trainfleet.broker.records import load_records
from trainfleet.broker.schema import JobStatus
from trainfleet.broker.settings import Settings
from trainfleet.controller.controller import Controller
from trainfleet.controller.manifest import parse_manifest

REPO = Path(__file__).resolve().parent.parent


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def controller_role(url: str, jobs: int) -> dict:
    started = time.perf_counter()
    manifest = parse_manifest(manifest_text(jobs), file=f"scale-{jobs}.toml")
    parse_s = time.perf_counter() - started
    broker = await Broker.connect(Settings(url=url), name="scale-controller", provision=True)
    controller = Controller(broker.settings, handle_signals=False)
    controller.broker = broker
    try:
        started = time.perf_counter()
        report = await controller.sync(manifest)
        sync_s = time.perf_counter() - started
        # One reconcile pass over the whole pending backlog: what the controller does every reconcile_s.
        started = time.perf_counter()
        await controller.reconcile()
        reconcile_s = time.perf_counter() - started
    finally:
        await broker.close()
    return {
        "parse_s": parse_s,
        "sync_s": sync_s,
        "created": len(report.created),
        "reconcile_s": reconcile_s,
        "peak_rss_mib": _peak_rss_mib(),
    }


async def agents_role(url: str, agents: int, jobs: int) -> dict:
    before = rss_mib()
    elapsed, sims = await run_agents(Settings(url=url), agents, jobs)
    done = Counter(job for a in sims for job in a.completed)
    return {
        "elapsed_s": elapsed,
        "agents": agents,
        "completed": sum(done.values()),
        "unique": len(done),
        "doubled": sum(1 for n in done.values() if n > 1),
        "dup_tickets": sum(a.dropped for a in sims),
        "lost_cas": sum(a.lost_cas for a in sims),
        "rss_before_mib": before,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _role(args: list[str], out: Path, timeout_s: float) -> dict:
    subprocess.run(
        [sys.executable, "-m", "bench.scale", *args, "--json", str(out)], cwd=REPO, check=True, timeout=timeout_s
    )
    return json.loads(out.read_text())


async def _verify(broker: Broker, jobs: int) -> tuple[Counter, int]:
    records = await load_records(broker)
    states = Counter(s.record.status.value for s in records.values())
    reclaimed = sum(1 for s in records.values() if s.record.attempt != 1)
    if len(records) != jobs or states[JobStatus.COMPLETED.value] != jobs or reclaimed:
        raise RuntimeError(f"scale run: {len(records)} records, states {dict(states)}, {reclaimed} claimed twice")
    return states, reclaimed


async def run(jobs: int, agents: int, *, timeout_s: float = 3600) -> list[Row]:
    async with fleet_env() as env:
        await ensure_consumer(env.broker.js, env.broker.settings, "cpu")
        url = env.server.url
        ctl = await asyncio.to_thread(
            _role, ["controller", "--url", url, "--jobs", str(jobs)], env.workdir / "controller.json", timeout_s
        )
        server_after_sync = rss_mib(env.server.proc.pid)
        ag = await asyncio.to_thread(
            _role,
            ["agents", "--url", url, "--agents", str(agents), "--jobs", str(jobs)],
            env.workdir / "agents.json",
            timeout_s,
        )
        server_peak = rss_mib(env.server.proc.pid)
        await _verify(env.broker, jobs)
    if ag["unique"] != jobs or ag["doubled"]:
        raise RuntimeError(f"scale run: agents completed {ag['unique']} distinct of {jobs}, {ag['doubled']} twice")
    label = f"{jobs // 1000}k" if jobs >= 1000 else str(jobs)
    per_agent = (ag["peak_rss_mib"] - ag["rss_before_mib"]) / agents
    return [
        Row(
            "scale",
            f"scale: manifest sync, {label} jobs",
            ctl["parse_s"] + ctl["sync_s"],
            "s",
            note=f"parse {ctl['parse_s']:.1f} s + sync {ctl['sync_s']:.1f} s ({jobs / ctl['sync_s']:.0f} jobs/s)",
        ),
        Row(
            "scale",
            f"scale: one reconcile pass, {label} pending jobs",
            ctl["reconcile_s"],
            "s",
            note="every record and every queued ticket read once",
        ),
        Row("scale", f"scale: controller peak RSS ({label} jobs)", ctl["peak_rss_mib"], "MiB"),
        Row(
            "scale",
            f"scale: {agents} agents' process peak RSS",
            ag["peak_rss_mib"],
            "MiB",
            note=f"{agents} connections in one process, ~{per_agent:.2f} MiB per agent",
        ),
        Row(
            "scale",
            f"scale: claim → complete, {agents} agents, {label} backlog",
            jobs / ag["elapsed_s"],
            "jobs/s",
            note=f"drained in {ag['elapsed_s']:.0f} s",
        ),
        Row(
            "scale",
            "scale: jobs lost / doubled",
            0,
            "jobs",
            note=f"{jobs} completed, all attempt 1, {ag['dup_tickets']} duplicate tickets dropped",
        ),
        Row(
            "scale",
            "scale: nats-server RSS after sync / peak",
            server_after_sync,
            "MiB",
            note=f"peak {server_peak:.0f} MiB",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("role", choices=["controller", "agents"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.role == "controller":
        result = asyncio.run(controller_role(args.url, args.jobs))
    else:
        result = asyncio.run(agents_role(args.url, args.agents, args.jobs))
    args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
