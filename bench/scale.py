"""Scale: a 100k-job manifest, hundreds to thousands of simulated agents, and proof that no job is
lost or doubled.

The controller's sync and the agents run as separate processes (so each one's
memory is its own): first ``controller`` syncs the manifest into an empty
server, then ``agents`` processes (AGENTS_PER_PROCESS agents each: 2 for 2,000)
open one connection per simulated agent, wait until every process is connected,
and drain the backlog through the real claim protocol, pulling the way the real
agent does (bench/simagent.py, ``--pull agent``: no_wait pulls while tickets wait, one
pull parked on the class while it is empty; ``--pull doorbell`` is the agent's path before
parked pulls: the doorbell and a 100 ms pull when it rang). While they drain, the class consumer's waiting pulls
(against its max_waiting) and the processes' CPU are sampled. Afterwards every
record is read back: each job must be completed, claimed exactly once (attempt 1),
and named exactly once in the agents' completion lists.

Roles run as ``python -m bench.scale controller|agents --url URL ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import resource
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from nats.aio.msg import Msg
from nats.js import api

from bench.env import Env, fleet_env, noop_spec, publish_ticket, rss_mib
from bench.report import Row, percentile
from bench.simagent import PULLS, connect_agents, drive
from bench.sync import manifest_text, raw_parallel
from trainfleet.broker import jsapi
from trainfleet.broker.connection import Broker, settle
from trainfleet.broker.provision import ensure_consumer
from trainfleet.broker.records import load_records
from trainfleet.broker.schema import JobRecord, JobStatus, decode, encode
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import put_spec
from trainfleet.broker.tickets import scan_tickets
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
        # The first pass loads the record cache (a KV watch of every record: cold); the next ones
        # read only the queued tickets and what changed (steady state).
        started = time.perf_counter()
        await controller.reconcile()
        reconcile_s = time.perf_counter() - started
        started = time.perf_counter()
        await controller.reconcile()
        steady_s = time.perf_counter() - started
        # What each pass read before the queued tickets were kept between passes: all of them.
        started = time.perf_counter()
        scanned = len(await scan_tickets(broker))
        scan_s = time.perf_counter() - started
    finally:
        await controller.stop()  # its record cache's watch, then the connection
    return {
        "parse_s": parse_s,
        "sync_s": sync_s,
        "created": len(report.created),
        "reconcile_s": reconcile_s,
        "reconcile_steady_s": steady_s,
        "ticket_scan_s": scan_s,
        "tickets_scanned": scanned,
        "peak_rss_mib": _peak_rss_mib(),
    }


async def agents_role(url: str, agents: int, *, first: int = 0, pull: str = "agent", go: Path) -> dict:
    """``agents`` simulated agents of the whole fleet's (sim-<first>…) in this process. They
    connect, say so (``go`` + ".ready.<first>"), wait for ``go`` to appear, then serve tickets
    until ``go`` + ".stop" appears (the parent decides when the fleet is done)."""
    before = rss_mib()
    sims = await connect_agents(Settings(url=url), agents, first=first, pull=pull)
    # A thousand connections are a large long-lived heap: the collector's full passes over it
    # cost this process more per claim than the claims (2,000 agents, 20k jobs: 1,153 → 1,618
    # claims/s once it is frozen). A real agent has one connection per process.
    gc.collect()
    gc.freeze()
    Path(f"{go}.ready.{first}").write_text(str(rss_mib()))
    while not go.exists():
        await asyncio.sleep(0.01)
    stop = Path(f"{go}.stop")

    async def stopped() -> bool:
        return stop.exists()

    await drive(sims, stopped, poll_s=0.05)
    statuses: Counter = Counter()
    errors: Counter = Counter()
    for a in sims:
        statuses.update(a.statuses)
        errors.update(a.errors)
    return {
        "agents": agents,
        "completed": [job for a in sims for job in a.completed],
        "dup_tickets": sum(a.dropped for a in sims),
        "lost_cas": sum(a.lost_cas for a in sims),
        "statuses": dict(statuses),
        "errors": dict(errors),
        "rss_before_mib": before,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _role(args: list[str], out: Path, timeout_s: float) -> dict:
    subprocess.run(
        [sys.executable, "-m", "bench.scale", *args, "--json", str(out)], cwd=REPO, check=True, timeout=timeout_s
    )
    return json.loads(out.read_text())


# Simulated agents per process: one process per core the machine has is the fewest that use
# every core; past this many agents a process's event loop is the bottleneck, not the server.
AGENTS_PER_PROCESS = 1000


@dataclass
class Drain:
    """What the agent processes and the server did: the backlog's drain, then a trickle of
    tickets to a fleet of idle agents (each ticket rings every agent's doorbell)."""

    results: list[dict]
    elapsed_s: float = 0.0
    max_waiting: int = 0  # the class consumer's outstanding pull requests, most seen while draining
    cap: int = 0  # the class consumer's max_waiting
    server_cpu: float = 0.0  # nats-server's CPU over the drain, % of one core
    agents_cpu: float = 0.0  # all agent processes' CPU over the drain, % of one core
    samples: int = 0
    trickle: list[float] = field(default_factory=list)  # ticket published → acked, ms, idle fleet
    trickle_waiting: int = 0  # most waiting pulls seen during the trickle
    trickle_server_cpu_ms: float = 0.0  # nats-server CPU time per trickled ticket


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


async def _drain(env: Env, url: str, agents: int, pull: str, trickle: int, timeout_s: float) -> Drain:
    """Run ``agents`` simulated agents in as few processes as AGENTS_PER_PROCESS allows, all
    released at once on the backlog, sampling the class consumer and the processes' CPU; then,
    with every agent idle, publish ``trickle`` jobs one at a time and time each to its ack."""
    procs_n = max(1, math.ceil(agents / AGENTS_PER_PROCESS))
    go = env.workdir / "go"
    shares = [agents // procs_n + (1 if i < agents % procs_n else 0) for i in range(procs_n)]
    firsts = [sum(shares[:i]) for i in range(procs_n)]
    outs = [env.workdir / f"agents-{i}.json" for i in range(procs_n)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.scale", "agents", "--url", url, "--agents", str(n)]
            + ["--first", str(first), "--pull", pull, "--go", str(go), "--json", str(out)],
            cwd=REPO,
        )
        for n, first, out in zip(shares, firsts, outs, strict=True)
    ]
    deadline = time.monotonic() + timeout_s
    try:
        while not all(Path(f"{go}.ready.{first}").exists() for first in firsts):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("scale run: an agent process failed before it was ready")
            await asyncio.sleep(0.1)
        drain = Drain([])
        go.write_text("go")
        await _backlog(env, drain, procs, deadline)
        await asyncio.sleep(1.5)  # every agent has found the class empty and sleeps on its doorbell
        await _trickle(env, drain, trickle)
        Path(f"{go}.stop").write_text("stop")
        for p in procs:
            await asyncio.to_thread(p.wait, max(1.0, deadline - time.monotonic()))
        if any(p.returncode for p in procs):
            raise RuntimeError(f"scale run: agent processes exited {[p.returncode for p in procs]}")
        drain.results = [json.loads(out.read_text()) for out in outs]
        return drain
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


async def _consumer(env: Env) -> api.ConsumerInfo:
    names = env.broker.names
    return await env.broker.js.consumer_info(names.jobs_stream, names.consumer("cpu"))


async def _backlog(env: Env, drain: Drain, procs: list[subprocess.Popen], deadline: float) -> None:
    """Until the class consumer has nothing pending and nothing unacked: its waiting pulls, and
    the CPU nats-server and the agent processes spent."""
    server = psutil.Process(env.server.proc.pid)
    agent_procs = [psutil.Process(p.pid) for p in procs]
    server_cpu, agents_cpu = _cpu_s([server]), _cpu_s(agent_procs)
    started = time.monotonic()
    while True:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError("scale run: the agents did not drain the backlog")
        info = await _consumer(env)
        drain.cap = info.config.max_waiting or 0
        drain.max_waiting = max(drain.max_waiting, info.num_waiting or 0)
        drain.samples += 1
        if not info.num_pending and not info.num_ack_pending:
            break
        await asyncio.sleep(0.1)
    drain.elapsed_s = time.monotonic() - started
    drain.server_cpu = 100 * (_cpu_s([server]) - server_cpu) / drain.elapsed_s
    drain.agents_cpu = 100 * (_cpu_s(agent_procs) - agents_cpu) / drain.elapsed_s


async def _trickle(env: Env, drain: Drain, count: int) -> None:
    """``count`` jobs to the idle fleet, one at a time: each ticket goes to one agent's parked
    pull (``agent``), or rings every agent's doorbell and each rung agent sends a pull that waits
    up to RUNG_WAIT_S (``doorbell``). Timed from the ticket's
    publish to its record's completed write (seen on the record's KV subject); the consumer's
    waiting pulls are sampled while the herd's pulls are out."""
    broker = env.broker
    server = psutil.Process(env.server.proc.pid)
    nonce = uuid.uuid4().hex
    server_cpu = _cpu_s([server])
    for i in range(count):
        spec = noop_spec(i, nonce, name="trickle")
        now = time.time()
        rec = JobRecord(
            job_id=spec.job_id, klass="cpu", offered=("cpu",), created_at=now, updated_at=now, queued_at=now
        )
        await put_spec(broker, spec, None)
        await broker.jobs.create(rec.job_id, encode(rec))
        done = asyncio.get_running_loop().create_future()

        async def written(msg: Msg, done: asyncio.Future = done) -> None:
            if msg.data and decode(msg.data, JobRecord).status == JobStatus.COMPLETED and not done.done():
                done.set_result(time.monotonic())

        sub = await broker.nc.subscribe(jsapi.kv_subject(broker.names.jobs_bucket, rec.job_id), cb=written)
        await settle(broker.nc)
        sent = time.monotonic()
        await publish_ticket(broker, rec)
        for at in (0.03, 0.06):
            await asyncio.sleep(max(0.0, sent + at - time.monotonic()))
            drain.trickle_waiting = max(drain.trickle_waiting, (await _consumer(env)).num_waiting or 0)
        finished = await asyncio.wait_for(done, 30)
        await sub.unsubscribe()
        drain.trickle.append((finished - sent) * 1000)
        await asyncio.sleep(0.3)  # the herd's pulls expire (doorbell); the winner parks again
    if count:
        drain.trickle_server_cpu_ms = 1000 * (_cpu_s([server]) - server_cpu) / count


def _counted(drain: Drain, key: str) -> str:
    total: Counter = Counter()
    for r in drain.results:
        total.update(r[key])
    return ", ".join(f"{n} × {s}" for s, n in sorted(total.items())) or "none"


def _statuses(drain: Drain) -> str:
    """Pull answers that were not tickets, summed over the agent processes."""
    return _counted(drain, "statuses")


def _errors(drain: Drain) -> str:
    """The agents' requests that timed out and tickets they handed back."""
    return _counted(drain, "errors")


async def _verify(broker: Broker, jobs: int) -> tuple[Counter, int]:
    records = await load_records(broker)
    states = Counter(s.record.status.value for s in records.values())
    reclaimed = sum(1 for s in records.values() if s.record.attempt != 1)
    if len(records) != jobs or states[JobStatus.COMPLETED.value] != jobs or reclaimed:
        raise RuntimeError(f"scale run: {len(records)} records, states {dict(states)}, {reclaimed} claimed twice")
    return states, reclaimed


async def run(
    jobs: int, agents: int, *, pull: str = "agent", trickle: int = 20, sync_always: bool = True, timeout_s: float = 3600
) -> list[Row]:
    """The rows; ``pull`` is how the simulated agents pull (simagent.PULLS), ``sync_always``
    False runs the server at its default sync interval (to see what the fsyncs cost)."""
    async with fleet_env(sync_always=sync_always) as env:
        await ensure_consumer(env.broker.js, env.broker.settings, "cpu")
        url = env.server.url
        ctl = await asyncio.to_thread(
            _role, ["controller", "--url", url, "--jobs", str(jobs)], env.workdir / "controller.json", timeout_s
        )
        server_after_sync = rss_mib(env.server.proc.pid)
        drain = await _drain(env, url, agents, pull, trickle, timeout_s)
        server_peak = rss_mib(env.server.proc.pid)
        try:
            await _verify(env.broker, jobs + trickle)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; agents' errors: {_errors(drain)}, pulls: {_statuses(drain)}") from None
    # The server's ceiling for the sync's writes on a fresh server, same run: is the sync at it?
    ceiling_s = await raw_parallel(parse_manifest(manifest_text(jobs), file="ceiling.toml")) if sync_always else None
    done = Counter(job for r in drain.results for job in r["completed"])
    if len(done) != jobs + trickle or any(n > 1 for n in done.values()):
        doubled = sum(1 for n in done.values() if n > 1)
        raise RuntimeError(f"scale run: agents completed {len(done)} distinct of {jobs + trickle}, {doubled} twice")
    label = f"{jobs // 1000}k" if jobs >= 1000 else str(jobs)
    procs = len(drain.results)
    peak = max(r["peak_rss_mib"] for r in drain.results)
    per_agent = sum(r["peak_rss_mib"] - r["rss_before_mib"] for r in drain.results) / agents
    refused, timeouts = _statuses(drain), _errors(drain)
    rows = [
        Row(
            "scale",
            f"scale: manifest sync, {label} jobs",
            ctl["parse_s"] + ctl["sync_s"],
            "s",
            30.0,
            "issue 17's target",
            note=f"parse {ctl['parse_s']:.1f} s + sync {ctl['sync_s']:.1f} s ({jobs / ctl['sync_s']:.0f} jobs/s)",
        ),
        Row(
            "scale",
            f"scale: manifest sync, {label} jobs (sync alone)",
            ctl["sync_s"],
            "s",
            ceiling_s,
            "same writes, 3 streams at once, pipelined" if ceiling_s else "",
            note=f"server ceiling {3 * jobs / ceiling_s:,.0f} fsynced writes/s" if ceiling_s else "",
        ),
        Row(
            "scale",
            f"scale: one reconcile pass, {label} pending jobs",
            ctl["reconcile_s"],
            "s",
            note="every record and every queued ticket read once",
        ),
        Row(
            "scale",
            f"scale: the next reconcile pass (warm), {label} pending jobs",
            ctl["reconcile_steady_s"],
            "s",
            ctl["ticket_scan_s"],
            "reading every queued ticket alone (each pass did)",
            note=f"records: the cache; tickets: the stream's state and what is new; {ctl['tickets_scanned']:,} queued",
        ),
        Row("scale", f"scale: controller peak RSS ({label} jobs)", ctl["peak_rss_mib"], "MiB"),
        Row(
            "scale",
            f"scale: {agents} agents' process peak RSS",
            peak,
            "MiB",
            note=f"{agents} connections in {procs} process(es) (the largest's peak), ~{per_agent:.2f} MiB per agent",
        ),
        Row(
            "scale",
            f"scale: claim → complete, {agents} agents, {label} backlog",
            jobs / drain.elapsed_s,
            "jobs/s",
            note=f"drained in {drain.elapsed_s:.0f} s; CPU: agents {drain.agents_cpu:.0f} %, "
            f"nats-server {drain.server_cpu:.0f} % (100 % = one core)",
        ),
        Row(
            "scale",
            f"scale: waiting pulls on the jobs consumer, {agents} agents ({pull} pulls)",
            drain.max_waiting,
            "pulls",
            baseline=drain.cap,
            baseline_label="max_waiting",
            note=f"most seen draining ({drain.samples} samples); pull answers not a ticket: {refused}",
        ),
        Row(
            "scale",
            f"scale: waiting pulls after one ticket to {agents} idle agents",
            drain.trickle_waiting,
            "pulls",
            baseline=drain.cap,
            baseline_label="max_waiting",
            note=f"most seen over {trickle} tickets, one at a time"
            + (": each rings every agent's doorbell" if pull == "doorbell" else f" ({pull} pulls)"),
        ),
        Row(
            "scale",
            f"scale: ticket → completed p50, {agents} idle agents",
            percentile(drain.trickle, 50),
            "ms",
            note=f"p99 {percentile(drain.trickle, 99):.0f} ms; nats-server CPU "
            f"{drain.trickle_server_cpu_ms:.0f} ms per ticket",
        ),
        Row(
            "scale",
            "scale: jobs lost / doubled",
            0,
            "jobs",
            note=f"{jobs + trickle} completed, all attempt 1, "
            f"{sum(r['dup_tickets'] for r in drain.results)} duplicate tickets dropped; agents' requests "
            f"that timed out: {timeouts}",
        ),
        Row(
            "scale",
            "scale: nats-server RSS after sync / peak",
            server_after_sync,
            "MiB",
            note=f"peak {server_peak:.0f} MiB",
        ),
    ]
    if not sync_always:
        for row in rows:
            row.durability = "file, sync 2 min (default)"
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("role", choices=["controller", "agents"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--jobs", type=int, help="controller: jobs in the manifest")
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--first", type=int, default=0, help="agents: the first agent's number")
    parser.add_argument("--pull", choices=PULLS, default="agent", help="agents: how they pull (bench/simagent.py)")
    parser.add_argument("--go", type=Path, help="agents: start pulling once this file exists")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.role == "controller":
        if args.jobs is None:
            parser.error("controller needs --jobs")
        result = asyncio.run(controller_role(args.url, args.jobs))
    else:
        if args.go is None:
            parser.error("agents needs --go")
        result = asyncio.run(agents_role(args.url, args.agents, first=args.first, pull=args.pull, go=args.go))
    args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
