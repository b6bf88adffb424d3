"""The ``trainfleet`` command: one thin, scriptable front for every verb.

Writes (sync, reload, cancel, requeue) are requests to the ``trainfleet`` micro
service, so they go through a controller exactly like ``nats req
trainfleet.ctl.<verb>`` does. Reads (status, jobs, show, workers, logs,
artifacts) go straight to the KV buckets, the logs stream and the object store
(controller/ops.py), so they work while no controller runs.

Exit codes: 0 ok · 1 jobs failed / operation refused · 2 bad usage or invalid
manifest · 3 NATS unreachable, not provisioned, or no controller answering ·
4 job not found or ambiguous · 5 artifact missing, corrupt or unsafe. Every
listing has --json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import ArtifactError, JobNotFound, ManifestError, TrainfleetError
from trainfleet.broker.schema import JobRecord, JobStatus
from trainfleet.broker.settings import Settings
from trainfleet.controller import ops, view
from trainfleet.controller.store import load_workers

# Named exit codes (docs/operations.md lists them with what an operator does about each).
EXIT_OK = 0  # done
EXIT_FAILED = 1  # jobs failed (`up`), or the controller refused the operation (cancel of a finished job, …)
EXIT_USAGE = 2  # bad arguments or an invalid manifest
EXIT_NATS = 3  # NATS unreachable, resources not provisioned, or no controller answering (BrokerError)
EXIT_NO_JOB = 4  # no job matches, or an id prefix matches several (JobNotFound, AmbiguousJob)
EXIT_ARTIFACT = 5  # artifact missing, corrupt or unsafe to extract (ArtifactError)


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


def _run(args: argparse.Namespace, fn: Callable[[Broker], Awaitable[int]]) -> int:
    return asyncio.run(_with_broker(args, fn))


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

    print(
        f"{args.manifest}: {len(manifest.jobs)} job(s), {len(manifest.models)} model(s), "
        f"{len(manifest.hosts)} host polic(ies)"
    )
    for spec in manifest.jobs:
        print(
            f"  {spec.job_id[:12]}  {spec.name:<28} {spec.model}/{spec.mode:<12} seed={spec.seed:<4} "
            f"prio={spec.priority:<3} class={ticket_class(spec)}"
        )
    return EXIT_OK


def cmd_controller(args: argparse.Namespace) -> int:
    from trainfleet.controller.controller import Controller

    controller = Controller(settings_from(args), manifest_path=args.manifest)
    asyncio.run(controller.run())
    return EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    from trainfleet.agent.capability import apply_overrides, detect, render_text

    cap = detect(args.host_id, probe_torch=not args.no_torch_probe)
    cap = apply_overrides(cap, max_cores=args.max_cores, max_ram_gib=args.max_ram_gib, max_vram_gib=args.max_vram_gib)
    if args.detect:
        if args.json:
            _print_json(msgspec.to_builtins(cap))
        else:
            print(render_text(cap))
        return EXIT_OK
    from trainfleet.agent.agent import Agent, AgentOptions

    options = AgentOptions(
        host_id=cap.host_id,
        cpu_slots=args.cpu_slots,
        gpu_slots=args.gpu_slots,
        serve_cpu=not args.no_cpu,
        workdir=args.workdir,
    )
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
    """One request to the control service; its result, or the controller's error raised."""
    from trainfleet.controller.service import request

    holder: dict[str, Any] = {}

    async def call(broker: Broker) -> int:
        holder["result"] = await request(broker.nc, broker.names, verb, body)
        return EXIT_OK

    _run(args, call)
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
        print(
            f"{len(report['created'])} new, {len(report['updated'])} updated, "
            f"{len(report['unchanged'])} unchanged, {len(report['not_in_manifest'])} only in the fleet"
        )
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    rec = _control(args, "cancel", {"job": args.job})
    if args.json:
        _print_json(rec)
    else:
        print(f"cancelled {rec['spec']['name']} ({rec['job_id'][:12]})")
    return EXIT_OK


