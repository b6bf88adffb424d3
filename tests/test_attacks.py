"""The attacks the trust-model issue reproduced, each now failing for the attacker.

Run against a server enforcing the roles (tests/conftest.py): the controller signs specs with
its key, agents trust only that key. An attacker here is someone who got write access to a
spec (the bucket only the controller may write), or who holds an operator's credentials, or
a trainer: untrusted code that should learn nothing it could use to reach NATS.
"""

from __future__ import annotations

import asyncio
import json
import stat
import sys
from pathlib import Path

import msgspec
import pytest

from trainfleet.agent.agent import Agent, AgentOptions
from trainfleet.broker.connection import Broker
from trainfleet.broker.control import request
from trainfleet.broker.errors import NotProvisioned, RemoteError, Unreachable
from trainfleet.broker.schema import JobStatus
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import Signer, get_spec, new_seed, seal
from trainfleet.controller.manifest import parse_manifest
from trainfleet.controller.up import start_fleet

from .conftest import (
    LINREG_MODEL,
    as_role,
    fake_capability,
    linreg_manifest,
    records,
    wait_for,
    wait_terminal,
)


async def wait_reason(broker: Broker, job_id: str, text: str, timeout_s: float = 30) -> None:
    async def has() -> bool:
        rec = (await records(broker))[job_id]
        return text in (rec.reason or "")

    await wait_for(has, timeout_s, what=f"a reason with {text!r}")


def evil_command(marker: Path) -> tuple[str, ...]:
    return ("{python}", "-c", f"open({str(marker)!r}, 'w').write('pwned')")


@pytest.mark.parametrize("tamper", ["unsigned", "rogue key", "another job's signed spec"])
async def test_a_spec_changed_by_anyone_but_the_controller_never_runs(fleet, broker, tmp_path, tamper):
    # Given a job the controller signed, and an attacker who rewrites its spec in the bucket
    manifest = linreg_manifest(2)
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    victim, other = manifest.jobs
    marker = tmp_path / "pwned"
    evil = msgspec.structs.replace(victim, command=evil_command(marker))
    if tamper == "unsigned":
        forged = seal(evil, None)
    elif tamper == "rogue key":
        forged = seal(evil, Signer(new_seed()))
    else:  # a genuine signature, but over another job's spec: its identity is not this job's
        forged = (await broker.specs.get(other.job_id)).value
    await broker.specs.put(victim.job_id, forged)
    # When an agent that trusts only the controller's key gets the ticket
    fleet.start_agent("a1")
    # Then it refuses the spec, says why on the job, and never runs the command
    await wait_reason(broker, victim.job_id, "spec refused")
    rec = (await records(broker))[victim.job_id]
    assert rec.status == JobStatus.PENDING and rec.attempt == 0
    # (the other job, untouched, trains as usual)
    assert (await wait_terminal(broker, [other.job_id]))[other.job_id].status == JobStatus.COMPLETED
    assert not marker.exists()


async def test_records_carry_no_command(fleet, broker):
    manifest = linreg_manifest(1)
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    raw = json.loads((await broker.jobs.get(manifest.jobs[0].job_id)).value)
    assert "spec" not in raw and "command" not in json.dumps(raw)
    # The command is in the signed spec, and only there
    assert (await get_spec(broker, manifest.jobs[0].job_id)).command == manifest.jobs[0].command


async def test_a_same_id_sync_with_another_command_is_refused_unless_allowed(fleet, broker, tmp_path):
    ctl = await fleet.start_controller()
    await ctl.sync(linreg_manifest(1))
    job_id = linreg_manifest(1).jobs[0].job_id
    # An operator re-declares the same job (same model, mode, hyper, seed) with another command
    text = LINREG_MODEL.replace("trainfleet.examples.linreg", "trainfleet.examples.sklearn_gbm")
    changed = parse_manifest(
        "schema_version = 1\n" + text + '[[jobs]]\nname = "lr-0"\nmodel = "linreg"\nmode = "gd"\n'
        f"seed = {sum(map(ord, 'lr')) * 1000}\nhyper = {{ epochs = 50 }}\n",
        file="changed.toml",
    )
    assert changed.jobs[0].job_id == job_id
    report = await ctl.sync(changed)
    assert [r["job_id"] for r in report.refused] == [job_id] and "command" in report.refused[0]["reason"]
    assert (await get_spec(broker, job_id)).command == linreg_manifest(1).jobs[0].command
    # Only an explicit decision changes it
    report = await ctl.sync(changed, allow_command_change=True)
    assert report.refused == [] and report.updated == [job_id]
    assert (await get_spec(broker, job_id)).command == changed.jobs[0].command


