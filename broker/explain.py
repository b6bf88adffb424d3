"""Matchmaking made visible: which worker can run a job now, and exactly why not.

``explain_job`` answers for one job against every registered worker (like
``condor_q -better-analyze``). The checks are the agent's own
(trainfleet.broker.eligibility) plus the routing the agent does by class
(trainfleet.broker.tickets), so the answer matches what the fleet will do.

It lives in broker/ so every front end computes the same verdicts with the same code:
the control service and ``trainfleet explain`` (controller/), and the monitor's job
detail screen (tui/), which may import only broker modules. :func:`explain_lines` is
the one text rendering of a verdict, shared by the CLI and the monitor.

Roles: read-only (records, specs and workers: every role that may read the fleet).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainfleet.broker import tickets
from trainfleet.broker.display import safe_text
from trainfleet.broker.eligibility import ineligibility, reported_module_check
from trainfleet.broker.jobs import Job, resolve
from trainfleet.broker.schema import WorkerRecord
from trainfleet.broker.workers import load_workers

if TYPE_CHECKING:
    from trainfleet.broker.connection import Broker


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


def explain_lines(job: Job, matches: list[Match]) -> list[str]:
    """The verdicts as ``trainfleet explain`` prints them, one line each, safe for a terminal
    (host ids and reasons come from the workers KV and the record: shown through safe_text)."""
    record = job.record
    lines = [
        f"{job.spec.name} ({record.job_id[:12]}) is {record.status.value}; ticket class "
        f"{', '.join(tickets.offered_classes(record))}"
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
    return [safe_text(line, newlines=False) for line in lines]


def explain_text(job: Job, matches: list[Match]) -> str:
    """:func:`explain_lines` as one text."""
    return "\n".join(explain_lines(job, matches))
