"""One typed settings object, built from defaults, env (NATS_URL, TRAINFLEET_*) and flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

from trainfleet.broker.names import DEFAULT_PREFIX, Names

DEFAULT_URL = "nats://127.0.0.1:4222"


def seconds_to_ns(seconds: float) -> int:
    """JetStream speaks nanoseconds; everything in trainfleet speaks seconds."""
    return int(seconds * 1_000_000_000)


@dataclass(frozen=True)
class Settings:
    url: str = DEFAULT_URL
    prefix: str = DEFAULT_PREFIX
    # The lease is the jobs consumer's ack-wait; heartbeats renew it.
    lease_s: float = 120.0
    heartbeat_s: float = 30.0
    # JetStream redeliveries per ticket before the max-deliveries advisory fails the job.
    max_deliver: int = 10
    # Claims (first run plus takeovers) before a job is failed.
    max_attempts: int = 3
    # Delay before an ineligible agent's NAK makes the ticket visible again.
    nak_delay_s: float = 5.0
    # How long a worker entry lives in the workers KV without a refresh.
    worker_ttl_s: float = 60.0
    # Controller reconcile cadence (ticket repair, prefer_cuda grace, lease sweeps).
    reconcile_s: float = 10.0
    prefer_cuda_grace_s: float = 300.0
    # Agent fetch: short pull requests with idle heartbeats so a dead pull never stalls.
    fetch_timeout_s: float = 1.0
    drain_timeout_s: float = 10.0
    # Long-running processes wait this long for a server that is still starting.
    connect_wait_s: float = 60.0
    term_grace_s: float = 5.0
    replicas: int = 1
    logs_max_bytes: int = 256 * 1024 * 1024
    logs_max_age_s: float = 7 * 24 * 3600.0
    logs_max_bytes_per_job: int = 4 * 1024 * 1024
    # A bundle larger than this is refused (the job fails with the reason): retrying won't shrink it.
    max_artifact_bytes: int = 8 * 1024**3
    # The controller purges stray artifact chunks (an upload cut off mid-way) this often,
    # once their newest chunk is this old (an upload still under way is never touched).
    artifact_sweep_s: float = 3600.0
    stray_chunk_age_s: float = 3600.0

    @property
    def names(self) -> Names:
        return Names(self.prefix)

    def with_(self, **changes: Any) -> Settings:
        """Copy with changes; ``None`` values are ignored (unset CLI flags)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def check(self) -> Settings:
        if self.heartbeat_s * 3 > self.lease_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s}) must be at most lease_s/3 ({self.lease_s / 3:.3g}) "
                "so two missed heartbeats never lapse a live lease"
            )
        return self

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``NATS_URL`` and ``TRAINFLEET_<FIELD>`` env vars, then overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if env.get("NATS_URL"):
            values["url"] = env["NATS_URL"]
        for f in fields(cls):
            raw = env.get(f"TRAINFLEET_{f.name.upper()}")
            if raw is None:
                continue
            kind = type(getattr(cls, f.name, ""))
            values[f.name] = kind(raw) if kind in (int, float) else raw
        return cls(**values).with_(**overrides).check()


# Settings every command accepts as a flag (the CLI's --url, --prefix, --lease-s, --heartbeat-s).
FLAG_FIELDS = ("url", "prefix", "lease_s", "heartbeat_s")


def from_flags(flags: Any) -> Settings:
    """Settings from env, then the command-line flags that were given (an argparse namespace)."""
    return Settings.from_env(**{name: getattr(flags, name, None) for name in FLAG_FIELDS})
