"""Job specs: what to train and how, in the ``<prefix>-specs`` KV bucket, signed by the controller.

The spec (model, mode, hyper, command, data, seed, constraints) is the only thing that
says what command an agent runs, so it lives apart from the state records agents write:
only the controller may write this bucket, and it signs every spec with an ed25519 nkey
seed it keeps (:class:`Signer`). An agent opens a spec (:func:`open_spec`) only when

* its signature verifies against one of the controller keys the agent trusts (when the
  agent is configured with any: ``--trust-key`` / ``TRAINFLEET_TRUST_KEY``), and
* the job id recomputed from the spec's identity equals the key it was read under.

The value is JSON: ``{"spec": {...}, "signature": "...", "key": "U...", ...}``; the
signature covers the bytes of ``spec`` exactly as stored, so ``nats kv get`` shows it
plainly and any client can verify it.

Roles: the controller writes specs; agents, operators and viewers read them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import nacl.exceptions
import nacl.signing
import nats.js.errors
import nkeys

from trainfleet.broker import kv
from trainfleet.broker.display import safe_text
from trainfleet.broker.errors import JobNotFound, SchemaError, UntrustedSpec, UsageError
from trainfleet.broker.names import FLEET_INFO_KEY, is_env_name, is_host_id, is_hyper_name, is_name
from trainfleet.broker.schema import SCHEMA_VERSION, JobSpec, decode

if TYPE_CHECKING:
    from trainfleet.broker.connection import Broker

log = logging.getLogger("trainfleet.specs")


def job_id_for(identity: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``JobSpec.identity()``.

    Sorted keys and fixed separators make the id independent of key order in
    the TOML file and of the Python version that computed it.
    """
    return hashlib.sha256(_CANONICAL.encode(identity).encode("utf-8")).hexdigest()


# One encoder for every id (json.dumps with these arguments would build one per call).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class SignedSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A spec as stored: its JSON bytes, and who signed them ("" for an unsigned spec)."""

    spec: msgspec.Raw
    signature: str = ""  # base64url of the ed25519 signature of the spec bytes
    key: str = ""  # the signer's public nkey (U...)
    signed_at: float = 0.0
    schema_version: int = SCHEMA_VERSION


# -- keys ------------------------------------------------------------------------------
def new_seed() -> bytes:
    """A fresh nkey seed (a user-type key: ``SU...``), for signing specs or as a NATS identity."""
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)


def write_seed(path: str | os.PathLike[str], seed: bytes) -> str:
    """Write a seed file readable by its owner only; returns the seed's public key."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(seed + b"\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return public_key_of(seed)


def public_key_of(seed: bytes) -> str:
    return nkeys.from_seed(seed.strip()).public_key.decode()


def _verify_key(public: str) -> nacl.signing.VerifyKey:
    """The ed25519 key inside a public nkey: base32 of prefix byte + 32 key bytes + crc16."""
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
    except (binascii.Error, ValueError) as exc:
        raise UntrustedSpec(f"{public!r} is not a public nkey") from exc
    if len(raw) != 35 or bytes(nkeys.crc16_checksum(raw[:-2])) != raw[-2:]:
        raise UntrustedSpec(f"{public!r} is not a public nkey (bad length or checksum)")
    return nacl.signing.VerifyKey(raw[1:33])


class Signer:
    """Signs specs with the controller's nkey seed (a file it keeps, mode 0600)."""

    def __init__(self, seed: bytes):
        self._pair = nkeys.from_seed(seed.strip())
        self.public_key = self._pair.public_key.decode()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Signer:
        try:
            return cls(Path(path).read_bytes())
        except OSError as exc:
            raise UsageError(f"cannot read the signing key {path}: {exc.strerror or exc}") from exc
        except (nkeys.NkeysError, ValueError) as exc:
            raise UsageError(f"{path} is not an nkey seed: {exc}") from exc

    def sign(self, data: bytes) -> str:
        return base64.urlsafe_b64encode(self._pair.sign(data)).decode()


# -- seal and open -------------------------------------------------------------------
def seal(spec: JobSpec, signer: Signer | None) -> bytes:
    """The stored form of ``spec``: signed when a signer is given."""
    body = msgspec.json.encode(spec)
    if signer is None:
        return msgspec.json.encode(SignedSpec(spec=msgspec.Raw(body), signed_at=time.time()))
    signature = signer.sign(body)
    signed = SignedSpec(spec=msgspec.Raw(body), signature=signature, key=signer.public_key, signed_at=time.time())
    return msgspec.json.encode(signed)


def open_spec(data: bytes, job_id: str, trusted: tuple[str, ...] = (), *, identity: bool = True) -> JobSpec:
    """The spec stored under ``job_id``, checked: signed by a ``trusted`` key (when any is
    given), and its identity hashing to ``job_id`` (``identity=False``, for showing jobs only:
    its own job id equal to ``job_id``). UntrustedSpec says why not."""
    stored: SignedSpec = decode(data, SignedSpec)
    body = bytes(stored.spec)
    if trusted:
        if not stored.signature:
            raise UntrustedSpec("spec is not signed, and this agent runs only signed specs")
        if stored.key not in trusted:
            raise UntrustedSpec(f"spec is signed by {stored.key[:12]}…, a key this agent does not trust")
        try:
            _verify_key(stored.key).verify(body, base64.urlsafe_b64decode(stored.signature))
        except (nacl.exceptions.BadSignatureError, binascii.Error, ValueError) as exc:
            raise UntrustedSpec("spec signature does not verify: the spec was changed after signing") from exc
    spec: JobSpec = decode(body, JobSpec)
    bad = bad_names(spec)
    if bad:
        raise UntrustedSpec(f"spec has names that are not tokens: {bad}")
    computed = job_id_for(spec.identity()) if identity else spec.job_id
    if spec.job_id != job_id or computed != job_id:
        raise UntrustedSpec(f"spec does not belong to job {job_id[:12]} (its identity hashes to {computed[:12]})")
    return spec


