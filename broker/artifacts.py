"""Artifacts: bundles in the ``<prefix>-artifacts`` object store, named by their sha256.

:class:`Artifacts` is the one client every part of trainfleet uses: put a bundle,
get one (verified end to end, written atomically), read an object's info, list the
stored bundles, read a bundle's provenance from its first chunks only, and sweep
the stray chunks an upload cut off mid-way leaves behind. An artifact id is checked
to be 64 lowercase hex before it reaches a path or a subject, a get is refused when
the object is bigger than the size limit, and a provenance read decompresses at most
bundle.PROVENANCE_MAX_BYTES however the bundle was crafted. Behind it the pipelined
object-store client (objstore.py) speaks the standard JetStream object-store format,
and fetches large objects over a direct connection (directget.py) where it can.

Roles: an agent puts; the controller sweeps; operators and viewers get, list and read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainfleet.broker.bundle import PROVENANCE_NAME, Bundle, ProvenanceStream
from trainfleet.broker.errors import ArtifactError, ObjectNotFound
from trainfleet.broker.objstore import ObjectInfo, ObjectStoreClient, parse_digest

if TYPE_CHECKING:
    from trainfleet.broker.connection import Broker

# Bigger chunks than the ADR's 128 KiB default: with sync_interval always the server
# fsyncs once per stored message, so bytes per fsync bound the upload rate (BENCHMARKS.md).
ARTIFACT_CHUNK_BYTES = 1 << 20
ARTIFACT_WINDOW_BYTES = 16 << 20
# A bundle's provenance.json is read from at most this many chunks of its start.
PROVENANCE_MAX_CHUNKS = 16
# An artifact id is the sha256 of the bundle's bytes, as 64 lowercase hex digits.
_ARTIFACT_ID = re.compile(r"[0-9a-f]{64}")


def is_artifact_id(value: object) -> bool:
    """Whether ``value`` is 64 lowercase hex digits (a sha256, as artifact and job ids are)."""
    return isinstance(value, str) and _ARTIFACT_ID.fullmatch(value) is not None


def check_artifact_id(value: object, what: str = "artifact id") -> str:
    """``value`` when it is 64 lowercase hex digits; ArtifactError otherwise. Call it before
    an id read from a record or typed by an operator is used in a path or a subject."""
    if not is_artifact_id(value):
        raise ArtifactError(f"{what} {str(value)[:100]!r} is not 64 lowercase hex digits (a sha256)")
    return str(value)


class Artifacts:
    """The artifacts bucket of one fleet, over a live connection."""

    def __init__(self, broker: Broker):
        self.broker = broker
        chunk = min(ARTIFACT_CHUNK_BYTES, broker.nc.max_payload or ARTIFACT_CHUNK_BYTES)
        self.store = ObjectStoreClient(
            broker.nc, broker.names.artifacts_bucket, chunk_bytes=chunk, window_bytes=ARTIFACT_WINDOW_BYTES
        )

    async def put(self, bundle: Bundle) -> str:
        """Store the bundle under its sha256 unless an identical object is already stored."""
        existing = await self.store.info(bundle.sha256)
        if existing is not None and existing.size == bundle.size:
            return bundle.sha256
        info = await self.store.put_file(bundle.sha256, bundle.path)
        stored = parse_digest(info.digest)
        if info.size != bundle.size or stored is None or stored.hex() != bundle.sha256:
            # The file changed between bundling and upload: never leave bytes under a name they don't hash to.
            await self.store.delete(bundle.sha256)
            raise ArtifactError(
                f"artifact {bundle.sha256}: uploaded {info.size} bytes hashing to "
                f"{stored.hex() if stored else '?'}, expected {bundle.size} bytes (bundle changed on disk)"
            )
        return bundle.sha256

    async def get(self, sha256: str, dest: str | os.PathLike[str], *, max_bytes: int | None = None) -> Path:
        """Fetch artifact ``sha256`` into ``dest``, verifying the digest; nothing is left on mismatch.

        An object bigger than ``max_bytes`` (default: the settings' max_artifact_bytes, the
        most an agent uploads) is refused before anything is written."""
        check_artifact_id(sha256)
        limit = self.broker.settings.max_artifact_bytes if max_bytes is None else max_bytes
        info = await self.store.info(sha256)
        if info is None:
            raise ArtifactError(f"artifact {sha256} is not in the object store")
        _check_size(info, limit)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            # The sha256 is computed while the chunks stream to disk: no second pass over the file.
            await self.store.get_file(sha256, dest, expect_sha256_hex=sha256, max_bytes=limit)
        except ObjectNotFound as exc:
            raise ArtifactError(f"artifact {sha256} is not in the object store") from exc
        return dest

    async def info(self, sha256: str) -> ObjectInfo | None:
        """The stored object's info, or None when there is no such artifact."""
        return await self.store.info(check_artifact_id(sha256))

    async def list(self) -> list[ObjectInfo]:
        """Every stored (undeleted) artifact, by name."""
        return await self.store.list()

    async def provenance(self, sha256: str) -> dict[str, Any]:
        """A bundle's provenance.json, read from the object store's first chunk(s) only.

        provenance.json is the bundle's first tar member, so a few KiB of the zstd stream
        hold it: this reads chunk by chunk and stops as soon as the member is complete.
        The whole-bundle sha256 is not checked here; :meth:`get` verifies it. At most
        bundle.PROVENANCE_MAX_BYTES are decompressed, whatever the chunks hold."""
        info = await self.info(sha256)
        if info is None:
            raise ArtifactError(f"artifact {sha256} is not in the object store")
        stream = ProvenanceStream()
        async for chunk in self.store.chunks(info, limit=PROVENANCE_MAX_CHUNKS):
            try:
                found = stream.feed(chunk)
            except ArtifactError as exc:
                raise ArtifactError(f"artifact {sha256}: {exc}") from exc
            if found is not None:
                return found
        raise ArtifactError(f"artifact {sha256}: no complete {PROVENANCE_NAME} at the start of the bundle")

    async def stray(self, older_than_s: float) -> dict[str, int]:
        """Chunk sets no object points at whose newest chunk is older than ``older_than_s``: nuid → chunks."""
        return await self.store.stray_chunks(older_than_s)

    async def sweep(self, older_than_s: float) -> dict[str, int]:
        """Purge what :meth:`stray` finds; returns what was purged."""
        return await self.store.sweep_stray_chunks(older_than_s)


def _check_size(info: ObjectInfo, limit: int) -> None:
    if info.size > limit:
        raise ArtifactError(
            f"artifact {info.name} is {info.size} bytes: over the download limit of {limit} bytes (max_artifact_bytes)"
        )
