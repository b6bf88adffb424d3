"""The trainfleet command as an operator runs it: output, --json shapes and exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from trainfleet.broker.schema import JobRecord, JobStatus, encode

from .conftest import GBM_MODEL, REPO, gbm_jobs, gbm_manifest, records, wait_terminal

CLI = [sys.executable, "-m", "trainfleet.controller.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


async def arun_cli(*args: str, url: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*CLI, *args, env={**os.environ, "NATS_URL": url},
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
    bad.write_text("schema_version = 1\n" + GBM_MODEL + """
[[jobs]]
name = "a"
model = "gbm"
mode = "sideways"
[[jobs]]
name = "b"
model = "gbm"
mode = "classify"
hyper = { max_iter = "many" }
""")
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert "bad.toml" in result.stderr and "job a" in result.stderr and "'mode'" in result.stderr
    assert "job b" in result.stderr and "max_iter" in result.stderr
    as_json = json.loads(run_cli("validate", "--json", str(bad)).stdout)
    assert as_json["ok"] is False and {p["job"] for p in as_json["problems"]} == {"a", "b"}


def test_help_lists_the_verbs():
    result = run_cli("--help")
    assert result.returncode == 0
    for verb in ("up", "validate", "agent", "controller", "status", "jobs", "cancel", "requeue"):
        assert verb in result.stdout


def test_commands_exit_3_when_nats_is_unreachable():
    result = run_cli("status", env={"NATS_URL": "nats://127.0.0.1:1"}, timeout=60)
    assert result.returncode == 3 and "cannot connect" in result.stderr


@pytest.mark.slow
def test_up_trains_the_tiny_manifest_end_to_end_and_exits_0(tmp_path):
    result = run_cli("up", str(REPO / "examples" / "tiny.toml"), "--data-dir", str(tmp_path / "up"),
                     "--no-live", timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all jobs completed" in result.stdout
    for name in ("tiny-mlp-classify", "tiny-mlp-autoencode", "tiny-gbm-classify", "tiny-gbm-regress"):
        assert name in result.stdout


@pytest.mark.slow
def test_up_exits_1_and_shows_the_error_when_a_job_fails(tmp_path):
    manifest = tmp_path / "m.toml"
    manifest.write_text("schema_version = 1\n" + GBM_MODEL + gbm_jobs(1, prefix="ok") + "\n"
                        + gbm_jobs(1, prefix="bad") + "hyper = { fail = true }\n")
    result = run_cli("up", str(manifest), "--agents", "1", "--data-dir", str(tmp_path / "up"), "--no-live",
                     "--json", timeout=400)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads(result.stdout[result.stdout.index("["): result.stdout.rindex("]") + 1])
    states = {row["name"]: row["state"] for row in summary}
    assert states == {"ok-0": "completed", "bad-0": "failed"}
    assert "requested failure" in result.stdout


async def test_operator_verbs_against_a_running_controller(fleet, broker, settings):
    ctl = await fleet.start_controller()
    manifest = gbm_manifest(gbm_jobs(2))
    await ctl.sync(manifest)
    url = settings.url
    code, out, _ = await arun_cli("status", "--json", url=url)
    assert code == 0 and json.loads(out)["jobs"] == {"pending": 2}
    code, out, _ = await arun_cli("jobs", "--json", url=url)
    assert code == 0 and sorted(r["name"] for r in json.loads(out)) == ["job-0", "job-1"]
    code, _, err = await arun_cli("show", "nope", url=url)
    assert code == 4 and "no job matches" in err
    code, out, _ = await arun_cli("cancel", "job-0", url=url)
    assert code == 0 and "cancelled job-0" in out
    code, _, err = await arun_cli("cancel", "job-0", url=url)
    assert code != 0 and "already cancelled" in err
    code, out, _ = await arun_cli("requeue", "job-0", url=url)
    assert code == 0 and "generation 2" in out
    recs = await records(broker)
    assert sorted(r.status.value for r in recs.values()) == ["pending", "pending"]
    # A worker comes up, trains both; the artifact downloads and extracts through the CLI
    fleet.start_agent("a1")
    await wait_terminal(broker, list(recs))
    code, out, _ = await arun_cli("workers", "--json", url=url)
    assert code == 0 and [w["host_id"] for w in json.loads(out)] == ["a1"]
    dest = Path(fleet.workdir) / "dl"
    code, out, err = await arun_cli("artifacts", "get", "job-1", "--out", str(dest), "--extract", url=url)
    assert code == 0, err
    assert (dest / "job-1" / "output" / "metrics.json").exists()
    assert all(r.status == JobStatus.COMPLETED for r in (await records(broker)).values())


async def test_ambiguous_id_prefix_is_a_clear_error_and_a_unique_one_resolves(broker, settings):
    # Given two records whose ids share the prefix "abcd"
    spec = gbm_manifest(gbm_jobs(1)).jobs[0]
    for suffix in ("1" * 60, "2" * 60):
        job_id = "abcd" + suffix
        rec = JobRecord(job_id=job_id, spec=msgspec.structs.replace(spec, job_id=job_id, name=f"n{suffix[0]}"))
        await broker.jobs.create(job_id, encode(rec))
    code, _, err = await arun_cli("show", "abcd", url=settings.url)
    assert code == 4 and "matches 2 jobs" in err
    code, out, _ = await arun_cli("show", "abcd2", "--json", url=settings.url)
    assert code == 0 and json.loads(out)["job_id"] == "abcd" + "2" * 60
    code, out, _ = await arun_cli("show", "n1", "--json", url=settings.url)
    assert code == 0 and json.loads(out)["job_id"] == "abcd" + "1" * 60
