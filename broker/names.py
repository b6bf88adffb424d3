"""Every NATS name trainfleet uses: streams, subjects, buckets, consumers, service.

This is the only module that spells a subject or resource name. Everything
else asks a :class:`Names` instance, so a deployment can change the prefix
(``TRAINFLEET_PREFIX``) and run two fleets on one server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "trainfleet"

# VRAM ladder (GiB) for gpu.<tier> classes: a job's min_vram_gib rounds up to
# the next rung, so a handful of consumers covers every card size.
VRAM_TIERS_GIB: tuple[int, ...] = (0, 4, 8, 12, 16, 24, 32, 48, 80, 96, 141, 192)

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def is_token(value: str) -> bool:
    """True when ``value`` is safe as one subject token / KV key / consumer name."""
    return bool(_TOKEN.match(value))


def vram_tier(min_vram_gib: float) -> int:
    """The smallest rung of the ladder that is >= ``min_vram_gib``."""
    for tier in VRAM_TIERS_GIB:
        if tier >= min_vram_gib:
            return tier
    return VRAM_TIERS_GIB[-1]


def tiers_served(vram_total_gib: float) -> list[int]:
    """Tiers a card of this size can serve, biggest first (best fit first)."""
    return sorted((t for t in VRAM_TIERS_GIB if t <= vram_total_gib), reverse=True)


def cpu_class() -> str:
    return "cpu"


def gpu_class(tier: int) -> str:
    return f"gpu.{tier}"


def host_class(host_id: str) -> str:
    return f"host.{host_id}"


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
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.jobs_stream}.{consumer}"

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
