"""The controller's queued-ticket view between reconcile passes (tickets.QueuedTickets), on a
real server under the controller's role: after each change to the jobs stream (tickets
published, acked by a pull, deleted, the stream purged or made anew) it is what a full scan
reads, while a pass reads only the tickets published since the pass before."""

from __future__ import annotations

import pytest

from trainfleet.broker import tickets
from trainfleet.broker.connection import Broker
from trainfleet.broker.provision import provision_resources
from trainfleet.broker.tickets import QueuedTickets, scan_tickets
from trainfleet.controller.controller import Controller

from .conftest import linreg_manifest


def seqs(refs: list[tickets.TicketRef]) -> list[int]:
    return [ref.seq for ref in refs]


async def agrees(view: QueuedTickets, broker: Broker) -> list[tickets.TicketRef]:
    got = await view.current()
    assert got == await scan_tickets(broker)
    return got


async def take(broker: Broker, n: int) -> list[int]:
    """Pull and ack ``n`` cpu tickets as an agent would (the work queue drops them)."""
    sub = await broker.js.pull_subscribe_bind(durable=broker.names.consumer("cpu"), stream=broker.names.jobs_stream)
    try:
        msgs = await sub.fetch(n, timeout=5)
        for msg in msgs:
            await msg.ack_sync()
        return [msg.metadata.sequence.stream for msg in msgs]
    finally:
        await sub.unsubscribe()


@pytest.fixture
async def view(role_controller: Controller) -> QueuedTickets:
    """Read under the controller's own connection (its role: stream info, direct gets)."""
    return QueuedTickets(role_controller.b)


async def test_the_view_follows_publishes_acks_deletes_and_a_purge_reading_only_new_tickets(
    view, role_controller, broker
):
    ctl = role_controller
    assert await agrees(view, broker) == []
    await ctl.sync(linreg_manifest(12, prefix="a"))
    first = await agrees(view, broker)
    assert len(first) == 12 and view.reads == {"all": 1, "new": 1}

    # Acked from the front (first_seq moves) and deleted from the middle (interior deletes)
    acked = await take(broker, 3)
    for ref in first[5:8]:
        assert await tickets.delete_ticket(broker, ref.seq)
    after = await agrees(view, broker)
    assert seqs(after) == [s for s in seqs(first) if s not in acked and s not in seqs(first[5:8])]

    # Published after the last pass: read from where that pass ended
    await ctl.sync(linreg_manifest(4, prefix="b"))
    grown = await agrees(view, broker)
    assert len(grown) == len(after) + 4 and seqs(grown) == sorted(seqs(grown))
    assert view.reads == {"all": 1, "new": 3}

    # Purged: nothing is left, and what comes next is read
    await broker.js.purge_stream(broker.names.jobs_stream)
    assert await agrees(view, broker) == []
    await ctl.sync(linreg_manifest(2, prefix="c"))
    assert len(await agrees(view, broker)) == 2
    assert view.reads == {"all": 1, "new": 5}


async def test_a_stream_made_anew_is_read_whole_again(view, role_controller, broker, settings):
    await role_controller.sync(linreg_manifest(5, prefix="d"))
    assert len(await agrees(view, broker)) == 5
    # Its sequences start over: nothing the view kept can be trusted
    await broker.js.delete_stream(broker.names.jobs_stream)
    await provision_resources(broker.js, settings)
    await broker.js.publish(broker.names.jobs_subject("cpu"), b"not a ticket")
    again = await agrees(view, broker)
    assert [ref.ticket for ref in again] == [None] and view.reads["all"] == 2


async def test_past_the_listed_deletes_the_view_reads_every_ticket(view, role_controller, broker, monkeypatch):
    monkeypatch.setattr(tickets, "DELETED_DETAILS_MAX", 2)
    await role_controller.sync(linreg_manifest(8, prefix="e"))
    first = await agrees(view, broker)
    for ref in first[1:4]:  # three interior deletes: more than the state may list
        assert await tickets.delete_ticket(broker, ref.seq)
    assert len(await agrees(view, broker)) == 5
    assert view.reads == {"all": 2, "new": 0}
    # The first ticket gone too, the deleted ones are all before the stream's first: none listed
    assert await tickets.delete_ticket(broker, first[0].seq)
    assert len(await agrees(view, broker)) == 4
    assert view.reads == {"all": 2, "new": 1}
