"""The artifact bundle format: the trainer's output dir plus provenance, as a zstd-compressed tar.

``provenance.json`` is the first member, then ``output/**``. The bundle id is the
sha256 of the compressed bytes, so identical bundles deduplicate in the object store.
Bundles are streamed to and from disk (memory does not grow with the artifact), and
extraction refuses any member that would land outside the target. No NATS here:
broker/artifacts.py moves bundles in and out of the object store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from trainfleet.broker.errors import ArtifactError

PROVENANCE_NAME = "provenance.json"
OUTPUT_PREFIX = "output"
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class Bundle:
    path: Path
    sha256: str
    size: int


class _HashingWriter(io.RawIOBase):
    """File writer that hashes and counts what passes through."""

    def __init__(self, fh: BinaryIO):
        self._fh = fh
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._fh.write(view)
        self.digest.update(view)
        self.size += len(view)
        return len(view)


def build_bundle(output_dir: str | os.PathLike, provenance: dict[str, Any], dest: str | os.PathLike) -> Bundle:
    """Write ``output_dir`` and ``provenance`` as a .tar.zst at ``dest``; return its id."""
    output_dir = Path(output_dir)
    dest = Path(dest)
    prov = json.dumps(provenance, indent=2, sort_keys=True, default=str).encode()
    with open(dest, "wb") as raw:
        hashing = _HashingWriter(raw)
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        with cctx.stream_writer(hashing, closefd=False) as zw:
            with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo(PROVENANCE_NAME)
                info.size = len(prov)
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(prov))
                for path in sorted(output_dir.rglob("*")):
                    if path.is_symlink() or not (path.is_file() or path.is_dir()):
                        continue  # links and devices never travel
                    arcname = f"{OUTPUT_PREFIX}/{path.relative_to(output_dir).as_posix()}"
                    tar.add(path, arcname=arcname, recursive=False)
    return Bundle(path=dest, sha256=hashing.digest.hexdigest(), size=hashing.size)


def _check_member(member: tarfile.TarInfo, target: Path) -> None:
    name = member.name
    resolved = (target / name).resolve()
    if os.path.isabs(name) or ".." in Path(name).parts or not resolved.is_relative_to(target):
        raise ArtifactError(f"refusing to extract {name!r}: it would land outside {target}")
    if not (member.isfile() or member.isdir()):
        raise ArtifactError(f"refusing to extract {name!r}: only regular files and directories are allowed")


def extract(bundle_path: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract a bundle into ``target``; any unsafe member aborts with ArtifactError."""
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    dctx = zstandard.ZstdDecompressor()
    try:
        with open(bundle_path, "rb") as raw, dctx.stream_reader(raw) as zr:
            with tarfile.open(fileobj=zr, mode="r|") as tar:
                for member in tar:
                    _check_member(member, target)
                    tar.extract(member, target, filter="data")
    except (tarfile.TarError, zstandard.ZstdError) as exc:
        raise ArtifactError(f"{bundle_path}: not a valid trainfleet bundle: {exc}") from exc
    return target


def read_provenance(bundle_path: str | os.PathLike) -> dict[str, Any]:
    """The provenance.json of a bundle (the first member), without extracting the rest."""
    dctx = zstandard.ZstdDecompressor()
    try:
        with open(bundle_path, "rb") as raw, dctx.stream_reader(raw) as zr:
            with tarfile.open(fileobj=zr, mode="r|") as tar:
                for member in tar:
                    if member.name == PROVENANCE_NAME:
                        fh = tar.extractfile(member)
                        return json.loads(fh.read()) if fh else {}
    except (tarfile.TarError, zstandard.ZstdError, ValueError) as exc:
        raise ArtifactError(f"{bundle_path}: cannot read provenance: {exc}") from exc
    raise ArtifactError(f"{bundle_path}: bundle has no {PROVENANCE_NAME}")


def provenance_from_prefix(data: bytes) -> dict[str, Any] | None:
    """provenance.json from the start of a tar, or None when ``data`` does not hold it all yet."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            member = tar.firstmember or tar.next()
    except (tarfile.TarError, EOFError):
        return None
    if member is None:
        return None
    if member.name != PROVENANCE_NAME:
        raise ArtifactError(f"bundle does not start with {PROVENANCE_NAME} (first member: {member.name!r})")
    end = member.offset_data + member.size
    if end > len(data):
        return None
    try:
        value = json.loads(data[member.offset_data : end])
    except ValueError as exc:
        raise ArtifactError(f"{PROVENANCE_NAME} is not JSON: {exc}") from exc
    return value if isinstance(value, dict) else {}
