"""Hostile input, the manifest and trainer side: names are tokens, flags cannot be overridden,
trainers keep nothing running and learn no credentials. (Artifacts: test_hostile_artifacts.py;
terminal output: test_sanitise.py.) Each test reproduces the attack as it was seen."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pytest

from trainfleet.agent.trainer import build_argv
from trainfleet.broker.errors import ManifestError
from trainfleet.broker.schema import JobStatus
from trainfleet.broker.specs import get_spec, put_spec
from trainfleet.controller.manifest import parse_manifest

from .conftest import gbm_jobs, gbm_manifest, put_job, records, wait_for, wait_terminal

MODEL = """
[models.m]
command = ["{python}", "-c", "print(1)"]
modes = ["run"]
[models.m.hyper.lr]
type = "float"
default = 0.1
"""


def problems(text: str) -> list[tuple[str | None, str | None, str]]:
    with pytest.raises(ManifestError) as err:
        parse_manifest("schema_version = 1\n" + text, file="bad.toml")
    assert all(p.file == "bad.toml" for p in err.value.problems)
    return [(p.job, p.field, p.message) for p in err.value.problems]


@pytest.mark.parametrize("name", ["../../victim-home", "/etc/passwd", "a b", "-rf", ".hidden", "x/y", "é\x1b[2J"])
def test_a_job_name_must_be_a_token(name):
    found = problems(MODEL + f'[[jobs]]\nname = {json.dumps(name)}\nmodel = "m"\nmode = "run"\n')
    assert any(field == "name" and "must be a name" in message for _, field, message in found), found


@pytest.mark.parametrize("hyper", ["out", "seed", "mode", "with space", "Lr", "-x", "a.b"])
def test_a_hyper_parameter_name_must_be_a_token_and_not_an_agent_flag(hyper):
    text = f'[models.m]\ncommand = ["x"]\nmodes = ["run"]\n[models.m.hyper.{json.dumps(hyper)}]\ntype = "int"\n'
    found = problems(text)
    assert any(field == f"models.m.hyper.{hyper}" for _, field, _ in found), found


@pytest.mark.parametrize("mode", ["../x", "a b", ""])
def test_a_mode_must_be_a_token(mode):
    found = problems(f'[models.m]\ncommand = ["x"]\nmodes = [{json.dumps(mode)}]\n')
    assert any(field == "models.m.modes" for _, field, _ in found), found


@pytest.mark.parametrize("var", ["NATS_URL", "TRAINFLEET_PROGRESS_FD", "lower", "A-B"])
def test_a_model_cannot_set_the_agents_own_variables(var):
    found = problems(f'[models.m]\ncommand = ["x"]\nmodes = ["run"]\nenv = {{ {json.dumps(var)} = "v" }}\n')
    assert any(field == "models.m.env" for _, field, _ in found), found


def test_flags_are_one_word_each_and_the_agents_own_come_last():
    spec = parse_manifest(
        "schema_version = 1\n" + MODEL + '[[jobs]]\nname = "j"\nmodel = "m"\nmode = "run"\nhyper = { lr = -0.5 }\n',
        file="ok.toml",
    ).jobs[0]
    argv = build_argv(spec, Path("/out"), python="py")
    # A value starting with "-" stays a value; nothing after the agent's own flags can override them
    assert argv[-4:] == ["--lr=-0.5", "--mode=run", "--seed=0", "--out=/out"]


async def test_a_spec_with_a_path_for_a_name_is_refused_by_the_agent(fleet, broker, tmp_path):
    # Given a job whose stored spec (written by hand, past the manifest) is named like a path
    spec = gbm_manifest(gbm_jobs(1)).jobs[0]
    job = await put_job(broker, msgspec.structs.replace(spec, name="../../victim-home"))
    await fleet.start_controller()  # (its class consumers)
    await broker.js.publish(
        broker.names.jobs_subject("cpu"),
        msgspec.json.encode({"job_id": job.job_id, "generation": 1, "klass": "cpu"}),
    )
    fleet.start_agent("a1")

    async def refused() -> bool:
        return "spec refused" in ((await records(broker))[job.job_id].reason or "")

    await wait_for(refused, 30, what="the agent to refuse the spec")
    assert (await records(broker))[job.job_id].status == JobStatus.PENDING


SPAWNER = """
import os, subprocess, sys
out = os.environ["TRAINFLEET_OUTPUT_DIR"]
os.makedirs(out, exist_ok=True)
# A daemon of its own: double fork and a new session, as a leaky trainer (or an attacker) would
child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(300)"],
                         start_new_session=True)
open(os.path.join(out, "metrics.json"), "w").write('{"child": %d, "uid": %d}' % (child.pid, os.getuid()))
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""


