"""The artifact bundle format: the trainer's output dir, packed deterministically as a zstd-compressed tar.

A bundle holds ``output/**`` only, packed so that the same files give the same bytes:
members sorted by path, mtime 0, uid/gid 0 and no owner names, modes normalised (0755
for directories and for files with any exec bit, else 0644; links 0777), no timestamps
in any header, one zstd frame at level :data:`ZSTD_LEVEL`. The bundle id is the sha256
of the compressed bytes, so two runs whose trainers write the same files get the same id
and share one stored object. Provenance (host, timings, versions, argv, attempt) is per
run and lives beside the bundle, never inside it (broker/artifacts.py: one object per run).

Bundles written before that carried ``provenance.json`` as their first member; they are
still read (:func:`read_provenance`, :class:`ProvenanceStream`, extraction), and
:func:`build_bundle` still writes one when given a provenance dict (tests make old
bundles that way). Bundles are streamed to and from disk (memory does not grow with the
artifact). No NATS here: broker/artifacts.py moves bundles in and out of the object store.

A bundle read back is untrusted (anyone who can write one object or one record can
hand us one), so every read is confined and bounded:

* extraction builds a temp dir beside a NEW target and renames it into place; only
  ``output/**`` regular files, directories and links inside it (and an old bundle's
  ``provenance.json``) are accepted,
  each member's resolved path must stay inside, and no existing file is overwritten;
* extraction stops past ``max_bytes`` of member data or ``max_members`` members;
* a provenance read never decompresses more than :data:`PROVENANCE_MAX_BYTES`;
* a PAX or GNU long-name header over :data:`MAX_LONG_HEADER_BYTES` is refused from its
  512-byte header block, before tarfile reads its payload into memory, and the bytes
  between one member and the next are capped (:data:`HEADER_REGION_BYTES`);
* a zstd frame wanting a window over :data:`ZSTD_MAX_WINDOW_BYTES` is refused.

Every refusal is an :class:`ArtifactError` naming the limit, and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import zstandard

from trainfleet.broker.errors import ArtifactError, PackError
from trainfleet.broker.settings import Settings

PROVENANCE_NAME = "provenance.json"
OUTPUT_PREFIX = "output"
# Part of the format: another level gives other bytes, so another artifact id.
ZSTD_LEVEL = 3
# Every member of a bundle is stamped with this mtime (extraction leaves such files the
# time they were written), owned by uid/gid 0 with no owner names.
BUNDLE_MTIME = 0

# provenance.json is a few KiB of JSON: a read of it never decompresses more than this.
PROVENANCE_MAX_BYTES = 1 << 20
# Extraction defaults: the size an agent may upload at all, and far more files than any
# trainer writes (each member costs a header parse and a file create).
DEFAULT_EXTRACT_MAX_BYTES = Settings.max_artifact_bytes
MAX_MEMBERS = 100_000
# A PAX extended header or GNU long name/link is read whole into memory by tarfile: one
# bigger than this is refused from its header block. Ours are a few dozen bytes.
MAX_LONG_HEADER_BYTES = 8 << 10
# Decompressed bytes allowed between one member's data and the next member's data: its
# header block, a few long headers, padding and tarfile's 10 KiB read-ahead. Whatever
# tarfile does with extension headers (sparse maps included), it cannot read more.
HEADER_REGION_BYTES = 64 << 10
# Our level-3 bundles use a 2 MiB window; a frame may ask for up to 128 MiB by default,
# which the decompressor would allocate. Level 19 needs 8 MiB.
ZSTD_MAX_WINDOW_BYTES = 8 << 20

_LONG_HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)


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


def build_bundle(output_dir: str | os.PathLike, provenance: dict[str, Any] | None, dest: str | os.PathLike) -> Bundle:
    """Pack ``output_dir`` deterministically as a .tar.zst at ``dest``; return its id and size.

    ``provenance`` None is the current format, the one agents write: the output only, so the
    id depends on the output's bytes alone. A dict writes the format before that, with it as
    a ``provenance.json`` first member (how tests make old bundles; nothing uploads it now)."""
    output_dir = Path(output_dir)
    dest = Path(dest)
    with open(dest, "wb") as raw:
        hashing = _HashingWriter(raw)
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0)
        with cctx.stream_writer(hashing, closefd=False) as zw:
            with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
                if provenance is not None:
                    prov = json.dumps(provenance, indent=2, sort_keys=True, default=str).encode()
                    info = _member(PROVENANCE_NAME, tarfile.REGTYPE, 0o644)
                    info.size = len(prov)
                    tar.addfile(info, io.BytesIO(prov))
                for path in sorted(output_dir.rglob("*")):
                    _add_output(tar, output_dir, path)
    return Bundle(path=dest, sha256=hashing.digest.hexdigest(), size=hashing.size)


def _member(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    """A header that says nothing of where or when it was packed: fixed mtime, owners 0."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = BUNDLE_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_output(tar: tarfile.TarFile, output_dir: Path, path: Path) -> None:
    """One entry of the output dir into the bundle. A symlink travels as a relative link when it
    points inside the output dir (dangling or not); one that points out is refused, like a file
    that cannot be read (PackError names it). Devices, FIFOs and sockets never travel; a hard
    link travels as a regular file (its content again). Only the exec bit of a mode is kept."""
    rel = path.relative_to(output_dir).as_posix()
    arcname = f"{OUTPUT_PREFIX}/{rel}"
    if path.is_symlink():
        link = os.readlink(path)
        where = os.path.normpath(os.path.join(path.parent, link))
        if os.path.commonpath([where, str(output_dir)]) != str(output_dir) or where == str(output_dir):
            raise PackError(f"{arcname}: a symlink to {link!r}, outside the output dir: only links inside it travel")
        info = _member(arcname, tarfile.SYMTYPE, 0o777)
        info.linkname = os.path.relpath(where, path.parent)
        tar.addfile(info)
        return
    if path.is_dir():
        tar.addfile(_member(arcname, tarfile.DIRTYPE, 0o755))
        return
    if not path.is_file():
        return
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            info = _member(arcname, tarfile.REGTYPE, 0o755 if st.st_mode & 0o111 else 0o644)
            info.size = st.st_size
            tar.addfile(info, fh)
    except OSError as exc:
        raise PackError(f"{arcname}: cannot read it: {exc.strerror or exc}") from exc


