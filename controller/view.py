"""How the CLI and ``trainfleet up`` show things: every table, detail view and summary.

The CLI (cli.py) parses and dispatches; each verb hands its result here. Shared
text of records and events (state colours, bars, durations) is broker/display.py,
which the monitor uses too. Every printer takes plain values (what ops.py and the
control service return), so ``--json`` and the text views show the same data.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

from trainfleet.broker import display, tickets
from trainfleet.broker.display import fmt_bytes, fmt_metrics, safe_text
from trainfleet.broker.explain import explain_text
from trainfleet.broker.jobs import Job
from trainfleet.broker.logs import LogEntry
from trainfleet.broker.schema import JobRecord, JobSpec, JobStatus
from trainfleet.controller.explain import JobPlan, Match
from trainfleet.controller.manifest import Manifest


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str, sort_keys=True))


def show(value: Any, as_json: bool, render: Callable[[Any], str | None]) -> None:
    """``value`` as JSON with ``--json``, else as ``render`` shows it: the text it returns is
    printed (a table prints itself and returns None)."""
    if as_json:
        print_json(value)
        return
    text = render(value)
    if text is not None:
        print(text)


# -- manifests -----------------------------------------------------------------
def manifest_problems(path: str, problems: list[Any], as_json: bool) -> None:
    if as_json:
        print_json({"ok": False, "problems": [p.to_dict() for p in problems]})
        return
    print(f"{len(problems)} problem(s) in {path}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def manifest_jobs(path: str, manifest: Manifest) -> str:
    lines = [
        f"{path}: {len(manifest.jobs)} job(s), {len(manifest.models)} model(s), {len(manifest.hosts)} host polic(ies)"
    ]
    for spec in manifest.jobs:
        lines.append(
            f"  {spec.job_id[:12]}  {spec.name:<28} {spec.model}/{spec.mode:<12} seed={spec.seed:<4} "
            f"prio={spec.priority:<3} class={tickets.ticket_class(spec)}"
        )
    return "\n".join(lines)


def sync_report(report: dict[str, Any]) -> str:
    lines = [
        f"{len(report['created'])} new, {len(report['updated'])} updated, "
        f"{len(report['unchanged'])} unchanged, {len(report['not_in_manifest'])} only in the fleet"
        + (f", {len(report['refused'])} refused" if report.get("refused") else "")
    ]
    for refused in report.get("refused") or []:
        lines.append(f"  refused {refused['name']} ({refused['job_id'][:12]}): {refused['reason']}")
    return "\n".join(lines)


def auth_files(result: dict[str, Any]) -> str:
    lines = [
        f"wrote {result['dir']}:",
        f"  server include  {result['server_include']}  (include it from nats-server.conf)",
    ]
    for name, ident in result["identities"].items():
        lines.append(f"  {name:<16} {ident['public_key'][:16]}…  seed {ident['seed']}  env {ident['env']}")
    lines.append(f"  spec signing key: public {result['signing_public_key']} (agents trust it: TRAINFLEET_TRUST_KEY)")
    return "\n".join(lines)


# -- status, jobs, workers ---------------------------------------------------------
def fleet_status(out: dict[str, Any]) -> str:
    counts = "  ".join(f"{state}={n}" for state, n in out["jobs"].items() if n)
    hosts = out["hosts"]
    alive = f" ({', '.join(hosts['alive'])})" if hosts["alive"] else ""
    stale = f" ({', '.join(hosts['stale'])})" if hosts["stale"] else ""
    name = display.safe_text(str(out.get("fleet") or ""), newlines=False)
    return (
        (f"fleet: {name}\n" if name else "") + f"jobs: {out['total']}" + (f"  {counts}" if counts else "") + "\n"
        f"workers: {len(hosts['alive'])} alive{alive}, {len(hosts['stale'])} stale{stale}"
    )


def _row_progress(row: dict[str, Any]) -> str:
    progress = row.get("progress") or {}
    step, total = progress.get("step"), progress.get("total")
    if row["state"] in ("claimed", "running") and isinstance(step, int) and isinstance(total, int) and total > 0:
        return f"{display.bar(min(step, total), total, 8)} {step}/{total}"
    return ""


def jobs_table(rows: list[dict[str, Any]], filtered: bool) -> None:
    print(f"{'ID':<12}  {'NAME':<28} {'STATE':<10} {'HOST':<12} {'TRY':>3} {'PRIO':>4}  {'PROGRESS':<16} METRIC")
    for r in rows:
        metric = fmt_metrics(r["metric"] or (r["progress"] or {}).get("metrics") or {}, 2)
        print(
            f"{r['job_id'][:12]}  {r['name']:<28} {r['state']:<10} {r['host'] or '-':<12} "
            f"{r['attempts']:>3} {r['priority']:>4}  {_row_progress(r):<16} {metric}".rstrip()
        )
    if not rows:
        print("(no jobs" + (" match" if filtered else "") + ")", file=sys.stderr)


def _gpu_use(w: dict[str, Any]) -> str:
    """Each GPU's live VRAM use and utilisation, compactly: ``41/141G 87%`` (agent-written text made
    safe); entries from agents without telemetry have no ``gpu_stats``."""
    parts = []
    for s in w.get("gpu_stats") or ():
        if s.get("error"):
            parts.append(f"gpu{s['index']} error")
            continue
        util = f" {s['util_pct']:.0f}%" if s.get("util_pct") is not None else ""
        parts.append(f"{s['vram_used_gib']:.0f}/{s['vram_total_gib']:.0f}G{util}")
    if not parts and w["capability"]["gpus"] and w.get("gpu_stats_reason"):
        parts.append(f"no telemetry: {w['gpu_stats_reason']}")
    return safe_text("; ".join(parts) or "-", newlines=False)


def workers_table(workers: list[dict[str, Any]]) -> None:
    print(
        f"{'HOST':<16} {'STATE':<6} {'CORES':>5} {'RAM GiB':>8} {'GPUS':>4} {'SEEN':>6}  {'JOBS':<14} "
        f"{'CLASSES':<24} GPU USE"
    )
    for w in workers:
        cap = w["capability"]
        seen = f"{w['age_s']:>5.0f}s" + ("" if w["alive"] else " stale")
        jobs = ",".join(j[:12] for j in w["current_jobs"]) or "-"
        print(
            f"{w['host_id']:<16} {w['state']:<6} {cap['cores_usable']:>5g} {cap['ram_available_gib']:>8.1f} "
            f"{len(cap['gpus']):>4} {seen:>6}  {jobs:<14} {','.join(w['classes']):<24} {_gpu_use(w)}"
        )
    if not workers:
        print("(no workers registered)", file=sys.stderr)


# -- show ----------------------------------------------------------------------------
def job_detail(data: dict[str, Any]) -> None:
    """``trainfleet show``: the record, its history and the bundle's provenance."""
    _print_detail(data, msgspec.convert(_record_fields(data), JobRecord), msgspec.convert(data["spec"], JobSpec))


