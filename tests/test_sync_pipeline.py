"""The controller's sync as a pipeline over bulk reads, on a real server, under the
controller's role: what it reads in bulk decides what it writes, a record written or
deleted by someone else is decided again on a fresh read, and an unchanged re-sync
writes no record and no ticket."""

from __future__ import annotations

import pytest

from trainfleet.broker import jsapi
from trainfleet.broker.connection import Broker
from trainfleet.broker.records import get_record
from trainfleet.broker.tickets import scan_tickets
from trainfleet.controller import controller as controller_module
from trainfleet.controller.controller import Controller
from trainfleet.controller.manifest import parse_manifest

from .conftest import linreg_manifest, linreg_text, records


@pytest.fixture
async def ctl(role_controller: Controller) -> Controller:
    """The controller under the controller role's nkey (conftest.role_controller)."""
    return role_controller


async def last_seq(broker: Broker, stream: str) -> int:
    return (await broker.js.stream_info(stream)).state.last_seq


async def tickets_by_job(broker: Broker) -> dict[str, int]:
    out: dict[str, int] = {}
    for ref in await scan_tickets(broker):
        if ref.ticket is not None:
            out[ref.ticket.job_id] = out.get(ref.ticket.job_id, 0) + 1
    return out


async def test_chunks_keep_every_job_whole_and_tickets_in_priority_order(ctl, broker, monkeypatch):
    monkeypatch.setattr(controller_module, "SYNC_CHUNK", 7)  # 40 jobs: chunks of 2, 4, 7, ... at once
    monkeypatch.setattr(controller_module, "SYNC_FIRST_CHUNK", 2)
    jobs = "".join(
        f'[[jobs]]\nname = "p-{i}"\nmodel = "linreg"\nmode = "gd"\nseed = {i}\npriority = {i % 4}\n' for i in range(40)
    )
    manifest = parse_manifest(linreg_text(0) + jobs, file="p.toml")
    report = await ctl.sync(manifest)

    assert len(report.created) == 40
    recs = await records(broker)
    assert set(recs) == {s.job_id for s in manifest.jobs}
    assert await tickets_by_job(broker) == dict.fromkeys(recs, 1)
    order = [t.ticket.priority for t in await scan_tickets(broker) if t.ticket]
    assert order == sorted(order, reverse=True)


def test_chunks_grow_from_the_first_size_to_the_most():
    chunked = controller_module._chunked
    items = list(range(100))
    chunks = chunked(items, 4, 32)
    assert [len(c) for c in chunks] == [4, 8, 16, 32, 32, 8]
    assert [i for c in chunks for i in c] == items
    assert [len(c) for c in chunked(items, 64, 32)] == [32, 32, 32, 4]
    assert chunked([], 4, 32) == []
    for n in range(0, 130):
        assert [i for c in chunked(list(range(n)), 4, 32) for i in c] == list(range(n)), n


async def test_an_unchanged_resync_writes_no_record_and_no_ticket(ctl, broker):
    manifest = linreg_manifest(20, prefix="same")
    await ctl.sync(manifest)
    names = broker.names
    before = (await last_seq(broker, jsapi.kv_stream(names.jobs_bucket)), await last_seq(broker, names.jobs_stream))

    report = await ctl.sync(manifest)

    assert len(report.unchanged) == 20 and not report.created and not report.updated
    after = (await last_seq(broker, jsapi.kv_stream(names.jobs_bucket)), await last_seq(broker, names.jobs_stream))
    assert after == before


async def test_a_changed_priority_refreshes_the_records_it_changes(ctl, broker):
    await ctl.sync(linreg_manifest(6, prefix="prio"))
    changed = linreg_manifest(6, prefix="prio", job_extra="priority = 3\n")

    report = await ctl.sync(changed)

    assert sorted(report.updated) == sorted(s.job_id for s in changed.jobs)
    assert {r.priority for r in (await records(broker)).values()} == {3}


async def test_a_deleted_record_is_created_again_with_its_ticket(ctl, broker):
    manifest = linreg_manifest(3, prefix="gone")
    await ctl.sync(manifest)
    job_id = manifest.jobs[1].job_id
    await broker.jobs.delete(job_id)  # a delete mark: a create conditional on "no message" fails

    report = await ctl.sync(manifest)

    assert report.created == [job_id] and len(report.unchanged) == 2
    assert (await get_record(broker, job_id)).record.generation == 1
    assert (await tickets_by_job(broker))[job_id] == 1  # its ticket (a re-publish of it is de-duplicated)


async def test_records_another_controller_created_meanwhile_are_kept_not_doubled(ctl, broker, monkeypatch):
    # Given records that exist, but that this sync's bulk read did not see (another controller
    # created them between the read and the writes)
    manifest = linreg_manifest(5, prefix="race")
    await ctl.sync(manifest)
    before = await records(broker)

    async def saw_nothing(broker, kind):
        return {}

    monkeypatch.setattr(controller_module, "load_as", saw_nothing)

    # When this controller syncs the same manifest
    report = await ctl.sync(manifest)

    # Then its creates lose, each record is read again and kept as it is, and no ticket is added
    assert not report.created and len(report.unchanged) == 5
    assert await records(broker) == before
    assert await tickets_by_job(broker) == dict.fromkeys(before, 1)