# -- reading untrusted bundles --------------------------------------------------------
def _decompressor() -> zstandard.ZstdDecompressor:
    return zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_BYTES)


def _zstd_problem(exc: zstandard.ZstdError) -> str:
    if "memory" in str(exc):
        return f"{exc} (zstd windows over the ZSTD_MAX_WINDOW_BYTES limit of {ZSTD_MAX_WINDOW_BYTES} bytes are refused)"
    return str(exc)


class _GuardedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized long headers and sparse members from their 512-byte block.

    tarfile calls ``frombuf`` for every header block, extension headers included, before
    it reads any payload: the one place a PAX header's size is known and nothing is read yet.
    """

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _LONG_HEADER_TYPES and info.size > MAX_LONG_HEADER_BYTES:
            raise ArtifactError(
                f"refusing a {info.size}-byte PAX/GNU long header: over the MAX_LONG_HEADER_BYTES "
                f"limit of {MAX_LONG_HEADER_BYTES} bytes"
            )
        if info.type == tarfile.GNUTYPE_SPARSE:
            # Its extension blocks are chained without bound; bundles never hold sparse files.
            raise ArtifactError(f"refusing sparse member {info.name!r}: only regular files and directories are allowed")
        return info


class _BoundedReader:
    """A read-only stream that refuses to go past ``limit`` decompressed bytes.

    Reads are cut at the limit, so tarfile's read-ahead never trips it: only a read that
    tarfile needs beyond the limit raises ArtifactError (``what`` says which limit).
    """

    def __init__(self, raw: Any, limit: int, what: str):
        self.raw = raw
        self.limit = limit
        self.what = what
        self.pos = 0

    def read(self, size: int = -1) -> bytes:
        if self.pos >= self.limit:
            raise ArtifactError(f"refusing to decompress past {self.limit} bytes: {self.what}")
        room = self.limit - self.pos
        data = self.raw.read(room if size is None or size < 0 else min(size, room))
        self.pos += len(data)
        return data


def _open_tar(reader: _BoundedReader) -> tarfile.TarFile:
    return tarfile.open(fileobj=reader, mode="r|", tarinfo=_GuardedTarInfo)


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


# -- extraction ------------------------------------------------------------------------
def check_target(target: str | os.PathLike, *, force: bool = False) -> Path:
    """The absolute extraction target, after refusing one that cannot be used.

    The parent is resolved, the target itself is not (a symlink there is never followed).
    An existing target must be an empty directory unless ``force`` (it is then replaced)."""
    target = Path(target)
    if target.name in ("", ".", ".."):
        raise ArtifactError(f"refusing to extract into {str(target)!r}: not a directory name")
    target = target.parent.resolve() / target.name
    if not os.path.lexists(target) or force:
        return target
    if target.is_symlink() or not target.is_dir():
        raise ArtifactError(
            f"refusing to extract into {target}: it exists and is not a directory (--force replaces it)"
        )
    if any(target.iterdir()):
        raise ArtifactError(f"refusing to extract into {target}: it exists and is not empty (--force replaces it)")
    return target


def extract(
    bundle_path: str | os.PathLike,
    target: str | os.PathLike,
    *,
    max_bytes: int = DEFAULT_EXTRACT_MAX_BYTES,
    max_members: int = MAX_MEMBERS,
    force: bool = False,
) -> Path:
    """Extract a bundle into the new directory ``target``; any unsafe member or exceeded limit
    aborts with ArtifactError and leaves nothing behind.

    Members are written into a temp dir beside ``target``, which is renamed into place once
    every member passed: a refusal midway removes the temp dir, and nothing is ever written
    outside it. ``force`` replaces an existing ``target``."""
    target = check_target(target, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.part-")).resolve()
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would become the target's mode
        _extract_into(Path(bundle_path), staging, max_bytes=max_bytes, max_members=max_members)
        _move_into_place(staging, target, force=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _extract_into(bundle_path: Path, root: Path, *, max_bytes: int, max_members: int) -> None:
    """Stream every member of the bundle into the (new, empty) directory ``root``."""
    region = f"more than HEADER_REGION_BYTES ({HEADER_REGION_BYTES}) of headers between two members of {bundle_path}"
    members = size = 0
    links: list[tuple[tuple[str, ...], str]] = []
    try:
        with open(bundle_path, "rb") as raw, _decompressor().stream_reader(raw) as zr:
            reader = _BoundedReader(zr, HEADER_REGION_BYTES, region)
            with _open_tar(reader) as tar:
                while (member := tar.next()) is not None:
                    tar.members.clear()  # tarfile keeps every member it read: memory would grow with the count
                    parts = _check_member(member, root)
                    if member.issym():
                        links.append((parts, member.linkname))  # made last: nothing is written through one
                        _check_limits(
                            bundle_path, members + len(links), size, max_members=max_members, max_bytes=max_bytes
                        )
                        continue
                    # A directory's size field is ignored by tarfile: it has no data and buys no room.
                    data = member.size if member.isfile() else 0
                    members, size = members + 1, size + data
                    _check_limits(bundle_path, members, size, max_members=max_members, max_bytes=max_bytes)
                    # This member's data, then at most one header region before the next member.
                    reader.limit = member.offset_data + _padded(data) + HEADER_REGION_BYTES
                    _write_member(tar, member, root.joinpath(*parts))
        for parts, linkname in links:
            _make_link(root, parts, linkname)
    except (tarfile.TarError, EOFError) as exc:
        raise ArtifactError(f"{bundle_path}: not a valid trainfleet bundle: {exc}") from exc
    except zstandard.ZstdError as exc:
        raise ArtifactError(f"{bundle_path}: not a valid trainfleet bundle: {_zstd_problem(exc)}") from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{bundle_path}: cannot extract: {exc}") from exc


def _check_member(member: tarfile.TarInfo, root: Path) -> tuple[str, ...]:
    """The path parts of an acceptable member; ArtifactError for anything else."""
    name = member.name
    parts = PurePosixPath(name).parts
    if os.path.isabs(name) or name.startswith("/") or ".." in parts or "\0" in name:
        raise ArtifactError(f"refusing to extract {name!r}: it would land outside {root}")
    if not root.joinpath(*parts).resolve().is_relative_to(root):
        raise ArtifactError(f"refusing to extract {name!r}: it would land outside {root}")
    if member.issym():
        _check_link(name, parts, member.linkname, root)
    elif not (member.type in _FILE_TYPES or member.isdir()) or member.sparse is not None or member.size < 0:
        raise ArtifactError(
            f"refusing to extract {name!r}: only regular files, directories and links inside output/ are allowed"
        )
    provenance = parts == (PROVENANCE_NAME,) and member.isfile()
    output = bool(parts) and parts[0] == OUTPUT_PREFIX and (member.isdir() or len(parts) > 1)
    if not (provenance or output):
        raise ArtifactError(
            f"refusing to extract {name!r}: a bundle holds only {PROVENANCE_NAME} and {OUTPUT_PREFIX}/ members"
        )
    return parts


def _check_link(name: str, parts: tuple[str, ...], linkname: str, root: Path) -> None:
    """A symlink member is accepted only relative, and pointing inside ``output/``."""
    inside = os.path.normpath(os.path.join(*parts[:-1], linkname)) if len(parts) > 1 else ""
    if not linkname or os.path.isabs(linkname) or not inside.startswith(f"{OUTPUT_PREFIX}/"):
        raise ArtifactError(
            f"refusing to extract {name!r}: a link to {linkname!r}; only relative links inside output/ are allowed"
        )


def _make_link(root: Path, parts: tuple[str, ...], linkname: str) -> None:
    path = root.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.parent.resolve().is_relative_to(root):
        raise ArtifactError(f"refusing to extract {'/'.join(parts)!r}: it would land outside {root}")
    try:
        os.symlink(linkname, path)
    except FileExistsError as exc:
        raise ArtifactError(f"refusing to extract {'/'.join(parts)!r}: the bundle holds that path twice") from exc


def _check_limits(bundle_path: Path, members: int, size: int, *, max_members: int, max_bytes: int) -> None:
    if members > max_members:
        raise ArtifactError(f"refusing {bundle_path}: more than the limit of {max_members} members (MAX_MEMBERS)")
    if size > max_bytes:
        raise ArtifactError(
            f"refusing {bundle_path}: its files add up to more than the extraction limit of {max_bytes} bytes "
            "(max_artifact_bytes)"
        )


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    """Create one directory or file; a file that already exists (a repeated member) is refused."""
    if member.isdir():
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    # O_EXCL: never overwrite; O_NOFOLLOW: never write through a link. Only the exec bit of
    # the member's mode survives (no setuid, setgid, sticky or world-writable).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o755 if member.mode & 0o111 else 0o644)
    except FileExistsError as exc:
        raise ArtifactError(f"refusing to extract {member.name!r}: the bundle holds that path twice") from exc
    with os.fdopen(fd, "wb") as dest:
        if source is not None:
            shutil.copyfileobj(source, dest, 1 << 20)
    if member.mtime != BUNDLE_MTIME:  # (a packed bundle's files keep the time they are written)
        with contextlib.suppress(OverflowError, OSError, ValueError):
            os.utime(path, (member.mtime, member.mtime))


def _move_into_place(staging: Path, target: Path, *, force: bool) -> None:
    """Rename the finished ``staging`` dir to ``target``; with ``force`` whatever is there goes."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    if not force:
        check_target(target)  # it appeared while we extracted: refuse if it is not empty now
        os.rmdir(target)
        os.rename(staging, target)
        return
    # Move the old one aside first, so the target is never half old, half new.
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-")) / "old"
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(aside, target)  # put the old one back rather than leave neither
        raise
    shutil.rmtree(aside.parent, ignore_errors=True)  # rmtree never follows links; a link is just removed