def _print_history(data: dict[str, Any]) -> None:
    note = "; older revisions already dropped" if data["history_truncated"] else ""
    print(f"history (revisions the jobs KV keeps, heartbeats collapsed{note}):")
    for t in data["history"]:
        print(
            f"  rev {t['revision']:<6} {display.fmt_time(t['at'])}  {t['status']:<10} {t['host'] or '-':<12} "
            f"attempt {t['attempt']}  gen {t['generation']}"
            + (f"  {safe_text(t['reason'], newlines=False)}" if t["reason"] else "")
        )


def _print_provenance(prov: dict[str, Any], source: str | None = None) -> None:
    """The run's provenance: read from the object store, so every field is shown made safe."""
    host = prov.get("host") or {}
    timings = prov.get("timings") or {}
    gpus = ", ".join(str(g.get("name", "?")) for g in host.get("gpus") or []) or "none"

    def line(text: str) -> None:
        print(safe_text(text, newlines=False))

    print(safe_text(f"provenance (from {source}):" if source else "provenance (from the bundle):", newlines=False))
    line(
        f"  {'host':<11} {host.get('host_id', '-')}  {host.get('platform', '')}  "
        f"{host.get('cores_usable', '?')} cores  {host.get('ram_total_gib', '?')} GiB  GPU: {gpus}"
    )
    line(f"  {'code':<11} {prov.get('code_commit') or '-'}")
    versions = prov.get("versions") or {}
    line(f"  {'versions':<11} " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    line(f"  {'attempt':<11} {prov.get('attempt', '-')} (generation {prov.get('generation', '-')})")
    dur = timings.get("duration_s")
    line(
        f"  {'timings':<11} started {display.fmt_time(timings.get('started_at'))}, finished "
        f"{display.fmt_time(timings.get('finished_at'))}" + (f" ({display.fmt_duration(dur)})" if dur else "")
    )
    if prov.get("argv"):
        line(f"  {'argv':<11} {' '.join(map(str, prov['argv']))}")


def _print_detail(data: dict[str, Any], rec: JobRecord, spec: JobSpec) -> None:
    print(f"{spec.name}  ({rec.job_id})")
    host = f" on {rec.claimed_by}" if rec.claimed_by else ""
    print(
        f"  {'state':<11} {rec.status.value}{host}  (attempt {rec.attempt} of {rec.max_attempts}, "
        f"generation {rec.generation}, revision {data['revision']})"
    )
    print(f"  {'model':<11} {spec.model}/{spec.mode}  seed={spec.seed}  priority={spec.priority}  class={rec.klass}")
    print(f"  {'hyper':<11} {json.dumps(spec.hyper, sort_keys=True)}")
    print(
        f"  {'command':<11} {' '.join(spec.command)}"
        + (f"  (signed by {data['signed_by']})" if data.get("signed_by") else "  (unsigned)")
    )
    needs = [
        f"{k}={','.join(v) if isinstance(v, list) else v}"
        for k, v in msgspec.to_builtins(spec.constraints).items()
        if v
    ]
    needs += [f"requires={','.join(spec.requires)}"] if spec.requires else []
    if needs:
        print(f"  {'needs':<11} {'  '.join(needs)}")
    if rec.status.held and (progress := display.progress_text(rec)):
        print(f"  {'progress':<11} {progress}  {display.fmt_metrics((rec.progress or {}).get('metrics') or {})}")
    if rec.metrics:
        head = rec.metrics.get("headline")
        ordered = {head: rec.metrics[head]} if head in rec.metrics else {}
        ordered.update((k, v) for k, v in sorted(rec.metrics.items()) if k not in (head, "headline"))
        print(f"  {'metrics':<11} {display.fmt_metrics(ordered)}")
    if rec.artifact:
        print(f"  {'artifact':<11} {rec.artifact}  ({display.fmt_bytes(rec.artifact_bytes)})")
    print(
        f"  {'times':<11} created {display.fmt_time(rec.created_at)}, started {display.fmt_time(rec.started_at)}, "
        f"finished {display.fmt_time(rec.finished_at)}"
        + (f" ({display.fmt_duration(display.duration(rec))})" if rec.started_at else "")
    )
    for host_id, why in sorted(rec.excluded_hosts.items()):
        print(f"  {'excluded':<11} {host_id}: {why}")
    # reason and last_error are the trainer's stderr tail: untrusted (broker/display.py: safe_text).
    if rec.reason:
        print(f"  {'reason':<11} {safe_text(rec.reason, newlines=False)}")
    if rec.last_error:
        print("  last error:")
        for line in rec.last_error.rstrip("\n").split("\n"):  # not splitlines: CR is shown, not a break
            print(f"    {safe_text(line)}")
    _print_history(data)
    if data["provenance"]:
        _print_provenance(data["provenance"], data.get("provenance_object"))
    elif data["provenance_error"]:
        print(f"provenance: unavailable ({data['provenance_error']})")
    _print_runs(data.get("runs") or [])


def _print_runs(runs: list[dict[str, Any]]) -> None:
    """Every run of the job that stored provenance (one object each; runs may share an artifact)."""
    if not runs:
        return
    print("runs (provenance objects):")
    for run in runs:
        what = (
            f"unreadable ({run['error']})"
            if run["error"]
            else (
                f"{run['host'] or '-'}  finished {display.fmt_time(run['finished_at'])}  "
                f"artifact {str(run['artifact'] or '-')[:12]}"
            )
        )
        print(safe_text(f"  gen {run['generation']} attempt {run['attempt']}  {what}  {run['object']}", newlines=False))


def _record_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k in JobRecord.__struct_fields__}


