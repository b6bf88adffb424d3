"""A 3-node JetStream cluster on loopback with R3 resources: losing a node loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import BrokerError
from trainfleet.broker.schema import JobStatus
from trainfleet.broker.server import EmbeddedServer, start_cluster
from trainfleet.broker.settings import Settings

from .conftest import FleetHarness, linreg_manifest, records, wait_for, wait_terminal


async def provisioned(settings: Settings, nodes: list[EmbeddedServer], timeout_s: float = 60) -> Broker:
    """Provision once the cluster has elected a meta leader (that takes a few seconds). When it
    never does, the failure carries the end of each node's log (a cluster that did not form was
    once seen in CI with nothing left to say why)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await Broker.connect(settings, provision=True)
        except (BrokerError, Exception) as exc:
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.log_path}\n{_tail(n.log_path)}" for n in nodes)
                raise AssertionError(f"no JetStream cluster after {timeout_s:g}s: {exc!r}\n{logs}") from exc
            await asyncio.sleep(1.0)


def cluster_settings(nodes: list[EmbeddedServer]) -> Settings:
    """A fleet on every node of ``nodes`` with R3 resources, its timings short for tests."""
    return Settings(
        url=",".join(n.url for n in nodes),
        replicas=3,
        lease_s=8.0,
        heartbeat_s=1.0,
        reconcile_s=1.0,
        nak_delay_s=0.5,
        fetch_timeout_s=0.5,
        drain_timeout_s=2.0,
        term_grace_s=2.0,
        worker_ttl_s=10.0,
    )


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"


@pytest.mark.slow
async def test_losing_one_node_of_three_loses_no_job_and_trains_none_twice(tmp_path):
    nodes = start_cluster(tmp_path)
    settings = cluster_settings(nodes)
    broker = await provisioned(settings, nodes)
    harness = FleetHarness(settings, tmp_path / "agents")
    try:
        info = await broker.js.stream_info(settings.names.jobs_stream)
        assert info.config.num_replicas == 3 and info.cluster is not None and len(info.cluster.replicas or []) == 2
        manifest = linreg_manifest(8, epochs=6000)
        ids = [s.job_id for s in manifest.jobs]
        ctl = await harness.start_controller()
        await ctl.sync(manifest)
        harness.start_agent("a1")
        harness.start_agent("a2")

        async def some_done():
            return sum(r.status == JobStatus.COMPLETED for r in (await records(broker)).values()) >= 2

        await wait_for(some_done, 120, what="two jobs to complete")
        # When one node dies hard
        nodes[0].kill()
        # Then every job still completes, each exactly once
        recs = await wait_terminal(broker, ids, timeout_s=240)
        assert all(recs[i].status == JobStatus.COMPLETED for i in ids), {r.job_id[:12]: r.status for r in recs.values()}
        # Exactly once: the agents live through the failover, so their own counts are exact (a
        # double accept would take two successful completion CASes, and fenced results are counted).
        counters = [a.counters for a in harness.agents.values()]
        assert sum(c["completed"] for c in counters) == len(ids)
        assert sum(c["failed"] for c in counters) == 0
    finally:
        await harness.stop()
        with contextlib.suppress(Exception):
            await broker.close()
        for node in nodes:
            node.stop()