# -- provenance ------------------------------------------------------------------------
def read_provenance(bundle_path: str | os.PathLike) -> dict[str, Any]:
    """The provenance.json of a bundle (its first member), decompressing at most
    :data:`PROVENANCE_MAX_BYTES`; ArtifactError when it is missing, too big or not JSON."""
    what = f"{bundle_path}: {PROVENANCE_NAME} is not within the first PROVENANCE_MAX_BYTES ({PROVENANCE_MAX_BYTES})"
    try:
        with open(bundle_path, "rb") as raw, _decompressor().stream_reader(raw) as zr:
            with _open_tar(_BoundedReader(zr, PROVENANCE_MAX_BYTES, what)) as tar:
                member = _check_provenance_member(tar.next())
                fh = tar.extractfile(member)
                return _provenance_json(fh.read() if fh else b"")
    except (tarfile.TarError, EOFError) as exc:
        raise ArtifactError(f"{bundle_path}: cannot read provenance: {exc}") from exc
    except zstandard.ZstdError as exc:
        raise ArtifactError(f"{bundle_path}: cannot read provenance: {_zstd_problem(exc)}") from exc


def _check_provenance_member(member: tarfile.TarInfo | None) -> tarfile.TarInfo:
    """``member`` when it is a provenance.json small enough to read; ArtifactError otherwise."""
    if member is None:
        raise ArtifactError(f"bundle has no {PROVENANCE_NAME}")
    if member.name != PROVENANCE_NAME or not member.isfile():
        raise ArtifactError(f"bundle does not start with {PROVENANCE_NAME} (first member: {member.name!r})")
    if member.size > PROVENANCE_MAX_BYTES:
        raise ArtifactError(
            f"{PROVENANCE_NAME} is {member.size} bytes: over the PROVENANCE_MAX_BYTES limit of {PROVENANCE_MAX_BYTES}"
        )
    return member


