"""``trainfleet health`` and ``ctl.health`` on a real nats-server, run as the viewer (the
least-privileged role that may): healthy, degraded for each reason, unreachable."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

from trainfleet.broker.control import request
from trainfleet.controller.health import check_within

from .conftest import as_role, linreg_manifest, role_env, wait_terminal
from .test_cli import CLI


async def health_cli(*args: str, url: str, role: str = "viewer") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "health",
        *args,
        env={**os.environ, **role_env(role), "NATS_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_health_degraded_then_healthy_then_degraded_as_the_viewer(fleet, broker, settings):
    url = settings.url
    # No controller yet: degraded (1), every resource present
    code, out, err = await health_cli("--json", url=url)
    report = json.loads(out)
    assert code == 1 and report["status"] == "degraded" and report["exit_code"] == 1, err
    assert report["server"]["ok"] and report["resources"]["ok"] and not report["resources"]["missing"]
    assert report["controller"]["answering"] is False
    assert any("no controller" in p for p in report["problems"])
    # A controller with pending jobs and no agent: still degraded, saying why
    ctl = await fleet.start_controller()
    manifest = linreg_manifest(2, extra='name = "probe fleet"\n')
    await ctl.sync(manifest)
    code, out, _ = await health_cli("--json", url=url)
    report = json.loads(out)
    assert code == 1 and report["controller"]["answering"] and report["controller"]["pid"] == os.getpid()
    assert report["fleet"] == "probe fleet"
    assert report["backlog"]["pending"] == 2 and report["backlog"]["tickets"] == 2
    assert report["backlog"]["oldest_pending_age_s"] >= 0
    assert report["problems"] == ["no live agent while 2 job(s) are pending"]
    code, out, _ = await health_cli("--json", "--max-pending-age", "0", url=url)
    assert code == 1 and any("the oldest pending job has waited" in p for p in json.loads(out)["problems"])
    # An agent takes them: healthy (0), in text too
    fleet.start_agent("pi.lan")
    await wait_terminal(broker, [s.job_id for s in manifest.jobs])
    code, out, err = await health_cli(url=url)
    assert code == 0, out + err
    assert out.startswith("healthy: probe fleet") and "a controller answers" in out and "1 agent(s) alive" in out
    # ctl.health answers the same report (as the viewer may ask it)
    viewer = await fleet_connect(settings)
    try:
        answer = await request(viewer.nc, viewer.names, "health", {}, timeout_s=10)
    finally:
        await viewer.close()
    assert answer["status"] == "healthy" and answer["agents"]["hosts"]["alive"] == ["pi.lan"]
    assert answer["backlog"]["pending"] == 0 and answer["backlog"]["jobs"] == 2


async def fleet_connect(settings):
    from trainfleet.broker.connection import Broker

    return await Broker.connect(as_role(settings, "viewer"), name="test-health")


async def test_health_unreachable_exits_3():
    code, out, _ = await health_cli("--json", "--timeout-s", "5", url="nats://127.0.0.1:1")
    report = json.loads(out)
    assert code == 3 and report["status"] == "unreachable" and report["exit_code"] == 3
    assert report["problems"] and "unreachable" in report["problems"][0].lower()


async def test_health_says_which_resources_are_missing(nats_server, settings):
    # A server nobody provisioned: reachable, degraded, every resource named missing
    report = await check_within(as_role(settings, "viewer"), 10)
    assert report["status"] == "degraded" and report["exit_code"] == 1
    assert len(report["resources"]["missing"]) == 6
    assert "stream TRAINFLEET_JOBS is missing" in report["problems"]
    assert "agents" not in report
