"""A predecessor-style manifest on a real fleet: the manifest's name shown by status and the
monitor, a host id with dots (``pi.lan``) pinned, registered and claiming under its token."""

from __future__ import annotations

import json

from trainfleet.broker.names import Names
from trainfleet.broker.roles import permissions
from trainfleet.broker.specs import get_fleet_info, load_specs
from trainfleet.broker.workers import load_workers
from trainfleet.controller.manifest import parse_manifest
from trainfleet.tui.app import MonitorApp

from .conftest import LINREG_MODEL, as_role, role_env, wait_terminal

MANIFEST = (
    'schema_version = 1\nname = "cis490 training"\n'
    '[hosts."pi.lan"]\nallow_jobs = ["linreg"]\n'
    + LINREG_MODEL
    + '[[jobs]]\nname = "on-pi"\nmodel = "linreg"\nmode = "gd"\nseed = 7\nallowed_hosts = ["pi.lan"]\n'
    + "split_recipe = { test_fraction = 0.5 }\n"
)


async def _cli(*args: str, url: str, role: str) -> tuple[int, str, str]:
    import asyncio
    import os
    import subprocess

    from .test_cli import CLI

    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env={**os.environ, **role_env(role), "NATS_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_a_named_manifest_with_a_dotted_host_runs_and_is_shown(fleet, broker, settings):
    manifest = parse_manifest(MANIFEST, file="training_manifest.toml")
    (job,) = manifest.jobs
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    assert (await get_fleet_info(broker))["name"] == "cis490 training"
    assert set(await load_specs(broker)) == {job.job_id}  # the fleet's facts are not read as a spec
    fleet.start_agent("other")
    fleet.start_agent("pi.lan")
    rec = (await wait_terminal(broker, [job.job_id]))[job.job_id]
    assert rec.status.value == "completed" and rec.claimed_by == "pi.lan"
    assert rec.klass == "host.pi=lan"
    assert "pi=lan" in await broker.workers.keys()
    assert {w.host_id for w in await load_workers(broker)} == {"other", "pi.lan"}
    # status shows the fleet's name, to the least-privileged role
    code, out, err = await _cli("status", url=settings.url, role="viewer")
    assert code == 0, err
    assert out.splitlines()[0] == "fleet: cis490 training" and "pi.lan" in out
    code, out, _ = await _cli("status", "--json", url=settings.url, role="viewer")
    assert json.loads(out)["fleet"] == "cis490 training"
    # the predecessor's `list` is `jobs`
    code, out, _ = await _cli("list", "--json", url=settings.url, role="viewer")
    assert code == 0 and [row["host"] for row in json.loads(out)] == ["pi.lan"]
    # and so does the monitor's header
    app = MonitorApp(as_role(settings, "viewer"))
    async with app.run_test(size=(120, 30)) as pilot:
        for _ in range(200):  # until the jobs are shown: leaving earlier races the monitor's start-up
            if app.loaded and app.jobs_table.row_count == 1:
                break
            await pilot.pause(0.05)
        assert app.sub_title.startswith("read-only (viewer) · cis490 training · ")


def test_an_agent_identity_for_a_dotted_host_writes_only_its_token_key():
    names = Names()
    publish = permissions("agent", names, host_id="pi.lan").publish
    assert f"$KV.{names.workers_bucket}.pi=lan" in publish
    assert not any("pi.lan" in subject for subject in publish)
