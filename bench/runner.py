"""``python -m bench``: run the benchmarks, print each figure beside its baseline, then one table."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import control, durability, failover, fleet, monitor, scale, sync, throughput, transfer
from bench.env import machine_facts
from bench.report import Row, format_table

MIB = 1 << 20


@dataclass(frozen=True)
class Profile:
    """How big each benchmark runs; --quick and --full pick another one."""

    latency_samples: int
    ks: tuple[int, ...]
    throughput_jobs: int
    sync_sizes: tuple[int, ...]
    artifact_sizes: tuple[int, ...]
    stock_max: int
    artifact_reps: int
    rtt_sizes: tuple[int, ...]
    rtt_stock_size: int
    durability_publishes: int
    durability_put: int
    scale_jobs: int
    scale_agents: int
    failover_rounds: int
    monitor_sizes: tuple[int, ...]


PROFILES = {
    "quick": Profile(
        latency_samples=3,
        ks=(1, 10, 100),
        throughput_jobs=100,
        sync_sizes=(50,),
        artifact_sizes=(1 * MIB, 8 * MIB),
        stock_max=8 * MIB,
        artifact_reps=1,
        rtt_sizes=(4 * MIB,),
        rtt_stock_size=0,
        durability_publishes=100,
        durability_put=4 * MIB,
        scale_jobs=300,
        scale_agents=20,
        failover_rounds=1,
        monitor_sizes=(2000,),
    ),
    "default": Profile(
        latency_samples=50,
        ks=(1, 10, 100),
        throughput_jobs=1000,
        sync_sizes=(1000, 10000),
        # 100 MiB and 1 GiB beside the server's ceiling: issue 17's rows (a 1 GiB transfer
        # takes ~1-3 s, ~1 min for all the 1 GiB rows)
        artifact_sizes=(1 * MIB, 100 * MIB, 1 << 30),
        stock_max=100 * MIB,
        artifact_reps=3,
        rtt_sizes=(100 * MIB, 1 << 30),
        rtt_stock_size=16 * MIB,
        durability_publishes=2000,
        durability_put=64 * MIB,
        scale_jobs=100_000,
        scale_agents=200,
        failover_rounds=3,
        monitor_sizes=(10_000, 100_000),
    ),
}
PROFILES["full"] = PROFILES["default"]  # (--full adds the scale run; the sizes are the same)

Bench = Callable[[Profile], Coroutine[Any, Any, list[Row]]]
BENCHES: dict[str, tuple[str, Bench]] = {
    "fleet": (
        "ticket → claimed / trainer start latency and per-job overhead (real Agent)",
        lambda p: fleet.run(p.latency_samples),
    ),
    "throughput": (
        "claim → complete throughput, K simulated agents",
        lambda p: throughput.run(list(p.ks), p.throughput_jobs),
    ),
    "sync": ("manifest sync time", lambda p: sync.run(list(p.sync_sizes))),
    "artifacts": (
        "artifact upload/download vs plain copy",
        lambda p: transfer.run(list(p.artifact_sizes), stock_max=p.stock_max, reps=p.artifact_reps),
    ),
    "rtt": (
        "artifact transfer through a 20 ms RTT proxy",
        lambda p: transfer.run_rtt(list(p.rtt_sizes), rtt_s=0.020, stock_size=p.rtt_stock_size, reps=p.artifact_reps),
    ),
    "durability": (
        "sync_interval always vs default",
        lambda p: durability.run(p.durability_publishes, p.durability_put),
    ),
    "failover": (
        "record-write gap and takeover when the node leading the jobs store dies (3-node cluster)",
        lambda p: failover.run(p.failover_rounds),
    ),
    "monitor": (
        "the Textual monitor over N jobs: start-up, key → repaint under 100 record changes/s, counts, RSS",
        lambda p: monitor.run(list(p.monitor_sizes)),
    ),
    "control": (
        "trainfleet requeue (ctl.requeue) by id and by name at 1k and the scale run's job count",
        # (sizes from the profile's scale run: 1k beside 100k by default, the quick run's 300 alone)
        lambda p: control.run(sorted({min(1000, p.scale_jobs), p.scale_jobs}), samples=max(20, 4 * p.latency_samples)),
    ),
    "scale": (
        "100k-job manifest, hundreds of agents (runs with --full or --only scale)",
        lambda p: scale.run(p.scale_jobs, p.scale_agents),
    ),
}
DEFAULT_SET = [name for name in BENCHES if name != "scale"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smallest sizes (a smoke run, well under a minute)")
    size.add_argument("--full", action="store_true", help="adds the 100k-job scale run")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(BENCHES), metavar="NAME", help=f"run only these: {', '.join(BENCHES)}"
    )
    parser.add_argument("--scale-jobs", type=int, help="jobs in the scale run (default 100000)")
    parser.add_argument("--scale-agents", type=int, help="simulated agents in the scale run (default 200)")
    parser.add_argument("--json", type=Path, help="also write facts and rows as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    profile = PROFILES["quick" if args.quick else "full" if args.full else "default"]
    overrides = {k: v for k, v in (("scale_jobs", args.scale_jobs), ("scale_agents", args.scale_agents)) if v}
    profile = Profile(**{**profile.__dict__, **overrides})
    names = args.only or (DEFAULT_SET + ["scale"] if args.full else DEFAULT_SET)
    facts = machine_facts()
    print("trainfleet benchmarks: " + ", ".join(f"{k}={v}" for k, v in facts.items()), flush=True)
    if facts["load_avg_1m"] > 0.5 * (facts["cpus"] or 1):
        print(
            f"warning: load average {facts['load_avg_1m']} — other work on this machine skews the figures", flush=True
        )
    rows: list[Row] = []
    started = time.perf_counter()
    for name in names:
        title, bench = BENCHES[name]
        print(f"\n== {name}: {title}", flush=True)
        t0 = time.perf_counter()
        got = asyncio.run(bench(profile))
        print(format_table(got), flush=True)
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
        rows += got
    print(f"\n== results ({time.perf_counter() - started:.0f} s; ratio = measured / baseline)\n", flush=True)
    print(format_table(rows), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"facts": facts, "profile": profile.__dict__, "rows": [r.to_dict() for r in rows]}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
