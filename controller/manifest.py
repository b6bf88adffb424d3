"""Load and validate the TOML job manifest.

The manifest declares models (command, modes, a typed hyper-parameter schema),
host policies and jobs. :func:`load_manifest` resolves every job into a
:class:`~trainfleet.broker.schema.JobSpec` with a content-derived ``job_id``,
or raises one :class:`~trainfleet.broker.errors.ManifestError` listing *every*
problem found, each naming the file, the job and the field: a user fixing a
manifest should see all mistakes in one run, not one per run.

Validation is strict: unknown keys are errors (a typo such as ``min_ram_gb``
would otherwise silently drop a constraint), hyper values are type-checked
against the model's schema, and float parameters are normalised so that
``lr = 1`` and ``lr = 1.0`` name the same job.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import fnmatch
import gc
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from trainfleet.broker.errors import ManifestError, ManifestProblem
from trainfleet.broker.names import (
    ENV_RULE,
    HOST_ID_RULE,
    HYPER_PATTERN,
    NAME_PATTERN,
    RESERVED_FLAGS,
    is_env_name,
    is_host_id,
    is_hyper_name,
    is_name,
)
from trainfleet.broker.schema import Constraints, JobSpec
from trainfleet.broker.specs import job_id_for
from trainfleet.broker.tickets import ticket_class

try:
    # tomli is the parser the standard library's tomllib was made from (same TOML 1.0, same
    # errors: pinned below 2.4, which reads TOML 1.1), compiled: it reads a 100k-job manifest
    # in ~1 s where tomllib takes ~2.3 s. Without it, tomllib reads the same files.
    import tomli as tomllib
except ImportError:  # pragma: no cover - tomli is a dependency; a bare install still parses
    import tomllib

__all__ = [
    "HYPER_TYPES",
    "MANIFEST_SCHEMA_VERSION",
    "HostPolicy",
    "HyperParam",
    "Manifest",
    "ManifestSettings",
    "ModelDef",
    "job_id_for",
    "load_manifest",
    "excluded_hosts",
    "parse_manifest",
]

# What a good name is, in the words a problem uses (broker/names.py has the patterns).
NAME_RULE = f"must be a name matching {NAME_PATTERN} (letters, digits, '.', '_' and '-'; no spaces or slashes)"
HYPER_RULE = f"must match {HYPER_PATTERN} and not be one of the agent's own flags ({', '.join(sorted(RESERVED_FLAGS))})"

# The manifest format's own version; independent of the record SCHEMA_VERSION.
MANIFEST_SCHEMA_VERSION = 1
HYPER_TYPES: tuple[str, ...] = ("int", "float", "str", "bool")

_TOP_KEYS = ("schema_version", "name", "settings", "models", "hosts", "jobs")
# The manifest's (the fleet's) name: shown by status, the monitor and `up`.
FLEET_NAME_MAX = 128
_SETTINGS_KEYS = ("prefer_cuda_grace_s", "max_attempts")
_MODEL_KEYS = ("command", "modes", "data", "requires", "env", "hyper")
_PARAM_KEYS = ("type", "default", "choices", "min", "max")
_HOST_KEYS = (
    "allow_jobs",
    "deny_jobs",
    "allow_job_names",
    "deny_job_names",
    "max_cores",
    "max_ram_gib",
    "max_vram_gib",
    "cpu_slots",
    "gpu_slots",
    "serve_cpu",
)
_JOB_KEYS = (
    "name",
    "model",
    "mode",
    "hyper",
    "data",
    "split_recipe",
    "seed",
    "priority",
    "require_cuda",
    "prefer_cuda",
    "min_vram_gib",
    "min_ram_gib",
    "min_cores",
    "allowed_hosts",
    "denied_hosts",
)
_JOB_FLAGS = ("require_cuda", "prefer_cuda")
_JOB_MINIMA = ("min_vram_gib", "min_ram_gib", "min_cores")
_JOB_HOST_LISTS = ("allowed_hosts", "denied_hosts")
_JOB_CONSTRAINT_KEYS = frozenset(_JOB_FLAGS + _JOB_MINIMA + _JOB_HOST_LISTS)
_NO_CONSTRAINTS = Constraints()

_T = TypeVar("_T")


# ---------------------------------------------------------------------------
# public data model
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HyperParam:
    """One typed hyper-parameter of a model (``[models.NAME.hyper.PARAM]``).

    ``has_default`` tells a declared ``default`` apart from none (a default may
    legitimately be any value); a parameter without one is required of every job.
    """

    name: str
    type: str
    default: Any = None
    has_default: bool = False
    choices: tuple[Any, ...] | None = None
    min: int | float | None = None
    max: int | float | None = None

    def check(self, value: Any) -> Any:
        """Type-check ``value``, enforce choices/min/max; return it normalised.

        Raises :class:`ValueError` with a message suitable for a ManifestProblem.
        """
        value = _HYPER_COERCERS[self.type](value)
        if self.choices is not None and value not in self.choices:
            raise _Invalid(f"{_show(value)} is not one of the choices {_show(list(self.choices))}")
        if self.min is not None and value < self.min:
            raise _Invalid(f"{_show(value)} is below min {_show(self.min)}")
        if self.max is not None and value > self.max:
            raise _Invalid(f"{_show(value)} is above max {_show(self.max)}")
        return value


@dataclass(frozen=True)
class ModelDef:
    """A trainable model: how to run it, its modes, hyper schema and data defaults."""

    name: str
    command: tuple[str, ...]
    modes: tuple[str, ...]
    hyper: dict[str, HyperParam]
    data: dict[str, Any]
    requires: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # what its trainers get in their environment


@dataclass(frozen=True)
class HostPolicy:
    """An operator's policy for one host: which jobs it takes and resource caps.

    ``None`` caps mean "not overridden" (the agent uses what it detects).
    """

    host_id: str
    allow_jobs: tuple[str, ...] = ()
    deny_jobs: tuple[str, ...] = ()
    max_cores: float | None = None
    max_ram_gib: float | None = None
    max_vram_gib: float | None = None
    cpu_slots: int | None = None
    gpu_slots: int | None = None
    serve_cpu: bool | None = None
    allow_job_names: tuple[str, ...] = ()
    deny_job_names: tuple[str, ...] = ()

    def permits(self, spec: JobSpec) -> tuple[bool, str]:
        """Whether this host may run ``spec``: ``(True, "")`` or ``(False, reason)``; the
        reason names the host, the rule (its key in ``[hosts.<id>]``) and the pattern that decided.

        Patterns are fnmatch globs (case-sensitive). ``allow_jobs`` / ``deny_jobs`` match the
        job's *model* (as the predecessor's did); ``allow_job_names`` / ``deny_job_names``
        match its job name. A matching deny pattern wins over any allow list; an empty allow
        list allows everything not denied, and a job must pass both allow lists that are set.
        """
        rules = (
            ("deny_jobs", self.deny_jobs, "model", spec.model),
            ("deny_job_names", self.deny_job_names, "job", spec.name),
        )
        for key, patterns, what, value in rules:
            pattern = next((p for p in patterns if fnmatch.fnmatchcase(value, p)), None)
            if pattern is not None:
                return False, f"{self._rule(key)} pattern {pattern!r} matches {what} {value!r}"
        allows = (
            ("allow_jobs", self.allow_jobs, "model", spec.model),
            ("allow_job_names", self.allow_job_names, "job", spec.name),
        )
        for key, patterns, what, value in allows:
            if patterns and not any(fnmatch.fnmatchcase(value, p) for p in patterns):
                return False, f"{self._rule(key)} {_show(list(patterns))} does not match {what} {value!r}"
        return True, ""

    def _rule(self, key: str) -> str:
        """How a reason names a rule: ``host policy of pi-1: deny_jobs``."""
        return f"host policy of {self.host_id}: {key}"


@dataclass(frozen=True)
class ManifestSettings:
    """Fleet-wide settings from ``[settings]``; ``None`` means "use the default"."""

    prefer_cuda_grace_s: float | None = None
    max_attempts: int | None = None


@dataclass(frozen=True)
class Manifest:
    """A fully validated manifest: every job resolved to a JobSpec with its id."""

    path: str
    schema_version: int
    settings: ManifestSettings
    models: dict[str, ModelDef]
    hosts: dict[str, HostPolicy]
    jobs: tuple[JobSpec, ...]
    name: str = ""  # the manifest's top-level ``name`` ("" when it has none)

    def job_by_id(self, job_id: str) -> JobSpec | None:
        """The job whose id is exactly ``job_id``, or None."""
        return next((spec for spec in self.jobs if spec.job_id == job_id), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (for ``--json`` output): file, settings, models, hosts, jobs."""
        return {
            "file": self.path,
            "name": self.name,
            "schema_version": self.schema_version,
            "settings": msgspec.to_builtins(self.settings),
            "models": {name: msgspec.to_builtins(model) for name, model in self.models.items()},
            "hosts": {host: msgspec.to_builtins(policy) for host, policy in self.hosts.items()},
            "jobs": [_job_json(spec) for spec in self.jobs],
        }


