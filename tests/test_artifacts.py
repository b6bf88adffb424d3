"""Artifact bundles: content addressing, verified transfer, safe extraction."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from trainfleet.broker import bundle as bundle_module
from trainfleet.broker.artifacts import Artifacts, download_artifact
from trainfleet.broker.bundle import build_bundle, extract, read_provenance
from trainfleet.broker.errors import ArtifactError, PackError

from .conftest import stock_artifacts


def make_output(root: Path) -> Path:
    out = root / "output"
    (out / "sub").mkdir(parents=True)
    (out / "model.bin").write_bytes(bytes(range(256)) * 100)
    (out / "sub" / "metrics.json").write_text('{"accuracy": 0.9}')
    return out


def zst_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return path


def test_bundle_id_is_the_sha256_of_its_bytes_and_round_trips(tmp_path):
    out = make_output(tmp_path)
    bundle = build_bundle(out, {"job": {"job_id": "x"}}, tmp_path / "b.tar.zst")
    assert bundle.sha256 == hashlib.sha256(bundle.path.read_bytes()).hexdigest()
    assert bundle.size == bundle.path.stat().st_size
    target = extract(bundle.path, tmp_path / "x")
    assert (target / "output" / "model.bin").read_bytes() == (out / "model.bin").read_bytes()
    assert (target / "output" / "sub" / "metrics.json").exists()
    assert read_provenance(bundle.path) == {"job": {"job_id": "x"}}


def test_a_symlink_out_of_the_output_dir_never_travels(tmp_path):
    # (the rule: links inside the output dir travel as links; any other fails the packing, named)
    out = make_output(tmp_path)
    (out / "escape").symlink_to("/etc/passwd")
    with pytest.raises(PackError, match="output/escape"):
        build_bundle(out, {}, tmp_path / "b.tar.zst")


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "output/../../evil.txt"])
def test_extraction_refuses_paths_that_leave_the_target(tmp_path, name):
    info = tarfile.TarInfo(name)
    info.size = 4
    bad = zst_tar(tmp_path / "bad.tar.zst", [(info, b"evil")])
    with pytest.raises(ArtifactError, match="outside"):
        extract(bad, tmp_path / "target")
    assert not (tmp_path / "evil.txt").exists()


def test_extraction_refuses_links_and_devices(tmp_path):
    link = tarfile.TarInfo("output/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    bad = zst_tar(tmp_path / "bad.tar.zst", [(link, None)])
    with pytest.raises(ArtifactError, match="only relative links inside output/"):
        extract(bad, tmp_path / "target")


def test_a_truncated_bundle_is_rejected_with_a_clear_error(tmp_path):
    bundle = build_bundle(make_output(tmp_path), {}, tmp_path / "b.tar.zst")
    data = bundle.path.read_bytes()
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a valid trainfleet bundle"):
        extract(cut, tmp_path / "target")


async def test_upload_deduplicates_and_download_verifies(broker, tmp_path):
    bundle = build_bundle(make_output(tmp_path), {"p": 1}, tmp_path / "b.tar.zst")
    assert await Artifacts(broker).put(bundle) == bundle.sha256
    info_before = await (await stock_artifacts(broker)).get_info(bundle.sha256)
    # The same bytes again: nothing new is written
    assert await Artifacts(broker).put(bundle) == bundle.sha256
    assert (await (await stock_artifacts(broker)).get_info(bundle.sha256)).nuid == info_before.nuid
    got = await Artifacts(broker).get(bundle.sha256, tmp_path / "dl" / "got.tar.zst")
    assert got.read_bytes() == bundle.path.read_bytes()


async def test_download_with_a_digest_mismatch_fails_and_leaves_nothing(broker, tmp_path):
    # An object stored under a name that is not the sha256 of its bytes (tampered or corrupt)
    fake_id = "0" * 64
    await (await stock_artifacts(broker)).put(fake_id, b"these bytes do not hash to zeros")
    dest = tmp_path / "dl" / "x.tar.zst"
    with pytest.raises(ArtifactError, match="hash to"):
        await Artifacts(broker).get(fake_id, dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


async def test_download_of_a_missing_artifact_is_a_clear_error(broker, tmp_path):
    with pytest.raises(ArtifactError, match="not in the object store"):
        await Artifacts(broker).get("f" * 64, tmp_path / "x")


async def test_download_artifact_extracts_into_a_new_directory_named_by_the_id(broker, tmp_path):
    # (what `trainfleet artifacts get --extract` and the monitor's download both call)
    bundle = build_bundle(make_output(tmp_path), {"p": 1}, tmp_path / "b.tar.zst")
    await Artifacts(broker).put(bundle)
    job_id, out = "a" * 64, tmp_path / "dl"
    result = await download_artifact(broker, bundle.sha256, out, into=job_id)
    assert result == {
        "artifact": bundle.sha256,
        "path": str(out / f"{bundle.sha256}.tar.zst"),
        "bytes": bundle.size,
        "verified": True,
        "extracted": str(out.resolve() / job_id),
        "provenance": None,
    }
    assert (out / job_id / "output" / "model.bin").read_bytes() == bytes(range(256)) * 100
    # A used target is refused before anything is downloaded...
    (out / f"{bundle.sha256}.tar.zst").unlink()
    with pytest.raises(ArtifactError, match="not empty"):
        await download_artifact(broker, bundle.sha256, out, into=job_id)
    assert sorted(p.name for p in out.iterdir()) == [job_id]
    # ...unless forced; without a directory to extract into only the bundle is fetched
    (out / job_id / "output" / "model.bin").write_bytes(b"stale")
    await download_artifact(broker, bundle.sha256, out, into=job_id, force=True)
    assert (out / job_id / "output" / "model.bin").read_bytes() == bytes(range(256)) * 100
    fetched = await download_artifact(broker, bundle.sha256, tmp_path / "only", into=None)
    assert fetched["extracted"] is None and sorted(p.name for p in (tmp_path / "only").iterdir()) == [
        f"{bundle.sha256}.tar.zst"
    ]


async def test_download_artifact_refuses_other_names_and_a_refused_extraction_leaves_nothing(broker, tmp_path):
    out = tmp_path / "dl"
    # A directory name that is not an id (a job's name, a path) is refused before any read
    for name in ("../victim", "model", str(tmp_path / "victim")):
        with pytest.raises(ArtifactError, match="64 lowercase hex"):
            await download_artifact(broker, "f" * 64, out, into=name)
    with pytest.raises(ArtifactError, match="64 lowercase hex"):
        await download_artifact(broker, "../x", out, into="a" * 64)
    assert not out.exists() and not (tmp_path / "victim").exists()
    # A stored bundle with a member that leaves the target: refused, and the bundle it fetched is removed
    info = tarfile.TarInfo("../evil.txt")
    info.size = 4
    data = zst_tar(tmp_path / "bad.tar.zst", [(info, b"evil")]).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    await (await stock_artifacts(broker)).put(sha, data)
    with pytest.raises(ArtifactError, match="outside"):
        await download_artifact(broker, sha, out, into="b" * 64)
    assert list(out.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_links_inside_the_output_travel_and_links_out_of_it_are_refused(tmp_path):
    out = tmp_path / "out"
    (out / "ckpt").mkdir(parents=True)
    (out / "ckpt" / "step-2.pt").write_bytes(b"weights")
    (out / "latest.pt").symlink_to("ckpt/step-2.pt")  # inside: kept, as a relative link
    (out / "gone.pt").symlink_to("ckpt/step-9.pt")  # inside though dangling: kept too
    bundle = build_bundle(out, {}, tmp_path / "b.tar.zst")
    target = extract(bundle.path, tmp_path / "x")
    assert (target / "output" / "latest.pt").read_bytes() == b"weights"
    assert os.readlink(target / "output" / "gone.pt") == "ckpt/step-9.pt"
    # A link out of the output dir is refused when packing, naming it
    (out / "leak").symlink_to("/etc/passwd")
    with pytest.raises(PackError, match="output/leak: a symlink to '/etc/passwd', outside the output dir"):
        build_bundle(out, {}, tmp_path / "c.tar.zst")


def test_an_unreadable_output_file_is_named(tmp_path, monkeypatch):
    out = make_output(tmp_path)
    real_open = open

    def unreadable(name, *args, **kwargs):
        if str(name).endswith("metrics.json"):
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(bundle_module, "open", unreadable, raising=False)  # (root reads any file: simulate one)
    with pytest.raises(PackError, match="output/sub/metrics.json: cannot read it: Permission denied"):
        build_bundle(out, {}, tmp_path / "b.tar.zst")