async def test_a_sync_request_cannot_repoint_what_reload_reads(fleet, broker, tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text("schema_version = 1\n")
    theirs = tmp_path / "theirs.toml"
    theirs.write_text("schema_version = 1\n")
    fleet.controller.manifest_path = str(mine)
    ctl = await fleet.start_controller()
    await ctl.sync_text(theirs.read_text(), str(theirs))
    assert ctl.manifest_path == str(mine)


async def test_a_trainer_gets_no_nats_credentials(fleet, broker, monkeypatch, tmp_path):
    # Given an agent whose own environment holds NATS credentials and trainfleet settings
    for var, value in {
        "NATS_URL": "nats://agent:hunter2@127.0.0.1:4222",
        "NATS_PASSWORD": "hunter2",
        "NATS_NKEY": str(tmp_path / "agent.nk"),
        "NATS_CREDS": str(tmp_path / "agent.creds"),
        "TRAINFLEET_TRUST_KEY": "UKEY",
        "TRAINFLEET_INBOX_PREFIX": "_INBOX_agent",
    }.items():
        monkeypatch.setenv(var, value)
    dump_env = (
        "import json, os; out = os.environ['TRAINFLEET_OUTPUT_DIR']; os.makedirs(out, exist_ok=True); "
        "json.dump({'env': sorted(os.environ)}, open(os.path.join(out, 'metrics.json'), 'w'))"
    )
    manifest = parse_manifest(
        "schema_version = 1\n[models.envdump]\n"
        f'command = [{json.dumps(sys.executable)}, "-c", {json.dumps(dump_env)}]\nmodes = ["run"]\n'
        '[[jobs]]\nname = "envdump"\nmodel = "envdump"\nmode = "run"\nseed = 1\n',
        file="envdump.toml",
    )
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("a1")
    # When its trainer runs
    rec = (await wait_terminal(broker, [manifest.jobs[0].job_id]))[manifest.jobs[0].job_id]
    # Then the trainer saw its own job's variables, and none of the agent's credentials or settings
    env = set(rec.metrics["env"])
    assert {"TRAINFLEET_JOB_ID", "TRAINFLEET_OUTPUT_DIR", "PATH"} <= env
    assert not {v for v in env if v.startswith("NATS_")}
    assert not env & {"TRAINFLEET_TRUST_KEY", "TRAINFLEET_INBOX_PREFIX", "TRAINFLEET_SIGNING_KEY"}


async def test_an_agent_never_provisions(nats_server, settings, tmp_path):
    # Given a secured server nobody has provisioned yet
    agent = Agent(
        as_role(settings, "agent").with_(connect_wait_s=0.0),
        AgentOptions(host_id="a1", handle_signals=False, workdir=str(tmp_path)),
        capability=fake_capability("a1"),
    )
    # When an agent starts, it does not try to create streams: it stops at once, saying why
    with pytest.raises(NotProvisioned, match="not provisioned"):
        await asyncio.wait_for(agent.run(), 20)


@pytest.mark.slow
def test_up_runs_its_embedded_server_with_per_run_credentials(tmp_path):
    # Given `trainfleet up`'s fleet on an embedded server (no agents: nothing to train)
    manifest = tmp_path / "m.toml"
    manifest.write_text("schema_version = 1\n")
    fleet, who = start_fleet(str(manifest), Settings(), agents=0, data_dir=tmp_path / "up", embed=True)
    try:
        auth = tmp_path / "up" / "auth"
        # Its identities are the owner's alone
        assert stat.S_IMODE(auth.stat().st_mode) == 0o700
        for seed in auth.glob("*.nk"):
            assert stat.S_IMODE(seed.stat().st_mode) == 0o600, seed
        # Each process has its own role: the controller's identity is not the admin's
        assert who.controller.nkey and who.controller.nkey != who.admin.nkey
        assert who.agent.trust_keys and who.controller.signing_key
        # And a local user without those files cannot connect at all
        with pytest.raises(Unreachable, match="(?i)authori[sz]ation"):
            asyncio.run(Broker.connect(Settings(url=who.admin.url)))
        # ... while `up`'s own watcher, with the viewer's files, reads the fleet
        assert asyncio.run(_records_readable(who.watcher))
    finally:
        fleet.stop()


async def _records_readable(settings: Settings) -> bool:
    broker = await Broker.connect(settings)
    try:
        return await records(broker) == {}
    finally:
        await broker.close()


async def test_a_malformed_consent_to_change_commands_is_a_usage_error(fleet, broker):
    await fleet.start_controller()
    with pytest.raises(RemoteError) as err:
        await request(
            broker.nc, broker.names, "sync", {"manifest": "schema_version = 1\n", "allow_command_change": "yes"}
        )
    assert err.value.exit_code == 2 and "allow_command_change" in str(err.value)