def excluded_hosts(manifest: Manifest, spec: JobSpec) -> dict[str, str]:
    """host id → why the manifest's host policy (allow_jobs / deny_jobs on models,
    allow_job_names / deny_job_names on job names) keeps ``spec`` off it."""
    out = {}
    for host_id, policy in manifest.hosts.items():
        ok, reason = policy.permits(spec)
        if not ok:
            out[host_id] = reason
    return out


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate the manifest at ``path``; raise ManifestError on any problem."""
    file = os.fspath(path)
    try:
        raw = Path(file).read_bytes()
    except FileNotFoundError:
        # ``from None``: the OS traceback adds nothing to "file not found".
        raise ManifestError([ManifestProblem(file, "manifest file not found")]) from None
    except OSError as exc:
        raise ManifestError([ManifestProblem(file, f"cannot read manifest: {exc.strerror or exc}")]) from None
    try:
        # utf-8-sig: editors on Windows like to prepend a BOM, which tomllib rejects.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problem = ManifestProblem(file, f"not UTF-8 text (bad byte at offset {exc.start})")
        raise ManifestError([problem]) from None
    return parse_manifest(text, file)


def parse_manifest(text: str, file: str = "<string>") -> Manifest:
    """Validate manifest ``text``; ``file`` names it in every problem reported."""
    with _no_cycle_collection():
        return _parse(text, file)


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Parsing makes ~15 objects per job and none that form a cycle; the cyclic collector would
    still walk the growing heap again and again (~0.25 s of a 100k-job parse). Nothing else runs
    meanwhile: parsing never awaits."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _parse(text: str, file: str) -> Manifest:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends with "(at line L, column C)".
        raise ManifestError([ManifestProblem(file, f"TOML syntax error: {exc}")]) from None
    sink = _Sink(file)
    top = _Scope(sink)
    _unknown_keys(top, doc, _TOP_KEYS)
    version = _schema_version(top, doc)
    name = _good(_take(top, doc, "name", _fleet_name, default=""), "")
    settings = _parse_settings(sink, doc)
    models = _parse_models(sink, doc)
    hosts = _parse_hosts(sink, doc)
    jobs = _parse_jobs(sink, doc, models)
    if sink.problems:
        raise ManifestError(sink.problems)
    return Manifest(
        path=file,
        schema_version=version,
        settings=settings,
        models={name: check.model for name, check in models.items()},
        hosts=hosts,
        jobs=tuple(jobs),
        name=name,
    )


# ---------------------------------------------------------------------------
# problem collection and value converters
# ---------------------------------------------------------------------------


class _Invalid(ValueError):
    """A value failed a check; the message becomes a ManifestProblem's message."""


