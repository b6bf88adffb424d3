"""TicketPuller: one-ticket no_wait pulls on the class consumers, as the agent's fetch rounds use them."""

from __future__ import annotations

import asyncio

import pytest

from trainfleet.broker import jsapi
from trainfleet.broker.errors import ConsumerUnavailable
from trainfleet.broker.provision import ensure_consumer
from trainfleet.broker.tickets import MaxWaitingExceeded, TicketPuller

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


class Landed:
    """What parked pulls answered, in order (durable, data or status)."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, object]] = []

    async def __call__(self, durable: str, msg) -> None:
        status = jsapi.status_of(msg)
        self.answers.append((durable, msg.data if status is None else status))
        if status is None:
            await msg.ack()


async def test_a_parked_pull_brings_the_next_ticket_and_never_blocks_pulls_on_other_classes(broker, puller):
    # (the agent's puller runs as the agent; the test's broker is admin: same requests)
    cpu = await ensure_consumer(broker.js, broker.settings, "cpu")
    gpu = await ensure_consumer(broker.js, broker.settings, "gpu.8")
    landed = Landed()
    # Given a pull parked on cpu for 10 s
    assert await puller.park(cpu, 10.0, landed) is True
    assert await puller.park(cpu, 10.0, landed) is False  # one per class
    assert puller.parked(cpu)
    # When another class is pulled meanwhile, it answers at once (its own inbox)
    await broker.js.publish(broker.names.jobs_subject("gpu.8"), b"gpu-ticket")
    await wait_for(lambda: _pending(broker, gpu), 5, 0.01, what="the gpu ticket counted")
    msg = await asyncio.wait_for(puller.pull(gpu), 2)
    assert msg is not None and msg.data == b"gpu-ticket"
    # And a cpu ticket goes to the parked pull
    await broker.js.publish(broker.names.jobs_subject("cpu"), b"cpu-ticket")
    await wait_for(lambda: landed.answers, 5, 0.01, what="the parked pull's answer")
    assert landed.answers == [(cpu, b"cpu-ticket")]
    assert not puller.parked(cpu)


async def test_a_parked_pull_that_expires_answers_408(broker, puller):
    cpu = await ensure_consumer(broker.js, broker.settings, "cpu")
    landed = Landed()
    await puller.park(cpu, 0.2, landed)
    await wait_for(lambda: landed.answers, 5, 0.01, what="the expiry")
    assert landed.answers == [(cpu, jsapi.STATUS_TIMEOUT)] and not puller.parked(cpu)


async def test_an_unparked_pull_takes_no_ticket(broker, puller):
    # Given a parked pull withdrawn by its agent (a stopping or full agent)
    cpu = await ensure_consumer(broker.js, broker.settings, "cpu")
    landed = Landed()
    await puller.park(cpu, 10.0, landed)
    await puller.unpark(cpu)
    # When a ticket comes, the server does not hand it to the withdrawn pull: it stays queued
    await broker.js.publish(broker.names.jobs_subject("cpu"), b"not-swallowed")
    await wait_for(lambda: _pending(broker, cpu), 5, 0.01, what="the ticket counted")
    info = await broker.js.consumer_info(broker.names.jobs_stream, cpu)
    assert info.num_ack_pending == 0 and landed.answers == []
    msg = await puller.pull(cpu)
    assert msg is not None and msg.data == b"not-swallowed"


async def test_exceeded_max_waiting_is_its_own_answer_not_a_missing_consumer(broker, puller):
    from nats.js.api import AckPolicy, ConsumerConfig

    durable = "jobs-tiny"
    await broker.js.add_consumer(
        broker.names.jobs_stream,
        ConsumerConfig(
            durable_name=durable,
            filter_subject=broker.names.jobs_subject("tiny"),
            ack_policy=AckPolicy.EXPLICIT,
            max_waiting=1,
        ),
    )
    landed = Landed()
    await puller.park(durable, 10.0, landed)
    await wait_for(lambda: _waiting(broker, durable), 5, 0.01, what="the parked pull counted")
    with pytest.raises(MaxWaitingExceeded):
        await puller.pull(durable, wait_s=1.0)
    other = await TicketPuller(broker).start()
    try:
        second = Landed()
        await other.park(durable, 10.0, second)
        await wait_for(lambda: second.answers, 5, 0.01, what="the refusal")
        (_, status), *_ = second.answers
        assert status == jsapi.STATUS_CONFLICT
    finally:
        await other.stop()


async def _waiting(broker, durable: str) -> int:
    return (await broker.js.consumer_info(broker.names.jobs_stream, durable)).num_waiting or 0
