"""broker/records.py: the one CAS and the one retry-on-conflict loop, on a real jobs bucket."""

from __future__ import annotations

import contextlib

import pytest

from trainfleet.broker.errors import Conflict, JobNotFound, Refused
from trainfleet.broker.records import (
    Stored,
    cas,
    create_record,
    get_record,
    record_history,
    update_record,
    watch_records,
)
from trainfleet.broker.schema import JobRecord, JobStatus

from .conftest import gbm_jobs, gbm_manifest


def a_record() -> JobRecord:
    spec = gbm_manifest(gbm_jobs(1)).jobs[0]
    return JobRecord(job_id=spec.job_id)


async def test_create_is_idempotent_and_cas_loses_to_a_newer_write(broker):
    rec = a_record()
    assert await create_record(broker, rec) is True
    assert await create_record(broker, rec) is False
    first = await get_record(broker, rec.job_id)
    assert await cas(broker, rec.evolve(reason="one"), first.revision) is not None
    # A second writer still holding the first revision loses
    assert await cas(broker, rec.evolve(reason="two"), first.revision) is None
    assert (await get_record(broker, rec.job_id)).record.reason == "one"


async def test_update_retries_a_lost_cas_on_a_fresh_read(broker):
    rec = a_record()
    await create_record(broker, rec)
    stale = await get_record(broker, rec.job_id)
    await cas(broker, rec.evolve(reason="meanwhile"), stale.revision)
    seen: list[str | None] = []

    def change(current: JobRecord) -> JobRecord:
        seen.append(current.reason)
        return current.evolve(status=JobStatus.CANCELLED)

    # Given a caller that starts from the stale revision, the CAS loses once, then wins on a re-read
    done = await update_record(broker, rec.job_id, change, known=stale)
    assert seen == [None, "meanwhile"]
    assert done is not None and done.record.status == JobStatus.CANCELLED
    assert (await get_record(broker, rec.job_id)) == done


async def test_update_writes_nothing_when_the_change_keeps_or_declines(broker):
    rec = a_record()
    await create_record(broker, rec)
    before = await get_record(broker, rec.job_id)
    assert await update_record(broker, rec.job_id, lambda current: current) == before
    assert await update_record(broker, rec.job_id, lambda current: None) is None
    assert len(await record_history(broker, rec.job_id)) == 1


async def test_update_raises_what_the_change_raises_and_conflict_when_it_keeps_losing(broker):
    rec = a_record()
    await create_record(broker, rec)

    def refuse(current: JobRecord) -> JobRecord:
        raise Refused("no")

    with pytest.raises(Refused):
        await update_record(broker, rec.job_id, refuse)
    with pytest.raises(JobNotFound):
        await update_record(broker, "no-such-job", lambda current: current)
    # A known revision that is always stale: every CAS loses until the attempts are spent
    stale = await get_record(broker, rec.job_id)
    await cas(broker, rec.evolve(reason="newer"), stale.revision)
    with pytest.raises(Conflict):
        await update_record(broker, rec.job_id, lambda current: current.evolve(reason="x"), known=stale, attempts=1)


async def test_watch_sees_the_current_record_then_every_change_and_the_delete(broker):
    rec = a_record()
    await create_record(broker, rec)
    changes = []
    async with contextlib.aclosing(watch_records(broker, rec.job_id)) as stream:
        async for change in stream:
            changes.append(change)
            if len(changes) == 1:
                current = await get_record(broker, rec.job_id)
                await update_record(
                    broker,
                    rec.job_id,
                    lambda r: r.evolve(reason="moved"),
                    known=Stored(current.record, current.revision),
                )
            elif len(changes) == 2:
                await broker.jobs.delete(rec.job_id)
            else:
                break
    assert [c.record.reason if c.record else "deleted" for c in changes] == [None, "moved", "deleted"]
    assert changes[0].revision < changes[1].revision < changes[2].revision
