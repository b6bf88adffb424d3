"""Deterministic artifacts (#16): a bundle is the trainer's output only, packed so the same files
give the same bytes; runs that write the same files share one artifact and one stored object,
and each run's provenance is its own object beside it (provenance/<job id>/<gen>-<attempt>.json)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import zstandard

from trainfleet.broker.artifacts import Artifacts, parse_provenance_object_name, provenance_object_name
from trainfleet.broker.bundle import BUNDLE_MTIME, PROVENANCE_MAX_BYTES, build_bundle, extract
from trainfleet.broker.errors import ArtifactError
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import JobStatus
from trainfleet.controller import ops
from trainfleet.controller.manifest import parse_manifest

from .conftest import gbm_jobs, gbm_manifest, put_job, records, stock_artifacts, wait_for
from .test_cli import arun_cli

# A trainer that writes the same bytes on every run (its files' times, owners and modes vary).
FIXED_MODEL = """
[models.fixed]
command = ["{python}", "-c", '''
import json, pathlib, sys
flags = dict(arg[2:].split("=", 1) for arg in sys.argv[1:] if arg.startswith("--") and "=" in arg)
out = pathlib.Path(flags["out"])
(out / "ckpt").mkdir(parents=True, exist_ok=True)
(out / "ckpt" / "weights.bin").write_bytes(bytes(range(256)) * 64)
(out / "metrics.json").write_text(json.dumps({"headline": "loss", "loss": 0.25}))
''']
modes = ["run"]
"""


def write_tree(root: Path, *, mtime: float, umask_mode: int, reverse: bool = False) -> Path:
    """The same files under ``root``, created in either order, with the given times and modes."""
    files = {"b.txt": b"bee\n", "a/z.bin": bytes(range(256)) * 40, "a/y/x.json": b'{"k": 1}', "run.sh": b"#!/bin/sh\n"}
    for rel, data in sorted(files.items(), reverse=reverse):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(umask_mode)
    (root / "run.sh").chmod(umask_mode | 0o111)
    (root / "empty").mkdir()
    (root / "latest").symlink_to("a/z.bin")
    for path in [*root.rglob("*"), root]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return root


def members(path: Path) -> list[tarfile.TarInfo]:
    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes())).read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


# -- packing ---------------------------------------------------------------------------------
def test_packing_the_same_files_twice_gives_the_same_bytes(tmp_path):
    # Given the same files written twice, in another order, an hour apart, with other modes
    one = write_tree(tmp_path / "one" / "output", mtime=1_700_000_000.25, umask_mode=0o644)
    two = write_tree(tmp_path / "two" / "output", mtime=1_700_003_600.75, umask_mode=0o664, reverse=True)
    if os.geteuid() == 0:  # (and other owners, where we may give them)
        for path in [*two.rglob("*"), two]:
            os.lchown(path, 1234, 5678)
    # When each is packed
    a = build_bundle(one, None, tmp_path / "a.tar.zst")
    b = build_bundle(two, None, tmp_path / "b.tar.zst")
    # Then the bytes, so the ids, are the same
    assert a.path.read_bytes() == b.path.read_bytes() and a.sha256 == b.sha256
    # and its headers say nothing of where or when: sorted, mtime 0, owners 0, normalised modes,
    # no PAX records (no timestamps), the output only (no provenance.json)
    infos = members(a.path)
    assert [m.name for m in infos] == sorted(m.name for m in infos)
    assert [m.name for m in infos][0] == "output/a" and all(m.name.startswith("output/") for m in infos)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in infos} == {(BUNDLE_MTIME, 0, 0, "", "")}
    assert all(not m.pax_headers for m in infos)
    modes = {m.name: (m.type, m.mode) for m in infos}
    assert modes["output/a"] == (tarfile.DIRTYPE, 0o755)
    assert modes["output/b.txt"] == (tarfile.REGTYPE, 0o644)
    assert modes["output/run.sh"] == (tarfile.REGTYPE, 0o755)  # the exec bit is content: kept
    assert modes["output/latest"] == (tarfile.SYMTYPE, 0o777)
    # And a changed byte, or a lost exec bit, is another artifact
    (two / "b.txt").write_bytes(b"bee!\n")
    assert build_bundle(two, None, tmp_path / "c.tar.zst").sha256 != a.sha256
    (two / "b.txt").write_bytes(b"bee\n")
    (two / "run.sh").chmod(0o644)
    assert build_bundle(two, None, tmp_path / "d.tar.zst").sha256 != a.sha256


def test_a_deterministic_bundle_extracts_with_the_files_and_the_exec_bit(tmp_path):
    out = write_tree(tmp_path / "output", mtime=1_700_000_000, umask_mode=0o600)
    bundle = build_bundle(out, None, tmp_path / "b.tar.zst")
    target = extract(bundle.path, tmp_path / "x")
    assert (target / "output" / "a" / "z.bin").read_bytes() == bytes(range(256)) * 40
    assert os.access(target / "output" / "run.sh", os.X_OK)
    assert (target / "output" / "b.txt").stat().st_mode & 0o777 == 0o644
    assert os.readlink(target / "output" / "latest") == "a/z.bin"
    assert not (target / "provenance.json").exists()
    # (files are dated when extracted, not 1970)
    assert (target / "output" / "b.txt").stat().st_mtime > 1_600_000_000


# -- storing the same bytes again -------------------------------------------------------------
async def test_storing_the_same_bytes_again_reuses_the_stored_object(broker, tmp_path):
    # Given a bundle stored a while ago
    out = write_tree(tmp_path / "output", mtime=1, umask_mode=0o644)
    bundle = build_bundle(out, None, tmp_path / "b.tar.zst")
    store = Artifacts(broker)
    await store.put(bundle)
    first = await store.info(bundle.sha256)
    await asyncio.sleep(0.05)
    # When the same bytes are put again (another run that wrote the same files)
    sent = 0
    real_publish = broker.nc.publish

    async def counting_publish(subject, *args, **kwargs):
        nonlocal sent
        sent += subject.startswith(f"$O.{store.store.bucket}.C.")
        return await real_publish(subject, *args, **kwargs)

    broker.nc.publish = counting_publish
    try:
        assert await store.put(bundle) == bundle.sha256
    finally:
        broker.nc.publish = real_publish
    # Then no chunk was sent: the same chunks, under an info as young as this upload
    again = await store.info(bundle.sha256)
    assert sent == 0 and again.nuid == first.nuid and again.mtime > first.mtime
    assert [i.name for i in await store.list()] == [bundle.sha256]
    got = await store.get(bundle.sha256, tmp_path / "dl.tar.zst")
    assert got.read_bytes() == bundle.path.read_bytes()


async def test_an_object_missing_chunks_or_changed_meanwhile_is_uploaded_again(broker, tmp_path):
    out = write_tree(tmp_path / "output", mtime=1, umask_mode=0o644)
    bundle = build_bundle(out, None, tmp_path / "b.tar.zst")
    store = Artifacts(broker)
    await store.put(bundle)
    broken = await store.info(bundle.sha256)
    # Given its chunks gone (an interrupted prune, say): the put stores them again, under a new nuid
    await store.store._purge(store.store.chunk_subject(broken.nuid))
    await store.put(bundle)
    fixed = await store.info(bundle.sha256)
    assert fixed.nuid != broken.nuid
    await store.get(bundle.sha256, tmp_path / "dl.tar.zst")
    # A touch of an info that is no longer the latest is refused
    info, seq = await store.store.info_and_seq(bundle.sha256)
    assert await store.store.touch(info, seq) is True
    assert await store.store.touch(info, seq) is False


async def test_a_prune_never_removes_chunks_a_touch_reuses(broker, tmp_path, monkeypatch):
    # Given an old unreferenced bundle, which an agent stores again while a prune removes it:
    # the touch lands after the prune judged the object, before its purge
    out = write_tree(tmp_path / "output", mtime=1, umask_mode=0o644)
    bundle = build_bundle(out, None, tmp_path / "b.tar.zst")
    store = Artifacts(broker)
    await store.put(bundle)
    real_purge = Artifacts._purge
    touched = []

    async def touch_first(self, stream, subject, *, seq=None):
        if seq is not None and not touched:
            touched.append(await Artifacts(broker).put(bundle))
        return await real_purge(self, stream, subject, seq=seq)

    monkeypatch.setattr(Artifacts, "_purge", touch_first)
    report = await store.prune(0.0)
    # Then it is kept, and it still downloads whole
    assert touched == [bundle.sha256] and report.removed == []
    await store.get(bundle.sha256, tmp_path / "dl.tar.zst")
    # And a touch that comes after the prune's purge of the info fails, so the agent uploads it again
    monkeypatch.setattr(Artifacts, "_purge", real_purge)
    info, seq = await store.store.info_and_seq(bundle.sha256)
    assert (await store.prune(0.0)).removed == [bundle.sha256]
    assert await store.store.touch(info, seq) is False
    await store.put(bundle)
    await store.get(bundle.sha256, tmp_path / "dl2.tar.zst")


# -- provenance objects -----------------------------------------------------------------------
def test_provenance_object_names():
    job = "ab" * 32
    assert provenance_object_name(job, 2, 1) == f"provenance/{job}/2-1.json"
    assert parse_provenance_object_name(f"provenance/{job}/2-1.json") == (job, 2, 1)
    for bad in (f"provenance/{job}/2-1.txt", f"provenance/{job[:-1]}/1-1.json", "provenance/../1-1.json", job):
        assert parse_provenance_object_name(bad) is None
    with pytest.raises(ArtifactError, match="64 lowercase hex"):
        provenance_object_name("../x", 1, 1)


async def test_a_provenance_object_is_read_bounded_and_verified(broker):
    store, stock = Artifacts(broker), await stock_artifacts(broker)
    job = "c" * 64
    name = await store.put_provenance(job, 1, 2, {"attempt": 2, "host": {"host_id": "h"}})
    assert name == f"provenance/{job}/1-2.json"
    assert await store.read_provenance_object(name) == {"attempt": 2, "host": {"host_id": "h"}}
    # (any NATS client reads it: a plain JSON object in the object store)
    assert json.loads((await stock.get(name)).data) == {"attempt": 2, "host": {"host_id": "h"}}
    assert await store.read_provenance_object(f"provenance/{job}/9-9.json") is None
    # Too big, not JSON, or a name that is not a provenance object's: refused, naming why
    big = f"provenance/{job}/1-3.json"
    await stock.put(big, b" " * (PROVENANCE_MAX_BYTES + 1))
    with pytest.raises(ArtifactError, match="PROVENANCE_MAX_BYTES"):
        await store.read_provenance_object(big)
    junk = f"provenance/{job}/1-4.json"
    await stock.put(junk, b"{not json")
    with pytest.raises(ArtifactError, match="not JSON"):
        await store.read_provenance_object(junk)
    with pytest.raises(ArtifactError, match="not a provenance object"):
        await store.read_provenance_object("notes.txt")


async def test_an_old_bundle_with_provenance_inside_is_still_shown(broker, tmp_path):
    # Given a completed job whose bundle was stored before provenance objects (provenance.json inside)
    out = tmp_path / "output"
    out.mkdir()
    (out / "model.bin").write_bytes(b"weights")
    old = build_bundle(out, {"host": {"host_id": "oldbox"}, "attempt": 1}, tmp_path / "old.tar.zst")
    await Artifacts(broker).put(old)
    spec = gbm_manifest(gbm_jobs(1)).jobs[0]
    await put_job(broker, spec, status=JobStatus.COMPLETED, artifact=old.sha256, attempt=1)
    # When it is shown and fetched
    data = await ops.job_detail(broker, spec.job_id)
    got = await ops.fetch_artifact(broker, spec.job_id, tmp_path / "get", extract=True)
    # Then its provenance comes from the bundle, and the extracted dir holds it as before
    assert data["provenance"] == {"host": {"host_id": "oldbox"}, "attempt": 1}
    assert data["provenance_object"] is None and data["runs"] == []
    assert json.loads(Path(got["extracted"], "provenance.json").read_text())["host"]["host_id"] == "oldbox"


async def test_provenance_objects_stay_while_their_job_exists(broker):
    # Given provenance objects of a job that exists and of one whose record is gone
    store = Artifacts(broker)
    spec = gbm_manifest(gbm_jobs(1)).jobs[0]
    await put_job(broker, spec, status=JobStatus.COMPLETED)
    kept = await store.put_provenance(spec.job_id, 1, 1, {"attempt": 1})
    gone = await store.put_provenance("d" * 64, 1, 1, {"attempt": 1})
    # When pruned within the grace period: both stay; past it, only the existing job's
    report = await store.prune(3600.0)
    assert (report.removed, report.kept_provenance, report.kept_recent) == ([], 1, 1)
    report = await store.prune(0.0)
    assert (report.removed, report.kept_provenance) == ([gone], 1)
    assert [i.name for i in await store.list()] == [kept]


# -- a fleet re-running a deterministic trainer -----------------------------------------------
async def test_a_rerun_that_writes_the_same_files_shares_one_artifact_and_keeps_both_provenances(
    fleet, broker, settings, tmp_path
):
    manifest = parse_manifest(
        "schema_version = 1\n" + FIXED_MODEL + '[[jobs]]\nname = "fixed"\nmodel = "fixed"\nmode = "run"\nseed = 1\n',
        file="fixed.toml",
    )
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("a1")
    artifacts = []
    for generation in (1, 2):
        if generation > 1:
            await ctl.requeue(job_id)

        async def completed(generation: int = generation) -> bool:
            rec = (await records(broker))[job_id]
            return rec.status == JobStatus.COMPLETED and rec.generation == generation

        await wait_for(completed, 90, what=f"generation {generation} to complete")
        artifacts.append((await get_record(broker, job_id)).record.artifact)
    # Then both runs have the same artifact id, and the store holds one bundle (one chunk set)...
    assert artifacts[0] == artifacts[1]
    artifact = artifacts[0]
    store = Artifacts(broker)
    names = sorted(i.name for i in await store.list())
    runs = [f"provenance/{job_id}/1-1.json", f"provenance/{job_id}/2-1.json"]
    assert names == sorted([artifact, *runs])
    prefix = f"$O.{store.store.bucket}.C."
    chunk_sets = set(await store.store._subject_counts(prefix + ">"))
    live = {prefix + (await store.store.info(n)).nuid for n in names}
    assert chunk_sets == live and len(live) == 3
    # ...and two provenance objects, one per run, each naming that artifact and its own run
    first, second = [await store.read_provenance_object(n) for n in runs]
    assert (first["generation"], second["generation"]) == (1, 2)
    assert first["artifact"] == second["artifact"] == artifact
    assert first["host"]["host_id"] == second["host"]["host_id"] == "a1"
    assert first["timings"]["finished_at"] < second["timings"]["started_at"]
    # `show` gives the current run's provenance and lists both runs, each read from its object
    data = await ops.job_detail(broker, job_id)
    assert data["provenance"] == second and data["provenance_object"] == runs[1]
    assert [(r["object"], r["artifact"], r["host"], r["error"]) for r in data["runs"]] == [
        (runs[0], artifact, "a1", None),
        (runs[1], artifact, "a1", None),
    ]
    code, out, err = await arun_cli("show", job_id, url=settings.url)
    assert code == 0, err
    assert f"provenance (from {runs[1]}):" in out and "runs (provenance objects):" in out
    assert all(f"{artifact[:12]}  {name}" in out for name in runs)
    # `artifacts get` writes the current run's beside the bundle
    got = await ops.fetch_artifact(broker, job_id, tmp_path / "get", extract=False)
    assert json.loads(Path(got["provenance"]).read_text()) == second
    assert hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest() == artifact
    # And a prune keeps all three: the bundle is referenced, the provenance objects' job exists
    report = await store.prune(0.0)
    assert (report.removed, report.kept_referenced, report.kept_provenance) == ([], 1, 2)
    shutil.rmtree(tmp_path / "get")
