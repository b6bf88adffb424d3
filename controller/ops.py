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
from trainfleet.broker.artifacts import Artifacts, check_artifact_id, download_artifact, is_artifact_id
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
async def job_detail(broker: Broker, ref: str, *, provenance: bool = True) -> dict[str, Any]:
    """``trainfleet show``: the record and its spec, its revision, state history, provenance."""
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
    if provenance and rec.artifact:
        try:
            data["provenance"] = await Artifacts(broker).provenance(rec.artifact)
        except ArtifactError as exc:
            data["provenance_error"] = str(exc)
    return data


# -- artifacts -----------------------------------------------------------------
async def list_artifacts(broker: Broker) -> list[dict[str, Any]]:
    """Every job with an artifact, then every stored bundle no record points at (an orphan:
    the upload of an agent that lost its lease, or of a job since requeued)."""
    objects = {o.name: o for o in await Artifacts(broker).list()}
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


async def _artifact_target(broker: Broker, ref: str) -> tuple[str, str]:
    """(artifact id, directory name) for a job reference, or for a stored artifact's full id
    (so orphans can be fetched too). Both are 64 lowercase hex, checked here: the directory is
    named by the job id (the artifact id for an orphan), never by the job's name, which is
    anything its manifest said."""
    try:
        job = await resolve(broker, ref)
    except JobNotFound:
        if is_artifact_id(ref):
            return ref, ref
        raise
    if not job.record.artifact:
        raise ArtifactError(f"job {job.spec.name} has no artifact (it is {job.record.status.value})")
    artifact = check_artifact_id(job.record.artifact, f"job {job.job_id[:12]}'s record: artifact")
    return artifact, check_artifact_id(job.job_id, "job id")


async def fetch_artifact(broker: Broker, ref: str, out: Path, *, extract: bool, force: bool = False) -> dict[str, Any]:
    """``artifacts get``: download a job's bundle into ``out`` (verified), optionally extract it
    into the new directory ``out/<job id>`` (``force``: replacing what is there).

    The download and the extraction are bounded by the settings' max_artifact_bytes; a refused
    extraction removes the bundle this call downloaded, so a refusal leaves nothing behind."""
    artifact, dirname = await _artifact_target(broker, ref)
    return await download_artifact(broker, artifact, out, into=dirname if extract else None, force=force)


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
