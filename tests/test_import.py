"""`trainfleet import --from training-fleet`: the predecessor's manifest, queue and store, brought in.

The predecessor's files are built here from its formats (../shared/predecessor/: queue.txt's
SQLite schema, store.txt's `<model>_<mode>/<sha>/bundle.tar.zst` + `meta.json` + `index.jsonl`,
test_manifest.txt's manifests), then imported into a real nats-server as the CLI does it."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import extract
from trainfleet.broker.connection import Broker
from trainfleet.broker.records import load_records
from trainfleet.broker.schema import JobStatus
from trainfleet.broker.specs import signed_by
from trainfleet.broker.tickets import scan_tickets
from trainfleet.controller import importer
from trainfleet.controller.manifest import load_manifest, parse_manifest

from .conftest import FleetHarness, role_env

CLI = [sys.executable, "-m", "trainfleet.controller.cli"]

# queue.txt: the predecessor's training_jobs.db
SCHEMA = """
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY, name TEXT NOT NULL, spec_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending','claimed','running','completed','failed','cancelled')),
    claimed_by TEXT, claimed_at REAL, heartbeat_at REAL, completed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, artifact_id TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE INDEX idx_jobs_status ON jobs(status);
CREATE TABLE workers (hostname TEXT PRIMARY KEY, capability_json TEXT NOT NULL, last_seen REAL NOT NULL,
    last_claim_id TEXT);
"""

MANIFEST = """
schema_version = 1
name = "cis490 training"

[hosts.tiny]
allow_jobs = ["gbt", "mlp"]
[hosts."pi.lan"]
deny_jobs = ["mlp"]

[[jobs]]
name = "gbt-r"
model = "gbt"
mode = "realistic"
hyper = { lr = 0.1, n_estimators = 100 }
split_recipe = "v1"
seed = 1

[[jobs]]
name = "gbt-o"
model = "gbt"
mode = "oracle"
hyper = { lr = 0.05, n_estimators = 200 }
seed = 1

[[jobs]]
name = "mlp-o"
model = "mlp"
mode = "oracle"
hyper = { epochs = 10, hidden = 64 }
seed = 2
prefer_cuda = true
min_ram_gib = 2.0

[[jobs]]
name = "mlp-r"
model = "mlp"
mode = "realistic"
hyper = { epochs = 20, hidden = 128 }
seed = 2

[[jobs]]
name = "mlp-r2"
model = "mlp"
mode = "realistic"
hyper = { epochs = 30, hidden = 128 }
seed = 3

[[jobs]]
name = "gbt-x"
model = "gbt"
mode = "realistic"
hyper = { lr = 0.2, n_estimators = 50 }
train_hosts = ["pi.lan"]
seed = 4

[[jobs]]
name = "gbt-bad"
model = "gbt"
mode = "oracle"
hyper = { lr = 0.3, n_estimators = 10 }
seed = 5

[[jobs]]
name = "gbt-new"
model = "gbt"
mode = "oracle"
hyper = { lr = 0.4, n_estimators = 10 }
priority = 3
seed = 6
"""

COMMANDS = 'gbt = ["python", "-m", "trainers.gbt"]\nmlp = "python -m trainers.mlp --torch"\n'


def jobs_of(text: str) -> dict[str, dict[str, Any]]:
    import tomllib

    return {j["name"]: j for j in tomllib.loads(text)["jobs"]}


def spec_json(job: dict[str, Any], pred_id: str) -> dict[str, Any]:
    """A queue row's spec as the predecessor stored it: its JobSpec, flat."""
    return {
        "job_id": pred_id,
        "name": job["name"],
        "model": job["model"],
        "mode": job["mode"],
        "hyper": job.get("hyper", {}),
        "split_recipe": job.get("split_recipe"),
        "train_hosts": job.get("train_hosts", []),
        "seed": job.get("seed"),
        "priority": job.get("priority", 0),
        "require_cuda": job.get("require_cuda", False),
        "prefer_cuda": job.get("prefer_cuda", False),
        "min_vram_gib": job.get("min_vram_gib", 0.0),
        "min_ram_gib": job.get("min_ram_gib", 0.0),
        "allowed_hosts": job.get("train_hosts", []),
        "denied_hosts": [],
    }


