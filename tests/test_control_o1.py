"""Control verbs cost O(1) records (issue 17 item 6): a cancel or requeue by full id or exact name
reads that job's record and spec, not every record of the fleet.

What a verb reads is observed on the server: an admin connection listens on ``$JS.API.>`` and
sees every JetStream request the controller makes (a get of one key is a DIRECT.GET on the
bucket's stream; reading a whole bucket is a CONSUMER.CREATE on it). The operator requests the
verb through the control service; the controller (its own role) executes it."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from trainfleet.broker.connection import Broker, settle
from trainfleet.broker.control import request
from trainfleet.broker.errors import AmbiguousJob, JobNotFound, TrainfleetError
from trainfleet.broker.jobs import NameIndex, load_jobs, resolve, resolve_job
from trainfleet.broker.schema import JobSpec, JobStatus
from trainfleet.broker.specs import put_spec
from trainfleet.controller.controller import Controller

from .conftest import as_role, gbm_jobs, gbm_manifest, put_job

JOBS = 150  # enough that a snapshot of the bucket is unmistakable beside one get


def _spec(name: str, job_id: str | None = None) -> JobSpec:
    spec = gbm_manifest(gbm_jobs(1)).jobs[0]
    return msgspec.structs.replace(spec, name=name, job_id=job_id or hashlib.sha256(name.encode()).hexdigest())


class ApiLog:
    """Every JetStream API request on the server, by subject (admin listens; nobody answers it)."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self.subjects: list[str] = []

    async def start(self) -> ApiLog:
        self._sub = await self.broker.nc.subscribe("$JS.API.>", cb=self._on)
        await settle(self.broker.nc)
        return self

    async def _on(self, msg: Any) -> None:
        self.subjects.append(msg.subject)

    async def take(self) -> list[str]:
        # Every request the controller made before it answered reached the server before the
        # operator got the answer, so it is in this connection's buffer before the flush's PONG.
        await self.broker.nc.flush()
        out, self.subjects = self.subjects, []
        return out


def reads(subjects: list[str], stream: str) -> Counter:
    """What was asked of ``stream``: gets of one key, and whole-bucket reads (consumers)."""
    out: Counter = Counter()
    for s in subjects:
        if s.startswith(f"$JS.API.DIRECT.GET.{stream}") or s == f"$JS.API.STREAM.MSG.GET.{stream}":
            out["get"] += 1
        elif s.startswith(f"$JS.API.CONSUMER.CREATE.{stream}"):
            out["consumer"] += 1
    return out


@pytest.fixture
async def seeded(broker: Broker) -> dict[str, str]:
    """JOBS jobs written straight to NATS: job-i, even ones pending and odd ones completed."""
    ids = {}
    for i in range(JOBS):
        spec = _spec(f"job-{i}")
        status = JobStatus.PENDING if i % 2 == 0 else JobStatus.COMPLETED
        await put_job(broker, spec, status=status, klass="cpu")
        ids[spec.name] = spec.job_id
    return ids


@pytest.fixture
async def controller(settings, broker) -> AsyncIterator[Controller]:
    """A controller under its own role serving ctl.* (no reconcile loop: nothing else reads)."""
    ctl = Controller(as_role(settings, "controller"), handle_signals=False)
    await ctl.start()
    try:
        yield ctl
    finally:
        await ctl.stop()


@pytest.fixture
async def operator(settings, broker) -> AsyncIterator[Broker]:
    b = await Broker.connect(as_role(settings, "operator"))
    try:
        yield b
    finally:
        await b.close()


@pytest.mark.parametrize("verb", ["cancel", "requeue"])
async def test_a_verb_by_full_id_reads_that_record_and_spec_only(broker, seeded, controller, operator, verb):
    names = broker.names
    log = await ApiLog(broker).start()
    # When an operator cancels a pending job (requeues a completed one) by its full id
    target = seeded["job-10"] if verb == "cancel" else seeded["job-11"]
    reply = await request(operator.nc, names, verb, {"job": target})
    assert reply["job_id"] == target and reply["status"] == ("cancelled" if verb == "cancel" else "pending")
    asked = await log.take()
    # Then the controller read that record and its spec once each (the CAS goes on the record
    # resolve read), and never the whole jobs or specs bucket
    jobs, specs = reads(asked, f"KV_{names.jobs_bucket}"), reads(asked, f"KV_{names.specs_bucket}")
    assert jobs["consumer"] == 0 and specs["consumer"] == 0, asked
    assert jobs["get"] == 1 and specs["get"] == 1, asked


