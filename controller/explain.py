"""Matchmaking made visible: which worker can run a job, and exactly why not.

``explain_job`` answers for one job against every registered worker (like
``condor_q -better-analyze``); ``plan_manifest`` answers, before a sync, which
registered hosts could ever take each job and flags the jobs none ever can.
The checks are the agent's own (trainfleet.agent.eligibility) plus the routing
the agent does by class, so the answer matches what the fleet will do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from trainfleet.agent.capability import KNOWN_MODULES
from trainfleet.agent.eligibility import ineligibility
from trainfleet.broker.connection import Broker
from trainfleet.broker.names import cpu_class
from trainfleet.broker.schema import Capability, JobRecord, JobSpec, WorkerRecord
from trainfleet.controller.manifest import Manifest, ticket_class


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


def _remote_module_check(cap: Capability):
    """A worker's modules as it reported them; modules outside the known list can't be judged here."""

    def has(module: str) -> bool:
        return module in cap.modules or module not in KNOWN_MODULES

    return has


def at_best(cap: Capability) -> Capability:
    """The host with nothing else running: what it could *ever* offer."""
    gpus = tuple(msgspec.structs.replace(g, vram_free_gib=g.vram_total_gib) for g in cap.gpus)
    return msgspec.structs.replace(cap, ram_available_gib=cap.ram_total_gib, gpus=gpus)


def _routing(klasses: tuple[str, ...], worker: WorkerRecord) -> list[str]:
    if any(k in worker.classes for k in klasses):
        return []
    return [f"does not pull class {' or '.join(klasses)} (it pulls {', '.join(worker.classes) or 'nothing'})"]


def explain_job(
    record: JobRecord, workers: list[WorkerRecord], *, stale_after_s: float, now: float | None = None
) -> list[Match]:
    """For every registered worker: can it run this job now, and if not, every failing constraint."""
    now = time.time() if now is None else now
    offered = record.offered or (record.klass,)
    out = []
    for worker in workers:
        cap = worker.capability
        reasons = _routing(tuple(offered), worker)
        reasons += ineligibility(record.spec, cap, record=record, has_module=_remote_module_check(cap))
        notes = []
        if record.spec.constraints.prefer_cuda and cpu_class() in worker.classes and cpu_class() not in offered:
            notes.append("prefer_cuda: offered to cpu only after the grace window")
        alive = now - worker.last_seen <= stale_after_s
        if not alive:
            notes.append(f"stale: last seen {now - worker.last_seen:.0f}s ago")
        out.append(Match(worker.host_id, not reasons, tuple(reasons), alive, tuple(notes)))
    return out


def plan_manifest(manifest: Manifest, workers: list[WorkerRecord]) -> list[JobPlan]:
    """Which registered hosts could ever take each job (policy, routing and capacity at its best)."""
    from trainfleet.controller.controller import excluded_hosts

    plans = []
    for spec in manifest.jobs:
        plan = JobPlan(spec.job_id, spec.name, ticket_class(spec))
        record = JobRecord(
            job_id=spec.job_id,
            spec=spec,
            klass=plan.klass,
            offered=_eventual_classes(spec, plan.klass),
            excluded_hosts=excluded_hosts(manifest, spec),
        )
        for worker in workers:
            cap = at_best(worker.capability)
            reasons = _routing(record.offered, worker)
            reasons += ineligibility(spec, cap, record=record, has_module=_remote_module_check(cap))
            if reasons:
                plan.rejected[worker.host_id] = reasons
            else:
                plan.hosts.append(worker.host_id)
        plans.append(plan)
    return plans


def _eventual_classes(spec: JobSpec, klass: str) -> tuple[str, ...]:
    """prefer_cuda jobs reach cpu after the grace window."""
    if spec.constraints.prefer_cuda and klass != cpu_class() and not klass.startswith("host."):
        return (klass, cpu_class())
    return (klass,)


async def explain_ref(broker: Broker, ref: str, *, stale_after_s: float) -> tuple[JobRecord, list[Match]]:
    """Resolve ``ref`` (name, id or prefix) and explain it against every registered worker."""
    from trainfleet.controller.store import load_records, load_workers, resolve_job

    rec = resolve_job(await load_records(broker), ref).record
    return rec, explain_job(rec, await load_workers(broker), stale_after_s=stale_after_s)


def explain_json(record: JobRecord, matches: list[Match]) -> dict[str, Any]:
    return {
        "job_id": record.job_id,
        "name": record.spec.name,
        "status": record.status.value,
        "classes": list(record.offered or (record.klass,)),
        "reason": record.reason,
        "workers": [m.to_dict() for m in matches],
    }


def render_explain(record: JobRecord, matches: list[Match]) -> str:
    lines = [
        f"{record.spec.name} ({record.job_id[:12]}) is {record.status.value}; ticket class "
        f"{', '.join(record.offered or (record.klass,))}"
    ]
    if record.reason:
        lines.append(f"  last reason: {record.reason}")
    if not matches:
        lines.append("  no workers are registered")
    for m in matches:
        verdict = "can run it" if m.eligible else "cannot run it"
        lines.append(f"  {m.host_id:<16} {verdict}{'' if m.alive else ' (stale)'}")
        lines += [f"      ✗ {r}" for r in m.reasons]
        lines += [f"      · {n}" for n in m.notes]
    if matches and not any(m.eligible and m.alive for m in matches):
        lines.append("  → no live worker can run this job now")
    return "\n".join(lines)


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
