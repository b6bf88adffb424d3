"""Hostile artifacts: each attack seen against `artifacts get`, `show` and the bundle reader, replayed.

An attacker who can write one artifact or one record (or a careless operator) must not get a
file written outside the extraction target, nor memory or disk past the limits. Each test
crafts the malicious input itself (tarfile + zstandard), asserts the refusal (exit 5 where
the CLI is involved) and that nothing was written outside the target or left behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard

from trainfleet.broker import jsapi, specs
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import (
    MAX_LONG_HEADER_BYTES,
    MAX_MEMBERS,
    PROVENANCE_MAX_BYTES,
    Bundle,
    build_bundle,
    extract,
    read_provenance,
)
from trainfleet.broker.errors import ArtifactError
from trainfleet.broker.objstore import ObjectStoreClient
from trainfleet.broker.schema import JobStatus
from trainfleet.controller.ops import fetch_artifact, job_detail

from .conftest import gbm_jobs, gbm_manifest, put_job, role_env

CLI = [sys.executable, "-m", "trainfleet.controller.cli"]
MiB = 1 << 20
# What a bomb decompresses to: far past every limit, yet a few KB compressed.
BOMB_BYTES = 64 * MiB
# A refused read must stay well below the bomb (tracemalloc: Python-side allocations).
PEAK_LIMIT = 16 * MiB
BASHRC = b"# the victim's shell profile\n"


# -- crafting bundles ---------------------------------------------------------------------
class Zeros(io.RawIOBase):
    """``size`` zero bytes, streamed: a bomb member is never held in the test's memory."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


class Padded(Zeros):
    """``size`` bytes of whitespace, then ``tail``: valid JSON when ``tail`` is."""

    def __init__(self, size: int, tail: bytes):
        super().__init__(size)
        self.tail = tail

    def readinto(self, buf: Any) -> int:
        if self.left:
            n = min(len(buf), self.left)
            buf[:n] = b" " * n
            self.left -= n
            return n
        n = min(len(buf), len(self.tail))
        buf[:n], self.tail = self.tail[:n], self.tail[n:]
        return n


def member(name: str, data: bytes | int = b"", *, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tuple:
    """A tar member: ``data`` as bytes, or an int for that many zero bytes."""
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    if kind != tarfile.REGTYPE:
        return info, None
    info.size = data if isinstance(data, int) else len(data)
    return info, Zeros(data) if isinstance(data, int) else io.BytesIO(data)


def craft(path: Path, members: list[tuple], *, fmt: int = tarfile.PAX_FORMAT, **zstd_args: Any) -> Bundle:
    """A .tar.zst of exactly these members, streamed to ``path``; its Bundle (id = sha256)."""
    cctx = zstandard.ZstdCompressor(**zstd_args)
    with open(path, "wb") as raw, cctx.stream_writer(raw, closefd=False) as zw:
        with tarfile.open(fileobj=zw, mode="w|", format=fmt) as tar:
            for info, data in members:
                tar.addfile(info, data)
    blob = path.read_bytes()
    return Bundle(path=path, sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))


def provenance(extra: bytes = b"") -> tuple:
    return member("provenance.json", b'{"job": {"name": "x"}}' + extra)


def good_bundle(tmp_path: Path) -> Bundle:
    out = tmp_path / "trainer-output"
    (out / "sub").mkdir(parents=True)
    (out / "model.bin").write_bytes(b"weights")
    (out / "sub" / "metrics.json").write_text('{"accuracy": 0.9}')
    return build_bundle(out, {"job": {"name": "good"}}, tmp_path / "good.tar.zst")


