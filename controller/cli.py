"""The ``trainfleet`` command: one thin, scriptable front for every verb.

Exit codes: 0 ok · 1 jobs failed / operation failed · 2 bad usage or invalid
manifest · 3 NATS unreachable or not provisioned · 4 job not found or
ambiguous · 5 artifact missing, corrupt or unsafe. Every listing has --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import ManifestError, TrainfleetError
from trainfleet.broker.schema import JobRecord
from trainfleet.broker.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str, sort_keys=True))


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings.from_env(url=args.url, prefix=args.prefix, lease_s=args.lease_s, heartbeat_s=args.heartbeat_s)


async def _with_broker(args: argparse.Namespace, fn: Callable[[Broker], Awaitable[int]]) -> int:
    broker = await Broker.connect(settings_from(args), name="trainfleet-cli")
    try:
        return await fn(broker)
    finally:
        await broker.close()


# -- verbs -------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from trainfleet.controller.manifest import load_manifest

    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        if args.json:
            _print_json({"ok": False, "problems": [p.to_dict() for p in exc.problems]})
        else:
            print(f"{len(exc.problems)} problem(s) in {args.manifest}:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        _print_json({"ok": True, **manifest.to_json()})
        return EXIT_OK
    from trainfleet.controller.manifest import ticket_class

    print(f"{args.manifest}: {len(manifest.jobs)} job(s), {len(manifest.models)} model(s), "
          f"{len(manifest.hosts)} host polic(ies)")
    for spec in manifest.jobs:
        print(f"  {spec.job_id[:12]}  {spec.name:<28} {spec.model}/{spec.mode:<12} seed={spec.seed:<4} "
              f"prio={spec.priority:<3} class={ticket_class(spec)}")
    return EXIT_OK


def cmd_controller(args: argparse.Namespace) -> int:
    from trainfleet.controller.controller import Controller

    controller = Controller(settings_from(args), manifest_path=args.manifest)
    asyncio.run(controller.run())
    return EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    from trainfleet.agent.capability import apply_overrides, detect, render_text

    cap = detect(args.host_id)
    cap = apply_overrides(cap, max_cores=args.max_cores, max_ram_gib=args.max_ram_gib,
                          max_vram_gib=args.max_vram_gib)
    if args.detect:
        if args.json:
            _print_json(msgspec.to_builtins(cap))
        else:
            print(render_text(cap))
        return EXIT_OK
    from trainfleet.agent.agent import Agent, AgentOptions

    options = AgentOptions(host_id=cap.host_id, cpu_slots=args.cpu_slots, gpu_slots=args.gpu_slots,
                           serve_cpu=not args.no_cpu, workdir=args.workdir)
    asyncio.run(Agent(settings_from(args), options, capability=cap).run())
    return EXIT_OK


def cmd_provision(args: argparse.Namespace) -> int:
    async def run() -> int:
        broker = await Broker.connect(settings_from(args), name="trainfleet-cli", provision=True)
        await broker.close()
        print(f"provisioned trainfleet resources (prefix {broker.settings.prefix}) on {broker.settings.url}")
        return EXIT_OK

    return asyncio.run(run())


def _control(args: argparse.Namespace, verb: str, body: dict[str, Any] | None = None) -> Any:
    from trainfleet.controller.service import request

    async def run(broker: Broker) -> Any:
        return await request(broker.nc, broker.names, verb, body)

    holder: dict[str, Any] = {}

    async def call(broker: Broker) -> int:
        holder["result"] = await run(broker)
        return EXIT_OK

    asyncio.run(_with_broker(args, call))
    return holder["result"]


def cmd_sync(args: argparse.Namespace) -> int:
    path = Path(args.manifest)
    try:
        text = path.read_text()
    except OSError as exc:
        print(f"cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = _control(args, "sync", {"manifest": text, "file": str(path.resolve())})
    return _print_sync(args, report)


def cmd_reload(args: argparse.Namespace) -> int:
    return _print_sync(args, _control(args, "reload"))


def _print_sync(args: argparse.Namespace, report: dict[str, Any]) -> int:
    if args.json:
        _print_json(report)
    else:
        print(f"{len(report['created'])} new, {len(report['updated'])} updated, "
              f"{len(report['unchanged'])} unchanged, {len(report['not_in_manifest'])} only in the fleet")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    rec = _control(args, "cancel", {"job": args.job})
    print(f"cancelled {rec['spec']['name']} ({rec['job_id'][:12]})")
    return EXIT_OK


def cmd_requeue(args: argparse.Namespace) -> int:
    rec = _control(args, "requeue", {"job": args.job})
    print(f"requeued {rec['spec']['name']} ({rec['job_id'][:12]}) as generation {rec['generation']}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        from trainfleet.controller.store import load_records, load_workers

        records = await load_records(broker)
        workers = await load_workers(broker)
        counts: dict[str, int] = {}
        for s in records.values():
            counts[s.record.status.value] = counts.get(s.record.status.value, 0) + 1
        stale_after = broker.settings.heartbeat_s * 3
        alive = [w.host_id for w in workers if time.time() - w.last_seen <= stale_after]
        out = {"jobs": counts, "total": len(records), "workers": {"alive": len(alive),
                                                                  "stale": len(workers) - len(alive)}}
        if args.json:
            _print_json(out)
        else:
            print(f"jobs: {len(records)}  " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
            print(f"workers: {len(alive)} alive, {len(workers) - len(alive)} stale")
        return EXIT_OK

    return asyncio.run(_with_broker(args, run))


def _job_row(rec: JobRecord) -> dict[str, Any]:
    headline = rec.metrics.get("headline") if rec.metrics else None
    duration = (rec.finished_at - rec.started_at) if rec.finished_at and rec.started_at else None
    return {"job_id": rec.job_id, "name": rec.spec.name, "model": rec.spec.model, "mode": rec.spec.mode,
            "state": rec.status.value, "host": rec.claimed_by, "attempts": rec.attempt,
            "priority": rec.spec.priority, "duration_s": duration, "artifact": rec.artifact,
            "metric": {headline: rec.metrics.get(headline)} if headline else None,
            "reason": rec.reason, "last_error": rec.last_error}


def cmd_jobs(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        from trainfleet.controller.store import load_records

        rows = [_job_row(s.record) for s in (await load_records(broker)).values()]
        rows = [r for r in rows if (not args.state or r["state"] == args.state)
                and (not args.model or r["model"] == args.model) and (not args.host or r["host"] == args.host)]
        rows.sort(key=lambda r: (-r["priority"], r["name"]))
        if args.json:
            _print_json(rows)
            return EXIT_OK
        print(f"{'ID':<12}  {'NAME':<28} {'STATE':<10} {'HOST':<12} {'TRY':>3}  {'PRIO':>4}  METRIC")
        for r in rows:
            metric = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in (r["metric"] or {}).items())
            print(f"{r['job_id'][:12]}  {r['name']:<28} {r['state']:<10} {r['host'] or '-':<12} "
                  f"{r['attempts']:>3}  {r['priority']:>4}  {metric}")
        return EXIT_OK

    return asyncio.run(_with_broker(args, run))


def cmd_show(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        from trainfleet.controller.store import load_records, resolve_job

        stored = resolve_job(await load_records(broker), args.job)
        data = msgspec.to_builtins(stored.record)
        data["revision"] = stored.revision
        if args.json:
            _print_json(data)
        else:
            rec = stored.record
            print(f"{rec.spec.name}  ({rec.job_id})")
            for key in ("status", "generation", "attempt", "claimed_by", "artifact", "reason", "last_error"):
                value = data[key]
                print(f"  {key:<11} {value if value is not None else '-'}")
            print(f"  {'model':<11} {rec.spec.model}/{rec.spec.mode} seed={rec.spec.seed} hyper={rec.spec.hyper}")
            if rec.metrics:
                print(f"  {'metrics':<11} {json.dumps(rec.metrics)}")
        return EXIT_OK

    return asyncio.run(_with_broker(args, run))


def cmd_workers(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        from trainfleet.controller.store import load_workers

        workers = await load_workers(broker)
        if args.json:
            _print_json([msgspec.to_builtins(w) for w in workers])
            return EXIT_OK
        print(f"{'HOST':<16} {'STATE':<6} {'CORES':>5} {'RAM GiB':>8} {'GPUS':>4} {'SEEN':>6}  CLASSES")
        for w in workers:
            cap = w.capability
            print(f"{w.host_id:<16} {w.state:<6} {cap.cores_usable:>5g} {cap.ram_available_gib:>8.1f} "
                  f"{len(cap.gpus):>4} {time.time() - w.last_seen:>5.0f}s  {','.join(w.classes)}")
        return EXIT_OK

    return asyncio.run(_with_broker(args, run))


def cmd_artifacts_get(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        from trainfleet.agent import artifacts
        from trainfleet.controller.store import load_records, resolve_job

        rec = resolve_job(await load_records(broker), args.job).record
        if not rec.artifact:
            raise TrainfleetError(f"job {rec.spec.name} has no artifact (it is {rec.status.value})")
        out = Path(args.out)
        bundle = await artifacts.download(broker, rec.artifact, out / f"{rec.artifact}.tar.zst")
        print(f"downloaded {bundle} ({bundle.stat().st_size} bytes, sha256 verified)")
        if args.extract:
            target = artifacts.extract(bundle, out / rec.spec.name)
            print(f"extracted into {target}")
        return EXIT_OK

    return asyncio.run(_with_broker(args, run))


def cmd_up(args: argparse.Namespace) -> int:
    from trainfleet.controller.up import run_up

    return run_up(args, settings_from(args))


# -- parser ------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="NATS URL(s), comma-separated (env NATS_URL; default nats://127.0.0.1:4222)")
    p.add_argument("--prefix", help="resource name prefix (env TRAINFLEET_PREFIX; default trainfleet)")
    p.add_argument("--lease-s", type=float, help="job lease = consumer ack-wait, seconds (default 120)")
    p.add_argument("--heartbeat-s", type=float, help="lease renewal interval, seconds (default 30; <= lease/3)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainfleet", description="Train every model in a manifest at most once, across a fleet of "
        "unlike machines, over NATS JetStream.",
        epilog="exit codes: 0 ok, 1 failed, 2 bad usage/manifest, 3 NATS unreachable, 4 no such job, "
               "5 artifact error")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _common(p)
        p.set_defaults(fn=fn)
        return p

    p = verb("up", cmd_up, "run a whole local fleet (embedded nats-server, controller, agents) on a manifest "
             "and show progress until every job is done")
    p.add_argument("manifest")
    p.add_argument("--agents", type=int, default=2, help="local agents to start (default 2)")
    p.add_argument("--keep", action="store_true", help="leave the fleet running after the jobs finish")
    p.add_argument("--data-dir", help="where the embedded server and agents keep state "
                                      "(default .trainfleet/up-<time>)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="give up after this long (default 1800)")
    p.add_argument("--no-live", action="store_true", help="print progress lines instead of a live table")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")

    p = verb("validate", cmd_validate, "check a manifest and list its jobs with ids (exit 2 on errors)")
    p.add_argument("manifest")
    p.add_argument("--json", action="store_true")

    p = verb("controller", cmd_controller, "run a controller (publishes tickets, reconciles, serves control)")
    p.add_argument("--manifest", help="sync this manifest at start; `reload` re-reads it")

    p = verb("agent", cmd_agent, "run an agent on this host (or --detect to print its capability)")
    p.add_argument("--host-id", help="host id (env TRAINFLEET_HOST_ID; default: hostname)")
    p.add_argument("--detect", action="store_true", help="print detected capability and exit")
    p.add_argument("--json", action="store_true", help="with --detect: JSON")
    p.add_argument("--cpu-slots", type=int, default=1, help="CPU jobs at once (default 1)")
    p.add_argument("--gpu-slots", type=int, help="GPU jobs at once (default: one per visible GPU)")
    p.add_argument("--no-cpu", action="store_true", help="a GPU host that takes no CPU-only jobs")
    p.add_argument("--max-cores", type=float, help="offer at most this many cores")
    p.add_argument("--max-ram-gib", type=float, help="offer at most this much RAM")
    p.add_argument("--max-vram-gib", type=float, help="offer at most this much VRAM per GPU")
    p.add_argument("--workdir", help="where trainer outputs are written (default: a temp dir)")

    verb("provision", cmd_provision, "create or update every stream, bucket and object store (idempotent)")

    p = verb("sync", cmd_sync, "send a manifest to the controller (idempotent: existing jobs keep their state)")
    p.add_argument("manifest")
    p.add_argument("--json", action="store_true")
    p = verb("reload", cmd_reload, "make the controller re-read its --manifest file")
    p.add_argument("--json", action="store_true")

    p = verb("status", cmd_status, "job counts by state and workers alive/stale")
    p.add_argument("--json", action="store_true")
    p = verb("jobs", cmd_jobs, "list jobs (sorted by priority)")
    p.add_argument("--state", help="only jobs in this state")
    p.add_argument("--model")
    p.add_argument("--host")
    p.add_argument("--json", action="store_true")
    p = verb("show", cmd_show, "one job's spec and record (JOB = name, id or unique id prefix)")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")
    p = verb("workers", cmd_workers, "registered agents and their capability")
    p.add_argument("--json", action="store_true")
    p = verb("cancel", cmd_cancel, "cancel a job (a running trainer is stopped within one heartbeat)")
    p.add_argument("job")
    p = verb("requeue", cmd_requeue, "put a failed, cancelled or completed job back to pending")
    p.add_argument("job")

    p = verb("artifacts", cmd_artifacts_get, "download a job's artifact, verified by sha256")
    p.add_argument("action", choices=["get"])
    p.add_argument("job")
    p.add_argument("--out", default=".", help="directory to write the bundle into (default .)")
    p.add_argument("--extract", action="store_true", help="also extract it (refusing unsafe paths)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if args.verb in ("controller", "agent") and not args.verbose:
        level = logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.fn(args) or 0)
    except TrainfleetError as exc:
        print(f"trainfleet: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        print(f"trainfleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
