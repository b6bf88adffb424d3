"""Matchmaking made visible: which worker can run a job, and exactly why not.

``explain_job`` answers for one job against every registered worker (like
``condor_q -better-analyze``); ``plan_manifest`` answers, before a sync, which
registered hosts could ever take each job and flags the jobs none ever can.
The checks are the agent's own (trainfleet.broker.eligibility) plus the routing
the agent does by class (trainfleet.broker.tickets), so the answer matches what
the fleet will do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from trainfleet.broker import tickets
from trainfleet.broker.connection import Broker
from trainfleet.broker.eligibility import at_best, ineligibility, reported_module_check
from trainfleet.broker.jobs import Job, resolve
from trainfleet.broker.schema import JobRecord, WorkerRecord
from trainfleet.broker.workers import load_workers
from trainfleet.controller.manifest import Manifest, excluded_hosts


@dataclass(frozen=True)
class Match:
    host_id: str
    eligible: bool
    reasons: tuple[str, ...] = ()
    alive: bool = True
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "host_id": self.host_id,
            "eligible": self.eligible,
            "reasons": list(self.reasons),
            "alive": self.alive,
            "notes": list(self.notes),
        }


@dataclass
class JobPlan:
    job_id: str
    name: str
    klass: str
    hosts: list[str] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)

    @property
    def runnable(self) -> bool:
        return bool(self.hosts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "name": self.name,
            "class": self.klass,
            "hosts": self.hosts,
            "rejected": self.rejected,
            "runnable": self.runnable,
        }


def _routing(klasses: tuple[str, ...], worker: WorkerRecord) -> list[str]:
    if any(k in worker.classes for k in klasses):
        return []
    return [f"does not pull class {' or '.join(klasses)} (it pulls {', '.join(worker.classes) or 'nothing'})"]


def explain_job(
    job: Job, workers: list[WorkerRecord], *, stale_after_s: float, now: float | None = None
) -> list[Match]:
    """For every registered worker: can it run this job now, and if not, every failing constraint."""
    now = time.time() if now is None else now
    record, spec = job.record, job.spec
    offered = tickets.offered_classes(record)
    out = []
    for worker in workers:
        cap = worker.capability
        reasons = _routing(tuple(offered), worker)
        reasons += ineligibility(spec, cap, record=record, has_module=reported_module_check(cap))
        notes = []
        cpu = tickets.cpu_class()
        if spec.constraints.prefer_cuda and cpu in worker.classes and cpu not in offered:
            notes.append("prefer_cuda: offered to cpu only after the grace window")
        alive = now - worker.last_seen <= stale_after_s
        if not alive:
            notes.append(f"stale: last seen {now - worker.last_seen:.0f}s ago")
        out.append(Match(worker.host_id, not reasons, tuple(reasons), alive, tuple(notes)))
    return out


def plan_manifest(manifest: Manifest, workers: list[WorkerRecord]) -> list[JobPlan]:
    """Which registered hosts could ever take each job (policy, routing and capacity at its best)."""
    plans = []
    for spec in manifest.jobs:
        plan = JobPlan(spec.job_id, spec.name, tickets.ticket_class(spec))
        record = JobRecord(
            job_id=spec.job_id,
            klass=plan.klass,
            offered=tickets.eventual_classes(spec, plan.klass),
            excluded_hosts=excluded_hosts(manifest, spec),
        )
        for worker in workers:
            cap = at_best(worker.capability)
            reasons = _routing(record.offered, worker)
            reasons += ineligibility(spec, cap, record=record, has_module=reported_module_check(cap))
            if reasons:
                plan.rejected[worker.host_id] = reasons
            else:
                plan.hosts.append(worker.host_id)
        plans.append(plan)
    return plans


async def explain_ref(broker: Broker, ref: str, *, stale_after_s: float) -> tuple[Job, list[Match]]:
    """Resolve ``ref`` (name, id or prefix) and explain it against every registered worker."""
    job = await resolve(broker, ref)
    return job, explain_job(job, await load_workers(broker), stale_after_s=stale_after_s)


def explain_json(job: Job, matches: list[Match]) -> dict[str, Any]:
    record = job.record
    return {
        "job_id": record.job_id,
        "name": job.spec.name,
        "status": record.status.value,
        "classes": list(tickets.offered_classes(record)),
        "reason": record.reason,
        "workers": [m.to_dict() for m in matches],
    }
