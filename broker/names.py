"""Every NATS name trainfleet uses: streams, subjects, buckets, consumers, service.

This is the only module that spells one of our subjects or resource names (NATS's own
names, `$JS.API...` and the rest, are in jsapi.py). Everything
else asks a :class:`Names` instance, so a deployment can change the prefix
(``TRAINFLEET_PREFIX``) and run two fleets on one server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trainfleet.broker import jsapi

DEFAULT_PREFIX = "trainfleet"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")

# The key in the specs bucket under which the controller keeps the fleet's own facts (the
# manifest's name and file, when it was last synced); every other key there is a job id.
FLEET_INFO_KEY = "_fleet"

# Headers on the trainer output the agent ships (logs subjects).
LOG_STREAM_HEADER = "Trainfleet-Stream"  # stdout | stderr
LOG_ATTEMPT_HEADER = "Trainfleet-Attempt"
LOG_GENERATION_HEADER = "Trainfleet-Generation"


def is_token(value: str) -> bool:
    """True when ``value`` is safe as one subject token / KV key / consumer name."""
    return bool(_TOKEN.match(value))


# A host id is any hostname: labels of letters, digits, '_' and '-' joined by single dots
# (``pi``, ``gpu_box-2``, ``pi.lan``), at most 253 characters. A dot separates subject
# tokens in NATS, so where a host id becomes part of a subject, a KV key or a consumer
# name it goes through :func:`host_token`.
HOST_ID_RULE = "must be a hostname: letters, digits, '_' and '-', labels joined by single dots (e.g. pi.lan)"
_HOST_ID = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")
HOST_TOKEN_DOT = "="  # what a host id's dot becomes in its token: never in a host id, allowed in keys and subjects


def is_host_id(value: object) -> bool:
    """A host id: a token, or tokens joined by single dots (a hostname such as ``pi.lan``)."""
    return isinstance(value, str) and len(value) <= 253 and bool(_HOST_ID.match(value))


def host_token(host_id: str) -> str:
    """The one subject token (and KV key, consumer-name part) standing for ``host_id``.

    Each dot becomes ``=`` (``pi.lan`` → ``pi=lan``); a host id without dots is its own
    token, so existing hosts keep their subjects and keys. ``=`` can never be in a host id,
    so two different host ids never share a token, and :func:`host_of_token` reverses it.
    """
    if not is_host_id(host_id):
        raise ValueError(f"host id {host_id!r} {HOST_ID_RULE}")
    return host_id.replace(".", HOST_TOKEN_DOT)


def host_of_token(token: str) -> str:
    """The host id a :func:`host_token` stands for."""
    return token.replace(HOST_TOKEN_DOT, ".")


# Names an operator chooses: jobs, models and modes (host ids are hostnames: is_host_id).
# They end up in paths, argv and terminals, so they are tokens, not free text.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
# Hyper parameter names become trainer flags (--<name>=value).
HYPER_PATTERN = r"[a-z_][a-z0-9_]{0,63}"
# Flags the agent passes to every trainer itself: no hyper parameter may take these names.
RESERVED_FLAGS = frozenset({"mode", "seed", "out", "help"})
_NAME = re.compile(rf"^{NAME_PATTERN}$")
_HYPER = re.compile(rf"^{HYPER_PATTERN}$")


def is_name(value: object) -> bool:
    """A job, model or mode name: NAME_PATTERN (no path separators, no spaces, no leading dot
    or dash)."""
    return isinstance(value, str) and bool(_NAME.match(value)) and value not in (".", "..")


ENV_RULE = "capitals, digits and '_', not NATS_* or TRAINFLEET_*"
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")


def is_env_name(value: object) -> bool:
    """A variable a manifest may set for its trainers: not one of the agent's own."""
    return isinstance(value, str) and bool(_ENV.match(value)) and not value.startswith(("NATS_", "TRAINFLEET_"))


def is_hyper_name(value: object) -> bool:
    """A hyper parameter name: HYPER_PATTERN and not one of the agent's own flags."""
    return isinstance(value, str) and bool(_HYPER.match(value)) and value not in RESERVED_FLAGS


@dataclass(frozen=True)
class Names:
    """All resource names for one prefix."""

    prefix: str = DEFAULT_PREFIX

    # -- streams -----------------------------------------------------------
    @property
    def jobs_stream(self) -> str:
        return f"{self.prefix.upper()}_JOBS"

    @property
    def logs_stream(self) -> str:
        return f"{self.prefix.upper()}_LOGS"

    # -- buckets -----------------------------------------------------------
    @property
    def jobs_bucket(self) -> str:
        return f"{self.prefix}-jobs"

    @property
    def specs_bucket(self) -> str:
        return f"{self.prefix}-specs"

    @property
    def workers_bucket(self) -> str:
        return f"{self.prefix}-workers"

    @property
    def artifacts_bucket(self) -> str:
        return f"{self.prefix}-artifacts"

    # -- subjects ----------------------------------------------------------
    @property
    def jobs_wildcard(self) -> str:
        return f"{self.prefix}.jobs.>"

    def jobs_subject(self, klass: str) -> str:
        """Ticket subject for a capability class (``cpu``, ``gpu.16``, ``host.pi``)."""
        return f"{self.prefix}.jobs.{klass}"

    def class_of_subject(self, subject: str) -> str:
        head = f"{self.prefix}.jobs."
        return subject[len(head) :] if subject.startswith(head) else ""

    def logs_subject(self, job_id: str) -> str:
        return f"{self.prefix}.logs.{job_id}"

    def events_subject(self, job_id: str) -> str:
        return f"{self.prefix}.events.{job_id}"

    @property
    def logs_wildcards(self) -> list[str]:
        return [f"{self.prefix}.logs.>", f"{self.prefix}.events.>"]

    # -- consumers ---------------------------------------------------------
    def consumer(self, klass: str) -> str:
        """Durable pull consumer shared by every agent serving ``klass``."""
        return "jobs-" + klass.replace(".", "-")

    def max_deliveries_advisory(self, consumer: str = "*") -> str:
        return jsapi.max_deliveries_advisory(self.jobs_stream, consumer)

    # -- control service ---------------------------------------------------
    @property
    def service(self) -> str:
        return self.prefix

    @property
    def ctl_group(self) -> str:
        return f"{self.prefix}.ctl"

    def ctl_subject(self, verb: str) -> str:
        return f"{self.ctl_group}.{verb}"

    @property
    def ctl_queue_group(self) -> str:
        return f"{self.prefix}-controllers"