@pytest.mark.parametrize("verb", ["cancel", "requeue"])
async def test_a_verb_by_name_reads_that_record_and_spec_only(broker, seeded, controller, operator, verb):
    names = broker.names
    # Given a controller that has resolved a name once (that builds its index: every spec once)
    await request(operator.nc, names, "cancel", {"job": "job-0"})
    log = await ApiLog(broker).start()
    # When an operator names another job
    target = "job-20" if verb == "cancel" else "job-21"
    reply = await request(operator.nc, names, verb, {"job": target})
    assert reply["job_id"] == seeded[target]
    asked = await log.take()
    # Then only that job's record and spec were read (and the specs stream's info: how far the
    # index must have caught up)
    jobs, specs = reads(asked, f"KV_{names.jobs_bucket}"), reads(asked, f"KV_{names.specs_bucket}")
    assert jobs["consumer"] == 0 and specs["consumer"] == 0, asked
    assert jobs["get"] == 1 and specs["get"] == 1, asked


async def test_the_name_index_sees_every_spec_write_at_once(broker, controller, operator):
    names = broker.names
    # Given a controller whose index is built (it has resolved a name)
    await controller.sync(gbm_manifest(gbm_jobs(3)))
    await request(operator.nc, names, "cancel", {"job": "job-0"})
    # When a sync adds a job, its name resolves right after the sync answers
    await controller.sync(gbm_manifest(gbm_jobs(4)))
    assert (await request(operator.nc, names, "cancel", {"job": "job-3"}))["status"] == "cancelled"
    # A renamed job (same id, the spec rewritten) goes by its new name; its old one is gone
    renamed = next(j for j in controller.manifest.jobs if j.name == "job-2") if controller.manifest else None
    assert renamed is not None
    await put_spec(broker, msgspec.structs.replace(renamed, name="renamed"), None)
    assert (await request(operator.nc, names, "cancel", {"job": "renamed"}))["job_id"] == renamed.job_id
    with pytest.raises(TrainfleetError, match="no job matches 'job-2'") as gone:
        await request(operator.nc, names, "cancel", {"job": "job-2"})
    assert gone.value.exit_code == 4
    # A job the controller's manifest does not know, sharing a manifest job's name: ambiguous,
    # as it is when every job is read
    await put_job(broker, _spec("job-1", "ab" * 32), klass="cpu")
    with pytest.raises(TrainfleetError, match="'job-1' matches 2 jobs"):
        await request(operator.nc, names, "cancel", {"job": "job-1"})


class _Deaf(NameIndex):
    """A name index whose watch never delivers (a stalled subscription)."""

    def _on_entry(self, generation: int, entry: Any) -> None:
        return None


async def test_resolve_answers_as_resolving_over_every_job(broker, settings):
    """The reads differ; the answers (a job, JobNotFound, AmbiguousJob and their messages) do not."""
    hexname = "c" * 64  # a name that looks like an id (of no job)
    for name, job_id in [
        ("alpha", "abcd" + "1" * 60),
        ("beta", "abcd" + "2" * 60),
        ("twin", "ef01" + "3" * 60),
        ("twin", "ef01" + "4" * 60),
        (hexname, "5" * 64),
        ("abcd", "6" * 64),  # a name that is also another job's id prefix
    ]:
        await put_job(broker, _spec(name, job_id))
    await put_spec(broker, _spec("orphan-spec", "7" * 64), None)  # a spec without a record
    refs = ["alpha", "abcd" + "1" * 60, "abcd2", "abcd", "abc", "twin", "ef01", "ef013", hexname, "5" * 64, "7" * 64]
    refs += ["orphan-spec", "nothing", "6" * 63, "ABCD"]
    every = await load_jobs(broker)
    ctl = await Broker.connect(as_role(settings, "controller"))
    try:
        # (an index whose watch delivers nothing falls back to reading every spec)
        for index in (NameIndex(ctl), _Deaf(ctl, catch_up_s=0.2), None):
            for ref in refs:
                try:
                    want: Any = resolve_job(every, ref).job_id
                except (JobNotFound, AmbiguousJob) as exc:
                    want = (type(exc), str(exc).split(":")[0])
                try:
                    got: Any = (await resolve(ctl, ref, index)).job_id
                except (JobNotFound, AmbiguousJob) as exc:
                    got = (type(exc), str(exc).split(":")[0])
                assert got == want, (ref, index is not None)
    finally:
        await ctl.close()
