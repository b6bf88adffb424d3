"""A subscription made just before a flush has reached the server when the flush returns.

nats-py's ``flush()`` writes its PING straight to the socket while SUBs wait in the client's
pending buffer for its flusher task: right after ``subscribe()`` the PING goes out first, so
its PONG proves nothing about the SUB. A controller that flushed so, then answered "started",
was seen with no responders on ``ctl.requeue`` (CI, stop 21). ``settle`` is the flush that
holds: these tests read the bytes on the wire through the benchmarks' proxy (bench/proxy.py),
which keeps a copy of what clients send.

Role: controller (it subscribes to ``<prefix>.ctl.*`` in the controllers' queue group, as
its control service does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client

from bench.proxy import LatencyProxy
from tests.conftest import as_role
from trainfleet.broker.connection import connect_nats, settle
from trainfleet.broker.server import EmbeddedServer
from trainfleet.broker.settings import Settings


@pytest.fixture
async def wire(nats_server: EmbeddedServer) -> AsyncIterator[tuple[bytearray, Client, Settings]]:
    """A controller's connection through a proxy that keeps what the client sent."""
    proxy = LatencyProxy(nats_server.host, nats_server.port)
    proxy.sent = bytearray()
    await proxy.start()
    settings = as_role(Settings(url=proxy.url), "controller")
    nc = await connect_nats(settings, allow_reconnect=False)
    try:
        yield proxy.sent, nc, settings
    finally:
        await nc.close()
        await proxy.stop()


async def _ignore(msg: object) -> None:
    pass


def _last_ping_after(sent: bytes, sub_line: bytes) -> bool:
    return sent.rfind(b"PING\r\n") > sent.find(sub_line) >= 0


async def test_a_plain_flush_can_answer_before_the_subscription_is_sent(wire):
    """What settle is for: if nats-py ever orders its PING behind pending SUBs, this fails and
    settle can become a plain flush again."""
    sent, nc, settings = wire
    subject = settings.names.ctl_subject("status")
    await nc.subscribe(subject, queue=settings.names.ctl_queue_group, cb=_ignore)
    await nc.flush()
    # The PONG came back while the SUB was still waiting to be written.
    assert not _last_ping_after(bytes(sent), f"SUB {subject} ".encode())


async def test_settle_returns_only_after_the_subscriptions_reached_the_server(wire):
    wire_sent, nc, settings = wire
    names = settings.names
    verbs = ("sync", "cancel", "requeue", "status", "jobs")
    for verb in verbs:
        await nc.subscribe(names.ctl_subject(verb), queue=names.ctl_queue_group, cb=_ignore)
    await settle(nc)
    sent = bytes(wire_sent)
    for verb in verbs:
        assert _last_ping_after(sent, f"SUB {names.ctl_subject(verb)} {names.ctl_queue_group} ".encode()), sent[-400:]
