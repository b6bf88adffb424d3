"""Operator queries over a :class:`Broker`: what the CLI, the control service and the monitor show.

Everything here reads NATS directly (the jobs and workers KV, the artifacts object
store), so it works with no controller running. Each function returns plain JSON-able
values: the CLI's ``--json`` output and the service's replies are these same shapes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec

from trainfleet.broker import display, specs
from trainfleet.broker.artifacts import (
    Artifacts,
    check_artifact_id,
    download_artifact,
    is_artifact_id,
    parse_provenance_object_name,
)
from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import ArtifactError, JobNotFound
from trainfleet.broker.jobs import Job, load_jobs, resolve
from trainfleet.broker.records import job_history, load_records
from trainfleet.broker.schema import JobStatus
from trainfleet.broker.workers import load_workers, stale_after_s

log = logging.getLogger("trainfleet.controller")


# -- status and listings -------------------------------------------------------
async def fleet_status(broker: Broker, now: float | None = None) -> dict[str, Any]:
    """Job counts for every state, and which workers are alive or stale."""
    now = time.time() if now is None else now
    records = await load_records(broker)
    workers = await load_workers(broker)
    counts = {s.value: 0 for s in JobStatus}
    for stored in records.values():
        counts[stored.record.status.value] += 1
    alive = [w.host_id for w in workers if now - w.last_seen <= stale_after_s(broker.settings)]
    stale = [w.host_id for w in workers if w.host_id not in alive]
    return {
        "fleet": (await specs.get_fleet_info(broker)).get("name", ""),
        "jobs": counts,
        "total": len(records),
        "workers": {"alive": len(alive), "stale": len(stale)},
        "hosts": {"alive": alive, "stale": stale},
    }


def job_json(job: Job) -> dict[str, Any]:
    """A job as one JSON object: its record's fields, with its spec under ``spec``."""
    return {**msgspec.to_builtins(job.record), "spec": msgspec.to_builtins(job.spec)}


def job_row(job: Job) -> dict[str, Any]:
    """One line of ``trainfleet jobs``."""
    rec, spec = job.record, job.spec
    duration = (rec.finished_at - rec.started_at) if rec.finished_at and rec.started_at else None
    return {
        "job_id": rec.job_id,
        "name": spec.name,
        "model": spec.model,
        "mode": spec.mode,
        "state": rec.status.value,
        "host": rec.claimed_by,
        "attempts": rec.attempt,
        "generation": rec.generation,
        "priority": spec.priority,
        "duration_s": duration,
        "artifact": rec.artifact,
        "metric": display.headline_metrics(rec.metrics) or None,
        "progress": rec.progress or None,
        "reason": rec.reason,
        "last_error": rec.last_error,
    }


async def list_jobs(
    broker: Broker, *, state: str | None = None, model: str | None = None, host: str | None = None
) -> list[dict[str, Any]]:
    """Jobs matching every given filter, highest priority first (then by name)."""
    rows = [job_row(job) for job in (await load_jobs(broker)).values()]
    rows = [
        r
        for r in rows
        if (not state or r["state"] == state) and (not model or r["model"] == model) and (not host or r["host"] == host)
    ]
    rows.sort(key=lambda r: (-r["priority"], r["name"], r["job_id"]))
    return rows


async def list_workers(broker: Broker, now: float | None = None) -> list[dict[str, Any]]:
    """Every registered worker with its capability, plus ``age_s`` and ``alive``."""
    now = time.time() if now is None else now
    out = []
    for worker in await load_workers(broker):
        row = msgspec.to_builtins(worker)
        row["age_s"] = max(0.0, now - worker.last_seen)
        row["alive"] = row["age_s"] <= stale_after_s(broker.settings)
        out.append(row)
    return out


# -- show ----------------------------------------------------------------------
# ``show`` reads the provenance of at most this many of a job's runs (the latest).
SHOW_MAX_RUNS = 20


async def job_detail(broker: Broker, ref: str, *, provenance: bool = True) -> dict[str, Any]:
    """``trainfleet show``: the record and its spec, its revision, state history, provenance.

    ``provenance`` is the current run's (its provenance object; an old bundle's own
    provenance.json), ``provenance_object`` the object it came from; ``runs`` lists every run
    of the job that stored provenance (an earlier generation's too), each read from its object."""
    job = await resolve(broker, ref)
    rec = job.record
    data = job_json(job)
    data["revision"] = job.revision
    data["signed_by"] = await specs.signed_by(broker, job.job_id)
    history, truncated = await job_history(broker, rec.job_id)
    data["history"] = [asdict(t) for t in history]
    data["history_truncated"] = truncated
    data["provenance"] = None
    data["provenance_error"] = None
    data["provenance_object"] = None
    data["runs"] = []
    if provenance:
        store = Artifacts(broker)
        if rec.artifact:
            try:
                found = await store.run_provenance(rec.job_id, rec.generation, rec.attempt, rec.artifact)
                data["provenance"], data["provenance_object"] = found.provenance, found.source
            except ArtifactError as exc:
                data["provenance_error"] = str(exc)
        runs = {(t.generation, t.attempt) for t in history if t.attempt > 0} | {(rec.generation, rec.attempt)}
        data["runs"] = await _runs(store, rec.job_id, runs)
    return data


