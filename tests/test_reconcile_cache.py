"""Reconcile through the controller's record cache (a KV watch), on a real server, the
controller running under its own role: every repair still happens when the cache is warm,
a record someone else changed between two passes is seen, and a cache whose watch was
lost resyncs instead of acting on what it had."""

from __future__ import annotations

import asyncio
import time

import pytest

from trainfleet.broker import kv, tickets
from trainfleet.broker.connection import Broker
from trainfleet.broker.records import RecordCache, get_record, job_ids, load_records, update_record
from trainfleet.broker.schema import JobRecord, JobStatus
from trainfleet.broker.specs import load_specs
from trainfleet.broker.tickets import scan_tickets
from trainfleet.controller.controller import Controller

from .conftest import as_role, linreg_manifest


@pytest.fixture
async def ctl(role_controller: Controller) -> Controller:
    """The controller under the controller role's nkey (conftest.role_controller)."""
    return role_controller


def cache_of(ctl: Controller) -> RecordCache:
    assert ctl._records is not None, "no reconcile pass yet"
    return ctl._records


async def queued(broker: Broker) -> list[tickets.TicketRef]:
    return [t for t in await scan_tickets(broker) if t.ticket is not None]


async def drop_tickets(broker: Broker, job_id: str) -> int:
    gone = [t for t in await queued(broker) if t.ticket and t.ticket.job_id == job_id]
    for ref in gone:
        assert await tickets.delete_ticket(broker, ref.seq)
    return len(gone)


async def lapsed_holder(broker: Broker, job_id: str) -> None:
    """As an agent that claimed the job and then vanished would leave it: running, its
    heartbeat long ago, its ticket gone."""

    def claimed(rec: JobRecord) -> JobRecord:
        past = time.time() - 3600
        return rec.evolve(
            status=JobStatus.RUNNING, claimed_by="gone", claimed_at=past, heartbeat_at=past, attempt=1, ticket_seq=10**9
        )

    assert await update_record(broker, job_id, claimed) is not None
    await drop_tickets(broker, job_id)


async def test_a_missing_ticket_is_republished_by_a_warm_cache(ctl, broker):
    manifest = linreg_manifest(3, prefix="warm")
    await ctl.sync(manifest)
    assert (await ctl.reconcile()).get("republished", 0) == 0  # the first pass loads the cache
    job_id = manifest.jobs[0].job_id
    assert await drop_tickets(broker, job_id) == 1

    stats = await ctl.reconcile()

    assert stats["republished"] == 1
    assert [t.ticket.job_id for t in await queued(broker) if t.ticket].count(job_id) == 1
    assert cache_of(ctl).loads == 1  # served by the watch, not by a reload


async def test_a_record_someone_else_changed_between_passes_is_seen(ctl, broker):
    # Given a warm cache that holds the job as pending with its ticket
    manifest = linreg_manifest(2, prefix="changed")
    await ctl.sync(manifest)
    await ctl.reconcile()
    job_id = manifest.jobs[0].job_id
    assert cache_of(ctl).views[job_id].status == JobStatus.PENDING

    # When an agent claims it (not through this controller) and then vanishes
    await lapsed_holder(broker, job_id)

    # Then the next pass sees it held with a lapsed lease, and tickets it for a takeover
    stats = await ctl.reconcile()
    assert stats["takeover_tickets"] == 1 and stats.get("republished", 0) == 0
    assert any(t.ticket and t.ticket.job_id == job_id for t in await queued(broker))
    assert cache_of(ctl).views[job_id].status == JobStatus.RUNNING and cache_of(ctl).loads == 1


async def test_finished_records_leave_the_cache_and_requeued_ones_come_back(ctl, broker):
    manifest = linreg_manifest(2, prefix="done")
    await ctl.sync(manifest)
    await ctl.reconcile()
    job_id = manifest.jobs[0].job_id
    await update_record(broker, job_id, lambda r: r.evolve(status=JobStatus.COMPLETED, finished_at=time.time()))
    await drop_tickets(broker, job_id)
    assert (await ctl.reconcile()).get("republished", 0) == 0
    assert job_id not in cache_of(ctl).views
    await ctl.requeue(job_id)
    await drop_tickets(broker, job_id)  # as if the requeue's ticket were lost
    assert (await ctl.reconcile())["republished"] == 1
    assert cache_of(ctl).views[job_id].generation == 2