def spawner_manifest(exit_code: int, name: str) -> object:
    return parse_manifest(
        "schema_version = 1\n[models.spawner]\n"
        f'command = [{json.dumps(sys.executable)}, "-c", {json.dumps(SPAWNER)}]\nmodes = ["run"]\n'
        f'env = {{ EXIT_CODE = "{exit_code}" }}\n'
        f'[[jobs]]\nname = "{name}"\nmodel = "spawner"\nmode = "run"\nseed = {exit_code}\n',
        file="spawner.toml",
    )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("exit_code", [0, 3], ids=["completed", "failed"])
async def test_nothing_a_trainer_started_outlives_its_job(fleet, broker, tmp_path, exit_code):
    # Given a trainer that leaves a process running in a session of its own, then exits
    manifest = spawner_manifest(exit_code, f"spawner-{exit_code}")
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("a1", keep_outputs=True)
    rec = (await wait_terminal(broker, [job_id]))[job_id]
    assert rec.status == (JobStatus.COMPLETED if exit_code == 0 else JobStatus.FAILED), rec.last_error
    # Then, whatever the outcome, that process is gone when the job is
    out = tmp_path / "agents" / "a1" / "jobs" / job_id / "attempt-1" / "output" / "metrics.json"
    child = json.loads(out.read_text())["child"]
    await wait_for(lambda: not alive(child), 10, what="the trainer's leftover process to be gone")


SYSTEM_PYTHON = "/usr/bin/python3"  # reachable by any user (this venv's may live under /root)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd") or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root, useradd and a system python3",
)
async def test_trainers_can_run_as_another_user(fleet, broker, tmp_path):
    # Given a system user for trainers (what deploy/install.sh --trainer-user makes)
    if subprocess.run(["id", "tftrainer"], capture_output=True).returncode != 0:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "tftrainer"], check=True
        )
    uid = int(subprocess.run(["id", "-u", "tftrainer"], capture_output=True, text=True, check=True).stdout)
    fleet.settings = fleet.settings.with_(trainer_user="tftrainer")
    # ...an agent work dir that user can reach (it will own only each job's own dir)...
    fleet.workdir = Path(tempfile.mkdtemp(prefix="trainfleet-as-user-"))
    os.chmod(fleet.workdir, 0o755)
    manifest = parse_manifest(
        "schema_version = 1\n[models.spawner]\n"
        f'command = [{json.dumps(SYSTEM_PYTHON)}, "-c", {json.dumps(SPAWNER)}]\nmodes = ["run"]\n'
        '[[jobs]]\nname = "as-trainer"\nmodel = "spawner"\nmode = "run"\n',
        file="as-user.toml",
    )
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    try:
        # When its trainer runs
        fleet.start_agent("a1")
        rec = (await wait_terminal(broker, [job_id]))[job_id]
    finally:
        shutil.rmtree(fleet.workdir, ignore_errors=True)
    # Then it ran as that user, not as the agent's
    assert rec.status == JobStatus.COMPLETED, rec.last_error
    assert rec.metrics["uid"] == uid != os.geteuid()


async def test_a_models_env_reaches_its_trainers_and_nothing_else(fleet, broker):
    # (test_attacks checks that the agent's own credentials never do)
    manifest = spawner_manifest(0, "env")
    spec = manifest.jobs[0]
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    assert (await get_spec(broker, spec.job_id)).env == {"EXIT_CODE": "0"}
    # A spec that tries to hand its trainer the agent's variables is refused where it is opened
    await put_spec(broker, msgspec.structs.replace(spec, env={"NATS_URL": "x"}), None)
    with pytest.raises(Exception, match="env 'NATS_URL'"):
        await get_spec(broker, spec.job_id)


LINKER = """
import json, os
out = os.environ["TRAINFLEET_OUTPUT_DIR"]
os.makedirs(out, exist_ok=True)
os.symlink("/etc/passwd", os.path.join(out, "leak"))
json.dump({"ok": 1}, open(os.path.join(out, "metrics.json"), "w"))
"""


async def test_output_that_cannot_be_packed_fails_the_job_once_naming_the_file(fleet, broker):
    # Given a trainer whose output holds a link out of its output dir (a retry would not change it)
    manifest = parse_manifest(
        "schema_version = 1\n[models.linker]\n"
        f'command = [{json.dumps(sys.executable)}, "-c", {json.dumps(LINKER)}]\nmodes = ["run"]\n'
        '[[jobs]]\nname = "linker"\nmodel = "linker"\nmode = "run"\n',
        file="linker.toml",
    )
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("a1")
    rec = (await wait_terminal(broker, [job_id]))[job_id]
    # Then it failed on its first attempt, saying which stage and which file
    assert rec.status == JobStatus.FAILED and rec.attempt == 1
    assert rec.last_error.startswith("pack: output/leak: a symlink to '/etc/passwd'"), rec.last_error