# Returned by _take when a value was bad (and a problem recorded), so callers
# can tell "bad" from a legitimate None default.
_BAD: Any = object()


class _Sink:
    """Every problem found in one file, in the order found."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[ManifestProblem] = []


@dataclass(frozen=True)
class _Scope:
    """Where problems are attributed: a job label and/or a field prefix."""

    sink: _Sink
    job: str | None = None
    prefix: str = ""

    def add(self, message: str, key: str | None = None) -> None:
        field = self.prefix + key if key is not None else (self.prefix.rstrip(".") or None)
        self.sink.problems.append(ManifestProblem(self.sink.file, message, job=self.job, field=field))

    def child(self, key: str) -> _Scope:
        return _Scope(self.sink, self.job, f"{self.prefix}{key}.")

    def mark(self) -> int:
        return len(self.sink.problems)

    def clean_since(self, mark: int) -> bool:
        return len(self.sink.problems) == mark


def _take(
    scope: _Scope,
    table: dict[str, Any],
    key: str,
    conv: Callable[[Any], Any],
    default: Any = None,
    required: bool = False,
) -> Any:
    """``conv(table[key])``; a missing key gives ``default``, a bad one a problem and _BAD."""
    if key not in table:
        if required:
            scope.add(f"required key {key!r} is missing", key)
            return _BAD
        return default
    try:
        return conv(table[key])
    except _Invalid as exc:
        scope.add(str(exc), key)
        return _BAD


def _good(value: Any, fallback: Any) -> Any:
    return fallback if value is _BAD else value


def _unknown_keys(scope: _Scope, table: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in table:
        if key in allowed:
            continue
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
        scope.add(f"unknown key {key!r} ({hint})", key)


# Order matters: bool before int (bool is an int subclass), datetime before date.
_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
    (_dt.datetime, "datetime"),
    (_dt.date, "date"),
    (_dt.time, "time"),
)


def _show(value: Any) -> str:
    """``value`` as TOML-ish text (true, "x", [1, 2]), shortened for messages."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(value: Any) -> str:
    kind = next((name for typ, name in _TOML_TYPES if isinstance(value, typ)), type(value).__name__)
    return f"{kind} {_show(value)}"


def _is_int(value: Any) -> bool:
    # TOML booleans arrive as Python bools, which are ints: exclude them.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_at_least(minimum: int | None) -> Callable[[Any], int]:
    wanted = "an integer" if minimum is None else f"an integer >= {minimum}"

    def conv(value: Any) -> int:
        if not _is_int(value) or (minimum is not None and value < minimum):
            raise _Invalid(f"must be {wanted}, got {_describe(value)}")
        return value

    return conv