async def test_prefer_cuda_jobs_reach_cpu_after_the_grace_window_with_a_warm_cache(ctl, broker):
    grace = "[settings]\nprefer_cuda_grace_s = 5.0\n"
    manifest = linreg_manifest(1, prefix="grace", extra=grace, job_extra="prefer_cuda = true\n")
    await ctl.sync(manifest)
    job_id = manifest.jobs[0].job_id
    assert (await ctl.reconcile()).get("grace", 0) == 0  # inside the window

    stats = await ctl.reconcile(now=time.time() + 10)

    assert stats["grace"] == 1 and stats["republished"] == 1
    rec = (await get_record(broker, job_id)).record
    assert rec.offered == ("gpu.0", "cpu")
    classes = {t.ticket.klass for t in await queued(broker) if t.ticket and t.ticket.job_id == job_id}
    assert classes == {"gpu.0", "cpu"}
    assert (await ctl.reconcile(now=time.time() + 20)).get("grace", 0) == 0  # once is enough


async def test_jobs_synced_after_the_cache_loaded_are_reordered_by_priority(ctl, broker):
    low = linreg_manifest(4, prefix="low")
    await ctl.sync(low)
    assert (await ctl.reconcile()).get("reordered", 0) == 0
    high = linreg_manifest(2, prefix="high", job_extra="priority = 10\n")
    await ctl.sync(high)  # behind the low ones in the cpu queue

    stats = await ctl.reconcile()

    assert stats["reordered"] == 6
    order = [t.ticket.priority for t in await queued(broker) if t.ticket and t.ticket.klass == "cpu"]
    assert order == sorted(order, reverse=True) and order[:2] == [10, 10]
    assert cache_of(ctl).loads == 1


async def test_a_cache_that_lost_its_watch_resyncs_instead_of_acting_on_stale_records(ctl, broker):
    # Given a warm cache
    manifest = linreg_manifest(2, prefix="lost")
    await ctl.sync(manifest)
    await ctl.reconcile()
    cache = cache_of(ctl)
    watch = cache._watch
    assert watch is not None and watch._consumer is not None

    # When its consumer vanishes (as after a server restart or an election), and a record changes meanwhile
    await broker.js.delete_consumer(watch.stream, watch._consumer)
    job_id = manifest.jobs[1].job_id
    await lapsed_holder(broker, job_id)

    # Then the next pass reloads every record and acts on what is stored now
    stats = await ctl.reconcile()
    assert cache.loads == 2
    assert stats["takeover_tickets"] == 1
    assert cache.views[job_id].status == JobStatus.RUNNING


async def test_a_watch_that_misses_a_delivery_says_it_is_lost(broker):
    seen: list[str] = []
    watch = await kv.LatestWatch(broker.js, broker.names.jobs_bucket, lambda d: seen.append(d.key)).start()
    try:
        await broker.jobs.put("a", b"{}")
        await broker.jobs.put("b", b"{}")
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:  # (the bucket was empty: caught up at once)
            await asyncio.sleep(0.01)
        assert seen == ["a", "b"] and watch.healthy
        # A delivery that skips a consumer sequence (what a dropped message looks like)
        watch._cseq -= 1
        await broker.jobs.put("c", b"{}")
        deadline = time.monotonic() + 5
        while watch.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not watch.healthy and "consumer sequence" in (watch.lost or "")
        assert seen == ["a", "b"]  # nothing after the gap is handed on
    finally:
        await watch.stop()


async def test_readers_read_whole_buckets_under_their_roles(settings, ctl):
    manifest = linreg_manifest(3, prefix="roles")
    await ctl.sync(manifest)
    ids = {s.job_id for s in manifest.jobs}
    for role in ("viewer", "operator", "controller"):
        reader = await Broker.connect(as_role(settings, role))
        try:
            assert set(await load_records(reader)) == ids
            assert await job_ids(reader) == ids
            assert set(await load_specs(reader)) == ids
        finally:
            await reader.close()