def parse_provenance(data: bytes) -> dict[str, Any]:
    """Provenance JSON (a bundle's provenance.json, or a run's provenance object) as a dict;
    ArtifactError when it is not JSON, {} when it is JSON but not an object."""
    return _provenance_json(data)


def _provenance_json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{PROVENANCE_NAME} is not JSON: {exc}") from exc
    return value if isinstance(value, dict) else {}


def provenance_from_prefix(data: bytes) -> dict[str, Any] | None:
    """provenance.json from the start of a decompressed tar, or None when ``data`` does not
    hold it all yet. Only the first :data:`PROVENANCE_MAX_BYTES` are looked at: past them a
    missing or incomplete provenance.json is an ArtifactError, not a wait for more."""
    window = data[:PROVENANCE_MAX_BYTES]
    try:
        with tarfile.open(fileobj=io.BytesIO(window), mode="r:", tarinfo=_GuardedTarInfo) as tar:
            member = tar.firstmember or tar.next()
    except (tarfile.TarError, EOFError):
        member = None
    if member is not None:
        _check_provenance_member(member)
        end = member.offset_data + member.size
        if end <= len(window):
            return _provenance_json(window[member.offset_data : end])
    if len(data) >= PROVENANCE_MAX_BYTES:
        raise ArtifactError(
            f"no complete {PROVENANCE_NAME} within the first {PROVENANCE_MAX_BYTES} bytes (PROVENANCE_MAX_BYTES limit)"
        )
    return None


