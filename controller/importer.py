"""``trainfleet import``: move a fleet from the predecessor (``training-fleet``) to trainfleet.

Three things come over (docs/migrating.md):

* **The manifest.** The predecessor's TOML (``name``, ``[hosts.<id>]``, ``[[jobs]]`` with
  model, mode, hyper, split_recipe, train_hosts, seed, constraints) is written as a trainfleet
  manifest: one ``[models.NAME]`` per model its jobs use, with the modes they use, a typed
  hyper schema inferred from their values, and the command from ``--commands`` (a TOML or
  JSON file, model → command). Without one, a placeholder command is written and a template
  printed for the user to fill. ``split_recipe`` becomes ``data`` (a string ``s`` is
  ``{ split = s }``), ``train_hosts`` becomes ``allowed_hosts``.
* **The queue** (``--db training_jobs.db``, read-only): every row of its ``jobs`` table is
  matched by content to a job of the written manifest (a row whose job left the manifest is
  added to it, so nothing is dropped) and brought in under that job's trainfleet id:
  completed with its artifact, failed and cancelled with their last error, pending (and
  claimed or running: that run is lost) as pending with its attempts, ticketed.
* **The store** (``--store DIR``): each completed job's ``<model>_<mode>/<sha>/bundle.tar.zst``
  is checked against the sha256 the queue recorded, repacked as a trainfleet bundle (its
  files under ``output/``), uploaded, checked against the object store's digest, and its
  ``meta.json`` (with its ``index.jsonl`` rows) kept as the run's provenance.

Everything that cannot be carried as it was is listed (exit 1); exit 0 means all of it came.

Writes go the controller's way: specs sealed with the controller's signing key (``--signing-key``
/ ``TRAINFLEET_SIGNING_KEY``, as ``trainfleet controller`` signs them), records created only
where none exists (so a re-run changes nothing), tickets published as the controller publishes
them, and finally :meth:`Controller.sync` of the written manifest, which creates the jobs the
queue did not know. So a later ``trainfleet sync`` of the written manifest finds every job in
place and re-trains nothing.

Role: with ``--db`` it runs as **admin**: it writes specs and records and publishes tickets
(the controller's rights) and uploads artifacts (an uploader's right, which the controller
role does not have). Without ``--db`` it only writes a file and needs no NATS at all.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
import shlex
import sqlite3
import tarfile
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec
import zstandard

from trainfleet.broker import names as _names
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import build_bundle
from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import EXIT_OK, JobNotFound, ManifestError, NotProvisioned, UsageError
from trainfleet.broker.objstore import parse_digest
from trainfleet.broker.records import create_record, get_record
from trainfleet.broker.schema import JobRecord, JobSpec, JobStatus
from trainfleet.broker.settings import Settings, from_flags
from trainfleet.broker.specs import put_spec
from trainfleet.controller import view
from trainfleet.controller.controller import Controller
from trainfleet.controller.manifest import MANIFEST_SCHEMA_VERSION, Manifest, parse_manifest

SOURCES = ("training-fleet",)
SOURCE = SOURCES[0]
HELP = (
    "write a trainfleet manifest from a training-fleet manifest; with --db and --store also bring its "
    "jobs (state, attempts, times, last error) and artifacts (sha256 verified) into this fleet "
    "(exit 0 all carried, 1 something could not be, 2 bad usage)"
)
EXIT_NOT_CARRIED = 1

# Host ids: hostnames (pi.lan) where this trainfleet takes them, else tokens.
is_host_id = getattr(_names, "is_host_id", _names.is_token)

# Predecessor job keys carried under the same name and meaning.
_SAME_JOB_KEYS = ("priority", "require_cuda", "prefer_cuda", "min_vram_gib", "min_ram_gib", "min_cores")
# Keys the translation handles itself (or drops knowingly: the predecessor's own id is recomputed).
_HANDLED_JOB_KEYS = (
    "name",
    "model",
    "mode",
    "hyper",
    "split_recipe",
    "data",
    "seed",
    "train_hosts",
    "allowed_hosts",
    "denied_hosts",
    "constraints",
    "job_id",
)
_SAME_HOST_KEYS = ("allow_jobs", "deny_jobs", "max_cores", "max_ram_gib", "max_vram_gib")
_SAME_SETTINGS = ("max_attempts", "prefer_cuda_grace_s")
_PLACEHOLDER = "FILL-IN-THE-COMMAND-OF-{model}"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The queue's columns, as its schema names them.
_COLUMNS = (
    "job_id",
    "name",
    "spec_json",
    "status",
    "claimed_by",
    "claimed_at",
    "heartbeat_at",
    "completed_at",
    "attempts",
    "last_error",
    "artifact_id",
    "created_at",
    "updated_at",
)


class _NotCarried(Exception):
    """What stops one thing from being carried; its message says why."""


@dataclass(frozen=True)
class Lost:
    """One thing that could not be carried as it was."""

    what: str
    why: str

    def __str__(self) -> str:
        return f"{self.what}: {self.why}"


@dataclass(frozen=True)
class QueueRow:
    """One row of the predecessor's ``jobs`` table."""

    job_id: str
    name: str
    spec: dict[str, Any]
    status: str
    claimed_by: str | None
    claimed_at: float | None
    heartbeat_at: float | None
    completed_at: float | None
    attempts: int
    last_error: str | None
    artifact_id: str | None
    created_at: float
    updated_at: float