def _finite(value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise _Invalid(f"must be a finite number, got {_describe(value)}")
    return value


def _number_at_least(minimum: float) -> Callable[[Any], float]:
    def conv(value: Any) -> float:
        if not _is_number(value) or not math.isfinite(value) or value < minimum:
            raise _Invalid(f"must be a number >= {minimum:g}, got {_describe(value)}")
        return float(value)

    return conv


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_describe(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"must be a non-empty string, got {_describe(value)}")
    return value


def _table(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"must be a table, got {_describe(value)}")
    return value


def _str_list(
    value: Any, *, nonempty: bool = False, ok: Callable[[str], bool] | None = None, what: str = "a string"
) -> tuple[str, ...]:
    """A TOML array of strings; ``ok`` vets each item (``what`` says what an item must be)."""
    if not isinstance(value, list) or (nonempty and not value):
        size = "a non-empty" if nonempty else "an"
        raise _Invalid(f"must be {size} array of strings, got {_describe(value)}")
    bad = [item for item in value if not isinstance(item, str) or (ok is not None and not ok(item))]
    if bad:
        raise _Invalid(f"every item must be {what}; bad: {', '.join(_show(b) for b in bad)}")
    return tuple(value)


def _fleet_name(value: Any) -> str:
    """The manifest's ``name``: free text for people (shown in status and the monitor), one
    line of printable characters."""
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"must be a non-empty string, got {_describe(value)}")
    if len(value) > FLEET_NAME_MAX or not value.isprintable():
        raise _Invalid(f"must be one line of at most {FLEET_NAME_MAX} printable characters, got {_describe(value)}")
    return value.strip()


def _host_list(value: Any) -> tuple[str, ...]:
    hosts = _str_list(value, ok=is_host_id, what="a host id (a hostname: letters, digits, '_', '-' and dots)")
    # Duplicates would change the job id (train_hosts) without changing meaning.
    return tuple(dict.fromkeys(hosts))


def _glob_list(value: Any) -> tuple[str, ...]:
    return _str_list(value, ok=bool, what="a non-empty glob pattern")