class _Full(Exception):
    """Raised through zstandard to stop decompressing once the buffer is full."""


class _CappedBuffer:
    """Where decompressed bytes land: keeps the first ``limit`` bytes, then stops the decompressor."""

    def __init__(self, limit: int):
        self.limit = limit
        self.data = bytearray()

    def write(self, data: Any) -> int:
        room = self.limit - len(self.data)
        self.data += memoryview(data)[:room]
        if len(data) > room:
            raise _Full
        return len(data)


class ProvenanceStream:
    """A bundle's compressed bytes fed in chunk by chunk (as they come from the object store),
    decompressing no more than :data:`PROVENANCE_MAX_BYTES` in all."""

    def __init__(self) -> None:
        self._buffer = _CappedBuffer(PROVENANCE_MAX_BYTES)
        self._writer = _decompressor().stream_writer(self._buffer)

    def feed(self, chunk: bytes) -> dict[str, Any] | None:
        """Provenance once the chunks so far hold all of it, else None; ArtifactError when they
        never will (not zstd, not a bundle, or not within the limit)."""
        try:
            self._writer.write(chunk)
        except _Full:
            pass  # the buffer holds exactly the limit: provenance is in it, or it is refused below
        except zstandard.ZstdError as exc:
            raise ArtifactError(f"not a zstd bundle: {_zstd_problem(exc)}") from exc
        return provenance_from_prefix(bytes(self._buffer.data))
