"""The trainfleet command as an operator runs it: output, --json shapes and exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from trainfleet.broker.schema import Capability, JobRecord, JobStatus, WorkerRecord, encode
from trainfleet.controller.manifest import parse_manifest

from .conftest import GBM_MODEL, REPO, gbm_jobs, gbm_manifest, put_job, records, role_env, wait_terminal

CLI = [sys.executable, "-m", "trainfleet.controller.cli"]
ZERO_COUNTS = {s.value: 0 for s in JobStatus}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None):
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd
    )


async def arun_cli(*args: str, url: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env={**os.environ, **role_env("operator"), "NATS_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def test_validate_lists_jobs_with_ids():
    result = run_cli("validate", str(REPO / "examples" / "fleet.toml"))
    assert result.returncode == 0, result.stderr
    assert "10 job(s)" in result.stdout and "mlp-classify-h64-s1" in result.stdout


def test_validate_json_has_every_job_with_its_id():
    result = run_cli("validate", "--json", str(REPO / "examples" / "fleet.toml"))
    data = json.loads(result.stdout)
    assert result.returncode == 0 and data["ok"] is True
    assert len(data["jobs"]) == 10 and all(len(j["job_id"]) == 64 for j in data["jobs"])


def test_validate_reports_every_error_naming_file_job_and_field_and_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "schema_version = 1\n"
        + GBM_MODEL
        + """