def predecessor_bundle(files: dict[str, bytes]) -> bytes:
    """A bundle as the predecessor's worker made it: its artifact dir, tarred (with ./), zstd."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            info.mtime = 1_715_000_000
            tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor(level=10).compress(raw.getvalue())


class Predecessor:
    """A training_jobs.db and a model store, in the predecessor's formats."""

    def __init__(self, root: Path):
        self.root = root
        self.db = root / "training_jobs.db"
        self.store = root / "models"
        self.store.mkdir(parents=True)
        self.conn = sqlite3.connect(self.db)
        self.conn.executescript(SCHEMA)
        self.bundles: dict[str, dict[str, bytes]] = {}  # name -> files

    def artifact(self, job: dict[str, Any], pred_id: str, files: dict[str, bytes], worker: str) -> str:
        data = predecessor_bundle(files)
        sha = hashlib.sha256(data).hexdigest()
        where = self.store / f"{job['model']}_{job['mode']}" / sha
        where.mkdir(parents=True)
        (where / "bundle.tar.zst").write_bytes(data)
        meta = dict(model=job["model"], mode=job["mode"], job_id=pred_id, worker=worker, artifact_id=sha)
        (where / "meta.json").write_text(json.dumps({**meta, "size_bytes": len(data)}, indent=2) + "\n")
        row = {**meta, "received_at_wall": "2026-05-08T06:20:20Z", "size_bytes": len(data)}
        with (self.store / "index.jsonl").open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        self.bundles[job["name"]] = files
        return sha

    def row(self, job: dict[str, Any], status: str, **cols: Any) -> str:
        pred_id = hashlib.sha256(f"pred:{job['name']}:{job.get('seed')}".encode()).hexdigest()
        values = {
            "job_id": pred_id,
            "name": job["name"],
            "spec_json": json.dumps(spec_json(job, pred_id), sort_keys=True),
            "status": status,
            "attempts": 0,
            "created_at": 1_715_000_000.0,
            "updated_at": 1_715_000_100.0,
            **cols,
        }
        if status == "completed":
            files = cols.pop("files", None) or {"model.pkl": job["name"].encode() * 100}
            values.pop("files", None)
            values["artifact_id"] = self.artifact(job, pred_id, files, cols.get("claimed_by", "gpu-box"))
        keys = ", ".join(values)
        self.conn.execute(f"INSERT INTO jobs ({keys}) VALUES ({', '.join('?' * len(values))})", list(values.values()))
        self.conn.commit()
        return pred_id


def build_predecessor(root: Path) -> Predecessor:
    jobs = jobs_of(MANIFEST)
    pred = Predecessor(root)
    done = dict(claimed_by="gpu-box", claimed_at=1_715_000_010.0, heartbeat_at=1_715_000_050.0, attempts=1)
    pred.row(
        jobs["gbt-r"],
        "completed",
        completed_at=1_715_000_060.0,
        files={"model.pkl": b"\x00gbt-r" * 1000, "metrics.json": b'{"accuracy": 0.93, "headline": "accuracy"}'},
        **done,
    )
    pred.row(jobs["gbt-o"], "completed", completed_at=1_715_000_070.0, **{**done, "attempts": 2})
    pred.row(jobs["mlp-o"], "failed", last_error="CUDA out of memory", **done)
    pred.row(jobs["mlp-r"], "pending", attempts=1)
    pred.row(jobs["mlp-r2"], "cancelled")
    pred.row(jobs["gbt-x"], "running", claimed_by="pi.lan", claimed_at=1_715_000_020.0, attempts=1)
    pred.row(jobs["gbt-bad"], "completed", completed_at=1_715_000_080.0, **done)
    # A job removed from the manifest but never cancelled: still the fleet's.
    old = {"name": "gbt-old", "model": "gbt", "mode": "oracle", "hyper": {"lr": 0.9, "n_estimators": 5}, "seed": 9}
    pred.row(old, "completed", completed_at=1_715_000_090.0, **done)
    # gbt-bad's bundle was damaged on disk after its upload: its hash no longer matches.
    for meta in (pred.store / "gbt_oracle").glob("*/meta.json"):
        if (
            json.loads(meta.read_text())["job_id"]
            == pred.conn.execute("SELECT job_id FROM jobs WHERE name='gbt-bad'").fetchone()[0]
        ):
            bundle = meta.parent / "bundle.tar.zst"
            bundle.write_bytes(bundle.read_bytes()[:-8] + b"damaged!")
    return pred


