"""TicketPuller: one-ticket no_wait pulls on the class consumers, as the agent's fetch rounds use them."""

from __future__ import annotations

import asyncio

import pytest

from trainfleet.broker.errors import ConsumerUnavailable
from trainfleet.broker.provision import ensure_consumer
from trainfleet.broker.tickets import TicketPuller

from .conftest import wait_for


@pytest.fixture
async def puller(broker):
    p = await TicketPuller(broker).start()
    try:
        yield p
    finally:
        await p.stop()


async def test_an_empty_class_answers_none_at_once_and_a_queued_ticket_comes_back(broker, puller):
    durable = await ensure_consumer(broker.js, broker.settings, "cpu")
    assert await puller.pull(durable) is None
    await broker.js.publish(broker.names.jobs_subject("cpu"), b"ticket-1")
    # (the PubAck can come a moment before the consumer counts the ticket: a no_wait pull in
    # between finds nothing, which is why the agent's pull on a rung class waits briefly)
    await wait_for(lambda: _pending(broker, durable), 5, 0.01, what="the consumer counting the ticket")
    msg = await puller.pull(durable)
    assert msg is not None and msg.data == b"ticket-1" and msg.metadata.sequence.consumer == 1
    await msg.ack()
    assert await puller.pull(durable) is None


async def _pending(broker, durable: str) -> int:
    return (await broker.js.consumer_info(broker.names.jobs_stream, durable)).num_pending or 0


async def test_a_waiting_pull_returns_a_ticket_published_while_it_waits(broker, puller):
    durable = await ensure_consumer(broker.js, broker.settings, "cpu")
    pull = asyncio.create_task(puller.pull(durable, wait_s=5.0))
    await asyncio.sleep(0.1)
    await broker.js.publish(broker.names.jobs_subject("cpu"), b"late-publish")
    msg = await asyncio.wait_for(pull, 3)
    assert msg is not None and msg.data == b"late-publish"


async def test_a_missing_consumer_is_reported_so_the_agent_creates_it_again(broker, puller):
    with pytest.raises(ConsumerUnavailable):
        await puller.pull("jobs-no-such-class")


async def test_a_ticket_answering_an_earlier_timed_out_pull_is_handed_to_the_next_pull(broker, puller):
    # Given a pull request whose caller gave up (its answer will land in the shared inbox later)
    durable = await ensure_consumer(broker.js, broker.settings, "cpu")
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{broker.names.jobs_stream}.{durable}"
    await broker.nc.publish(next_subject, b'{"batch":1,"expires":5000000000}', reply=puller.inbox)
    await broker.nc.flush()
    await broker.js.publish(broker.names.jobs_subject("cpu"), b"delivered-late")
    await wait_for(lambda: not puller._answers.empty(), 5, what="the late delivery")
    # When the agent pulls next, it gets that ticket (it is ack-pending on us) without asking again
    msg = await puller.pull(durable)
    assert msg is not None and msg.data == b"delivered-late"
    assert await puller.pull(durable) is None


async def test_sent_runs_once_the_pull_is_on_its_way_and_before_its_answer(broker, puller):
    # (the agent starts its record and spec reads there, so they follow the pull onto the wire)
    durable = await ensure_consumer(broker.js, broker.settings, "cpu")
    calls: list[bool] = []
    pull = asyncio.create_task(puller.pull(durable, wait_s=5.0, sent=lambda: calls.append(pull.done())))
    await wait_for(lambda: calls, 5, 0.01, what="the sent callback")
    assert calls == [False]  # the pull was still waiting for its ticket
    await broker.js.publish(broker.names.jobs_subject("cpu"), b"after-sent")
    msg = await asyncio.wait_for(pull, 3)
    assert msg is not None and msg.data == b"after-sent" and calls == [False]
