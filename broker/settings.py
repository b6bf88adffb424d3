"""One typed settings object, built from defaults, env (NATS_URL, TRAINFLEET_*) and flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from trainfleet.broker.names import DEFAULT_PREFIX, Names

DEFAULT_URL = "nats://127.0.0.1:4222"
# Settings the nats CLI's own environment variables also set (the same names it reads).
NATS_ENV = {
    "url": "NATS_URL",
    "creds": "NATS_CREDS",
    "nkey": "NATS_NKEY",
    "user": "NATS_USER",
    "password": "NATS_PASSWORD",
    "token": "NATS_TOKEN",
    "tls_ca": "NATS_CA",
    "tls_cert": "NATS_CERT",
    "tls_key": "NATS_KEY",
    "context": "NATS_CONTEXT",
}


def _optional_kind(annotation: str) -> type:
    """The value type of an optional setting ("float | None" → float)."""
    for kind in (float, int):
        if kind.__name__ in annotation:
            return kind
    return str


def seconds_to_ns(seconds: float) -> int:
    """JetStream speaks nanoseconds; everything in trainfleet speaks seconds."""
    return int(seconds * 1_000_000_000)


@dataclass(frozen=True)
class Settings:
    url: str = field(default=DEFAULT_URL, repr=False)  # kept out of repr: it may hold user:password@
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
    # The controller removes artifacts no job record points at (a requeued job's earlier
    # bundle) this often (0: never; `trainfleet artifacts prune` does it on demand), once
    # their info is this old (an upload whose record is not written yet is never touched).
    artifact_prune_s: float = 0.0
    artifact_prune_age_s: float = 3600.0
    # -- who we are to the server (see docs/security.md) ---------------------------
    # Credentials: a creds file (user JWT + nkey seed), an nkey seed file, a user and
    # password, or a token. Env: NATS_CREDS, NATS_NKEY, NATS_USER, NATS_PASSWORD, NATS_TOKEN.
    creds: str | None = None
    nkey: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    # TLS: the CA that signed the server's certificate, and our client certificate and key
    # (mTLS). Env: NATS_CA, NATS_CERT, NATS_KEY.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # A nats CLI context (~/.config/nats/context/<name>.json) to take all of the above from.
    context: str | None = None
    # Replies to our requests arrive under this prefix; each role has its own (_INBOX_<role>),
    # and the server lets each role subscribe only to its own.
    inbox_prefix: str | None = None
    # -- spec signing (see docs/security.md) ----------------------------------------
    # Controller: the nkey seed file it signs job specs with (TRAINFLEET_SIGNING_KEY).
    signing_key: str | None = None
    # Agent: the controller public keys whose signatures it accepts (TRAINFLEET_TRUST_KEY,
    # comma-separated: several during a key rotation). None configured: unsigned specs run.
    trust_keys: tuple[str, ...] = ()
    # Agent: how long an upload that keeps failing is tried again before the job is handed back
    # (None: a lease, at least 30 s; the lease is renewed meanwhile).
    upload_patience_s: float | None = None
    # Agent: run trainers as this user (TRAINFLEET_TRAINER_USER); None: as the agent's user.
    trainer_user: str | None = None

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
        """Defaults, then the nats CLI's env vars (``NATS_URL``, ``NATS_CREDS``…, see NATS_ENV) and
        ``TRAINFLEET_<FIELD>`` env vars, then overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, var in NATS_ENV.items():
            if env.get(var):
                values[name] = env[var]
        for f in fields(cls):
            raw = env.get(f"TRAINFLEET_{f.name.upper()}")
            if f.name == "trust_keys":
                raw = env.get("TRAINFLEET_TRUST_KEY", raw)
            if raw is None:
                continue
            kind = type(f.default) if f.default is not None else _optional_kind(str(f.type))
            if kind in (int, float):
                values[f.name] = kind(raw)
            elif kind is tuple:
                values[f.name] = tuple(part.strip() for part in raw.split(",") if part.strip())
            else:
                values[f.name] = raw
        return cls(**values).with_(**overrides).check()


# Settings every command accepts as a flag (--url, --prefix, --lease-s, --creds, --tls-ca, ...).
FLAG_FIELDS = (
    "url",
    "prefix",
    "lease_s",
    "heartbeat_s",
    "creds",
    "nkey",
    "user",
    "password",
    "token",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "context",
    "inbox_prefix",
)


def from_flags(flags: Any) -> Settings:
    """Settings from env, then the command-line flags that were given (an argparse namespace)."""
    return Settings.from_env(**{name: getattr(flags, name, None) for name in FLAG_FIELDS})


def connection_env(settings: Settings) -> dict[str, str]:
    """Environment variables that give a child process this connection and identity (URL,
    credentials, TLS files, inbox prefix, signing and trust keys); unset ones are left out."""
    env = {var: str(getattr(settings, name)) for name, var in NATS_ENV.items() if getattr(settings, name)}
    extra = {"inbox_prefix": "TRAINFLEET_INBOX_PREFIX", "signing_key": "TRAINFLEET_SIGNING_KEY"}
    env.update({var: str(getattr(settings, name)) for name, var in extra.items() if getattr(settings, name)})
    if settings.trust_keys:
        env["TRAINFLEET_TRUST_KEY"] = ",".join(settings.trust_keys)
    return env
