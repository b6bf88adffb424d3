"""Artifacts: bundles in the ``<prefix>-artifacts`` object store, named by their sha256, and
beside them one provenance object per run.

A bundle is the trainer's output only, packed deterministically (bundle.py), so runs that
write the same files share one artifact id and one stored object. What belongs to a run
(host, timings, versions, argv, attempt, spec) is its own small JSON object in the same
bucket, ``provenance/<job id>/<generation>-<attempt>.json`` (:func:`provenance_object_name`):
one per run, never shared, readable by any object-store client. Bundles stored before
carry provenance.json inside; :meth:`Artifacts.run_provenance` falls back to that.

:class:`Artifacts` is the one client every part of trainfleet uses: put a bundle (storing
the same bytes again reuses the stored object), put and read a run's provenance, get a
bundle (verified end to end, written atomically), read an object's info, list the stored
bundles, read an old bundle's provenance from its first chunks only, and sweep
the stray chunks an upload cut off mid-way leaves behind. An artifact id is checked
to be 64 lowercase hex before it reaches a path or a subject, a get is refused when
the object is bigger than the size limit, and a provenance read decompresses at most
bundle.PROVENANCE_MAX_BYTES however the bundle was crafted. Behind it the pipelined
object-store client (objstore.py) speaks the standard JetStream object-store format,
and fetches large objects over a direct connection (directget.py) where it can.

:func:`download_artifact` is ``trainfleet artifacts get`` and the monitor's download: a
verified get, then a safe extraction into the new directory ``DIR/<job id>``.

It also prunes: :meth:`Artifacts.prune` removes the stored bundles no job record points
at (a requeued job's earlier bundle, a fenced agent's upload) once they are old enough, and
the provenance objects of jobs that no longer exist.

Roles: an agent puts; the controller sweeps and prunes; operators and viewers get, list and read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.errors

from trainfleet.broker import kv
from trainfleet.broker.bundle import (
    PROVENANCE_MAX_BYTES,
    PROVENANCE_NAME,
    Bundle,
    ProvenanceStream,
    check_target,
    extract,
    parse_provenance,
)
from trainfleet.broker.errors import ArtifactError, BrokerError, ObjectNotFound, SchemaError, StoreFull
from trainfleet.broker.objstore import (
    ObjectInfo,
    ObjectStoreClient,
    _parse_rfc3339,
    completeness_problem,
    parse_digest,
)
from trainfleet.broker.provision import LOGS_STREAM_PLACEHOLDER, size_text
from trainfleet.broker.records import job_ids
from trainfleet.broker.schema import JobRecord, decode

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
# Any sha256 in the text of a record this trainfleet cannot decode: each may be a reference.
_ANY_ARTIFACT_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
# A run's provenance object: provenance/<job id>/<generation>-<attempt>.json.
PROVENANCE_PREFIX = "provenance/"
_PROVENANCE_OBJECT = re.compile(r"provenance/([0-9a-f]{64})/([0-9]{1,18})-([0-9]{1,18})\.json")


def provenance_object_name(job_id: str, generation: int, attempt: int) -> str:
    """The name of the provenance object of one run: attempt ``attempt`` of generation
    ``generation`` of job ``job_id`` (checked to be 64 lowercase hex)."""
    return f"{PROVENANCE_PREFIX}{check_artifact_id(job_id, 'job id')}/{int(generation)}-{int(attempt)}.json"


def parse_provenance_object_name(name: str) -> tuple[str, int, int] | None:
    """(job id, generation, attempt) of a provenance object's name; None for any other name."""
    match = _PROVENANCE_OBJECT.fullmatch(name)
    return (match[1], int(match[2]), int(match[3])) if match else None


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
        """Store the bundle under its sha256; when the same bytes are stored already (another run
        wrote the same files), reuse them: their info is stored again with a new mtime (a
        "touch": one small message, no chunk sent), so the object is as young as this upload and
        a prune's grace period protects it until the run's record points at it.

        Reuse needs the stored info to say the same size and sha256, its chunks to be all there,
        and the touch to land on the info just read (see ObjectStoreClient.touch): otherwise the
        bundle is uploaded again, replacing what is there (chunks under a new nuid; the old ones,
        if any, are left to the stray-chunk sweep, since an agent may not purge). StoreFull when
        the store has no room for it: the same put succeeds once room is made (retry later), and
        nothing of a refused upload is readable under the artifact's name."""
        if await self._reuse(bundle):
            return bundle.sha256
        try:
            # (what this replaces, if anything, leaves its chunks to the sweep: an agent may not purge)
            info = await self.store.put_file(bundle.sha256, bundle.path, purge_previous=False)
        except StoreFull as exc:
            why = str(exc).replace(LOGS_STREAM_PLACEHOLDER, self.broker.names.logs_stream)
            raise StoreFull(
                f"uploading artifact {bundle.sha256[:12]} ({size_text(bundle.size)}) to the artifacts bucket "
                f"failed: {why}"
            ) from exc
        stored = parse_digest(info.digest)
        if info.size != bundle.size or stored is None or stored.hex() != bundle.sha256:
            # The file changed between bundling and upload: never leave bytes under a name they don't hash to.
            await self.store.delete(bundle.sha256)
            raise ArtifactError(
                f"artifact {bundle.sha256}: uploaded {info.size} bytes hashing to "
                f"{stored.hex() if stored else '?'}, expected {bundle.size} bytes (bundle changed on disk)"
            )
        return bundle.sha256

    async def _reuse(self, bundle: Bundle) -> bool:
        """Whether the bundle's bytes are stored already and were touched (see :meth:`put`)."""
        found = await self.store.info_and_seq(bundle.sha256)
        if found is None:
            return False
        info, seq = found
        same = (
            not info.deleted
            and info.name == bundle.sha256
            and info.size == bundle.size
            and parse_digest(info.digest) == bytes.fromhex(bundle.sha256)
            and (info.options is None or info.options.link is None)
            and bool(info.nuid)
        )
        if not same or await self.store.chunk_count(info.nuid) != info.chunks:
            return False
        return await self.store.touch(info, seq)

    # -- provenance objects ------------------------------------------------------
    async def put_provenance(self, job_id: str, generation: int, attempt: int, provenance: dict[str, Any]) -> str:
        """Store one run's provenance as its own JSON object; returns the object's name. Storing
        it again (a retried upload of the same run) replaces it."""
        name = provenance_object_name(job_id, generation, attempt)
        data = json.dumps(provenance, indent=2, sort_keys=True, default=str).encode()
        await self.store.put_bytes(name, data, purge_previous=False)  # (agents may not purge: the sweep does)
        return name

    async def read_provenance_object(self, name: str) -> dict[str, Any] | None:
        """A run's provenance object, or None when it is not stored. Bounded and verified: an
        info saying more than bundle.PROVENANCE_MAX_BYTES, a link, more bytes than the info says
        or bytes that do not hash to its digest are an ArtifactError; so is text that is not JSON."""
        if parse_provenance_object_name(name) is None:
            raise ArtifactError(f"{str(name)[:120]!r} is not a provenance object's name")
        info = await self.store.info(name)
        if info is None:
            return None
        if info.options is not None and info.options.link is not None:
            raise ArtifactError(f"provenance object {name}: a link; links are not followed")
        if info.size > PROVENANCE_MAX_BYTES:
            raise ArtifactError(
                f"provenance object {name} is {info.size} bytes: over the PROVENANCE_MAX_BYTES limit "
                f"of {PROVENANCE_MAX_BYTES}"
            )
        data = bytearray()
        digest = hashlib.sha256()
        async for chunk in self.store.chunks(info, limit=PROVENANCE_MAX_CHUNKS):
            if len(data) + len(chunk) > info.size:
                raise ArtifactError(f"provenance object {name}: its chunks hold more than its {info.size} bytes")
            data += chunk
            digest.update(chunk)
        problem = completeness_problem(info, len(data), digest)
        if problem is not None:
            raise ArtifactError(f"provenance object {name}: {problem}")
        try:
            return parse_provenance(bytes(data))
        except ArtifactError as exc:
            raise ArtifactError(f"provenance object {name}: {exc}") from exc

    async def run_provenance(self, job_id: str, generation: int, attempt: int, artifact: str | None) -> RunProvenance:
        """The provenance of one run: its provenance object, or for a bundle stored before those
        existed the provenance.json inside ``artifact`` (read from its first chunks). ArtifactError
        when there is neither, or what there is cannot be read within the limits."""
        name = provenance_object_name(job_id, generation, attempt)
        found = await self.read_provenance_object(name)
        if found is not None:
            return RunProvenance(found, name)
        if not artifact:
            raise ArtifactError(f"no provenance stored for this run ({name} is not in the object store)")
        try:
            return RunProvenance(await self.provenance(artifact), None)
        except ArtifactError as exc:
            raise ArtifactError(
                f"no provenance stored for this run: {name} is not in the object store, and the bundle "
                f"carries none ({exc})"
            ) from exc

    async def provenance_objects(self, job_id: str, runs: Iterable[tuple[int, int]]) -> list[str]:
        """The names of the stored provenance objects of job ``job_id``'s ``runs`` ((generation,
        attempt) pairs, as its record's history names them), by generation and attempt: one
        info read each. (Object names are base64 in their subjects, so a job's objects cannot
        be listed without listing the whole bucket: the caller says which runs to look for.)"""
        names = []
        for generation, attempt in sorted(set(runs)):
            name = provenance_object_name(job_id, generation, attempt)
            if await self.store.info(name) is not None:
                names.append(name)
        return names

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
            await self.store.get_file(sha256, dest, expect_sha256_hex=sha256, max_bytes=limit, info=info)
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
        """An old bundle's provenance.json (bundles stored before provenance objects carried it
        inside), read from the object store's first chunk(s) only; a bundle of today has none
        (see :meth:`run_provenance`).

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

    # -- prune -----------------------------------------------------------------
    async def prune(self, older_than_s: float, *, dry_run: bool = False) -> PruneReport:
        """Remove every stored artifact no job record points at whose info is at least
        ``older_than_s`` old; with ``dry_run`` only report what would go.

        The age is the grace period of an upload: an agent stores its bundle, then writes the
        completed record that points at it, so a young unreferenced object may be one whose
        record is on its way. The records are read again right before anything is removed (a
        job that completed meanwhile keeps its object), and each object goes only while its
        info is still the one judged (see :meth:`_remove`). A run's provenance object stays as
        long as its job's record exists (any state), and goes like a bundle, past the same age,
        once the record is gone. Objects whose names are neither artifact ids nor provenance
        objects' are not trainfleet's: they are counted, never touched.

        Removing needs the right to purge the artifacts stream (controller or admin); without
        it a BrokerError says so before anything is removed."""
        report = PruneReport(dry_run=dry_run, older_than_s=older_than_s)
        objects = await self.list()
        referenced, jobs = await referenced_artifacts(self.broker), await job_ids(self.broker)
        now = datetime.now(UTC)
        candidates: list[ObjectInfo] = []
        for info in objects:
            kept = _kept_because(info.name, referenced, jobs)
            if kept is not None:
                setattr(report, kept, getattr(report, kept) + 1)
            elif _age_s(info.mtime, now) < older_than_s:
                report.kept_recent += 1
            else:
                candidates.append(info)
        if dry_run:
            report.removed = [info.name for info in candidates]
            report.bytes = sum(info.size for info in candidates)
            return report
        await self._check_purge_right()  # refused whether or not there is anything to remove
        if not candidates:
            return report
        # A job may have completed (or been created) meanwhile: read the records again.
        referenced, jobs = await referenced_artifacts(self.broker), await job_ids(self.broker)
        for info in candidates:
            kept = _kept_because(info.name, referenced, jobs)
            if kept is not None:
                setattr(report, kept, getattr(report, kept) + 1)
                continue
            outcome, removed = await self._remove(info.name, older_than_s)
            if outcome == "kept":
                report.kept_recent += 1
            elif removed is not None:
                report.removed.append(removed.name)
                report.bytes += removed.size
        return report

    async def _remove(self, name: str, older_than_s: float) -> tuple[str, ObjectInfo | None]:
        """Remove object ``name`` if its info is still at least ``older_than_s`` old: purge its
        info (only up to the message judged, so an info stored meanwhile survives), then its
        chunks. Returns ("removed", its info), ("kept", None) when it was stored again meanwhile
        (an upload of the same bytes, or an agent's touch reusing them: see Artifacts.put) or its
        info cannot be read, or ("gone", None) when it is gone already (another controller's prune).

        A touch is conditional on the info message it read still being the latest: once the purge
        of the info judged has landed none can succeed, and one that landed before it is seen
        here, before the chunks (which it reuses) are touched.

        A purge rather than ObjectStoreClient.delete's marker: purging the artifacts stream is
        the controller's right, publishing object infos is not (only an uploader's). A prune cut
        off between the two purges leaves stray chunks, which the sweep removes."""
        stream, meta = self.store.stream, self.store.meta_subject(name)
        msg = await self._last(stream, meta)
        if msg is None or msg.seq is None:
            return "gone", None
        try:
            info = msgspec.json.decode(msg.data or b"", type=ObjectInfo)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return "kept", None  # an unreadable info: not ours to judge
        if info.deleted:
            return "gone", None
        if msg.time is None or (datetime.now(UTC) - msg.time).total_seconds() < older_than_s:
            return "kept", None
        await self._purge(stream, meta, seq=msg.seq + 1)
        newer = await self._last(stream, meta)
        if newer is not None and _nuid_of(newer) in (info.nuid, None):
            return "kept", None  # stored again on these same chunks (a touch), or unreadable: they stay
        if info.nuid:
            await self._purge(stream, self.store.chunk_subject(info.nuid))
        if await self._last(stream, meta) is not None:
            return "kept", None  # stored again between our read and the purge: that version stays
        info.name = name
        return "removed", info

    async def _last(self, stream: str, subject: str) -> Any:
        try:
            return await self.broker.js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            return None
        except nats.errors.TimeoutError as exc:
            raise BrokerError(f"reading {subject}: the server did not answer") from exc
        except nats.js.errors.APIError as exc:
            raise ArtifactError(f"reading {subject}: {exc}") from exc

    async def _purge(self, stream: str, subject: str, *, seq: int | None = None) -> None:
        try:
            await self.broker.js.purge_stream(stream, subject=subject, seq=seq)
        except nats.errors.TimeoutError as exc:
            raise self._refused(subject) from exc
        except nats.js.errors.APIError as exc:
            raise ArtifactError(f"purging {subject}: {exc}") from exc

    async def _check_purge_right(self) -> None:
        """Purge a chunk subject nothing uses: the server answers a controller or an admin at
        once, and drops the request of an identity that may not purge (the request then times
        out), so a refusal is known before anything is removed."""
        await self._purge(self.store.stream, self.store.chunk_subject(f"prune-check-{os.getpid()}"))

    def _refused(self, subject: str) -> BrokerError:
        need = "removing artifacts needs the controller's or the admin's credentials (docs/security.md)"
        last = str(self.broker.nc.last_error or "").lower()  # (nats-py lowercases the server's -ERR)
        if "permissions violation" in last and "stream.purge" in last:
            return BrokerError(f"the server refused this identity the purge of stream {self.store.stream}: {need}")
        return BrokerError(
            f"purging {subject}: the server did not answer (it drops the requests of an identity that "
            f"may not purge stream {self.store.stream}: {need})"
        )


@dataclass
class PruneReport:
    """What a prune removed (or with ``dry_run`` would remove), and what it kept and why."""

    dry_run: bool
    older_than_s: float
    removed: list[str] = field(default_factory=list)  # artifact ids, and provenance objects' names
    bytes: int = 0  # their sizes together
    kept_referenced: int = 0  # a job record points at them
    kept_recent: int = 0  # unreferenced, but younger than older_than_s
    kept_provenance: int = 0  # provenance objects of runs of jobs whose records exist
    foreign: int = 0  # objects whose names are not artifact ids: never touched

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "removed": sorted(self.removed)}


async def referenced_artifacts(broker: Broker) -> set[str]:
    """Every artifact id a job record (in any state) points at. A record this trainfleet cannot
    decode (garbage, a newer schema) protects every sha256 its text holds: a prune must never
    remove what a record it cannot read may point at."""
    referenced: set[str] = set()
    for entry in await kv.snapshot(broker.jobs):
        value = entry.value or b""
        try:
            artifact = decode(value, JobRecord).artifact
        except SchemaError:
            referenced.update(_ANY_ARTIFACT_ID.findall(value.decode(errors="replace")))
            continue
        if artifact:
            referenced.add(artifact)
    return referenced


def _kept_because(name: str, referenced: set[str], jobs: set[str]) -> str | None:
    """The PruneReport counter of an object a prune keeps whatever its age: a bundle a record
    points at, a provenance object of a job that exists, an object that is not trainfleet's.
    None: the object goes once old enough."""
    run = parse_provenance_object_name(name)
    if run is not None:
        return "kept_provenance" if run[0] in jobs else None
    if not is_artifact_id(name):
        return "foreign"
    return "kept_referenced" if name in referenced else None


@dataclass(frozen=True)
class RunProvenance:
    """A run's provenance, and the object it was read from (None: from inside an old bundle)."""

    provenance: dict[str, Any]
    source: str | None


def _nuid_of(msg: Any) -> str | None:
    """The nuid of an info message; None when it cannot be read."""
    try:
        return msgspec.json.decode(msg.data or b"", type=ObjectInfo).nuid
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


async def download_artifact(
    broker: Broker,
    artifact: str,
    out: Path,
    *,
    into: str | None = None,
    force: bool = False,
    provenance: dict[str, Any] | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Download bundle ``artifact`` (verified) into ``out/<artifact>.tar.zst`` and, when ``into``
    is given (the job id; an orphan's artifact id), extract it into the new directory
    ``out/<into>`` (``force``: replacing what is there).

    ``provenance`` (the run's, see Artifacts.run_provenance) is written beside it as JSON: into
    the extracted directory as ``provenance.json``, where bundles used to carry it (an old
    bundle's own is left as it is), else as ``out/<job_id>.provenance.json``.

    Both names are checked to be 64 lowercase hex, so the paths never depend on anything a
    manifest or a record said. An unusable target is refused before the download. The download
    and the extraction are bounded by the settings' max_artifact_bytes; a refused extraction
    removes the bundle this call downloaded, so a refusal leaves nothing behind."""
    artifact = check_artifact_id(artifact)
    limit = broker.settings.max_artifact_bytes
    target = None
    if into is not None:
        target = check_target(out / check_artifact_id(into, "extraction directory"), force=force)
    bundle_path = out / f"{artifact}.tar.zst"
    existed = bundle_path.exists()
    bundle_path = await Artifacts(broker).get(artifact, bundle_path, max_bytes=limit)
    size = bundle_path.stat().st_size
    if target is not None:
        try:
            target = await asyncio.to_thread(extract, bundle_path, target, max_bytes=limit, force=force)
        except ArtifactError:
            if not existed:
                bundle_path.unlink(missing_ok=True)
            raise
    written = None
    if provenance is not None:
        if target is not None:
            written = target / PROVENANCE_NAME
            if not os.path.lexists(written):
                _write_json(written, provenance)
        else:
            written = out / f"{check_artifact_id(job_id or artifact, 'job id')}.provenance.json"
            _write_json(written, provenance)
    return {
        "artifact": artifact,
        "path": str(bundle_path),
        "bytes": size,
        "verified": True,
        "extracted": str(target) if target else None,
        "provenance": str(written) if written else None,
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as JSON at ``path`` through a temp file beside it, renamed over whatever
    is there (a link there is replaced, never followed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.part-")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(value, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _age_s(mtime: str, now: datetime) -> float:
    """Seconds since an info's mtime; 0 (young: kept) when the stamp cannot be read."""
    stamp = _parse_rfc3339(mtime)
    return (now - stamp).total_seconds() if stamp is not None else 0.0


def _check_size(info: ObjectInfo, limit: int) -> None:
    if info.size > limit:
        raise ArtifactError(
            f"artifact {info.name} is {info.size} bytes: over the download limit of {limit} bytes (max_artifact_bytes)"
        )