# -- the manifest alone (no NATS) --------------------------------------------------------
def run_import(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "import", "--from", "training-fleet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_manifest_without_commands_prints_a_template_and_exits_1(tmp_path: Path) -> None:
    src = tmp_path / "training_manifest.toml"
    src.write_text(MANIFEST)
    result = run_import(str(src), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    out = Path(report["out"])
    assert out == tmp_path / "training_manifest.trainfleet.toml" and report["written"] == "written"
    assert 'gbt = ["python", "training/trainer/run.py", "--model", "gbt"]' in report["commands_template"]
    assert [item["what"] for item in report["not_carried"]] == ["command of gbt, mlp"]
    manifest = load_manifest(str(out))
    assert manifest.models["gbt"].command == ("FILL-IN-THE-COMMAND-OF-gbt",)
    # Text mode says the same, with the template to fill.
    text = run_import(str(src))
    assert text.returncode == 1 and "NOT CARRIED (1)" in text.stdout and "--commands FILE" in text.stdout
    assert "unchanged" in text.stdout  # the same manifest again


def test_manifest_is_translated_with_models_inferred(tmp_path: Path) -> None:
    src = tmp_path / "m.toml"
    src.write_text(MANIFEST)
    (tmp_path / "cmds.toml").write_text(COMMANDS)
    out = tmp_path / "new.toml"
    result = run_import(str(src), "--commands", str(tmp_path / "cmds.toml"), "--out", str(out), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["not_carried"] == []
    manifest = load_manifest(str(out))
    gbt, mlp = manifest.models["gbt"], manifest.models["mlp"]
    assert gbt.command == ("python", "-m", "trainers.gbt") and mlp.command == (
        "python",
        "-m",
        "trainers.mlp",
        "--torch",
    )
    assert gbt.modes == ("oracle", "realistic") and mlp.modes == ("oracle", "realistic")
    assert {k: p.type for k, p in gbt.hyper.items()} == {"lr": "float", "n_estimators": "int"}
    assert not any(p.has_default for p in gbt.hyper.values())  # every job gave every value
    jobs = {j.name: j for j in manifest.jobs}
    assert len(jobs) == 8
    assert jobs["gbt-r"].data == {"split": "v1"} and jobs["gbt-o"].data == {}
    assert jobs["gbt-x"].constraints.allowed_hosts == ("pi.lan",)
    assert jobs["mlp-o"].constraints.prefer_cuda and jobs["mlp-o"].constraints.min_ram_gib == 2.0
    assert jobs["gbt-new"].priority == 3
    assert manifest.hosts["pi.lan"].deny_jobs == ("mlp",) and manifest.hosts["tiny"].allow_jobs == ("gbt", "mlp")
    assert getattr(manifest, "name", "cis490 training") == "cis490 training"
    # An edited output is not overwritten without --force.
    out.write_text(out.read_text() + "# mine\n")
    again = run_import(str(src), "--commands", str(tmp_path / "cmds.toml"), "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr


def test_what_cannot_be_carried_is_listed(tmp_path: Path) -> None:
    src = tmp_path / "m.toml"
    src.write_text(
        """
schema_version = 1
stale_after_s = 600
[settings]
max_attempts = 5
sweep_s = 30
[hosts.huge]
deny_jobs = ["transformer"]
cuda = true
[[jobs]]
name = "a"
model = "gbt"
mode = "realistic"
hyper = { lr = 0.1, depth = 3 }
[[jobs]]
name = "b"
model = "gbt"
mode = "realistic"
hyper = { lr = 0.2 }
notes = "keep"
[[jobs]]
name = "c"
model = "gbt"
mode = "oracle"
hyper = { lr = 0.3, layers = [1, 2] }
[[jobs]]
name = "d"
model = "gbt"
mode = "realistic"
hyper = { lr = 0.1, depth = 3 }
"""
    )
    (tmp_path / "cmds.json").write_text(json.dumps({"gbt": ["python", "gbt.py"]}))
    result = run_import(str(src), "--commands", str(tmp_path / "cmds.json"), "--json")
    assert result.returncode == 1, result.stderr
    lost = {item["what"]: item["why"] for item in json.loads(result.stdout)["not_carried"]}
    assert "no trainfleet manifest key" in lost["stale_after_s"]
    assert "sweep_s" in " ".join(lost) and "host huge: cuda" in lost
    assert "job b: notes" in lost
    assert "not all of one of int, float, str, bool" in lost["job c"]
    assert "passes the declared default 3" in lost["model gbt: hyper 'depth'"]
    assert "same content as job 'a'" in lost["job d"]  # a duplicate, as the predecessor refused it too
    manifest = load_manifest(str(tmp_path / "m.trainfleet.toml"))
    assert sorted(j.name for j in manifest.jobs) == ["a", "b"]
    assert manifest.settings.max_attempts == 5 and manifest.hosts["huge"].deny_jobs == ("transformer",)
    assert {j.name: j.hyper for j in manifest.jobs}["b"] == {"depth": 3, "lr": 0.2}


# The predecessor's own manifest tests (test_manifest.txt) whose manifests it accepted.
PREDECESSOR_CASES = {
    "load_minimal": (
        'schema_version = 1\nname = "test"\n[[jobs]]\nname = "gbt-r"\nmodel = "gbt"\nmode = "realistic"\n',
        ["gbt-r"],
    ),
    "disambiguation_via_hyper": (
        'schema_version = 1\n[[jobs]]\nname = "lr1"\nmodel = "gbt"\nmode = "realistic"\nhyper.lr = 0.1\n'
        '[[jobs]]\nname = "lr2"\nmodel = "gbt"\nmode = "realistic"\nhyper.lr = 0.05\n',
        ["lr1", "lr2"],
    ),
    "host_allow_deny": (
        'schema_version = 1\n[hosts.tiny]\nallow_jobs = ["gbt"]\n[hosts.huge]\ndeny_jobs = ["transformer"]\n'
        '[[jobs]]\nname = "x"\nmodel = "gbt"\nmode = "realistic"\n',
        ["x"],
    ),
    "job_id_stable": (
        'schema_version = 1\n[[jobs]]\nname = "stable"\nmodel = "transformer"\nmode = "oracle"\n'
        "hyper.epochs = 80\nhyper.batch_size = 256\n",
        ["stable"],
    ),
    "priority_default_zero": ('schema_version = 1\n[[jobs]]\nname = "x"\nmodel = "gbt"\nmode = "realistic"\n', ["x"]),
}


@pytest.mark.parametrize("case", sorted(PREDECESSOR_CASES))
def test_the_predecessors_own_manifests_translate(case: str, tmp_path: Path) -> None:
    text, names = PREDECESSOR_CASES[case]
    doc = importer.tomllib.loads(text)
    commands = {"gbt": ("gbt",), "transformer": ("tf",)}
    first = importer.translate(doc, [], commands, file="a.toml")
    second = importer.translate(doc, [], commands, file="b.toml")
    assert first.lost == [] and sorted(j.name for j in first.manifest.jobs) == names
    assert [j.job_id for j in first.manifest.jobs] == [j.job_id for j in second.manifest.jobs]
    assert all(j.priority == 0 for j in first.manifest.jobs)
    assert parse_manifest(first.text).jobs == first.manifest.jobs
    if case == "host_allow_deny":
        spec = first.manifest.jobs[0]
        assert first.manifest.hosts["tiny"].permits(spec)[0] and first.manifest.hosts["huge"].permits(spec)[0]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    src = tmp_path / "m.toml"
    src.write_text(MANIFEST)
    assert run_import(str(src), "--db", str(tmp_path / "x.db")).returncode == 2  # --db without --store
    result = run_import(str(src), "--db", str(tmp_path / "x.db"), "--store", str(tmp_path))
    assert result.returncode == 2 and "no predecessor database" in result.stderr
    build_predecessor(tmp_path / "pred")
    pred = tmp_path / "pred"
    result = run_import(str(src), "--db", str(pred / "training_jobs.db"), "--store", str(pred / "models"))
    assert result.returncode == 2 and "--commands FILE" in result.stderr  # pending jobs would get placeholders
    bad = subprocess.run([*CLI, "import", str(src), "--from", "other"], capture_output=True, text=True)
    assert bad.returncode == 2


# -- the queue and the store, into a real server ------------------------------------------
async def cli(*args: str, url: str, role: str, extra_env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env={**os.environ, **role_env(role), "NATS_URL": url, **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def revisions(broker: Broker) -> tuple[dict[str, int], dict[str, int]]:
    jobs = {k: s.revision for k, s in (await load_records(broker)).items()}
    specs = {}
    for key in jobs:
        specs[key] = (await broker.specs.get(key)).revision
    return jobs, specs


async def test_import_brings_every_job_and_artifact_and_is_idempotent(
    tmp_path: Path, settings: Any, broker: Broker, fleet: FleetHarness, fleet_auth: Any
) -> None:
    pred = build_predecessor(tmp_path / "pred")
    src = tmp_path / "training_manifest.toml"
    src.write_text(MANIFEST)
    (tmp_path / "cmds.toml").write_text(COMMANDS)
    out = tmp_path / "fleet.toml"
    argv = [
        "import", str(src), "--from", "training-fleet", "--db", str(pred.db), "--store", str(pred.store),
        "--commands", str(tmp_path / "cmds.toml"), "--out", str(out), "--json",
    ]  # fmt: skip
    signing = {"TRAINFLEET_SIGNING_KEY": role_env("controller")["TRAINFLEET_SIGNING_KEY"]}
    code, stdout, stderr = await cli(*argv, url=settings.url, role="admin", extra_env=signing)
    assert code == 1, stdout + stderr
    report = json.loads(stdout)
    lost = {item["what"]: item["why"] for item in report["not_carried"]}
    assert set(lost) == {"job gbt-bad: artifact", "job gbt-x: its run on pi.lan"}, lost
    assert "not the" in lost["job gbt-bad: artifact"] and "imported as failed" in lost["job gbt-bad: artifact"]
    queue = report["queue"]
    assert queue["rows"] == 8 and queue["new"] == 9 and queue["existing"] == 0 and queue["artifacts_uploaded"] == 3

    # Every job under the id of its entry in the written manifest (gbt-old added to it).
    manifest = load_manifest(str(out))
    ids = {j.name: j.job_id for j in manifest.jobs}
    assert set(ids) == {"gbt-r", "gbt-o", "mlp-o", "mlp-r", "mlp-r2", "gbt-x", "gbt-bad", "gbt-new", "gbt-old"}
    recs = {name: (await load_records(broker))[job_id].record for name, job_id in ids.items()}
    state = {name: rec.status for name, rec in recs.items()}
    assert state == {
        "gbt-r": JobStatus.COMPLETED,
        "gbt-o": JobStatus.COMPLETED,
        "gbt-old": JobStatus.COMPLETED,
        "mlp-o": JobStatus.FAILED,
        "gbt-bad": JobStatus.FAILED,
        "mlp-r2": JobStatus.CANCELLED,
        "mlp-r": JobStatus.PENDING,
        "gbt-x": JobStatus.PENDING,
        "gbt-new": JobStatus.PENDING,
    }
    assert recs["gbt-r"].attempt == 1 and recs["gbt-o"].attempt == 2 and recs["gbt-r"].claimed_by == "gpu-box"
    assert recs["gbt-r"].finished_at == 1_715_000_060.0 and recs["gbt-r"].started_at == 1_715_000_010.0
    assert recs["gbt-r"].metrics == {"accuracy": 0.93, "headline": "accuracy"}
    assert recs["mlp-o"].last_error == "CUDA out of memory" and recs["mlp-o"].attempt == 1
    assert "could not be carried" in (recs["gbt-bad"].last_error or "")
    assert recs["mlp-r"].attempt == 1 and recs["gbt-x"].attempt == 1 and recs["gbt-x"].claimed_by is None
    assert all("imported from training-fleet" in (r.reason or "") for n, r in recs.items() if n != "gbt-new")

    # Specs signed with the controller's key, as sync signs them.
    for job_id in ids.values():
        assert await signed_by(broker, job_id) == fleet_auth.signing_public_key

    # Pending jobs are ticketed: agents pick them up.
    ticketed = {ref.ticket.job_id for ref in await scan_tickets(broker) if ref.ticket is not None}
    assert {ids["mlp-r"], ids["gbt-x"], ids["gbt-new"]} <= ticketed
    assert not ticketed & {ids[n] for n in ("gbt-r", "gbt-o", "gbt-old", "mlp-o", "mlp-r2", "gbt-bad")}

    # Artifacts: downloaded (sha256 verified), extracted, the predecessor's files under output/.
    store = Artifacts(broker)
    for name in ("gbt-r", "gbt-o", "gbt-old"):
        rec = recs[name]
        assert rec.artifact is not None
        path = await store.get(rec.artifact, tmp_path / "dl" / f"{name}.tar.zst")
        assert (
            hashlib.sha256(path.read_bytes()).hexdigest() == rec.artifact and rec.artifact_bytes == path.stat().st_size
        )
        target = extract(path, tmp_path / "x" / name)
        for rel, data in pred.bundles[name].items():
            assert (target / "output" / rel).read_bytes() == data
        if hasattr(store, "run_provenance"):
            prov = (await store.run_provenance(rec.job_id, rec.generation, rec.attempt, rec.artifact)).provenance
        else:  # before provenance objects: inside the bundle
            prov = json.loads((target / "provenance.json").read_text())
        assert prov["imported_from"] == "training-fleet" and prov["host"]["host_id"] == "gpu-box"
        pred_sha = prov["predecessor"]["artifact_id"]
        assert prov["predecessor"]["meta"]["artifact_id"] == pred_sha
        assert prov["predecessor"]["index"][0]["received_at_wall"] == "2026-05-08T06:20:20Z"
        model_mode = "gbt_realistic" if name == "gbt-r" else "gbt_oracle"
        original = pred.store / model_mode / pred_sha / "bundle.tar.zst"
        assert hashlib.sha256(original.read_bytes()).hexdigest() == pred_sha

    # Re-running the import changes nothing and reports nothing new.
    before = await revisions(broker)
    code, stdout, stderr = await cli(*argv, url=settings.url, role="admin", extra_env=signing)
    report = json.loads(stdout)
    assert code == 0, stdout + stderr  # nothing was left behind this time
    assert report["queue"]["new"] == 0 and report["queue"]["existing"] == 8
    assert report["queue"]["artifacts_uploaded"] == 0 and report["written"] == "unchanged"
    assert report["queue"]["sync"]["created"] == [] and report["queue"]["sync"]["updated"] == []
    assert await revisions(broker) == before

    # A later `trainfleet sync` of the written manifest finds every job in place: nothing re-trains.
    await fleet.start_controller()
    code, stdout, stderr = await cli("sync", str(out), "--json", url=settings.url, role="operator")
    assert code == 0, stdout + stderr
    synced = json.loads(stdout)
    assert synced["created"] == [] and synced["updated"] == [] and synced["refused"] == []
    assert sorted(synced["unchanged"]) == sorted(ids.values())
    after = {k: s.record for k, s in (await load_records(broker)).items()}
    for name in ("gbt-r", "gbt-o", "gbt-old"):
        assert after[ids[name]].status == JobStatus.COMPLETED and after[ids[name]].artifact == recs[name].artifact
    assert before[0] == {k: s.revision for k, s in (await load_records(broker)).items()}