@dataclass
class _Entry:
    """One job on its way over: from the manifest, from the queue, or both."""

    name: str
    raw: dict[str, Any]
    origin: str  # "manifest" or "queue"
    row: QueueRow | None = None
    table: dict[str, Any] = field(default_factory=dict)  # the trainfleet [[jobs]] table
    job_id: str = ""


@dataclass
class Translation:
    """The written manifest: its text, parsed, and every job with where it came from."""

    text: str
    manifest: Manifest
    entries: list[_Entry]
    lost: list[Lost]
    template: str | None  # the --commands template, when commands are missing


# ---------------------------------------------------------------------------
# reading the predecessor's files
# ---------------------------------------------------------------------------


def read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid TOML: {exc}") from exc


def read_commands(path: Path) -> dict[str, tuple[str, ...]]:
    """``--commands``: a TOML or JSON table, model → command (an array of words, or one string
    split as a shell would)."""
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the commands file {path}: {exc}") from exc
    else:
        raw = read_toml(path, "the commands file")
    if not isinstance(raw, dict):
        raise UsageError(f"the commands file {path} must be a table: model = command")
    out: dict[str, tuple[str, ...]] = {}
    for model, command in raw.items():
        if isinstance(command, str):
            command = shlex.split(command)
        if not isinstance(command, list) or not command or not all(isinstance(w, str) and w for w in command):
            raise UsageError(f"the commands file {path}: {model} must be a command (an array of words, or a string)")
        out[model] = tuple(command)
    return out


def read_queue(path: Path) -> list[QueueRow]:
    """Every row of the predecessor's ``jobs`` table, opened read-only (it is never written)."""
    if not path.is_file():
        raise UsageError(f"no predecessor database at {path}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY created_at, job_id").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise UsageError(f"{path} is not a training-fleet database (training_jobs.db): {exc}") from exc
    out = []
    for row in rows:
        values = dict(zip(_COLUMNS, row, strict=True))
        try:
            spec = json.loads(values.pop("spec_json"))
        except ValueError as exc:
            raise UsageError(f"{path}: job {values['job_id']}: spec_json is not JSON: {exc}") from exc
        if not isinstance(spec, dict):
            raise UsageError(f"{path}: job {values['job_id']}: spec_json is not an object")
        values["attempts"] = int(values["attempts"] or 0)
        out.append(QueueRow(spec=spec, **values))
    return out


