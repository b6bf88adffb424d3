"""How many pulls a class consumer keeps waiting (max_waiting, issue 17 item 5), on a real nats-server.

A class every host shares gets room for a large fleet's waiting pulls; a host's own class
little (the server preallocates a slot per pull). The server refuses to change max_waiting on
an existing consumer, so a controller (its own role) ensuring the consumer of a fleet
provisioned before keeps the value it has and still updates the rest."""

from __future__ import annotations

import contextlib

import nats.js.errors

from trainfleet.broker.connection import Broker
from trainfleet.broker.provision import (
    HOST_CLASS_MAX_WAITING,
    MAX_WAITING_PULLS,
    ensure_consumer,
    jobs_consumer_config,
)

from .conftest import as_role


async def _max_waiting(broker: Broker, klass: str) -> tuple[int, float]:
    info = await broker.js.consumer_info(broker.names.jobs_stream, broker.names.consumer(klass))
    return info.config.max_waiting or 0, info.config.ack_wait or 0.0


async def test_a_controller_ensures_a_consumer_made_with_another_max_waiting(broker, settings):
    names = broker.names
    # Given the cpu consumer as a fleet provisioned before issue 17 has it: 4096 waiting pulls
    old = jobs_consumer_config(names, broker.settings, "cpu")
    old.max_waiting = 4096
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await broker.js.delete_consumer(names.jobs_stream, names.consumer("cpu"))
    await broker.js.add_consumer(names.jobs_stream, config=old)
    # When a controller with a longer lease ensures it (what it does at start)
    ctl = await Broker.connect(as_role(settings, "controller").with_(lease_s=settings.lease_s + 3))
    try:
        await ensure_consumer(ctl.js, ctl.settings, "cpu")
        # Then the consumer keeps its max_waiting (the server cannot change it) and takes the lease
        assert await _max_waiting(broker, "cpu") == (4096, settings.lease_s + 3)
        # A class consumer made now has room for a large fleet; a host's own class little
        await ensure_consumer(ctl.js, ctl.settings, "gpu.16")
        await ensure_consumer(ctl.js, ctl.settings, "host.pi=lan")
        assert (await _max_waiting(broker, "gpu.16"))[0] == MAX_WAITING_PULLS > 4096
        assert (await _max_waiting(broker, "host.pi=lan"))[0] == HOST_CLASS_MAX_WAITING
        # Ensuring again is a no-op, not an error
        await ensure_consumer(ctl.js, ctl.settings, "gpu.16")
    finally:
        await ctl.close()
