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

# Headers on the trainer output the agent ships (logs subjects).
LOG_STREAM_HEADER = "Trainfleet-Stream"  # stdout | stderr
LOG_ATTEMPT_HEADER = "Trainfleet-Attempt"
LOG_GENERATION_HEADER = "Trainfleet-Generation"


def is_token(value: str) -> bool:
    """True when ``value`` is safe as one subject token / KV key / consumer name."""
    return bool(_TOKEN.match(value))


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