def read_index(store: Path) -> dict[str, list[dict[str, Any]]]:
    """The store's ``index.jsonl``: artifact id → its rows (unreadable lines are skipped)."""
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        lines = (store / "index.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("artifact_id"), str):
            out.setdefault(row["artifact_id"], []).append(row)
    return out


# ---------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------


def _content_key(raw: dict[str, Any]) -> str:
    """What the predecessor's job id hashed (model, mode, hyper, split_recipe, train_hosts,
    seed), as one string: a queue row and a manifest job with the same key are the same job."""
    hosts = sorted(set(_host_list(raw, "train_hosts")) | set(_host_list(raw, "allowed_hosts")))
    key = {
        "model": raw.get("model"),
        "mode": raw.get("mode"),
        "hyper": raw.get("hyper") or {},
        "data": _recipe(raw),
        "hosts": hosts,
        "seed": raw.get("seed") or 0,
    }
    return json.dumps(key, sort_keys=True, default=str)


def _host_list(raw: dict[str, Any], key: str) -> list[str]:
    value = raw.get(key) or (raw.get("constraints") or {}).get(key) or []
    return [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []


def _recipe(raw: dict[str, Any]) -> Any:
    """The job's data recipe as trainfleet reads ``split_recipe``: a table as it is, a string
    ``s`` as ``{split = s}``."""
    recipe = raw.get("split_recipe", raw.get("data"))
    if recipe is None:
        return {}
    return {"split": recipe} if isinstance(recipe, str) else recipe


class _Translator:
    def __init__(self, doc: dict[str, Any], rows: list[QueueRow], commands: dict[str, tuple[str, ...]] | None):
        self.doc = doc
        self.rows = rows
        self.commands = commands
        self.lost: list[Lost] = []

    def lose(self, what: str, why: str) -> None:
        self.lost.append(Lost(what, why))

    # -- jobs --------------------------------------------------------------------
    def entries(self) -> list[_Entry]:
        raw_jobs = self.doc.get("jobs", [])
        if not isinstance(raw_jobs, list):
            raise UsageError("the manifest's jobs must be an array of tables ([[jobs]])")
        entries: list[_Entry] = []
        by_key: dict[str, _Entry] = {}
        for index, raw in enumerate(raw_jobs, start=1):
            if not isinstance(raw, dict):
                self.lose(f"[[jobs]] #{index}", "not a table")
                continue
            entry = _Entry(str(raw.get("name") or f"job-{index}"), raw, "manifest")
            entries.append(entry)
            by_key.setdefault(_content_key(raw), entry)
        taken = {e.name for e in entries}
        for row in self.rows:
            entry = by_key.get(_content_key(row.spec))
            if entry is not None and entry.row is None:
                entry.row = row
                continue
            if entry is not None:
                self.lose(f"queue row {row.job_id[:12]} ({row.name})", f"same content as {entry.name}: not brought in")
                continue
            name = row.name or str(row.spec.get("name") or "job")
            if name in taken:
                name = f"{name}-{row.job_id[:8]}"
            taken.add(name)
            entry = _Entry(name, {**row.spec, "name": name}, "queue", row=row)
            entries.append(entry)
            by_key[_content_key(row.spec)] = entry
        return entries

    def job_table(self, entry: _Entry) -> dict[str, Any] | None:
        """The [[jobs]] table of ``entry`` (hyper still raw), or None when it cannot be carried."""
        label = f"job {entry.name}"
        merged = self._merged(entry.raw, label)
        name = entry.name if _names.is_name(entry.name) else re.sub(r"[^A-Za-z0-9._-]", "-", entry.name).lstrip("._-")
        if name != entry.name:
            self.lose(label, f"renamed {name!r} (a trainfleet job name is {_names.NAME_PATTERN})")
            entry.name = name
        for key in ("model", "mode"):
            if not _names.is_name(merged.get(key)):
                self.lose(label, f"its {key} {merged.get(key)!r} is not a trainfleet name ({_names.NAME_PATTERN})")
                return None
        table: dict[str, Any] = {"name": name, "model": merged["model"], "mode": merged["mode"]}
        hyper = merged.get("hyper") or {}
        if not isinstance(hyper, dict):
            self.lose(label, "its hyper is not a table")
            return None
        table["hyper"] = dict(hyper)
        recipe = _recipe(merged)
        if recipe:
            table["data"] = recipe
        seed = merged.get("seed")
        table["seed"] = 0 if seed is None else seed
        for key in _SAME_JOB_KEYS:
            if merged.get(key) is not None:
                table[key] = merged[key]
        return table if self._hosts_of(table, merged, label) else None

    def _merged(self, raw: dict[str, Any], label: str) -> dict[str, Any]:
        """The job's keys with a ``constraints`` table's merged in; unknown ones reported."""
        merged = dict(raw)
        constraints = raw.get("constraints")
        for key, value in constraints.items() if isinstance(constraints, dict) else ():
            merged.setdefault(key, value)
        for key in merged:
            if key not in _HANDLED_JOB_KEYS and key not in _SAME_JOB_KEYS:
                self.lose(f"{label}: {key}", "no trainfleet equivalent; left out")
        return merged

    def _hosts_of(self, table: dict[str, Any], merged: dict[str, Any], label: str) -> bool:
        """allowed_hosts (train_hosts and allowed_hosts together) and denied_hosts into ``table``."""
        allowed = list(dict.fromkeys([*_host_list(merged, "train_hosts"), *_host_list(merged, "allowed_hosts")]))
        denied = _host_list(merged, "denied_hosts")
        for key, hosts in (("allowed_hosts", allowed), ("denied_hosts", denied)):
            bad = [h for h in hosts if not is_host_id(h)]
            if bad:
                self.lose(label, f"{key} {bad} are not host ids trainfleet takes; the job is left out")
                return False
            if hosts:
                table[key] = hosts
        return True

    # -- models ------------------------------------------------------------------
    def models(self, entries: list[_Entry]) -> dict[str, dict[str, Any]]:
        """One declaration per model the jobs use; entries whose hyper cannot be typed are
        dropped (``table`` emptied) and reported."""
        by_model: dict[str, list[_Entry]] = {}
        for entry in entries:
            if entry.table:
                by_model.setdefault(entry.table["model"], []).append(entry)
        out: dict[str, dict[str, Any]] = {}
        for model, members in by_model.items():
            schema = self._schema(model, members)
            kept = [e for e in members if e.table]
            if not kept:
                continue
            command = (self.commands or {}).get(model)
            out[model] = {
                "command": list(command) if command else [_PLACEHOLDER.format(model=model)],
                "modes": sorted({e.table["mode"] for e in kept}),
                "hyper": schema,
            }
        return out

    def _schema(self, model: str, members: list[_Entry]) -> dict[str, dict[str, Any]]:
        values: dict[str, list[tuple[_Entry, Any]]] = {}
        for entry in members:
            for key, value in entry.table["hyper"].items():
                values.setdefault(key, []).append((entry, value))
        schema: dict[str, dict[str, Any]] = {}
        for key, seen in values.items():
            why = None if _names.is_hyper_name(key) else f"not a trainfleet hyper name ({_names.HYPER_PATTERN})"
            ptype = None if why else _hyper_type([v for _, v in seen])
            if why is None and ptype is None:
                why = f"its values {[v for _, v in seen][:5]} are not all of one of int, float, str, bool"
            if why is not None:
                for entry, _ in seen:
                    self.lose(f"job {entry.name}", f"hyper {key!r}: {why}; the job is left out")
                    entry.table = {}
                continue
            param: dict[str, Any] = {"type": ptype}
            missing = [e for e in members if e.table and key not in e.table["hyper"]]
            if missing:
                common = Counter(json.dumps(v) for _, v in seen).most_common(1)[0][0]
                param["default"] = json.loads(common)
                self.lose(
                    f"model {model}: hyper {key!r}",
                    f"{', '.join(e.name for e in missing)} had no value (the predecessor passed none); trainfleet "
                    f"passes the declared default {common} to them",
                )
            schema[key] = param
        return schema

    # -- the rest of the manifest ---------------------------------------------------
    def hosts(self) -> dict[str, dict[str, Any]]:
        raw = self.doc.get("hosts", {})
        out: dict[str, dict[str, Any]] = {}
        for host_id, table in _flat_hosts(raw if isinstance(raw, dict) else {}).items():
            if not is_host_id(host_id):
                self.lose(f"host {host_id}", "not a host id trainfleet takes; its policy is left out")
                continue
            out[host_id] = {k: v for k, v in table.items() if k in _SAME_HOST_KEYS}
            for key in table:
                if key not in _SAME_HOST_KEYS:
                    self.lose(f"host {host_id}: {key}", "no trainfleet host policy key means this; left out")
        return out

    def top(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": MANIFEST_SCHEMA_VERSION}
        for key, value in self.doc.items():
            if key in ("schema_version", "jobs", "hosts"):
                continue
            if key == "name" and isinstance(value, str):
                out["name"] = value
            elif key == "settings" and isinstance(value, dict):
                out["settings"] = {k: v for k, v in value.items() if k in _SAME_SETTINGS}
                for k in value:
                    if k not in _SAME_SETTINGS:
                        self.lose(f"settings.{k}", "no trainfleet manifest setting means this; left out")
            else:
                self.lose(key, "no trainfleet manifest key means this; left out")
        return out


def _flat_hosts(raw: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """``[hosts.pi.lan]`` (unquoted: TOML nests it) and ``[hosts."pi.lan"]`` both as host ``pi.lan``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if not isinstance(value, dict):
            continue
        own = {k: v for k, v in value.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in value.items() if isinstance(v, dict)}
        if own or not nested:
            out[prefix + key] = own
        out.update(_flat_hosts(nested, f"{prefix}{key}."))
    return out


def _hyper_type(values: list[Any]) -> str | None:
    kinds = set()
    for value in values:
        if isinstance(value, bool):
            kinds.add("bool")
        elif isinstance(value, int):
            kinds.add("int")
        elif isinstance(value, float) and math.isfinite(value):
            kinds.add("float")
        elif isinstance(value, str):
            kinds.add("str")
        else:
            return None
    if kinds == {"int", "float"}:
        return "float"
    return kinds.pop() if len(kinds) == 1 else None


def translate(
    doc: dict[str, Any], rows: list[QueueRow], commands: dict[str, tuple[str, ...]] | None, *, file: str
) -> Translation:
    """The trainfleet manifest of a predecessor manifest (and of the queue rows it lacks)."""
    tr = _Translator(doc, rows, commands)
    top = tr.top()
    hosts = tr.hosts()
    entries = tr.entries()
    for entry in entries:
        entry.table = tr.job_table(entry) or {}
    models = tr.models(entries)
    template = None
    missing = sorted(m for m in models if not (commands or {}).get(m))
    if missing:
        template = commands_template(missing)
        tr.lose(
            f"command of {', '.join(missing)}",
            "the predecessor's manifest names no command (its worker ran training/trainer/run.py); a placeholder "
            "is written: fill in the template and import again with --commands FILE",
        )
    while True:
        kept = [e for e in entries if e.table]
        text = render(top, models, hosts, kept)
        try:
            manifest = parse_manifest(text, file=file)
            break
        except ManifestError as exc:
            if not _drop_refused(exc, top, entries, tr):
                raise
    by_name = {spec.name: spec for spec in manifest.jobs}
    for entry in kept:
        entry.job_id = by_name[entry.table["name"]].job_id
    return Translation(text, manifest, kept, tr.lost, template)


def _drop_refused(exc: ManifestError, top: dict[str, Any], entries: list[_Entry], tr: _Translator) -> bool:
    """Leave out what this trainfleet's manifest refuses (a manifest name before it knew one, a
    job): each is reported. False when a problem is not about one of those (a bug here)."""
    dropped = False
    for problem in exc.problems:
        entry = next((e for e in entries if e.table and e.table["name"] == problem.job), None)
        if entry is not None:
            tr.lose(f"job {entry.name}", f"{problem.message}; the job is left out")
            entry.table = {}
            dropped = True
        elif problem.job is None and problem.field == "name" and "name" in top:
            tr.lose("name", f"this trainfleet's manifest has no name ({problem.message}); left out")
            top.pop("name")
            dropped = True
    return dropped


def commands_template(models: Iterable[str]) -> str:
    lines = [
        "# trainfleet import --commands FILE: the command that trains each model, as an array of words.",
        "# An agent runs it as: <command> --<hyper>=<value>... --mode=<mode> --seed=<seed> --out=<dir>",
        "# (docs/operations.md, 'What a trainer gets'); the predecessor's worker ran training/trainer/run.py.",
    ]
    lines += [f'{model} = ["python", "training/trainer/run.py", "--model", "{model}"]  # check me' for model in models]
    return "\n".join(lines) + "\n"


# -- TOML out ------------------------------------------------------------------------
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(value: str) -> str:
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "nan"  # (not finite: the manifest refuses it, named)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    return _string(str(value))  # (dates and times: a string, as the manifest asks)


def render(
    top: dict[str, Any], models: dict[str, dict[str, Any]], hosts: dict[str, dict[str, Any]], entries: list[_Entry]
) -> str:
    lines = [
        f"# Written by `trainfleet import --from {SOURCE}` (docs/migrating.md).",
        f"schema_version = {top['schema_version']}",
    ]
    if "name" in top:
        lines.append(f"name = {_value(top['name'])}")
    if top.get("settings"):
        lines += ["", "[settings]", *(f"{_key(k)} = {_value(v)}" for k, v in top["settings"].items())]
    for model, decl in models.items():
        lines += ["", f"[models.{_key(model)}]"]
        lines += [f"command = {_value(decl['command'])}", f"modes = {_value(decl['modes'])}"]
        for param, spec in decl["hyper"].items():
            lines.append(f"hyper.{_key(param)} = {_value(spec)}")
    for host_id, policy in hosts.items():
        lines += ["", f"[hosts.{_key(host_id)}]", *(f"{_key(k)} = {_value(v)}" for k, v in policy.items())]
    for entry in entries:
        lines.append("")
        if entry.origin == "queue":
            lines.append("# from training_jobs.db only (gone from the manifest, never cancelled there)")
        lines.append("[[jobs]]")
        lines += [f"{_key(k)} = {_value(v)}" for k, v in entry.table.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# the queue and the store
# ---------------------------------------------------------------------------


@dataclass
class _Moved:
    """What the queue and store import did."""

    new: list[dict[str, Any]] = field(default_factory=list)
    existing: int = 0
    uploaded: int = 0
    sync: dict[str, Any] = field(default_factory=dict)


def _reason(row: QueueRow) -> str:
    return f"imported from {SOURCE} (its job {row.job_id[:12]}, {row.status})"


def _record(base: JobRecord, row: QueueRow, status: JobStatus, **changes: Any) -> JobRecord:
    """``base`` (the controller's new record for the job) in the state ``row`` had."""
    fields: dict[str, Any] = {
        "status": status,
        "attempt": row.attempts,
        "claimed_by": row.claimed_by,
        "claimed_at": row.claimed_at,
        "heartbeat_at": row.heartbeat_at,
        "last_error": row.last_error,
        "reason": _reason(row),
        "created_at": row.created_at or base.created_at,
        "updated_at": row.updated_at or base.updated_at,
    }
    return base.evolve(**{**fields, **changes})


class _Mover:
    def __init__(self, broker: Broker, translation: Translation, store: Path, lost: list[Lost]):
        self.broker = broker
        self.translation = translation
        self.store = store
        self.lost = lost
        self.index = read_index(store)
        self.controller = Controller(broker.settings, handle_signals=False)
        self.controller.broker = broker  # its sync, records and tickets, on this connection
        self.artifacts = Artifacts(broker)
        self.moved = _Moved()

    async def run(self) -> _Moved:
        manifest = self.translation.manifest
        for entry in self.translation.entries:
            if entry.row is not None:
                await self._bring(entry, entry.row, manifest.job_by_id(entry.job_id))
        self.moved.sync = (await self.controller.sync(manifest)).to_dict()
        return self.moved

    async def _bring(self, entry: _Entry, row: QueueRow, spec: JobSpec | None) -> None:
        assert spec is not None
        try:
            await get_record(self.broker, spec.job_id)
            self.moved.existing += 1  # brought in before (or synced): left as it is
            return
        except JobNotFound:
            pass
        base = self.controller._new_record(self.translation.manifest, spec)
        record = await self._state(entry, row, spec, base)
        await put_spec(self.broker, spec, self.controller.signer)
        if not await create_record(self.broker, record):
            self.moved.existing += 1
            return
        if record.status == JobStatus.PENDING:
            await self.controller._ticket(record, record.klass)
        self.moved.new.append(
            {"name": spec.name, "job_id": spec.job_id, "predecessor": row.job_id, "state": record.status.value}
        )

    async def _state(self, entry: _Entry, row: QueueRow, spec: JobSpec, base: JobRecord) -> JobRecord:
        label = f"job {entry.name}"
        if row.status == "completed":
            try:
                return await self._completed(row, spec, base)
            except _NotCarried as exc:
                self.lost.append(Lost(f"{label}: artifact", f"{exc}; imported as failed (requeue it to train again)"))
                error = f"imported from {SOURCE} as completed, but its artifact could not be carried: {exc}"
                return _record(base, row, JobStatus.FAILED, last_error=error, finished_at=row.completed_at)
        if row.status in ("failed", "cancelled"):
            return _record(base, row, JobStatus(row.status), finished_at=row.updated_at)
        if row.status in ("claimed", "running"):
            why = f"was {row.status}: imported as pending, that run is lost"
            self.lost.append(Lost(f"{label}: its run on {row.claimed_by}", why))
        elif row.status != "pending":
            self.lost.append(Lost(label, f"unknown predecessor status {row.status!r}: imported as pending"))
        return _record(
            base, row, JobStatus.PENDING, claimed_by=None, claimed_at=None, heartbeat_at=None, queued_at=time.time()
        )

    async def _completed(self, row: QueueRow, spec: JobSpec, base: JobRecord) -> JobRecord:
        sha = row.artifact_id or ""
        if not _SHA256.fullmatch(sha):
            raise _NotCarried(f"the queue records no sha256 artifact id ({sha[:80]!r})")
        where = self.store / f"{row.spec.get('model')}_{row.spec.get('mode')}" / sha
        bundle = where / "bundle.tar.zst"
        if not bundle.is_file():
            raise _NotCarried(f"{bundle} is not in the store")
        actual = await asyncio.to_thread(_sha256_file, bundle)
        if actual != sha:
            raise _NotCarried(f"{bundle} hashes to {actual}, not the {sha} the queue recorded")
        meta = _read_meta(where / "meta.json", sha, self.lost)
        attempt = max(row.attempts, 1)
        provenance = {
            "imported_from": SOURCE,
            "job": msgspec.to_builtins(spec),
            "attempt": attempt,
            "generation": base.generation,
            "host": {"host_id": meta.get("worker") or row.claimed_by},
            "timings": {"claimed_at": row.claimed_at, "started_at": row.claimed_at, "finished_at": row.completed_at},
            "predecessor": {
                "job_id": row.job_id,
                "name": row.name,
                "artifact_id": sha,
                "spec": row.spec,
                "meta": meta,
                "index": self.index.get(sha, []),
            },
        }
        stored, size, metrics = await self._upload(bundle, provenance, spec, base.generation, attempt)
        if not isinstance(meta.get("metrics"), dict):
            meta["metrics"] = metrics
        return _record(
            base,
            row,
            JobStatus.COMPLETED,
            attempt=attempt,
            started_at=row.claimed_at,
            finished_at=row.completed_at or row.updated_at,
            artifact=stored,
            artifact_bytes=size,
            metrics=meta["metrics"],
        )

    async def _upload(
        self, bundle: Path, provenance: dict[str, Any], spec: JobSpec, generation: int, attempt: int
    ) -> tuple[str, int, dict[str, Any]]:
        """Repack the predecessor's bundle as a trainfleet one, upload it, check the stored digest."""
        limit = self.broker.settings.max_artifact_bytes
        objects = hasattr(self.artifacts, "put_provenance")  # provenance beside bundles (else inside)
        with tempfile.TemporaryDirectory(prefix="trainfleet-import-") as tmp:
            output = Path(tmp) / "output"
            await asyncio.to_thread(_unpack, bundle, output, limit)
            metrics = _metrics(output / "metrics.json")
            provenance["artifact_from"] = str(bundle)
            packed = await asyncio.to_thread(
                build_bundle, output, None if objects else provenance, Path(tmp) / "bundle.tar.zst"
            )
            sha = await self.artifacts.put(packed)
            info = await self.artifacts.info(sha)
            digest = parse_digest(info.digest) if info is not None else None
            if info is None or digest is None or digest.hex() != packed.sha256 or info.size != packed.size:
                raise _NotCarried(f"the object store does not hold {packed.sha256} as uploaded")
            if objects:
                provenance["artifact"] = sha
                await self.artifacts.put_provenance(spec.job_id, generation, attempt, provenance)
        self.moved.uploaded += 1
        return sha, packed.size, metrics


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_meta(path: Path, sha: str, lost: list[Lost]) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        lost.append(Lost(f"{path}", f"unreadable ({exc}); the run's provenance has only what the queue recorded"))
        return {}
    if not isinstance(meta, dict):
        return {}
    if meta.get("artifact_id") not in (None, sha):
        lost.append(Lost(f"{path}", f"names artifact {meta.get('artifact_id')!r}, not {sha}; kept as it is"))
    return meta


def _metrics(path: Path) -> dict[str, Any]:
    """The bundle's metrics.json (trainfleet's convention), when it has one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _unpack(bundle: Path, output: Path, max_bytes: int) -> None:
    """The predecessor's bundle's regular files and directories into ``output``: anything else
    (a link, a device, a path leaving ``output``), or more than ``max_bytes``, is refused."""
    output.mkdir(parents=True)
    total = 0
    try:
        with open(bundle, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as zr:
            with tarfile.open(fileobj=zr, mode="r|") as tar:
                for member in tar:
                    parts = tuple(p for p in PurePosixPath(member.name).parts if p != ".")
                    if not parts:
                        continue
                    if member.name.startswith("/") or ".." in parts or "\0" in member.name:
                        raise _NotCarried(f"its member {member.name!r} would land outside the output dir")
                    path = output.joinpath(*parts)
                    if member.isdir():
                        path.mkdir(parents=True, exist_ok=True)
                    elif member.isfile():
                        total += member.size
                        if total > max_bytes:
                            raise _NotCarried(f"it holds more than max_artifact_bytes ({max_bytes})")
                        path.parent.mkdir(parents=True, exist_ok=True)
                        source = tar.extractfile(member)
                        assert source is not None
                        with open(path, "xb") as out:
                            while chunk := source.read(1 << 20):
                                out.write(chunk)
                        os.chmod(path, 0o755 if member.mode & 0o111 else 0o644)
                    else:
                        raise _NotCarried(f"its member {member.name!r} is not a regular file or directory")
    except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as exc:
        raise _NotCarried(f"{bundle} cannot be read as a tar.zst bundle: {exc}") from exc


async def _connect(settings: Settings) -> Broker:
    """Bind to the fleet's resources, provisioning them first when missing (admin)."""
    try:
        return await Broker.connect(settings, name="trainfleet-import")
    except NotProvisioned:
        return await Broker.connect(settings, name="trainfleet-import", provision=True)


async def bring(settings: Settings, translation: Translation, store: Path, lost: list[Lost]) -> _Moved:
    broker = await _connect(settings)
    try:
        return await _Mover(broker, translation, store, lost).run()
    finally:
        await broker.close()


# ---------------------------------------------------------------------------
# the verb
# ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="the predecessor's manifest (TOML)")
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="what the manifest is from")
    p.add_argument("--db", help="its queue (training_jobs.db): bring its jobs in (needs --store and --commands)")
    p.add_argument("--store", help="its artifact store (the directory holding index.jsonl and <model>_<mode>/)")
    p.add_argument("--commands", help="TOML or JSON file: model = command (without it a template is printed)")
    p.add_argument("--out", help="the trainfleet manifest to write (default: MANIFEST's name with .trainfleet.toml)")
    p.add_argument("--force", action="store_true", help="replace --out when it exists with other content")
    p.add_argument(
        "--signing-key",
        metavar="SEED_FILE",
        help="the controller's spec-signing nkey seed (env TRAINFLEET_SIGNING_KEY), as `trainfleet controller` has",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")


def cmd_import(args: argparse.Namespace) -> int:
    source = Path(args.manifest)
    out = Path(args.out) if args.out else source.with_name(f"{source.stem}.trainfleet.toml")
    if bool(args.db) != bool(args.store):
        raise UsageError("--db and --store go together: the queue's completed jobs need their artifacts")
    if out.resolve() == source.resolve():
        raise UsageError(f"--out {out} is the predecessor's manifest itself; write elsewhere")
    commands = read_commands(Path(args.commands)) if args.commands else None
    rows = read_queue(Path(args.db)) if args.db else []
    translation = translate(read_toml(source, "the manifest"), rows, commands, file=str(out))
    if args.db and translation.template is not None:
        raise UsageError(
            "with --db every model needs its command (pending jobs are ticketed at once): fill in this template "
            "and pass it as --commands FILE:\n" + translation.template
        )
    written = _write(out, translation.text, force=args.force)
    lost = list(translation.lost)
    report: dict[str, Any] = {
        "source": SOURCE,
        "manifest": str(source),
        "out": str(out),
        "written": written,
        "jobs": len(translation.entries),
        "models": sorted(translation.manifest.models),
        "commands_template": translation.template,
    }
    if args.db:
        settings = from_flags(args).with_(signing_key=args.signing_key)
        moved = asyncio.run(bring(settings, translation, Path(args.store), lost))
        created = moved.sync.get("created", [])
        report["queue"] = {
            "rows": len(rows),
            "new": len(moved.new) + len(created),
            "brought": moved.new,
            "created_by_sync": created,
            "existing": moved.existing,
            "artifacts_uploaded": moved.uploaded,
            "sync": moved.sync,
        }
        if moved.sync.get("refused"):
            lost += [Lost(f"job {r['name']}", r["reason"]) for r in moved.sync["refused"]]
    report["not_carried"] = [{"what": item.what, "why": item.why} for item in lost]
    report["exit_code"] = EXIT_NOT_CARRIED if lost else EXIT_OK
    view.show(report, args.json, report_text)
    return int(report["exit_code"])


def _write(path: Path, text: str, *, force: bool) -> str:
    """Write the manifest: "written", or "unchanged" when it holds this text already."""
    try:
        current = path.read_text()
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if current == text:
        return "unchanged"
    if current is not None and not force:
        raise UsageError(f"{path} exists with other content (edited by hand?): pass --force to replace it")
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    os.replace(tmp, path)
    return "written"


def report_text(report: dict[str, Any]) -> str:
    lines = [
        f"{report['written']} {report['out']}: {report['jobs']} job(s) of model(s) {', '.join(report['models'])} "
        f"from {report['manifest']}"
    ]
    queue = report.get("queue")
    if queue is not None:
        states = Counter(j["state"] for j in queue["brought"])
        by_state = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
        lines.append(
            f"queue: {queue['rows']} row(s); {queue['new']} new job(s) ({by_state} from the queue, "
            f"{len(queue['created_by_sync'])} pending from the manifest only), {queue['existing']} already here; "
            f"{queue['artifacts_uploaded']} artifact(s) uploaded"
        )
    if report["commands_template"]:
        lines += ["", "commands template (fill in, save, pass as --commands FILE):", report["commands_template"]]
    lost = report["not_carried"]
    if lost:
        lines += ["", f"NOT CARRIED ({len(lost)}):", *(f"  - {item['what']}: {item['why']}" for item in lost)]
    else:
        lines.append("everything was carried")
    return "\n".join(lines)