def bad_names(spec: JobSpec) -> str:
    """What in ``spec`` is not a token where one must be (names reach paths, argv and
    terminals): "" when all is well. A manifest never yields such a spec; a hand-written one may."""
    bad = [
        f"{what} {value!r}"
        for what, value in (("name", spec.name), ("model", spec.model), ("mode", spec.mode))
        if not is_name(value)
    ]
    bad += [f"hyper {key!r}" for key in spec.hyper if not is_hyper_name(key)]
    bad += [
        f"host {host!r}"
        for host in (*spec.constraints.allowed_hosts, *spec.constraints.denied_hosts)
        if not is_host_id(host)
    ]
    bad += [f"env {key!r}" for key in spec.env if not is_env_name(key)]
    if not spec.command or not spec.command[0]:
        bad.append("an empty command")
    return ", ".join(bad)


def signer_of(data: bytes) -> str:
    """The public key a stored spec claims to be signed by ("" when unsigned)."""
    return decode(data, SignedSpec).key


# -- the bucket ----------------------------------------------------------------------
async def put_spec(broker: Broker, spec: JobSpec, signer: Signer | None) -> int:
    """Write (or replace) a job's spec. Controller only: no other role may write the bucket."""
    return await broker.specs.put(spec.job_id, seal(spec, signer))


@dataclass(frozen=True)
class Sealed:
    """A stored spec as the controller compares it with its manifest: the spec and its signer."""

    spec: JobSpec
    key: str  # the signer's public key; "" when unsigned


async def load_sealed(broker: Broker) -> dict[str, Sealed]:
    """Every usable spec with the key that signed it (signatures are the controller's own)."""
    out: dict[str, Sealed] = {}
    for entry in await kv.snapshot(broker.specs):
        if entry.key == FLEET_INFO_KEY:
            continue
        try:
            out[entry.key] = Sealed(open_spec(entry.value or b"", entry.key), signer_of(entry.value or b""))
        except (SchemaError, UntrustedSpec) as exc:
            log.warning("spec %s is unusable: %s", entry.key, exc)
    return out


async def read_spec(broker: Broker, job_id: str) -> bytes:
    """A job's stored spec, unopened: check it with :func:`open_spec` before any use
    (JobNotFound when there is none)."""
    try:
        entry = await broker.specs.get(job_id)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError) as exc:
        raise JobNotFound(f"no spec for job {job_id}") from exc
    return entry.value or b""


async def get_spec(broker: Broker, job_id: str, trusted: tuple[str, ...] = (), *, identity: bool = True) -> JobSpec:
    """A job's spec, checked as :func:`open_spec` does (JobNotFound when there is none)."""
    return open_spec(await read_spec(broker, job_id), job_id, trusted, identity=identity)


async def signed_by(broker: Broker, job_id: str) -> str:
    """The public key a job's stored spec is signed with ("" when unsigned or absent)."""
    try:
        entry = await broker.specs.get(job_id)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
        return ""
    try:
        return signer_of(entry.value or b"")
    except SchemaError:
        return ""


async def load_specs(broker: Broker) -> dict[str, JobSpec]:
    """Every readable spec stored under its own job id (others are logged and skipped).
    Neither signatures nor identities are checked: this is for showing jobs, not running them."""
    out: dict[str, JobSpec] = {}
    for entry in await kv.snapshot(broker.specs):
        if entry.key == FLEET_INFO_KEY:
            continue
        try:
            out[entry.key] = open_spec(entry.value or b"", entry.key, identity=False)
        except (SchemaError, UntrustedSpec) as exc:
            log.warning("spec %s is unusable: %s", entry.key, exc)
    return out


# -- the fleet's own facts -------------------------------------------------------------
async def put_fleet_info(broker: Broker, *, name: str, manifest: str) -> None:
    """Record the name and file of the manifest last synced (controller only), under
    FLEET_INFO_KEY in the specs bucket: ``{"name", "manifest", "synced_at"}``."""
    info = {"name": name, "manifest": manifest, "synced_at": time.time()}
    await broker.specs.put(FLEET_INFO_KEY, json.dumps(info).encode())


async def get_fleet_info(broker: Broker) -> dict[str, Any]:
    """What :func:`put_fleet_info` stored ({} before the first sync, or if unreadable)."""
    try:
        entry = await broker.specs.get(FLEET_INFO_KEY)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
        return {}
    try:
        info = json.loads(entry.value or b"{}")
    except ValueError:
        return {}
    if not isinstance(info, dict):
        return {}
    name = info.get("name")
    return {**info, "name": name if isinstance(name, str) else ""}


def fleet_name(info: dict[str, Any]) -> str:
    """The fleet's name from :func:`get_fleet_info`'s answer, safe to print ("" for none)."""
    return safe_text(str(info.get("name") or ""), newlines=False)