# -- logs ------------------------------------------------------------------------------
class LogPrinter:
    """Prints a job's log entries as they come, with a separator where another run begins."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.shown: tuple[int | None, int | None] | None = None

    def entry(self, entry: LogEntry) -> None:
        if self.as_json:
            print(json.dumps(entry.to_json(), default=str), flush=True)
            return
        if entry.kind != "log":
            print(display.event_text(entry.kind, entry.event or {}, entry.attempt), flush=True)
            return
        if self.shown is not None and entry.run != self.shown:
            gen = f" (generation {entry.generation})" if entry.generation is not None else ""
            print(f"--- attempt {entry.attempt}{gen} ---", flush=True)
        self.shown = entry.run
        # The trainer's own output: untrusted, so control characters are shown escaped.
        line = safe_text(entry.line or "")
        print(line, file=sys.stderr if entry.stream == "stderr" else sys.stdout, flush=True)


# -- artifacts -------------------------------------------------------------------------
def artifacts_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'ARTIFACT':<16} {'SIZE':>10}  {'JOB':<28} {'HOST':<12} STATE")
    for r in rows:
        job = r["name"] or "(orphan: no record points at it)"
        state = r["state"] or "-"
        if not r["stored"]:
            state += "  MISSING from the object store"
        print(f"{r['artifact'][:16]} {fmt_bytes(r['bytes']):>10}  {job:<28} {r['host'] or '-':<12} {state}")
    if not rows:
        print("(no artifacts)", file=sys.stderr)


def artifact_fetched(result: dict[str, Any]) -> str:
    lines = [f"downloaded {result['path']} ({result['bytes']} bytes, sha256 verified)"]
    if result["extracted"]:
        lines.append(f"extracted into {result['extracted']}")
    if result.get("provenance"):
        lines.append(f"the run's provenance in {result['provenance']}")
    elif result.get("provenance_error"):
        lines.append(safe_text(f"provenance: unavailable ({result['provenance_error']})", newlines=False))
    return "\n".join(lines)


def sweep_report(result: dict[str, Any]) -> str:
    verb_text = "would purge" if result["dry_run"] else "purged"
    return (
        f"{verb_text} {result['chunk_sets']} stray chunk set(s), {result['chunks']} chunk(s) "
        f"(no object points at them; newest chunk older than {result['older_than_s']:g}s)"
    )


def prune_report(result: dict[str, Any]) -> str:
    verb_text = "would remove" if result["dry_run"] else "removed"
    kept = (
        f"kept {result['kept_referenced']} referenced, {result['kept_recent']} younger than {result['older_than_s']:g}s"
    )
    if result.get("kept_provenance"):
        kept += f", {result['kept_provenance']} provenance object(s) of existing jobs"
    if result["foreign"]:
        kept += f", {result['foreign']} not trainfleet's (left alone)"
    return f"{verb_text} {len(result['removed'])} unreferenced artifact(s), {fmt_bytes(result['bytes'])}; {kept}"


# -- explain and plan --------------------------------------------------------------------
def render_explain(job: Job, matches: list[Match]) -> str:
    # The monitor's job detail shows the same lines: one rendering, in broker/explain.py.
    return explain_text(job, matches)


def render_plan(plans: list[JobPlan]) -> str:
    lines = []
    for p in plans:
        hosts = ", ".join(p.hosts) if p.hosts else "NONE"
        lines.append(f"{p.job_id[:12]}  {p.name:<28} {p.klass:<12} → {hosts}")
        if not p.runnable:
            for host, reasons in sorted(p.rejected.items()):
                lines.append(f"      {host}: {'; '.join(reasons)}")
    never = [p.name for p in plans if not p.runnable]
    if never:
        lines.append(f"warning: {len(never)} job(s) no registered host can ever run: {', '.join(never)}")
    return "\n".join(lines)


# -- trainfleet up ------------------------------------------------------------------------
def _progress_cell(rec: JobRecord) -> str:
    text = display.progress_text(rec)
    return f"[green]{text}[/]" if rec.status == JobStatus.COMPLETED else text


def render_table(manifest: Manifest, records: dict[str, JobRecord], *, final: bool = False) -> Table:
    now = time.time()
    done = sum(1 for r in records.values() if r.status.terminal)
    title = f"trainfleet · {manifest.path} · {done}/{len(manifest.jobs)} done"
    table = Table(title=title, title_justify="left", expand=False)
    # Minimum widths keep the live table from jumping as bars and metrics appear.
    columns = (
        ("job", 0),
        ("model/mode", 0),
        ("state", 9),
        ("host", 6),
        ("try", 3),
        ("time", 6),
        ("artifact", 12) if final else ("progress", 16),
        ("metric", 0 if final else 28),
    )
    for col, width in columns:
        table.add_column(col, no_wrap=True, min_width=width or None)
    for spec in sorted(manifest.jobs, key=lambda s: (-s.priority, s.name)):
        rec = records.get(spec.job_id)
        if rec is None:
            table.add_row(spec.name, f"{spec.model}/{spec.mode}", "[dim]unsynced[/]", "", "", "", "", "")
            continue
        table.add_row(
            spec.name,
            f"{spec.model}/{spec.mode}",
            display.styled_state(rec.status.value),
            rec.claimed_by or "-",
            str(rec.attempt),
            display.fmt_duration(display.duration(rec, now)),
            (rec.artifact or "-")[:12] if final else _progress_cell(rec),
            Text(display.headline(rec)),  # trainer-named metrics: never read as markup
        )
    return table


def summary_json(manifest: Manifest, records: dict[str, JobRecord]) -> list[dict[str, Any]]:
    out = []
    for spec in manifest.jobs:
        rec = records.get(spec.job_id)
        out.append(
            {
                "job_id": spec.job_id,
                "name": spec.name,
                "state": rec.status.value if rec else "unsynced",
                "host": rec.claimed_by if rec else None,
                "attempts": rec.attempt if rec else 0,
                "duration_s": display.duration(rec) if rec else None,
                "artifact": rec.artifact if rec else None,
                "metrics": rec.metrics if rec else {},
                "last_error": rec.last_error if rec else None,
            }
        )
    return out


def print_changes(console: Console, manifest: Manifest, records: dict[str, JobRecord], seen: dict[str, str]) -> None:
    names = {spec.job_id: spec.name for spec in manifest.jobs}
    for job_id, rec in sorted(records.items(), key=lambda kv: names.get(kv[0], kv[0])):
        key = f"{rec.status.value}/{rec.attempt}"
        if seen.get(job_id) != key:
            seen[job_id] = key
            host = f" on {rec.claimed_by}" if rec.claimed_by else ""
            extra = f" {display.headline(rec)}" if rec.status.terminal else ""
            name = names.get(job_id, job_id[:12])
            # Text, not a markup string: the headline carries trainer-named metrics.
            console.print(Text(f"{time.strftime('%H:%M:%S')} {name:<28} {rec.status.value}{host}{extra}"))