def _module_name(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _job_name(value: Any) -> str:
    if not is_name(value):
        raise _Invalid(f"{NAME_RULE}, got {_describe(value)}")
    return value


def _trainer_env(value: Any) -> dict[str, str]:
    """A model's ``env``: variables its trainers get (names in capitals; never NATS_* or
    TRAINFLEET_*: those are the agent's, and a trainer never gets them)."""
    table = _table(value)
    for key, item in table.items():
        if not is_env_name(key):
            raise _Invalid(f"{key!r} is not an environment variable name this can set ({ENV_RULE})")
        if not isinstance(item, str):
            raise _Invalid(f"{key} must be a string, got {_describe(item)}")
    return dict(table)


def _modes(value: Any) -> tuple[str, ...]:
    modes = _str_list(value, nonempty=True, ok=is_name, what="a mode name (letters, digits, '.', '_', '-')")
    if len(set(modes)) != len(modes):
        raise _Invalid(f"modes must be distinct, got {_show(list(modes))}")
    return modes


def _command(value: Any) -> tuple[str, ...]:
    command = _str_list(value, nonempty=True)
    if not command[0]:
        raise _Invalid("the program (first item) must not be empty")
    return command


def _json_value(value: Any, path: str) -> None:
    """Reject what canonical JSON (the job id) cannot carry: dates/times, NaN/inf."""
    if isinstance(value, dict):
        for key, item in value.items():
            _json_value(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _json_value(item, f"{path}[{index}]")
    elif isinstance(value, _dt.date | _dt.time):
        raise _Invalid(f"{path}: TOML dates and times are not supported (use a string): {_describe(value)}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(f"{path}: must be a finite number, got {_describe(value)}")


def _data_recipe(value: Any) -> dict[str, Any]:
    """A job's ``split_recipe``: a table (like ``data``) or a string naming the split."""
    if isinstance(value, str) and value:
        return {"split": value}
    if isinstance(value, dict):
        return _json_table(value)
    raise _Invalid(
        f"must be a table (the data recipe) or a non-empty string (the split's name), got {_describe(value)}"
    )


def _json_table(value: Any) -> dict[str, Any]:
    table = _table(value)
    for key, item in table.items():
        _json_value(item, key)
    return table


# -- hyper values -------------------------------------------------------------


def _hyper_int(value: Any) -> int:
    if not _is_int(value):
        raise _Invalid(f"must be an integer, got {_describe(value)}")
    return value


def _hyper_float(value: Any) -> float:
    try:
        result = float(value) if _is_number(value) else math.nan
    except OverflowError:  # an int too large for a float
        result = math.nan
    if not math.isfinite(result):
        raise _Invalid(f"must be a finite number (int or float), got {_describe(value)}")
    # Normalise: lr = 1 and lr = 1.0 must give the same job id.
    return result


def _hyper_str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_describe(value)}")
    return value


_HYPER_COERCERS: dict[str, Callable[[Any], Any]] = {
    "int": _hyper_int,
    "float": _hyper_float,
    "str": _hyper_str,
    "bool": _boolean,
}


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------


def _schema_version(scope: _Scope, doc: dict[str, Any]) -> int:
    if "schema_version" not in doc:
        hint = f"add schema_version = {MANIFEST_SCHEMA_VERSION} at the top"
        scope.add(f"required key 'schema_version' is missing ({hint})", "schema_version")
        return MANIFEST_SCHEMA_VERSION
    version = doc["schema_version"]
    # A bool equals 1 in Python, so compare the type too.
    if not _is_int(version) or version != MANIFEST_SCHEMA_VERSION:
        scope.add(
            f"unsupported schema_version {_describe(version)}; this trainfleet understands {MANIFEST_SCHEMA_VERSION}",
            "schema_version",
        )
    return MANIFEST_SCHEMA_VERSION


def _section(scope: _Scope, doc: dict[str, Any], key: str, shape: str) -> dict[str, Any]:
    """A top-level table, or {} (with a problem) when it has the wrong shape."""
    value = doc.get(key, {})
    if isinstance(value, dict):
        return value
    scope.add(f"must be a table ({shape}), got {_describe(value)}", key)
    return {}


def _parse_settings(sink: _Sink, doc: dict[str, Any]) -> ManifestSettings:
    raw = _section(_Scope(sink), doc, "settings", "[settings]")
    scope = _Scope(sink, prefix="settings.")
    _unknown_keys(scope, raw, _SETTINGS_KEYS)
    grace = _take(scope, raw, "prefer_cuda_grace_s", _number_at_least(0.0))
    attempts = _take(scope, raw, "max_attempts", _int_at_least(1))
    return ManifestSettings(prefer_cuda_grace_s=_good(grace, None), max_attempts=_good(attempts, None))


# -- named tables ([models.NAME], [hosts.HOST_ID]) ---------------------------------


@dataclass(frozen=True)
class _NamedSection:
    """A top-level section whose entries are tables keyed by a user-chosen name."""

    key: str  # the section's key: "models"
    placeholder: str  # what stands for the name in the section's shape: "NAME"
    label: str  # what a bad name is called in its problem: "model name"
    keys: tuple[str, ...]  # the keys each entry's table may have
    valid: Callable[[str], bool]  # what a good name is
    rule: str  # ... in words, for the problem


_MODELS = _NamedSection("models", "NAME", "model name", _MODEL_KEYS, is_name, NAME_RULE)
_HOSTS = _NamedSection("hosts", "HOST_ID", "host id", _HOST_KEYS, is_host_id, HOST_ID_RULE)


def _parse_named(
    sink: _Sink,
    doc: dict[str, Any],
    section: _NamedSection,
    parse: Callable[[_Scope, str, dict[str, Any]], _T],
    fallback: Callable[[str], _T],
) -> dict[str, _T]:
    """Each entry of ``section``: its name, table shape and keys checked here, its values by ``parse``."""
    raw = _section(_Scope(sink), doc, section.key, f"[{section.key}.{section.placeholder}]")
    parsed: dict[str, _T] = {}
    for name, value in raw.items():
        scope = _Scope(sink, prefix=f"{section.key}.{name}.")
        if not section.valid(name):
            scope.add(f"{section.label} {name!r} {section.rule}")
        if not isinstance(value, dict):
            scope.add(f"must be a table ([{section.key}.{name}]), got {_describe(value)}")
            # A stand-in keeps the name declared, so a job using it is not also told it is undeclared.
            parsed[name] = fallback(name)
            continue
        if section is _HOSTS:
            value = _unquoted_dotted_hosts(scope, name, value)
        _unknown_keys(scope, value, section.keys)
        parsed[name] = parse(scope, name, value)
    return parsed


def _unquoted_dotted_hosts(scope: _Scope, name: str, value: dict[str, Any]) -> dict[str, Any]:
    """``[hosts.pi.lan]`` is TOML for host ``pi`` with a table ``lan``: say to quote the id."""
    nested = [key for key, item in value.items() if isinstance(item, dict) and key not in _HOST_KEYS]
    for key in nested:
        scope.add(f'a host id with dots must be quoted: [hosts."{name}.{key}"], not [hosts.{name}.{key}]', key)
    return {key: item for key, item in value.items() if key not in nested}


# -- models -------------------------------------------------------------------


@dataclass(frozen=True)
class _ModelCheck:
    """A model plus which of its parts were broken, so jobs using it skip
    checks that would only echo the model's own problems."""

    model: ModelDef
    modes_ok: bool = True
    hyper_ok: bool = True
    bad_params: frozenset[str] = frozenset()


def _parse_models(sink: _Sink, doc: dict[str, Any]) -> dict[str, _ModelCheck]:
    return _parse_named(sink, doc, _MODELS, _parse_model, _broken_model)


def _broken_model(name: str) -> _ModelCheck:
    return _ModelCheck(ModelDef(name, (), (), {}, {}), modes_ok=False, hyper_ok=False)


def _parse_model(scope: _Scope, name: str, raw: dict[str, Any]) -> _ModelCheck:
    command = _take(scope, raw, "command", _command, required=True)
    modes = _take(scope, raw, "modes", _modes, required=True)
    data = _take(scope, raw, "data", _json_table, default={})
    requires = _take(scope, raw, "requires", lambda v: _str_list(v, ok=_module_name, what="a module name"), default=())
    env = _take(scope, raw, "env", _trainer_env, default={})
    hyper, hyper_ok, bad_params = _parse_hyper_schema(scope, raw)
    model = ModelDef(
        name=name,
        command=_good(command, ()),
        modes=_good(modes, ()),
        hyper=hyper,
        data=_good(data, {}),
        requires=_good(requires, ()),
        env=_good(env, {}),
    )
    return _ModelCheck(model, modes_ok=modes is not _BAD, hyper_ok=hyper_ok, bad_params=bad_params)


def _parse_hyper_schema(scope: _Scope, raw: dict[str, Any]) -> tuple[dict[str, HyperParam], bool, frozenset[str]]:
    """(params that are valid, whether the hyper table itself is usable, names of broken params)."""
    table = raw.get("hyper", {})
    if not isinstance(table, dict):
        scope.add(f"must be a table of parameter tables ([...hyper.PARAM]), got {_describe(table)}", "hyper")
        return {}, False, frozenset()
    params: dict[str, HyperParam] = {}
    bad: set[str] = set()
    for name, praw in table.items():
        if not is_hyper_name(name):
            scope.child(f"hyper.{name}").add(f"hyper parameter name {name!r} {HYPER_RULE}")
            bad.add(name)
            continue
        param = _parse_param(scope.child(f"hyper.{name}"), name, praw)
        if param is None:
            bad.add(name)
        else:
            params[name] = param
    return params, True, frozenset(bad)


def _parse_param(scope: _Scope, name: str, raw: Any) -> HyperParam | None:
    """One hyper-parameter declaration, or None (problems recorded) when invalid."""
    if not isinstance(raw, dict):
        scope.add(f"must be a table with at least 'type', got {_describe(raw)}")
        return None
    mark = scope.mark()
    _unknown_keys(scope, raw, _PARAM_KEYS)
    ptype = _take(scope, raw, "type", _hyper_type, required=True)
    if ptype is _BAD:
        return None  # nothing else can be checked without knowing the type
    low, high = _param_bounds(scope, ptype, raw)
    choices = _take(scope, raw, "choices", lambda v: _choices(ptype, v))
    param = HyperParam(name, ptype, choices=_good(choices, None), min=low, max=high)
    if "default" in raw:
        # Checked through the param itself, so a default must obey choices/min/max too.
        default = _take(scope, raw, "default", param.check)
        param = replace(param, default=_good(default, None), has_default=True)
    return param if scope.clean_since(mark) else None


def _hyper_type(value: Any) -> str:
    if value not in HYPER_TYPES or not isinstance(value, str):
        raise _Invalid(f"must be one of {', '.join(HYPER_TYPES)}, got {_describe(value)}")
    return value


def _choices(ptype: str, value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f"must be a non-empty array, got {_describe(value)}")
    coerce = _HYPER_COERCERS[ptype]
    try:
        return tuple(coerce(item) for item in value)
    except _Invalid as exc:
        raise _Invalid(f"every choice must be of type {ptype}: {exc}") from None


def _param_bounds(scope: _Scope, ptype: str, raw: dict[str, Any]) -> tuple[Any, Any]:
    bounds = []
    for key in ("min", "max"):
        if key in raw and ptype not in ("int", "float"):
            scope.add(f"{key} only applies to int and float parameters, not {ptype}", key)
            bounds.append(None)
        else:
            bounds.append(_good(_take(scope, raw, key, _finite), None))
    low, high = bounds
    if low is not None and high is not None and low > high:
        scope.add(f"max {_show(high)} is below min {_show(low)}", "max")
    return low, high


# -- hosts --------------------------------------------------------------------


def _parse_hosts(sink: _Sink, doc: dict[str, Any]) -> dict[str, HostPolicy]:
    return _parse_named(sink, doc, _HOSTS, _parse_host, HostPolicy)


def _parse_host(scope: _Scope, host_id: str, raw: dict[str, Any]) -> HostPolicy:
    values: dict[str, Any] = {
        "allow_jobs": _take(scope, raw, "allow_jobs", _glob_list, default=()),
        "deny_jobs": _take(scope, raw, "deny_jobs", _glob_list, default=()),
        "allow_job_names": _take(scope, raw, "allow_job_names", _glob_list, default=()),
        "deny_job_names": _take(scope, raw, "deny_job_names", _glob_list, default=()),
        "serve_cpu": _take(scope, raw, "serve_cpu", _boolean),
    }
    for key in ("max_cores", "max_ram_gib", "max_vram_gib"):
        values[key] = _take(scope, raw, key, _number_at_least(0.0))
    for key in ("cpu_slots", "gpu_slots"):
        values[key] = _take(scope, raw, key, _int_at_least(0))
    # A bad value is reported already; the fallback only keeps the object well-typed.
    clean = {key: _good(value, () if key.endswith(("_jobs", "_names")) else None) for key, value in values.items()}
    return HostPolicy(host_id, **clean)


# -- jobs ---------------------------------------------------------------------


def _parse_jobs(sink: _Sink, doc: dict[str, Any], models: dict[str, _ModelCheck]) -> list[JobSpec]:
    raw = doc.get("jobs", [])
    if not isinstance(raw, list):
        _Scope(sink).add(f"must be an array of tables ([[jobs]]), got {_describe(raw)}", "jobs")
        return []
    specs: list[JobSpec] = []
    names: dict[str, list[int]] = {}
    shared: dict[Any, Any] = {}  # equal immutable parts of many specs, held once
    for index, raw_job in enumerate(raw, start=1):
        name, spec = _parse_job(sink, index, raw_job, models, shared)
        raw[index - 1] = None  # the table is done with: its memory goes to the next specs
        if name is not None:
            names.setdefault(name, []).append(index)
        if spec is not None:
            specs.append(spec)
    _check_duplicate_names(sink, names)
    _check_duplicate_ids(sink, specs)
    return specs


def _parse_job(
    sink: _Sink, index: int, raw: Any, models: dict[str, _ModelCheck], shared: dict[Any, Any]
) -> tuple[str | None, JobSpec | None]:
    """(the job's name if it has a usable one, its JobSpec if it has no problems). Equal
    constraints (frozen), a model's trainer environment and its data recipe (when the job
    keeps it) are shared among the specs through ``shared``, not copied into each one (100k
    jobs hold them once; specs are never changed in place)."""
    if not isinstance(raw, dict):
        _Scope(sink, f"#{index}").add(f"each [[jobs]] entry must be a table, got {_describe(raw)}")
        return None, None
    name = raw.get("name")
    named = is_name(name)
    # A bad name is shown quoted, never as it is (it may hold anything: slashes, escapes)
    scope = _Scope(sink, name if named else f"#{index}" + (f" ({name!r})" if name is not None else ""))
    mark = scope.mark()
    _unknown_keys(scope, raw, _JOB_KEYS)
    _take(scope, raw, "name", _job_name, required=True)
    check = _job_model(scope, raw, models)
    mode = _job_mode(scope, raw, check)
    hyper = _job_hyper(scope, raw, check)
    data = _job_data(scope, raw, check)
    seed = _take(scope, raw, "seed", _int_at_least(None), default=0)
    priority = _take(scope, raw, "priority", _int_at_least(None), default=0)
    constraints = _job_constraints(scope, raw)
    if not scope.clean_since(mark) or check is None:
        return (name if named else None), None
    model = check.model
    constraints = shared.setdefault(constraints, constraints)
    env = shared.setdefault(("env", model.name), dict(model.env))
    if data == model.data:  # the model's recipe, as most jobs have it
        data = shared.setdefault(("data", model.name), data)
    spec = JobSpec(
        job_id="",
        name=name,
        model=model.name,
        mode=mode,
        hyper=hyper,
        data=data,
        seed=seed,
        command=model.command,
        priority=priority,
        constraints=constraints,
        requires=model.requires,
        env=env,
    )
    return name, msgspec.structs.replace(spec, job_id=job_id_for(spec.identity()))


def _job_model(scope: _Scope, raw: dict[str, Any], models: dict[str, _ModelCheck]) -> _ModelCheck | None:
    model = _take(scope, raw, "model", _string, required=True)
    if model is _BAD:
        return None
    if model not in models:
        declared = ", ".join(sorted(models)) or "none"
        scope.add(f"model {model!r} is not declared (declared models: {declared})", "model")
        return None
    return models[model]


def _job_mode(scope: _Scope, raw: dict[str, Any], check: _ModelCheck | None) -> str:
    mode = _take(scope, raw, "mode", _string, required=True)
    if mode is not _BAD and check is not None and check.modes_ok and mode not in check.model.modes:
        scope.add(
            f"mode {mode!r} is not a mode of model {check.model.name!r} (modes: {', '.join(check.model.modes)})", "mode"
        )
    return mode


def _job_hyper(scope: _Scope, raw: dict[str, Any], check: _ModelCheck | None) -> dict[str, Any]:
    """The job's hyper values checked against the model's schema, defaults filled in."""
    given = _take(scope, raw, "hyper", _table, default={})
    if given is _BAD or check is None or not check.hyper_ok:
        return {}
    resolved = _given_hyper(scope, given, check)
    for key, param in check.model.hyper.items():
        if key in given:
            continue
        if param.has_default:
            resolved[key] = param.default
        else:
            scope.add(
                f"required hyper parameter {key!r} of model {check.model.name!r} is missing (it has no default)",
                f"hyper.{key}",
            )
    # Key order does not affect the id (canonical JSON sorts), but a stable order reads better.
    return dict(sorted(resolved.items()))


def _given_hyper(scope: _Scope, given: dict[str, Any], check: _ModelCheck) -> dict[str, Any]:
    resolved: dict[str, Any] = {}
    params = check.model.hyper
    for key, value in given.items():
        if key in check.bad_params:
            continue  # the model's own problem is reported; don't echo it per job
        if key not in params:
            declared = ", ".join(sorted(params)) or "none"
            scope.add(
                f"unknown hyper parameter {key!r} for model {check.model.name!r} (declared: {declared})", f"hyper.{key}"
            )
            continue
        try:
            resolved[key] = params[key].check(value)
        except _Invalid as exc:
            scope.add(f"{exc} (hyper parameter of type {params[key].type})", f"hyper.{key}")
    return resolved


def _job_data(scope: _Scope, raw: dict[str, Any], check: _ModelCheck | None) -> dict[str, Any]:
    """The job's data recipe: ``data``, or the predecessor's ``split_recipe`` (a table is the
    recipe itself; a string ``s`` is short for ``{ split = s }``), over the model's defaults.
    A job without either keeps exactly the recipe (and so the id) it always had."""
    if "split_recipe" in raw and "data" in raw:
        scope.add("give the data recipe as data or as split_recipe, not both", "split_recipe")
        return {}
    key = "split_recipe" if "split_recipe" in raw else "data"
    data = _take(scope, raw, key, _data_recipe, default={})
    if data is _BAD:
        return {}
    # Shallow merge: a job's key replaces the model default of the same name wholesale.
    defaults = check.model.data if check is not None else {}
    return {**defaults, **data}


def _job_constraints(scope: _Scope, raw: dict[str, Any]) -> Constraints | None:
    if raw.keys().isdisjoint(_JOB_CONSTRAINT_KEYS):
        return _NO_CONSTRAINTS  # most jobs of a big manifest: nothing to check
    values: dict[str, Any] = {}
    for key in _JOB_FLAGS:
        values[key] = _take(scope, raw, key, _boolean, default=False)
    for key in _JOB_MINIMA:
        values[key] = _take(scope, raw, key, _number_at_least(0.0), default=0.0)
    for key in _JOB_HOST_LISTS:
        values[key] = _take(scope, raw, key, _host_list, default=())
    if any(value is _BAD for value in values.values()):
        return None
    both = sorted(set(values["allowed_hosts"]) & set(values["denied_hosts"]))
    if both:
        scope.add(f"{', '.join(both)} is in both allowed_hosts and denied_hosts", "denied_hosts")
        return None
    return Constraints(**values)


def _check_duplicate_names(sink: _Sink, names: dict[str, list[int]]) -> None:
    for name, indexes in names.items():
        if len(indexes) > 1:
            where = ", ".join(f"#{i}" for i in indexes)
            _Scope(sink, name).add(
                f"job name {name!r} is used by more than one job ({where}); names must be unique", "name"
            )


def _check_duplicate_ids(sink: _Sink, specs: Iterable[JobSpec]) -> None:
    first: dict[str, JobSpec] = {}
    for spec in specs:
        earlier = first.setdefault(spec.job_id, spec)
        if earlier is spec:
            continue
        _Scope(sink, spec.name).add(
            f"job {spec.name!r} has the same content as job {earlier.name!r} (job id {spec.job_id[:12]}): "
            "same model, mode, hyper, data, seed and allowed_hosts; change one or remove a duplicate"
        )


# ---------------------------------------------------------------------------
# helpers for the public API
# ---------------------------------------------------------------------------


def _job_json(spec: JobSpec) -> dict[str, Any]:
    return {
        "job_id": spec.job_id,
        "name": spec.name,
        "model": spec.model,
        "mode": spec.mode,
        "hyper": spec.hyper,
        "data": spec.data,
        "seed": spec.seed,
        "priority": spec.priority,
        "klass": ticket_class(spec),
        "command": list(spec.command),
        "requires": list(spec.requires),
        "constraints": msgspec.to_builtins(spec.constraints),
    }