def cmd_requeue(args: argparse.Namespace) -> int:
    rec = _control(args, "requeue", {"job": args.job})
    if args.json:
        _print_json(rec)
    else:
        print(f"requeued {rec['spec']['name']} ({rec['job_id'][:12]}) as generation {rec['generation']}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        out = await ops.fleet_status(broker)
        if args.json:
            _print_json(out)
            return EXIT_OK
        counts = "  ".join(f"{state}={n}" for state, n in out["jobs"].items() if n)
        print(f"jobs: {out['total']}" + (f"  {counts}" if counts else ""))
        hosts = out["hosts"]
        alive = f" ({', '.join(hosts['alive'])})" if hosts["alive"] else ""
        stale = f" ({', '.join(hosts['stale'])})" if hosts["stale"] else ""
        print(f"workers: {len(hosts['alive'])} alive{alive}, {len(hosts['stale'])} stale{stale}")
        return EXIT_OK

    return _run(args, run)


def _row_progress(row: dict[str, Any]) -> str:
    progress = row.get("progress") or {}
    step, total = progress.get("step"), progress.get("total")
    if row["state"] in ("claimed", "running") and isinstance(step, int) and isinstance(total, int) and total > 0:
        return f"{view.bar(min(step, total), total, 8)} {step}/{total}"
    return ""


def cmd_jobs(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        rows = await ops.list_jobs(broker, state=args.state, model=args.model, host=args.host)
        if args.json:
            _print_json(rows)
            return EXIT_OK
        print(f"{'ID':<12}  {'NAME':<28} {'STATE':<10} {'HOST':<12} {'TRY':>3} {'PRIO':>4}  {'PROGRESS':<16} METRIC")
        for r in rows:
            metric = view.fmt_metrics(r["metric"] or (r["progress"] or {}).get("metrics") or {}, 2)
            print(
                f"{r['job_id'][:12]}  {r['name']:<28} {r['state']:<10} {r['host'] or '-':<12} "
                f"{r['attempts']:>3} {r['priority']:>4}  {_row_progress(r):<16} {metric}".rstrip()
            )
        if not rows:
            print("(no jobs" + (" match" if args.state or args.model or args.host else "") + ")", file=sys.stderr)
        return EXIT_OK

    return _run(args, run)


def _print_history(data: dict[str, Any]) -> None:
    note = "; older revisions already dropped" if data["history_truncated"] else ""
    print(f"history (revisions the jobs KV keeps, heartbeats collapsed{note}):")
    for t in data["history"]:
        print(
            f"  rev {t['revision']:<6} {view.fmt_time(t['at'])}  {t['status']:<10} {t['host'] or '-':<12} "
            f"attempt {t['attempt']}  gen {t['generation']}" + (f"  {t['reason']}" if t["reason"] else "")
        )


def _print_provenance(prov: dict[str, Any]) -> None:
    host = prov.get("host") or {}
    timings = prov.get("timings") or {}
    gpus = ", ".join(g.get("name", "?") for g in host.get("gpus") or []) or "none"
    print("provenance (from the bundle):")
    print(
        f"  {'host':<11} {host.get('host_id', '-')}  {host.get('platform', '')}  "
        f"{host.get('cores_usable', '?')} cores  {host.get('ram_total_gib', '?')} GiB  GPU: {gpus}"
    )
    print(f"  {'code':<11} {prov.get('code_commit') or '-'}")
    versions = prov.get("versions") or {}
    print(f"  {'versions':<11} " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"  {'attempt':<11} {prov.get('attempt', '-')} (generation {prov.get('generation', '-')})")
    dur = timings.get("duration_s")
    print(
        f"  {'timings':<11} started {view.fmt_time(timings.get('started_at'))}, finished "
        f"{view.fmt_time(timings.get('finished_at'))}" + (f" ({view.fmt_duration(dur)})" if dur else "")
    )
    if prov.get("argv"):
        print(f"  {'argv':<11} {' '.join(map(str, prov['argv']))}")


def _print_detail(data: dict[str, Any], rec: JobRecord) -> None:
    spec = rec.spec
    print(f"{spec.name}  ({rec.job_id})")
    host = f" on {rec.claimed_by}" if rec.claimed_by else ""
    print(
        f"  {'state':<11} {rec.status.value}{host}  (attempt {rec.attempt} of {rec.max_attempts}, "
        f"generation {rec.generation}, revision {data['revision']})"
    )
    print(f"  {'model':<11} {spec.model}/{spec.mode}  seed={spec.seed}  priority={spec.priority}  class={rec.klass}")
    print(f"  {'hyper':<11} {json.dumps(spec.hyper, sort_keys=True)}")
    needs = [
        f"{k}={','.join(v) if isinstance(v, list) else v}"
        for k, v in msgspec.to_builtins(spec.constraints).items()
        if v
    ]
    needs += [f"requires={','.join(spec.requires)}"] if spec.requires else []
    if needs:
        print(f"  {'needs':<11} {'  '.join(needs)}")
    if rec.status.held and (progress := view.progress_text(rec)):
        print(f"  {'progress':<11} {progress}  {view.fmt_metrics((rec.progress or {}).get('metrics') or {})}")
    if rec.metrics:
        head = rec.metrics.get("headline")
        ordered = {head: rec.metrics[head]} if head in rec.metrics else {}
        ordered.update((k, v) for k, v in sorted(rec.metrics.items()) if k not in (head, "headline"))
        print(f"  {'metrics':<11} {view.fmt_metrics(ordered)}")
    if rec.artifact:
        print(f"  {'artifact':<11} {rec.artifact}  ({view.fmt_bytes(rec.artifact_bytes)})")
    print(
        f"  {'times':<11} created {view.fmt_time(rec.created_at)}, started {view.fmt_time(rec.started_at)}, "
        f"finished {view.fmt_time(rec.finished_at)}"
        + (f" ({view.fmt_duration(view.duration(rec))})" if rec.started_at else "")
    )
    for host_id, why in sorted(rec.excluded_hosts.items()):
        print(f"  {'excluded':<11} {host_id}: {why}")
    if rec.reason:
        print(f"  {'reason':<11} {rec.reason}")
    if rec.last_error:
        print("  last error:")
        for line in rec.last_error.splitlines():
            print(f"    {line}")
    _print_history(data)
    if data["provenance"]:
        _print_provenance(data["provenance"])
    elif data["provenance_error"]:
        print(f"provenance: unavailable ({data['provenance_error']})")


def cmd_show(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        data = await ops.job_detail(broker, args.job, provenance=not args.no_provenance)
        if args.json:
            _print_json(data)
        else:
            _print_detail(data, msgspec.convert(_record_fields(data), JobRecord))
        return EXIT_OK

    return _run(args, run)


def _record_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k in JobRecord.__struct_fields__}


def cmd_workers(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        workers = await ops.list_workers(broker)
        if args.json:
            _print_json(workers)
            return EXIT_OK
        print(f"{'HOST':<16} {'STATE':<6} {'CORES':>5} {'RAM GiB':>8} {'GPUS':>4} {'SEEN':>6}  {'JOBS':<14} CLASSES")
        for w in workers:
            cap = w["capability"]
            seen = f"{w['age_s']:>5.0f}s" + ("" if w["alive"] else " stale")
            jobs = ",".join(j[:12] for j in w["current_jobs"]) or "-"
            print(
                f"{w['host_id']:<16} {w['state']:<6} {cap['cores_usable']:>5g} {cap['ram_available_gib']:>8.1f} "
                f"{len(cap['gpus']):>4} {seen:>6}  {jobs:<14} {','.join(w['classes'])}"
            )
        if not workers:
            print("(no workers registered)", file=sys.stderr)
        return EXIT_OK

    return _run(args, run)


def cmd_explain(args: argparse.Namespace) -> int:
    from trainfleet.controller.explain import explain_json, explain_ref, render_explain

    async def run(broker: Broker) -> int:
        rec, matches = await explain_ref(broker, args.job, stale_after_s=ops.stale_after_s(broker))
        if args.json:
            _print_json(explain_json(rec, matches))
        else:
            print(render_explain(rec, matches))
        return EXIT_OK if any(m.eligible and m.alive for m in matches) else EXIT_FAILED

    return _run(args, run)


def cmd_plan(args: argparse.Namespace) -> int:
    from trainfleet.controller.explain import plan_manifest, render_plan
    from trainfleet.controller.manifest import load_manifest

    manifest = load_manifest(args.manifest)

    async def run(broker: Broker) -> int:
        plans = plan_manifest(manifest, await load_workers(broker))
        if args.json:
            _print_json([p.to_dict() for p in plans])
        else:
            print(render_plan(plans))
        return EXIT_FAILED if args.check and not all(p.runnable for p in plans) else EXIT_OK

    return _run(args, run)


def cmd_logs(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        job_id = (await ops.resolve(broker, args.job)).record.job_id
        shown: tuple[int | None, int | None] | None = None
        reader = ops.read_logs(broker, job_id, follow=args.follow, events=args.events, attempt=args.attempt)
        async with contextlib.aclosing(reader) as entries:
            async for entry in entries:
                if args.json:
                    print(json.dumps(entry.to_json(), default=str), flush=True)
                    continue
                if entry.kind == "log":
                    if shown is not None and entry.run != shown:
                        gen = f" (generation {entry.generation})" if entry.generation is not None else ""
                        print(f"--- attempt {entry.attempt}{gen} ---", flush=True)
                    shown = entry.run
                    print(entry.line, file=sys.stderr if entry.stream == "stderr" else sys.stdout, flush=True)
                else:
                    print(view.event_text(entry.kind, entry.event or {}, entry.attempt), flush=True)
        return EXIT_OK

    return _run(args, run)


def cmd_artifacts_list(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        rows = await ops.list_artifacts(broker)
        if args.json:
            _print_json(rows)
            return EXIT_OK
        print(f"{'ARTIFACT':<16} {'SIZE':>10}  {'JOB':<28} {'HOST':<12} STATE")
        for r in rows:
            job = r["name"] or "(orphan: no record points at it)"
            state = r["state"] or "-"
            if not r["stored"]:
                state += "  MISSING from the object store"
            print(f"{r['artifact'][:16]} {view.fmt_bytes(r['bytes']):>10}  {job:<28} {r['host'] or '-':<12} {state}")
        if not rows:
            print("(no artifacts)", file=sys.stderr)
        return EXIT_OK

    return _run(args, run)


async def _artifact_target(broker: Broker, ref: str) -> tuple[str, str]:
    """(artifact id, directory name) for a job reference, or for a stored artifact's full id
    (so orphans can be fetched too)."""
    try:
        rec = (await ops.resolve(broker, ref)).record
    except JobNotFound:
        if len(ref) == 64 and all(c in "0123456789abcdef" for c in ref):
            return ref, ref[:12]
        raise
    if not rec.artifact:
        raise ArtifactError(f"job {rec.spec.name} has no artifact (it is {rec.status.value})")
    return rec.artifact, rec.spec.name


def cmd_artifacts_get(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        from trainfleet.agent import artifacts

        artifact, name = await _artifact_target(broker, args.job)
        out = Path(args.out)
        bundle = await artifacts.download(broker, artifact, out / f"{artifact}.tar.zst")
        target = artifacts.extract(bundle, out / name) if args.extract else None
        if args.json:
            _print_json(
                {
                    "artifact": artifact,
                    "path": str(bundle),
                    "bytes": bundle.stat().st_size,
                    "verified": True,
                    "extracted": str(target) if target else None,
                }
            )
            return EXIT_OK
        print(f"downloaded {bundle} ({bundle.stat().st_size} bytes, sha256 verified)")
        if target:
            print(f"extracted into {target}")
        return EXIT_OK

    return _run(args, run)


def cmd_artifacts_sweep(args: argparse.Namespace) -> int:
    async def run(broker: Broker) -> int:
        from trainfleet.agent import artifacts

        store = artifacts.object_store(broker)
        older_than = args.older_than if args.older_than is not None else broker.settings.stray_chunk_age_s
        if args.dry_run:
            stray = await store.stray_chunks(older_than)
        else:
            stray = await store.sweep_stray_chunks(older_than)
        if args.json:
            _print_json(
                {
                    "dry_run": args.dry_run,
                    "older_than_s": older_than,
                    "chunk_sets": len(stray),
                    "chunks": sum(stray.values()),
                    "nuids": sorted(stray),
                }
            )
            return EXIT_OK
        verb_text = "would purge" if args.dry_run else "purged"
        print(
            f"{verb_text} {len(stray)} stray chunk set(s), {sum(stray.values())} chunk(s) "
            f"(no object points at them; newest chunk older than {older_than:g}s)"
        )
        return EXIT_OK

    return _run(args, run)


def cmd_monitor(args: argparse.Namespace) -> int:
    from trainfleet.tui.app import run_monitor

    return run_monitor(settings_from(args))


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


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


JOB_HELP = "job name, full id, or unique id prefix (4+ characters)"
EPILOG = (
    "exit codes: 0 ok, 1 failed (jobs or the operation), 2 bad usage or invalid manifest, "
    "3 NATS unreachable / not provisioned / no controller answering, 4 no such job or ambiguous prefix, "
    "5 artifact missing, corrupt or unsafe"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainfleet",
        description="Train every model in a manifest at most once, across a fleet of "
        "unlike machines, over NATS JetStream.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(
        name: str, fn: Callable[[argparse.Namespace], int], help: str, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, epilog=EPILOG)
        _common(p)
        p.set_defaults(fn=fn)
        return p

    # -- running a fleet --
    p = verb(
        "up",
        cmd_up,
        "run a whole local fleet (embedded nats-server, controller, agents) on a manifest "
        "and show progress until every job is done",
    )
    p.add_argument("manifest")
    p.add_argument("--agents", type=int, default=2, help="local agents to start (default 2)")
    p.add_argument("--keep", action="store_true", help="leave the fleet running after the jobs finish")
    p.add_argument("--data-dir", help="where the embedded server and agents keep state (default .trainfleet/up-<time>)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="give up after this long (default 1800)")
    p.add_argument("--no-live", action="store_true", help="print progress lines instead of a live table")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")

    p = verb("validate", cmd_validate, "check a manifest and list its jobs with ids (exit 2 on errors)")
    p.add_argument("manifest")
    _json_flag(p)

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
    p.add_argument(
        "--no-torch-probe",
        action="store_true",
        help="skip the torch/CUDA cross-check subprocess (faster start; torch jobs still need torch)",
    )

    verb("provision", cmd_provision, "create or update every stream, bucket and object store (idempotent)")

    # -- control (through the trainfleet micro service: a controller must be running) --
    p = verb("sync", cmd_sync, "send a manifest to the controller (idempotent: existing jobs keep their state)")
    p.add_argument("manifest")
    _json_flag(p)
    p = verb("reload", cmd_reload, "make the controller re-read its --manifest file")
    _json_flag(p)
    p = verb("cancel", cmd_cancel, "cancel a job (a running trainer is stopped by its agent)")
    p.add_argument("job", help=JOB_HELP)
    _json_flag(p)
    p = verb("requeue", cmd_requeue, "put a failed, cancelled or completed job back to pending")
    p.add_argument("job", help=JOB_HELP)
    _json_flag(p)

    # -- reading (straight from the KV, stream and object store: works without a controller) --
    p = verb("status", cmd_status, "job counts by state and workers alive/stale")
    _json_flag(p)
    p = verb("jobs", cmd_jobs, "list jobs, highest priority first")
    p.add_argument("--state", choices=[s.value for s in JobStatus], help="only jobs in this state")
    p.add_argument("--model", help="only jobs of this model")
    p.add_argument("--host", help="only jobs claimed by this host")
    _json_flag(p)
    p = verb("show", cmd_show, "one job: spec, record, state history, last error, artifact and provenance")
    p.add_argument("job", help=JOB_HELP)
    p.add_argument("--no-provenance", action="store_true", help="skip reading provenance from the bundle")
    _json_flag(p)
    p = verb("workers", cmd_workers, "registered agents, their capability and current jobs")
    _json_flag(p)
    p = verb("logs", cmd_logs, "a job's trainer output (stdout, and stderr on stderr) from the logs stream")
    p.add_argument("job", help=JOB_HELP)
    p.add_argument("-f", "--follow", action="store_true", help="keep following until the job is terminal")
    p.add_argument("--attempt", type=int, help="only this attempt's output")
    p.add_argument("--events", action="store_true", help="interleave progress and lifecycle events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser(
        "artifacts",
        help="list artifacts, or download one verified by sha256",
        description="list artifacts, or download one verified by sha256",
        epilog=EPILOG,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = verb(
        "list",
        cmd_artifacts_list,
        "jobs with artifacts, and stored bundles no record points at (orphans)",
        parent=actions,
    )
    _json_flag(p)
    p = verb(
        "get", cmd_artifacts_get, "download a job's bundle (verified by sha256), optionally extract it", parent=actions
    )
    p.add_argument("job", help=JOB_HELP + "; or a stored artifact's full sha256")
    p.add_argument("--out", default=".", help="directory to write the bundle into (default .)")
    p.add_argument("--extract", action="store_true", help="also extract it into OUT/<job name> (refusing unsafe paths)")
    _json_flag(p)

    p = verb(
        "sweep",
        cmd_artifacts_sweep,
        "purge stray chunks: what an upload cut off mid-way leaves in the object "
        "store (the controller also does this every artifact_sweep_s)",
        parent=actions,
    )
    p.add_argument(
        "--older-than",
        type=float,
        metavar="SECONDS",
        help="only chunk sets whose newest chunk is at least this old (default stray_chunk_age_s, "
        "3600: an upload still under way is never touched)",
    )
    p.add_argument("--dry-run", action="store_true", help="only report what would be purged")
    _json_flag(p)

    verb("monitor", cmd_monitor, "live terminal monitor: jobs, workers and logs (q quit, c cancel, r requeue, l logs)")

    p = verb(
        "explain",
        cmd_explain,
        "for every registered worker: can it run JOB, and if not exactly which "
        "constraint fails (exit 0 when a live worker can run it now, 1 when none can)",
    )
    p.add_argument("job", help=JOB_HELP)
    _json_flag(p)
    p = verb(
        "plan",
        cmd_plan,
        "before syncing: which registered hosts could ever take each job of MANIFEST, "
        "with a warning for every job none can",
    )
    p.add_argument("manifest")
    p.add_argument("--check", action="store_true", help="exit 1 when some job can never run")
    _json_flag(p)
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
    except BrokenPipeError:
        # `trainfleet logs JOB | head`: the reader left; nothing more to say.
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