async def _runs(store: Artifacts, job_id: str, runs: set[tuple[int, int]]) -> list[dict[str, Any]]:
    """One row per stored provenance object of the job's runs the history names (the latest
    SHOW_MAX_RUNS; a run older than the revisions the jobs KV keeps is not looked for)."""
    rows = []
    for name in await store.provenance_objects(job_id, sorted(runs)[-SHOW_MAX_RUNS:]):
        _, generation, attempt = parse_provenance_object_name(name) or ("", 0, 0)
        row: dict[str, Any] = {"object": name, "generation": generation, "attempt": attempt, "error": None}
        try:
            prov = await store.read_provenance_object(name) or {}
        except ArtifactError as exc:
            prov, row["error"] = {}, str(exc)
        # (untrusted: an agent wrote it; only values of the expected types are passed on)
        host = prov.get("host") if isinstance(prov.get("host"), dict) else {}
        timings = prov.get("timings") if isinstance(prov.get("timings"), dict) else {}
        finished = timings.get("finished_at")
        row["artifact"] = prov.get("artifact") if is_artifact_id(prov.get("artifact")) else None
        row["host"] = host.get("host_id") if isinstance(host.get("host_id"), str) else None
        row["finished_at"] = finished if isinstance(finished, (int, float)) and not isinstance(finished, bool) else None
        rows.append(row)
    return rows


# -- artifacts -----------------------------------------------------------------
async def list_artifacts(broker: Broker) -> list[dict[str, Any]]:
    """Every job with an artifact, then every stored bundle no record points at (an orphan:
    the upload of an agent that lost its lease, or of a job since requeued)."""
    # (a run's provenance object is listed by `show`, not here)
    objects = {o.name: o for o in await Artifacts(broker).list() if parse_provenance_object_name(o.name) is None}
    rows: list[dict[str, Any]] = []
    referenced: set[str] = set()
    for job in sorted((await load_jobs(broker)).values(), key=lambda j: j.spec.name):
        rec = job.record
        if not rec.artifact:
            continue
        referenced.add(rec.artifact)
        obj = objects.get(rec.artifact)
        rows.append(
            {
                "artifact": rec.artifact,
                "job_id": rec.job_id,
                "name": job.spec.name,
                "host": rec.claimed_by,
                "state": rec.status.value,
                "bytes": obj.size if obj else rec.artifact_bytes,
                "stored": obj is not None,
                "orphan": False,
                "mtime": obj.mtime if obj else None,
            }
        )
    for name, obj in sorted(objects.items()):
        if name not in referenced:
            rows.append(
                {
                    "artifact": name,
                    "job_id": None,
                    "name": None,
                    "host": None,
                    "state": None,
                    "bytes": obj.size,
                    "stored": True,
                    "orphan": True,
                    "mtime": obj.mtime,
                }
            )
    return rows


async def _artifact_target(broker: Broker, ref: str) -> tuple[str, str, Job | None]:
    """(artifact id, directory name, the job) for a job reference, or for a stored artifact's
    full id (so orphans can be fetched too; no job then). Both are 64 lowercase hex, checked
    here: the directory is named by the job id (the artifact id for an orphan), never by the
    job's name, which is anything its manifest said."""
    try:
        job = await resolve(broker, ref)
    except JobNotFound:
        if is_artifact_id(ref):
            return ref, ref, None
        raise
    if not job.record.artifact:
        raise ArtifactError(f"job {job.spec.name} has no artifact (it is {job.record.status.value})")
    artifact = check_artifact_id(job.record.artifact, f"job {job.job_id[:12]}'s record: artifact")
    return artifact, check_artifact_id(job.job_id, "job id"), job


async def fetch_artifact(broker: Broker, ref: str, out: Path, *, extract: bool, force: bool = False) -> dict[str, Any]:
    """``artifacts get``: download a job's bundle into ``out`` (verified), optionally extract it
    into the new directory ``out/<job id>`` (``force``: replacing what is there), and write the
    run's provenance beside it (``out/<job id>/provenance.json`` when extracted, else
    ``out/<job id>.provenance.json``; none for an orphan, whose run no record names).

    The download and the extraction are bounded by the settings' max_artifact_bytes; a refused
    extraction removes the bundle this call downloaded, so a refusal leaves nothing behind. A
    provenance that cannot be read does not stop the download: ``provenance_error`` says why."""
    artifact, dirname, job = await _artifact_target(broker, ref)
    provenance, problem = None, None
    if job is not None:
        rec = job.record
        try:
            provenance = (
                await Artifacts(broker).run_provenance(rec.job_id, rec.generation, rec.attempt, artifact)
            ).provenance
        except ArtifactError as exc:
            problem = str(exc)
    result = await download_artifact(
        broker,
        artifact,
        out,
        into=dirname if extract else None,
        force=force,
        provenance=provenance,
        job_id=dirname,
    )
    result["provenance_error"] = problem
    return result


async def sweep_artifacts(broker: Broker, older_than_s: float | None, *, dry_run: bool) -> dict[str, Any]:
    """``artifacts sweep``: stray chunk sets (uploads cut off mid-way), purged unless ``dry_run``."""
    older_than = older_than_s if older_than_s is not None else broker.settings.stray_chunk_age_s
    store = Artifacts(broker)
    stray = await (store.stray(older_than) if dry_run else store.sweep(older_than))
    return {
        "dry_run": dry_run,
        "older_than_s": older_than,
        "chunk_sets": len(stray),
        "chunks": sum(stray.values()),
        "nuids": sorted(stray),
    }


async def prune_artifacts(broker: Broker, older_than_s: float | None, *, dry_run: bool) -> dict[str, Any]:
    """``artifacts prune``: stored bundles no job record points at, older than ``older_than_s``
    (default artifact_prune_age_s), removed unless ``dry_run``."""
    older_than = older_than_s if older_than_s is not None else broker.settings.artifact_prune_age_s
    report = await Artifacts(broker).prune(older_than, dry_run=dry_run)
    return report.to_dict()
