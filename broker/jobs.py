"""A job as operators see it: its spec (specs bucket) joined with its state record (jobs bucket).

Listings, ``show``, ``explain``, the monitor and operator verbs find jobs by name, id or
id prefix here. Nothing here runs a job: an agent opens and verifies a spec itself
(specs.get_spec with its trusted keys).

Roles: read-only (every role that may read records and specs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainfleet.broker.errors import AmbiguousJob, JobNotFound
from trainfleet.broker.records import Stored, get_record, load_records
from trainfleet.broker.schema import JobRecord, JobSpec
from trainfleet.broker.specs import get_spec, load_specs

if TYPE_CHECKING:
    from trainfleet.broker.connection import Broker

log = logging.getLogger("trainfleet.jobs")


@dataclass(frozen=True)
class Job:
    """One job: what it is (spec) and where it stands (record, at a KV revision)."""

    spec: JobSpec
    record: JobRecord
    revision: int

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def stored(self) -> Stored:
        return Stored(self.record, self.revision)


def join(specs: dict[str, JobSpec], records: dict[str, Stored]) -> dict[str, Job]:
    """Jobs that have both a spec and a record (a record without its spec is logged and left out)."""
    out: dict[str, Job] = {}
    for job_id, stored in records.items():
        spec = specs.get(job_id)
        if spec is None:
            log.warning("job %s has a record but no usable spec; left out", job_id[:12])
            continue
        out[job_id] = Job(spec, stored.record, stored.revision)
    return out


async def load_jobs(broker: Broker) -> dict[str, Job]:
    """Every job with a readable spec and record."""
    records = await load_records(broker)
    return join(await load_specs(broker), records)


async def get_job(broker: Broker, job_id: str) -> Job:
    stored = await get_record(broker, job_id)
    return Job(await get_spec(broker, job_id, identity=False), stored.record, stored.revision)


def resolve_job(jobs: dict[str, Job], ref: str) -> Job:
    """A job by full id, unique id prefix, or exact name."""
    if ref in jobs:
        return jobs[ref]
    by_name = [j for j in jobs.values() if j.spec.name == ref]
    if len(by_name) == 1:
        return by_name[0]
    by_prefix = [j for key, j in jobs.items() if key.startswith(ref)] if len(ref) >= 4 else []
    matches = {j.job_id: j for j in by_name + by_prefix}
    if len(matches) == 1:
        return next(iter(matches.values()))
    if not matches:
        raise JobNotFound(f"no job matches {ref!r} (give a name, an id, or an id prefix of 4+ characters)")
    listed = ", ".join(f"{j.job_id[:12]} ({j.spec.name})" for j in matches.values())
    raise AmbiguousJob(f"{ref!r} matches {len(matches)} jobs: {listed}; give more of the id")


async def resolve(broker: Broker, ref: str) -> Job:
    """A job by full id, unique id prefix or exact name (JobNotFound / AmbiguousJob otherwise)."""
    return resolve_job(await load_jobs(broker), ref)
