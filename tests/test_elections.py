"""Waiting out an election: logs and events reach the stream across a server outage, calls that
meet an election are retried with bounded backoff, and what cannot wait says so (exit 3)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import nats.js.errors
import pytest

from trainfleet.broker import retry
from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import JetStreamUnavailable
from trainfleet.broker.logs import Outbox, read_logs

from .conftest import wait_for


async def stored_lines(broker: Broker, job_id: str) -> list[str]:
    async with contextlib.aclosing(read_logs(broker, job_id)) as entries:
        return [e.line async for e in entries if e.line is not None]


async def test_the_outbox_delivers_every_line_once_in_order_across_a_server_restart(broker, nats_server):
    outbox = Outbox(broker).start()
    subject = broker.names.logs_subject("j1")
    try:
        for i in range(5):
            outbox.put(subject, f"before {i}\n".encode())
        assert await outbox.flush(10)
        # When the server goes away (as a stream leader does in an election) while lines keep coming
        nats_server.stop()
        for i in range(5):
            outbox.put(subject, f"during {i}\n".encode())
        await asyncio.sleep(1.0)
        assert not await outbox.flush(0.1)  # held, not lost
        nats_server.start()
        # Then, once it is back, every line is in the stream, once, in order
        assert await outbox.flush(30)
    finally:
        await outbox.close(5)
    expected = [f"before {i}" for i in range(5)] + [f"during {i}" for i in range(5)]
    await wait_for(lambda: _lines_are(broker, "j1", expected), 20, what="every line in the stream")
    assert outbox.dropped == 0


async def _lines_are(broker: Broker, job_id: str, expected: list[str]) -> bool:
    return await stored_lines(broker, job_id) == expected


async def test_a_full_outbox_drops_the_oldest_lines_but_never_a_lifecycle_mark(broker, nats_server):
    outbox = Outbox(broker, max_messages=4).start()
    subject = broker.names.events_subject("j2")
    nats_server.stop()
    try:
        outbox.put(subject, json.dumps({"job_id": "j2", "kind": "started"}).encode(), essential=True)
        for i in range(10):
            outbox.put(subject, json.dumps({"job_id": "j2", "kind": "progress", "step": i}).encode())
        assert outbox.dropped == 7  # 11 queued, room for 4: the mark and the three newest reports
    finally:
        nats_server.start()
    assert await outbox.flush(30)
    await outbox.close(5)
    async with contextlib.aclosing(read_logs(broker, "j2", events=True)) as entries:
        events = [e.event async for e in entries]
    assert [e["kind"] for e in events] == ["started", "progress", "progress", "progress"]
    assert [e.get("step") for e in events[1:]] == [7, 8, 9]


async def test_a_call_that_meets_an_election_is_retried_then_given_up_on_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(retry, "FIRST_PAUSE_S", 0.01)
    answers = iter([nats.js.errors.ServiceUnavailableError(), nats.js.errors.ServiceUnavailableError(), "ok"])

    async def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await retry.patiently(flaky, what="a read", limit_s=5) == "ok"

    async def never():
        raise nats.js.errors.ServiceUnavailableError()

    with pytest.raises(JetStreamUnavailable, match="a read: JetStream did not answer for 0.2s") as err:
        await retry.patiently(never, what="a read", limit_s=0.2)
    assert err.value.exit_code == 3

    async def refused():
        raise nats.js.errors.NotFoundError()

    with pytest.raises(nats.js.errors.NotFoundError):  # not an election: no retry
        await retry.patiently(refused, what="a read", limit_s=5)

    async def full():  # a full store answers 503 too, but waiting does not fix it
        raise nats.js.errors.ServiceUnavailableError(code=503, err_code=10023, description="insufficient resources")

    with pytest.raises(nats.js.errors.ServiceUnavailableError):
        await retry.patiently(full, what="a write", limit_s=5)


async def test_binding_at_start_waits_out_an_election(broker, settings, monkeypatch, caplog):
    # Given JetStream that answers 503 to the first bind calls (a leader being elected)
    monkeypatch.setattr(retry, "FIRST_PAUSE_S", 0.01)
    real = nats.js.JetStreamContext.key_value
    failures = {"left": 3}

    async def electing(self, bucket):
        if failures["left"]:
            failures["left"] -= 1
            raise nats.js.errors.ServiceUnavailableError()
        return await real(self, bucket)

    monkeypatch.setattr(nats.js.JetStreamContext, "key_value", electing)
    # When a long-running process connects, it waits (saying so once) and binds
    bound = await Broker.connect(settings, wait_s=5)
    await bound.close()
    assert failures["left"] == 0 and caplog.text.count("waiting for JetStream") == 1
    # ... while a command gives up after its patience with exit 3
    monkeypatch.setattr(retry, "CLI_PATIENCE_S", 0.2)
    monkeypatch.setattr("trainfleet.broker.connection.CLI_PATIENCE_S", 0.2)
    failures["left"] = 10_000
    with pytest.raises(JetStreamUnavailable):
        await Broker.connect(settings)
