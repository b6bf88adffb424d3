"""A job as operators see it: its spec (specs bucket) joined with its state record (jobs bucket).

Listings, ``show``, ``explain``, the monitor and operator verbs find jobs by name, id or
id prefix here. Nothing here runs a job: an agent opens and verifies a spec itself
(specs.get_spec with its trusted keys).

Roles: read-only (every role that may read records and specs).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from trainfleet.broker import jsapi, kv
from trainfleet.broker.errors import AmbiguousJob, JobNotFound, SchemaError, UntrustedSpec
from trainfleet.broker.names import FLEET_INFO_KEY
from trainfleet.broker.records import Stored, get_record, job_ids, load_records
from trainfleet.broker.schema import JobRecord, JobSpec
from trainfleet.broker.specs import get_spec, load_specs

if TYPE_CHECKING:
    from trainfleet.broker.connection import Broker

log = logging.getLogger("trainfleet.jobs")

JOB_ID_LENGTH = 64
_HEX = re.compile(r"[0-9a-f]+")


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


def is_job_id(ref: str) -> bool:
    """A full job id: 64 lowercase hex digits (a sha256, specs.job_id_for)."""
    return len(ref) == JOB_ID_LENGTH and _HEX.fullmatch(ref) is not None


def resolve_job(jobs: dict[str, Job], ref: str) -> Job:
    """A job by full id, unique id prefix, or exact name."""
    if ref in jobs:
        return jobs[ref]
    by_name = [j for j in jobs.values() if j.spec.name == ref]
    if len(by_name) == 1:
        return by_name[0]
    by_prefix = [j for key, j in jobs.items() if key.startswith(ref)] if len(ref) >= 4 else []
    return _one({j.job_id: j for j in by_name + by_prefix}, ref)


def _one(matches: dict[str, Job], ref: str) -> Job:
    if len(matches) == 1:
        return next(iter(matches.values()))
    if not matches:
        raise JobNotFound(f"no job matches {ref!r} (give a name, an id, or an id prefix of 4+ characters)")
    listed = ", ".join(f"{j.job_id[:12]} ({j.spec.name})" for j in matches.values())
    raise AmbiguousJob(f"{ref!r} matches {len(matches)} jobs: {listed}; give more of the id")


async def _readable(broker: Broker, job_id: str) -> Job | None:
    """The job if it has both a record and a usable spec (what load_jobs would list), else None."""
    try:
        return await get_job(broker, job_id)
    except JobNotFound:
        return None
    except (SchemaError, UntrustedSpec) as exc:
        log.warning("job %s is unreadable: %s; left out", job_id[:12], exc)
        return None


async def _named(broker: Broker, ids: Iterable[str], name: str) -> list[Job]:
    """The jobs among ``ids`` whose spec is named ``name`` now (read one record and spec each)."""
    found = await asyncio.gather(*(_readable(broker, job_id) for job_id in sorted(ids)))
    return [job for job in found if job is not None and job.spec.name == name]


async def resolve(broker: Broker, ref: str, names: NameIndex | None = None) -> Job:
    """A job by full id, unique id prefix or exact name (JobNotFound / AmbiguousJob otherwise),
    the same answer :func:`resolve_job` gives over :func:`load_jobs`, reading less:

    * a full id that is a job: its record and its spec (two gets);
    * an exact name: with ``names`` (a :class:`NameIndex`), the record and spec of each job
      the index lists under it (one of each for a unique name); without, every spec is read
      (never every record);
    * otherwise (no job of that name, or several) an id prefix is looked for: the jobs
      bucket's keys are listed (not its records), then the matches read one by one.
    """
    if is_job_id(ref):
        job = await _readable(broker, ref)
        if job is not None:
            return job
    ids = await names.ids(ref) if names is not None else None
    if ids is None:  # no index, or it could not catch up: read every spec (not every record)
        ids = {job_id for job_id, spec in (await load_specs(broker)).items() if spec.name == ref}
    by_name = await _named(broker, ids, ref)
    if len(by_name) == 1:
        return by_name[0]
    matches = {j.job_id: j for j in by_name}
    if len(ref) >= 4 and _HEX.fullmatch(ref) and not is_job_id(ref):
        prefixed = sorted(k for k in await job_ids(broker) if k.startswith(ref))
        for job in await asyncio.gather(*(_readable(broker, k) for k in prefixed)):
            if job is not None:
                matches.setdefault(job.job_id, job)
    return _one(matches, ref)


class _Named(msgspec.Struct):
    """The one field of a spec the name index reads."""

    name: str = ""


class _Sealed(msgspec.Struct):
    spec: msgspec.Raw


class NameIndex:
    """Job names → ids over the whole specs bucket, kept by a watch of it (kv.LatestWatch).

    Built the first time it is asked (every spec read once), then kept current by the watch:
    a spec written later (a sync by this or any other controller, a rename) lands in it within
    a message. It only ever lists too much (a renamed or deleted job stays under its old
    name), never too little, so :func:`resolve` reads each listed job and keeps those whose
    spec is named so now. Before answering, it catches up to the specs stream's last sequence
    (one stream-info request), so a lookup right after a sync sees the sync's specs. A watch
    that was lost (a gap, a silence) is dropped and the index built again.

    Role: any that may read specs (the controller uses it for cancel and requeue)."""

    def __init__(self, broker: Broker, *, catch_up_s: float = 30.0):
        self.broker = broker
        self.catch_up_s = catch_up_s
        self._ids: dict[str, str | frozenset[str]] = {}
        self._seen = 0  # the specs stream's sequence the index holds everything up to
        self._watch: kv.LatestWatch | None = None
        self._starting = asyncio.Lock()
        self._generation = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._stream = jsapi.kv_stream(broker.names.specs_bucket)

    async def ids(self, name: str) -> set[str] | None:
        """Every id whose spec is (or was) named ``name``; None when the index could not catch
        up with the specs stream in ``catch_up_s`` (the caller reads the specs instead; the
        index is then dropped and built again on the next lookup)."""
        async with self._starting:
            if self._watch is not None and not self._watch.healthy:
                await self.stop()
            if self._watch is None:
                on_entry = functools.partial(self._on_entry, self._generation)
                self._watch = await kv.LatestWatch(self.broker.js, self.broker.names.specs_bucket, on_entry).start()
        state = (await self.broker.js.stream_info(self._stream)).state
        last = state.last_seq if state.messages else 0
        if self._seen < last:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((last, waiter))
            try:
                await asyncio.wait_for(waiter, self.catch_up_s)
            except TimeoutError:
                log.warning("the name index is at %d of the specs stream's %d; reading every spec", self._seen, last)
                await self.stop()
                return None
            finally:
                self._waiters = [w for w in self._waiters if w[1] is not waiter]
        found = self._ids.get(name)
        return set() if found is None else {found} if isinstance(found, str) else set(found)

    async def stop(self) -> None:
        """Stop the watch and forget everything: the next lookup starts anew."""
        watch, self._watch = self._watch, None
        self._ids, self._seen = {}, 0
        self._generation += 1  # what the old watch still delivers is ignored
        if watch is not None:
            await watch.stop()

    def __len__(self) -> int:
        return len(self._ids)

    def _on_entry(self, generation: int, entry: kv.Delivery) -> None:
        if generation != self._generation:
            return
        if entry.key != FLEET_INFO_KEY and entry.operation is None:
            try:
                name = msgspec.json.decode(msgspec.json.decode(entry.value, type=_Sealed).spec, type=_Named).name
            except msgspec.DecodeError:
                name = ""
            if name:
                self._add(name, entry.key)
        self._seen = max(self._seen, entry.revision)
        for target, waiter in self._waiters:
            if target <= self._seen and not waiter.done():
                waiter.set_result(None)

    def _add(self, name: str, job_id: str) -> None:
        have = self._ids.get(name)
        if have is None:
            self._ids[name] = job_id
        elif isinstance(have, str):
            if have != job_id:
                self._ids[name] = frozenset((have, job_id))
        elif job_id not in have:
            self._ids[name] = have | {job_id}
