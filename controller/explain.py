"""Matchmaking made visible: which worker can run a job, and exactly why not.

``plan_manifest`` answers, before a sync, which registered hosts could ever take
each job and flags the jobs none ever can. ``explain_job`` (one job against every
registered worker, now) lives in trainfleet.broker.explain, so the monitor computes
it with the same code; it is re-exported here. The checks are the agent's own
(trainfleet.broker.eligibility) plus the routing the agent does by class
(trainfleet.broker.tickets), so the answer matches what the fleet will do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainfleet.broker import tickets
from trainfleet.broker.eligibility import at_best, ineligibility, reported_module_check
from trainfleet.broker.explain import Match, _routing, explain_job, explain_json, explain_ref
from trainfleet.broker.schema import JobRecord, WorkerRecord
from trainfleet.controller.manifest import Manifest, excluded_hosts

__all__ = ["JobPlan", "Match", "explain_job", "explain_json", "explain_ref", "plan_manifest"]


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