# -- observing the file system --------------------------------------------------------------
def tree(root: Path) -> set[str]:
    """Every path under ``root`` (links not followed), relative."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def new_paths(before: set[str], root: Path) -> set[str]:
    return tree(root) - before


def peak_while(fn: Any) -> tuple[Any, int]:
    """(fn()'s result or exception, the peak of Python allocations while it ran)."""
    tracemalloc.start()
    try:
        try:
            result: Any = fn()
        except Exception as exc:  # the caller asserts on it
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A victim's home with a .bashrc; the operator's --out is three levels below it."""
    root = tmp_path / "home"
    (root / "work" / "dl").mkdir(parents=True)
    (root / ".bashrc").write_bytes(BASHRC)
    yield root
    assert (root / ".bashrc").read_bytes() == BASHRC, "the victim's .bashrc was overwritten"


# -- the CLI, as an operator runs it --------------------------------------------------------
async def cli(*args: str, url: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env={**os.environ, **role_env("operator"), "NATS_URL": url, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def stored_job(broker: Any, bundle: Bundle | None, *, artifact: str | None = None, **spec_changes: Any) -> Any:
    """A completed job whose record points at ``bundle`` (uploaded) or at ``artifact``."""
    if bundle is not None:
        await Artifacts(broker).put(bundle)
    spec = msgspec.structs.replace(gbm_manifest(gbm_jobs(1)).jobs[0], **spec_changes)
    return await put_job(
        broker, spec, status=JobStatus.COMPLETED, artifact=artifact or (bundle.sha256 if bundle else None)
    )


# -- 1. the job name is never a path ------------------------------------------------------------
async def test_extraction_goes_into_a_new_directory_named_by_the_job_id(broker, settings, tmp_path, home):
    job = await stored_job(broker, good_bundle(tmp_path), name="good")
    out = home / "work" / "dl"
    code, out_text, err = await cli("artifacts", "get", "good", "--out", str(out), "--extract", url=settings.url)
    assert code == 0, err
    assert (out / job.job_id / "output" / "model.bin").read_bytes() == b"weights"
    assert not (out / "good").exists() and str(out / job.job_id) in out_text


@pytest.mark.parametrize("hostile", ["../../victim", "ABSOLUTE"])
async def test_a_hostile_job_name_never_chooses_where_artifacts_get_extracts(
    broker, tmp_path, home, monkeypatch, hostile
):
    # Given a job whose spec names it "../../victim" (or an absolute path into the victim's home).
    # Specs with such names are now refused when read (broker/specs.py): let this one through,
    # as an older reader or a future bug would, to show the path never depends on the name.
    monkeypatch.setattr(specs, "bad_names", lambda spec: "")
    name = str(home / "victim") if hostile == "ABSOLUTE" else hostile
    job = await stored_job(broker, good_bundle(tmp_path), name=name)
    out = home / "work" / "dl"
    before = tree(home)
    # When the operator fetches and extracts it by that name
    result = await fetch_artifact(broker, name, out, extract=True)
    # Then it lands in a new directory named by the job id, under --out, and nowhere else
    assert result["extracted"] == str(out / job.job_id)
    assert (out / job.job_id / "output" / "model.bin").read_bytes() == b"weights"
    assert not (home / "victim").exists()
    assert all(p.startswith(os.path.join("work", "dl", "")) for p in new_paths(before, home))


# -- 2. members that leave the target -------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../../.bashrc", "output/../../../../.bashrc", "ABSOLUTE"])
async def test_bundle_members_that_leave_the_target_are_refused_and_nothing_is_left(
    broker, settings, tmp_path, home, name
):
    # Given a bundle with a legit start, then a member aimed at the victim's .bashrc
    name = str(home / ".bashrc") if name == "ABSOLUTE" else name
    bad = craft(tmp_path / "b.tar.zst", [provenance(), member("output/ok.txt", b"ok"), member(name, b"rm -rf ~\n")])
    await stored_job(broker, bad, name="innocent")
    out = home / "work" / "dl"
    code, _, err = await cli("artifacts", "get", "innocent", "--out", str(out), "--extract", url=settings.url)
    # Then: exit 5, .bashrc untouched (the fixture checks), and --out is as empty as before
    assert code == 5 and "outside" in err, err
    assert tree(out) == set()


async def test_a_member_outside_output_is_refused(broker, settings, tmp_path, home):
    # Given a bundle that carries a top-level .bashrc and notes beside provenance.json and output/
    bad = craft(tmp_path / "b.tar.zst", [provenance(), member("output/a.txt", b"a"), member(".bashrc", b"evil")])
    await stored_job(broker, bad, name="innocent")
    out = home / "work" / "dl"
    code, _, err = await cli("artifacts", "get", "innocent", "--out", str(out), "--extract", url=settings.url)
    assert code == 5 and "only provenance.json and output/" in err, err
    assert tree(out) == set()


@pytest.mark.parametrize(
    "bad",
    [
        member("output/link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
        member("output/hard", kind=tarfile.LNKTYPE, linkname="provenance.json"),
        member("output/dev", kind=tarfile.CHRTYPE, devmajor=1, devminor=3),
        member("output/fifo", kind=tarfile.FIFOTYPE),
    ],
    ids=["symlink", "hardlink", "device", "fifo"],
)
def test_links_devices_and_fifos_are_refused_and_nothing_is_left(tmp_path, bad):
    bundle = craft(tmp_path / "b.tar.zst", [provenance(), member("output/ok.txt", b"ok"), bad])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArtifactError, match="only regular files, directories and|only relative links inside output/"):
        extract(bundle.path, dest / "target")
    assert tree(dest) == set()


def test_setuid_and_world_writable_modes_are_stripped(tmp_path):
    bundle = craft(tmp_path / "b.tar.zst", [provenance(), member("output/run.sh", b"#!/bin/sh\n", mode=0o6777)])
    target = extract(bundle.path, tmp_path / "target")
    assert (target / "output" / "run.sh").stat().st_mode & 0o7777 == 0o755


# -- 3. existing files are never overwritten -------------------------------------------------------
async def test_an_existing_target_is_refused_unless_forced(broker, settings, tmp_path, home):
    job = await stored_job(broker, good_bundle(tmp_path), name="good")
    out = home / "work" / "dl"
    get = ("artifacts", "get", "good", "--out", str(out), "--extract")
    assert (await cli(*get, url=settings.url))[0] == 0
    # Given the operator's own edit in the extracted tree
    mine = out / job.job_id / "output" / "model.bin"
    mine.write_bytes(b"my tuned weights")
    # When fetched again: refused, the edit kept
    code, _, err = await cli(*get, url=settings.url)
    assert code == 5 and "not empty" in err and "--force" in err, err
    assert mine.read_bytes() == b"my tuned weights"
    # With --force it is replaced as a whole, and no temp dir is left beside it
    code, _, err = await cli(*get, "--force", url=settings.url)
    assert code == 0, err
    assert mine.read_bytes() == b"weights"
    assert {p.name for p in out.iterdir()} == {job.job_id, f"{job.record.artifact}.tar.zst"}


def test_a_symlinked_target_is_never_followed(tmp_path):
    # Given the target is a link to someone else's directory
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    (tmp_path / "target").symlink_to(victim)
    bundle = craft(tmp_path / "b.tar.zst", [provenance(), member("output/x.txt", b"x")])
    with pytest.raises(ArtifactError, match="not a directory"):
        extract(bundle.path, tmp_path / "target")
    # --force replaces the link itself; the directory it pointed at is untouched
    target = extract(bundle.path, tmp_path / "target", force=True)
    assert not target.is_symlink() and (target / "output" / "x.txt").read_bytes() == b"x"
    assert tree(victim) == {"keep.txt"}


def test_a_member_repeated_to_overwrite_an_earlier_one_is_refused(tmp_path):
    bundle = craft(
        tmp_path / "b.tar.zst", [provenance(), member("output/model.bin", b"real"), member("output/model.bin", b"fake")]
    )
    with pytest.raises(ArtifactError, match="twice"):
        extract(bundle.path, tmp_path / "target")
    assert tree(tmp_path) == {"b.tar.zst"}


# -- 4. decompression bombs --------------------------------------------------------------------
async def test_a_zip_bomb_member_is_refused_at_the_extraction_limit(broker, settings, tmp_path, home):
    # Given a few-KB bundle whose one member decompresses to 64 MiB of zeros
    bomb = craft(tmp_path / "b.tar.zst", [provenance(), member("output/zeros.bin", BOMB_BYTES)], level=19)
    assert bomb.size < 64 * 1024
    await stored_job(broker, bomb, name="bomb")
    out = home / "work" / "dl"
    # When extracted under a 1 MiB max_artifact_bytes: refused, naming the limit, nothing written
    env = {"TRAINFLEET_MAX_ARTIFACT_BYTES": str(MiB)}
    code, _, err = await cli("artifacts", "get", "bomb", "--out", str(out), "--extract", url=settings.url, env=env)
    assert code == 5 and "extraction limit" in err and str(MiB) in err, err
    assert tree(out) == set()


def test_the_extraction_limit_is_checked_before_writing(tmp_path):
    bomb = craft(tmp_path / "b.tar.zst", [provenance(), member("output/zeros.bin", BOMB_BYTES)])
    with pytest.raises(ArtifactError, match="extraction limit of 1048576 bytes"):
        extract(bomb.path, tmp_path / "target", max_bytes=MiB)
    assert tree(tmp_path) == {"b.tar.zst"}


def test_too_many_members_are_refused(tmp_path):
    # Given a bundle of 60 empty files, against a 50-member limit (the default is MAX_MEMBERS)
    assert MAX_MEMBERS == 100_000
    files = [member(f"output/f{i}", b"") for i in range(60)]
    bundle = craft(tmp_path / "b.tar.zst", [provenance(), *files])
    with pytest.raises(ArtifactError, match="limit of 50 members"):
        extract(bundle.path, tmp_path / "target", max_members=50)
    assert tree(tmp_path) == {"b.tar.zst"}


def huge_long_header(tmp_path: Path, kind: str) -> Bundle:
    """A 2-KB bundle whose first header carries a 32 MiB PAX record or GNU long name."""
    if kind == "pax":
        info, data = provenance()
        info.pax_headers = {"comment": "x" * (32 * MiB)}
        return craft(tmp_path / "b.tar.zst", [(info, data)], level=19)
    return craft(tmp_path / "b.tar.zst", [member("output/" + "a" * (32 * MiB), b"x")], fmt=tarfile.GNU_FORMAT, level=19)


@pytest.mark.parametrize("kind", ["pax", "gnu-longname"])
def test_a_huge_pax_or_long_name_header_is_refused_before_it_is_read(tmp_path, kind):
    bundle = huge_long_header(tmp_path, kind)
    assert bundle.size < 64 * 1024
    for read in (lambda: extract(bundle.path, tmp_path / "target"), lambda: read_provenance(bundle.path)):
        result, peak = peak_while(read)
        assert isinstance(result, ArtifactError), result
        assert "long header" in str(result) and str(MAX_LONG_HEADER_BYTES) in str(result)
        assert peak < PEAK_LIMIT, f"{peak} bytes allocated refusing a long header"
    assert tree(tmp_path) == {"b.tar.zst"}


def chained_long_names(tmp_path: Path) -> Bundle:
    """Forty GNU long-name headers of 7 KiB each (every one under the limit) before one member."""
    raw = io.BytesIO()
    for _ in range(40):
        name = b"output/" + b"n" * (7 << 10) + b"\0"
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size = tarfile.GNUTYPE_LONGNAME, len(name)
        raw.write(info.tobuf(format=tarfile.GNU_FORMAT) + name + bytes(-len(name) % tarfile.BLOCKSIZE))
    info, _ = member("output/x", b"x")
    raw.write(info.tobuf(format=tarfile.GNU_FORMAT) + b"x".ljust(tarfile.BLOCKSIZE, b"\0") + bytes(1024))
    path = tmp_path / "b.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(raw.getvalue()))
    return Bundle(path=path, sha256="", size=path.stat().st_size)


def sparse_map_bomb(tmp_path: Path) -> Bundle:
    """A PAX GNU-sparse-1.0 member whose sparse map (read before the member is returned, one
    list entry per line) claims 100 million entries: 32 MiB of "0\\n" lines follow."""
    data = b"100000000\n" + b"0\n" * (16 * MiB)
    info, _ = member("output/sparse", len(data))
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "output/sparse"}
    return craft(tmp_path / "b.tar.zst", [provenance(), (info, io.BytesIO(data))], level=19)


@pytest.mark.parametrize("make", [chained_long_names, sparse_map_bomb], ids=["chained-long-names", "sparse-map"])
def test_headers_between_two_members_are_capped(tmp_path, make):
    # Each header is small, but together (or through tarfile's sparse map) they would be read whole
    bundle = make(tmp_path)
    result, peak = peak_while(lambda: extract(bundle.path, tmp_path / "target"))
    assert isinstance(result, ArtifactError) and "HEADER_REGION_BYTES" in str(result), result
    assert peak < PEAK_LIMIT, f"{peak} bytes allocated refusing the headers"
    assert tree(tmp_path) == {"b.tar.zst"}


def test_a_bundle_asking_for_a_huge_zstd_window_is_refused(tmp_path):
    # A frame may ask for a 128 MiB window (the decoder allocates it); ours use 2 MiB
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    bundle = craft(tmp_path / "b.tar.zst", [provenance(), member("output/x", b"x")], compression_params=params)
    with pytest.raises(ArtifactError, match="ZSTD_MAX_WINDOW_BYTES"):
        extract(bundle.path, tmp_path / "target")
    with pytest.raises(ArtifactError, match="ZSTD_MAX_WINDOW_BYTES"):
        read_provenance(bundle.path)
    assert tree(tmp_path) == {"b.tar.zst"}


def provenance_bomb(tmp_path: Path) -> Bundle:
    """provenance.json of 64 MiB of whitespace then ``{}``: valid JSON, a few KB compressed."""
    info, _ = member("provenance.json")
    info.size = BOMB_BYTES + 2
    return craft(tmp_path / "b.tar.zst", [(info, Padded(BOMB_BYTES, b"{}"))], level=19)


def test_a_provenance_bomb_is_refused_by_read_provenance(tmp_path):
    bomb = provenance_bomb(tmp_path)
    result, peak = peak_while(lambda: read_provenance(bomb.path))
    assert isinstance(result, ArtifactError) and "PROVENANCE_MAX_BYTES" in str(result), result
    assert peak < PEAK_LIMIT


async def test_a_provenance_bomb_sent_to_show_is_refused_within_the_limit(broker, tmp_path):
    # Given a completed job whose bundle's provenance.json decompresses to 64 MiB
    bomb = provenance_bomb(tmp_path)
    job = await stored_job(broker, bomb, name="bomb")
    # When shown (the ctl.show path: provenance read from the object store's chunks)
    tracemalloc.start()
    try:
        detail = await job_detail(broker, job.job_id)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Then the show answers, without provenance, saying which limit was hit
    assert detail["provenance"] is None
    assert (
        "PROVENANCE_MAX_BYTES" in detail["provenance_error"] and str(PROVENANCE_MAX_BYTES) in detail["provenance_error"]
    )
    assert peak < PEAK_LIMIT, f"{peak} bytes allocated reading a provenance bomb"


async def test_a_large_legit_bundle_still_shows_its_provenance(broker, tmp_path):
    # Not an attack: provenance.json first, then 64 MiB that decompress past the limit in one chunk
    bundle = craft(tmp_path / "b.tar.zst", [provenance(), member("output/zeros.bin", BOMB_BYTES)])
    await Artifacts(broker).put(bundle)
    assert await Artifacts(broker).provenance(bundle.sha256) == {"job": {"name": "x"}}
    assert read_provenance(bundle.path) == {"job": {"name": "x"}}


async def test_a_huge_pax_header_in_the_stored_provenance_is_refused(broker, tmp_path):
    bundle = huge_long_header(tmp_path, "pax")
    await Artifacts(broker).put(bundle)
    with pytest.raises(ArtifactError, match="PROVENANCE_MAX_BYTES|long header"):
        await Artifacts(broker).provenance(bundle.sha256)


# -- 5. downloads past the size limit ----------------------------------------------------------
async def inflate_info(broker: Any, name: str, size: int) -> None:
    """Rewrite the object's info record so it claims ``size`` bytes (what a record writer can do)."""
    store = ObjectStoreClient(broker.nc, broker.names.artifacts_bucket)
    info = await store.info(name)
    fake = msgspec.structs.replace(info, size=size)
    await broker.nc.request(store.meta_subject(name), fake.to_json(), headers=jsapi.ROLLUP_SUBJECT, timeout=5)


async def test_a_download_whose_info_claims_more_than_the_limit_is_refused(broker, settings, tmp_path, home):
    # Given a stored object whose info claims 9 GiB (over the 8 GiB max_artifact_bytes)
    bundle = good_bundle(tmp_path)
    await stored_job(broker, bundle, name="huge")
    await inflate_info(broker, bundle.sha256, 9 * 1024**3)
    out = home / "work" / "dl"
    code, _, err = await cli("artifacts", "get", "huge", "--out", str(out), url=settings.url)
    assert code == 5 and "download limit" in err, err
    assert tree(out) == set()


async def test_a_download_over_a_given_limit_is_refused_before_anything_is_written(broker, tmp_path):
    bundle = good_bundle(tmp_path)
    await Artifacts(broker).put(bundle)
    dest = tmp_path / "dl" / "x.tar.zst"
    with pytest.raises(ArtifactError, match=f"over the download limit of {bundle.size - 1} bytes"):
        await Artifacts(broker).get(bundle.sha256, dest, max_bytes=bundle.size - 1)
    assert not dest.parent.exists()


# -- 6. artifact and job ids are checked before use --------------------------------------------
async def test_a_record_naming_a_path_as_its_artifact_is_refused(broker, settings, tmp_path, home):
    # Given a record whose artifact is a path, not a sha256
    await stored_job(broker, None, artifact="../../escaped/x", name="pathy")
    out = home / "work" / "dl"
    code, _, err = await cli("artifacts", "get", "pathy", "--out", str(out), "--extract", url=settings.url)
    assert code == 5 and "64 lowercase hex" in err, err
    assert not (home / "escaped").exists() and tree(out) == set()


async def test_a_job_id_that_is_not_hex_is_never_used_as_a_directory(broker, settings, tmp_path, home):
    await stored_job(broker, good_bundle(tmp_path), job_id="not-a-sha256", name="odd")
    out = home / "work" / "dl"
    code, _, err = await cli("artifacts", "get", "odd", "--out", str(out), "--extract", url=settings.url)
    assert code == 5 and "job id" in err and "64 lowercase hex" in err, err
    assert tree(out) == set()


@pytest.mark.parametrize("bad_id", ["../x", "A" * 64, "0" * 63, "0" * 64 + "/..", "", "g" * 64])
async def test_a_non_hex_artifact_id_is_refused_before_any_path_or_subject(broker, tmp_path, bad_id):
    store = Artifacts(broker)
    with pytest.raises(ArtifactError, match="64 lowercase hex"):
        await store.get(bad_id, tmp_path / "dl" / "x.tar.zst")
    with pytest.raises(ArtifactError, match="64 lowercase hex"):
        await store.info(bad_id)
    with pytest.raises(ArtifactError, match="64 lowercase hex"):
        await store.provenance(bad_id)
    assert not (tmp_path / "dl").exists()