[[jobs]]
name = "a"
model = "gbm"
mode = "sideways"
[[jobs]]
name = "b"
model = "gbm"
mode = "classify"
hyper = { max_iter = "many" }
"""
    )
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert "bad.toml" in result.stderr and "job a" in result.stderr and "'mode'" in result.stderr
    assert "job b" in result.stderr and "max_iter" in result.stderr
    as_json = json.loads(run_cli("validate", "--json", str(bad)).stdout)
    assert as_json["ok"] is False and {p["job"] for p in as_json["problems"]} == {"a", "b"}


def test_help_lists_the_verbs():
    result = run_cli("--help")
    assert result.returncode == 0
    for verb in (
        "up",
        "validate",
        "agent",
        "controller",
        "status",
        "jobs",
        "show",
        "cancel",
        "requeue",
        "reload",
        "workers",
        "logs",
        "artifacts",
        "monitor",
    ):
        assert f"    {verb}" in result.stdout
    assert "exit codes" in result.stdout
    for verb in ("status", "jobs", "show", "workers", "logs"):  # every listing has --json
        assert "--json" in run_cli(verb, "--help").stdout
    assert "--json" in run_cli("artifacts", "list", "--help").stdout


def test_commands_exit_3_when_nats_is_unreachable():
    result = run_cli("status", env={"NATS_URL": "nats://127.0.0.1:1"}, timeout=60)
    assert result.returncode == 3 and "cannot connect" in result.stderr


@pytest.mark.slow
def test_up_trains_the_tiny_manifest_end_to_end_and_exits_0(tmp_path):
    result = run_cli(
        "up", str(REPO / "examples" / "tiny.toml"), "--data-dir", str(tmp_path / "up"), "--no-live", timeout=400
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all jobs completed" in result.stdout
    for name in ("tiny-mlp-classify", "tiny-mlp-autoencode", "tiny-gbm-classify", "tiny-gbm-regress"):
        assert name in result.stdout


@pytest.mark.slow
def test_up_on_an_existing_server_exits_1_and_shows_the_error_when_a_job_fails(tmp_path, nats_server):
    manifest = tmp_path / "m.toml"
    manifest.write_text(
        "schema_version = 1\n"
        + GBM_MODEL
        + gbm_jobs(1, prefix="ok")
        + "\n"
        + gbm_jobs(1, prefix="bad")
        + "hyper = { fail = true }\n"
    )
    result = run_cli(
        "up",
        str(manifest),
        "--agents",
        "1",
        "--data-dir",
        str(tmp_path / "up"),
        "--no-live",
        "--json",
        "--url",
        nats_server.url,
        "--auth-dir",  # the identities our server knows: each process gets its own role's
        str(Path(role_env("admin")["NATS_NKEY"]).parent),
        env=role_env("admin"),  # `up` provisions, so it needs admin rights
        timeout=400,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert nats_server.proc is not None and nats_server.proc.poll() is None  # `up` left our server running
    assert not (tmp_path / "up" / "nats").exists()  # and embedded none
    summary = json.loads(result.stdout[result.stdout.index("[") : result.stdout.rindex("]") + 1])
    states = {row["name"]: row["state"] for row in summary}
    assert states == {"ok-0": "completed", "bad-0": "failed"}
    assert "requested failure" in result.stdout


async def test_operator_verbs_against_a_running_controller(fleet, broker, settings):
    ctl = await fleet.start_controller()
    manifest = gbm_manifest(gbm_jobs(2) + "\n" + gbm_jobs(1, prefix="boom") + "hyper = { fail = true }\n")
    await ctl.sync(manifest)
    url = settings.url
    code, out, _ = await arun_cli("status", "--json", url=url)
    assert code == 0 and json.loads(out)["jobs"] == {**ZERO_COUNTS, "pending": 3}
    code, out, _ = await arun_cli("jobs", "--json", url=url)
    assert code == 0 and sorted(r["name"] for r in json.loads(out)) == ["boom-0", "job-0", "job-1"]
    code, _, err = await arun_cli("show", "nope", url=url)
    assert code == 4 and "no job matches" in err
    code, out, _ = await arun_cli("cancel", "job-0", url=url)
    assert code == 0 and "cancelled job-0" in out
    code, _, err = await arun_cli("cancel", "job-0", url=url)
    assert code == 1 and "already cancelled" in err
    code, out, _ = await arun_cli("requeue", "job-0", "--json", url=url)
    assert code == 0 and json.loads(out)["generation"] == 2 and json.loads(out)["status"] == "pending"
    recs = await records(broker)
    assert sorted(r.status.value for r in recs.values()) == ["pending"] * 3
    # A worker comes up and trains them; one trainer fails on purpose
    fleet.start_agent("a1")
    await wait_terminal(broker, list(recs))
    code, out, _ = await arun_cli("workers", "--json", url=url)
    assert code == 0 and [w["host_id"] for w in json.loads(out)] == ["a1"] and json.loads(out)[0]["alive"]
    code, out, _ = await arun_cli("jobs", "--state", "failed", url=url)
    assert code == 0 and "boom-0" in out and "job-1" not in out
    # show: record, state history, last error; and for a completed job its provenance
    code, out, _ = await arun_cli("show", "boom-0", url=url)
    assert code == 0 and "failed on a1" in out and "requested failure" in out and "last error" in out
    code, out, _ = await arun_cli("show", "job-1", url=url)
    assert code == 0 and "provenance (from provenance/" in out and "scikit-learn" in out  # (its run's object)
    assert [line.split()[4] for line in out.splitlines() if line.startswith("  rev ")] == [
        "pending",
        "claimed",
        "running",
        "completed",
    ]
    shown = json.loads((await arun_cli("show", "job-1", "--json", url=url))[1])
    assert shown["provenance"]["host"]["host_id"] == "a1" and shown["provenance"]["job"]["name"] == "job-1"
    assert shown["provenance"]["versions"]["python"] and "timings" in shown["provenance"]
    # logs of a finished job: the trainer's output, stderr on stderr
    code, out, err = await arun_cli("logs", "boom-0", url=url)
    assert code == 0 and "requested failure" in err
    code, out, _ = await arun_cli("logs", "job-1", "--events", "--json", url=url)
    entries = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and {e["kind"] for e in entries} >= {"log", "progress"}
    assert all(e["attempt"] == 1 for e in entries)
    # artifacts: listed, downloaded verified, extracted; a job without one is exit 5
    code, out, _ = await arun_cli("artifacts", "list", "--json", url=url)
    listed = json.loads(out)
    assert code == 0 and sorted(r["name"] for r in listed) == ["job-0", "job-1"]
    assert not any(r["orphan"] for r in listed)
    dest = Path(fleet.workdir) / "dl"
    code, out, err = await arun_cli("artifacts", "get", "job-1", "--out", str(dest), "--extract", url=url)
    assert code == 0, err
    assert (dest / shown["job_id"] / "output" / "metrics.json").exists()
    code, _, err = await arun_cli("artifacts", "get", "boom-0", "--out", str(dest), url=url)
    assert code == 5 and "has no artifact" in err


async def test_ambiguous_id_prefix_is_a_clear_error_and_a_unique_one_resolves(broker, settings):
    # Given two records whose ids share the prefix "abcd"
    spec = gbm_manifest(gbm_jobs(1)).jobs[0]
    for suffix in ("1" * 60, "2" * 60):
        job_id = "abcd" + suffix
        await put_job(broker, msgspec.structs.replace(spec, job_id=job_id, name=f"n{suffix[0]}"))
    code, _, err = await arun_cli("show", "abcd", url=settings.url)
    assert code == 4 and "matches 2 jobs" in err
    code, out, _ = await arun_cli("show", "abcd2", "--json", url=settings.url)
    assert code == 0 and json.loads(out)["job_id"] == "abcd" + "2" * 60
    code, out, _ = await arun_cli("show", "n1", "--json", url=settings.url)
    assert code == 0 and json.loads(out)["job_id"] == "abcd" + "1" * 60


# A trainer that prints a line, then waits for a gate file before it finishes: the test decides
# when the job ends, so "follows a running job" is observed without guessing at timings.
GATED_MODEL = """
[models.gated]
command = ["{python}", "-c", '''
import json, pathlib, sys, time
from trainfleet.agent.progress import report
flags = dict(arg[2:].split("=", 1) for arg in sys.argv[1:] if arg.startswith("--") and "=" in arg)
gate, out = pathlib.Path(flags["gate"]), pathlib.Path(flags["out"])
print("before the gate", flush=True)
report(step=1, total=2, loss=0.5)
while not gate.exists():
    time.sleep(0.05)
print("a warning", file=sys.stderr, flush=True)
print("after the gate", flush=True)
report(step=2, total=2, loss=0.25)
(out / "metrics.json").write_text(json.dumps({"headline": "loss", "loss": 0.25}))
''']
modes = ["run"]
[models.gated.hyper.gate]
type = "str"
default = ""
"""


async def read_line(stream: asyncio.StreamReader) -> str:
    return (await asyncio.wait_for(stream.readline(), 60)).decode()


async def test_logs_follow_shows_a_running_jobs_output_live_and_exits_0_when_it_ends(fleet, broker, settings, tmp_path):
    # Given a job whose trainer is waiting at its gate, and `logs -f` started before it ran
    gate = tmp_path / "gate"
    manifest = parse_manifest(
        "schema_version = 1\n"
        + GATED_MODEL
        + f"""
