"""Artifact bundles: tar of the trainer's output dir plus provenance, zstd-compressed.

The bundle id is the sha256 of the compressed bytes, so identical bundles
deduplicate in the object store. Bundles are streamed to and from disk (the
memory used does not grow with the artifact), downloads are verified against
the id, and extraction refuses any member that would land outside the target.
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

from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import ArtifactError
from trainfleet.broker.objstore import ObjectNotFound, ObjectStoreClient, parse_digest

PROVENANCE_NAME = "provenance.json"
OUTPUT_PREFIX = "output"
ZSTD_LEVEL = 3
CHUNK = 1 << 20
# Bigger chunks than the ADR's 128 KiB default: with sync_interval always the server
# fsyncs once per stored message, so bytes per fsync bound the upload rate (BENCHMARKS.md).
ARTIFACT_CHUNK_BYTES = 1 << 20
ARTIFACT_WINDOW_BYTES = 16 << 20


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


def object_store(broker: Broker) -> ObjectStoreClient:
    """The artifacts bucket through the pipelined transfer path (standard object-store format)."""
    chunk = min(ARTIFACT_CHUNK_BYTES, broker.nc.max_payload or ARTIFACT_CHUNK_BYTES)
    return ObjectStoreClient(
        broker.nc, broker.names.artifacts_bucket, chunk_bytes=chunk, window_bytes=ARTIFACT_WINDOW_BYTES
    )


async def upload(broker: Broker, bundle: Bundle) -> str:
    """Put the bundle under its sha256 unless an identical object is already stored."""
    store = object_store(broker)
    existing = await store.info(bundle.sha256)
    if existing is not None and existing.size == bundle.size:
        return bundle.sha256
    info = await store.put_file(bundle.sha256, bundle.path)
    stored = parse_digest(info.digest)
    if info.size != bundle.size or stored is None or stored.hex() != bundle.sha256:
        # The file changed between bundling and upload: never leave bytes under a name they don't hash to.
        await store.delete(bundle.sha256)
        raise ArtifactError(
            f"artifact {bundle.sha256}: uploaded {info.size} bytes hashing to "
            f"{stored.hex() if stored else '?'}, expected {bundle.size} bytes (bundle changed on disk)"
        )
    return bundle.sha256


async def download(broker: Broker, sha256: str, dest: str | os.PathLike) -> Path:
    """Fetch artifact ``sha256`` into ``dest``, verifying the digest; nothing is left on mismatch."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The sha256 is computed while the chunks stream to disk: no second pass over the file.
        await object_store(broker).get_file(sha256, dest, expect_sha256_hex=sha256)
    except ObjectNotFound as exc:
        raise ArtifactError(f"artifact {sha256} is not in the object store") from exc
    return dest


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
