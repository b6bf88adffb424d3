"""A subscription made just before a flush has reached the server when the flush returns.

nats-py's ``flush()`` writes its PING straight to the socket while SUBs wait in the client's
pending buffer for its flusher task: right after ``subscribe()`` the PING goes out first, so
its PONG proves nothing about the SUB. A controller that flushed so, then answered "started",
was seen with no responders on ``ctl.requeue`` (CI, stop 21). ``settle`` is the flush that
holds: these tests read the bytes on the wire through a recording proxy.

Role: controller (it subscribes to ``<prefix>.ctl.*`` in the controllers' queue group, as
its control service does).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client

from tests.conftest import as_role
from trainfleet.broker.connection import connect_nats, settle
from trainfleet.broker.server import EmbeddedServer
from trainfleet.broker.settings import Settings


class WireLog:
    """A TCP proxy in front of the server, keeping what the client sent."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.sent = bytearray()
        self._tasks: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if keep:
                        self.sent += data
                    dst.write(data)
                    await dst.drain()

        tasks = [
            asyncio.create_task(pipe(reader, up_writer, True)),
            asyncio.create_task(pipe(up_reader, writer, False)),
        ]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def wire(nats_server: EmbeddedServer) -> AsyncIterator[tuple[WireLog, Client, Settings]]:
    log = WireLog((nats_server.host, nats_server.port))
    settings = as_role(Settings(url=await log.start()), "controller")
    nc = await connect_nats(settings, allow_reconnect=False)
    try:
        yield log, nc, settings
    finally:
        await nc.close()
        await log.stop()


async def _ignore(msg: object) -> None:
    pass


def _last_ping_after(sent: bytes, sub_line: bytes) -> bool:
    return sent.rfind(b"PING\r\n") > sent.find(sub_line) >= 0


async def test_a_plain_flush_can_answer_before_the_subscription_is_sent(wire):
    """What settle is for: if nats-py ever orders its PING behind pending SUBs, this fails and
    settle can become a plain flush again."""
    log, nc, settings = wire
    subject = settings.names.ctl_subject("status")
    await nc.subscribe(subject, queue=settings.names.ctl_queue_group, cb=_ignore)
    await nc.flush()
    # The PONG came back while the SUB was still waiting to be written.
    assert not _last_ping_after(bytes(log.sent), f"SUB {subject} ".encode())


async def test_settle_returns_only_after_the_subscriptions_reached_the_server(wire):
    log, nc, settings = wire
    names = settings.names
    verbs = ("sync", "cancel", "requeue", "status", "jobs")
    for verb in verbs:
        await nc.subscribe(names.ctl_subject(verb), queue=names.ctl_queue_group, cb=_ignore)
    await settle(nc)
    sent = bytes(log.sent)
    for verb in verbs:
        assert _last_ping_after(sent, f"SUB {names.ctl_subject(verb)} {names.ctl_queue_group} ".encode()), sent[-400:]