[[jobs]]
name = "gated"
model = "gated"
mode = "run"
hyper = {{ gate = "{gate}" }}
""",
        file="gated.toml",
    )
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "logs",
        "gated",
        "-f",
        "--events",
        env={**os.environ, **role_env("operator"), "NATS_URL": settings.url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        fleet.start_agent("a1")
        # When the trainer's first line appears in the follower's output
        first = {await read_line(proc.stdout) for _ in range(3)}
        assert first == {"[started] attempt 1 on a1\n", "before the gate\n", "[progress] █████░░░░░ 1/2 loss=0.5\n"}
        # Then the job is still running: the line came live, not after the fact
        assert (await records(broker))[job_id].status == JobStatus.RUNNING
        assert proc.returncode is None
        # And once the trainer passes its gate and the job completes, the follower prints the rest and exits 0
        gate.touch()
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    rest = out.decode().splitlines()
    # (output and progress travel on separate pipes and subjects: each is in order, not interleaved exactly)
    assert [line for line in rest if not line.startswith("[")] == ["after the gate"]
    assert [line[:26] for line in rest if line.startswith("[progress]")] == ["[progress] ██████████ 2/2 "]
    assert rest[-1] == "[finished] attempt 1 on a1: completed"
    assert err.decode() == "a warning\n"
    assert (await records(broker))[job_id].status == JobStatus.COMPLETED
    # The whole output is there afterwards too, as JSON lines
    code, out_json, _ = await arun_cli("logs", job_id[:8], "--json", url=settings.url)
    lines = [json.loads(line) for line in out_json.splitlines()]
    assert code == 0 and [(e["stream"], e["line"]) for e in lines] == [
        ("stdout", "before the gate"),
        ("stderr", "a warning"),
        ("stdout", "after the gate"),
    ]
    code, out_none, _ = await arun_cli("logs", "gated", "--attempt", "2", url=settings.url)
    assert code == 0 and out_none == ""


async def test_listings_have_json_shapes_and_filters_without_a_controller(broker, settings, tmp_path):
    # Given records of two models (no controller running: reads go straight to NATS)
    high = gbm_jobs(1, prefix="high") + "priority = 9\nhyper = { max_iter = 11 }\n"
    gbm = gbm_manifest(gbm_jobs(2, prefix="low") + "\n" + high)
    for spec in gbm.jobs:
        await put_job(broker, spec)
    other = msgspec.structs.replace(gbm.jobs[0], job_id="f" * 64, name="mlp-0", model="mlp")
    await put_job(broker, other, status=JobStatus.RUNNING, claimed_by="box")
    worker = WorkerRecord(
        host_id="box",
        capability=Capability(host_id="box"),
        classes=("cpu",),
        current_jobs=(other.job_id,),
        state="busy",
        last_seen=time.time(),
    )
    await broker.workers.put("box", encode(worker))
    url = settings.url
    code, out, _ = await arun_cli("jobs", "--json", url=url)
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == ["high-0", "low-0", "low-1", "mlp-0"]
    assert set(rows[0]) >= {
        "job_id",
        "name",
        "model",
        "mode",
        "state",
        "host",
        "attempts",
        "priority",
        "progress",
        "metric",
        "artifact",
        "last_error",
    }
    assert [r["name"] for r in json.loads((await arun_cli("jobs", "--json", "--model", "mlp", url=url))[1])] == [
        "mlp-0"
    ]
    assert [r["name"] for r in json.loads((await arun_cli("jobs", "--json", "--host", "box", url=url))[1])] == ["mlp-0"]
    assert json.loads((await arun_cli("jobs", "--json", "--state", "completed", url=url))[1]) == []
    code, out, _ = await arun_cli("status", "--json", url=url)
    status = json.loads(out)
    assert status == {
        "fleet": "",  # no controller synced a named manifest here
        "jobs": {**ZERO_COUNTS, "pending": 3, "running": 1},
        "total": 4,
        "workers": {"alive": 1, "stale": 0},
        "hosts": {"alive": ["box"], "stale": []},
    }
    code, out, _ = await arun_cli("status", url=url)
    assert code == 0 and "jobs: 4" in out and "1 alive (box)" in out
    code, out, _ = await arun_cli("workers", url=url)
    assert code == 0 and "box" in out and other.job_id[:12] in out
    code, out, _ = await arun_cli("artifacts", "list", "--json", url=url)
    assert code == 0 and json.loads(out) == []
    # Exit codes: bad usage 2, writes with no controller 3, artifact missing 5
    code, _, err = await arun_cli("jobs", "--state", "sleeping", url=url)
    assert code == 2 and "invalid choice" in err
    code, _, err = await arun_cli("cancel", "high-0", url=url)
    assert code == 3 and "no controller is running" in err
    await broker.jobs.put(
        other.job_id, encode(JobRecord(job_id=other.job_id, artifact="e" * 64, status=JobStatus.COMPLETED))
    )
    code, _, err = await arun_cli("artifacts", "get", "mlp-0", "--out", str(tmp_path), url=url)
    assert code == 5 and "not in the object store" in err


def test_list_is_an_alias_of_jobs():
    from trainfleet.controller.cli import build_parser, cmd_jobs

    args = build_parser().parse_args(["list", "--state", "pending", "--json"])
    assert args.fn is cmd_jobs and args.state == "pending" and args.json
    assert "alias: list" in run_cli("--help").stdout or "list" in run_cli("list", "--help").stdout
