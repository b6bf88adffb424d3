"""Roles the server enforces: what each kind of client may publish and subscribe to.

DESIGN.md's roles (admin, controller, operator, agent, viewer) become nats-server
permission blocks here, built from our names (names.py) and NATS's own (jsapi.py), so
a server started with :func:`authorization_config` refuses everything a role has no
business doing: an agent cannot write a job spec, a viewer cannot cancel a job, nobody
but the controller can subscribe to the control subjects. Each role receives replies
under its own inbox prefix (``_INBOX_<role>``) and may subscribe only there, so no role
can read another's replies.

The permissions are allow-lists; what is not listed is denied. :func:`permissions`
is the single source: ``trainfleet auth init`` writes it into a server include, and the
role-matrix test walks it against a real server.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainfleet.broker import jsapi
from trainfleet.broker.names import Names, host_token

ROLES = ("admin", "controller", "operator", "agent", "viewer")
# Control verbs a viewer may call: the ones that only read.
READ_VERBS = ("status", "jobs", "show", "workers", "explain", "health")


def inbox_prefix(role: str) -> str:
    """Where replies to this role's requests arrive; the only inbox it may subscribe to."""
    return f"_INBOX_{role}"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    # Publish answers to requests received (a service replying on a requester's inbox).
    allow_responses: bool = False


def _kv_read(names: Names, bucket: str) -> list[str]:
    """Get a key, watch keys (an ordered consumer), read a key's kept revisions."""
    stream = jsapi.kv_stream(bucket)
    return [
        jsapi.stream_info(stream),
        f"{jsapi.direct_get(stream)}.>",
        jsapi.stream_msg_get(stream),
        *_ephemeral_consumers(stream),
    ]


def _ephemeral_consumers(stream: str) -> list[str]:
    """Create, read from, look at and delete a reader's own consumer of ``stream``."""
    return [
        f"{jsapi.API}.CONSUMER.CREATE.{stream}",
        f"{jsapi.API}.CONSUMER.CREATE.{stream}.>",
        f"{jsapi.consumer_next(stream, '*')}",
        f"{jsapi.API}.CONSUMER.INFO.{stream}.*",
        f"{jsapi.consumer_delete(stream, '*')}",
        f"$JS.FC.{stream}.>",  # flow control answers of a push (watch) consumer
    ]


def _reader(names: Names) -> list[str]:
    """What every role that may read the fleet publishes: reads of records, specs, workers,
    logs and artifacts (downloads included)."""
    artifacts = jsapi.object_stream(names.artifacts_bucket)
    return [
        *_kv_read(names, names.jobs_bucket),
        *_kv_read(names, names.specs_bucket),
        *_kv_read(names, names.workers_bucket),
        jsapi.stream_info(names.jobs_stream),  # its state: tickets queued (`trainfleet health`)
        jsapi.stream_info(names.logs_stream),
        *_ephemeral_consumers(names.logs_stream),
        jsapi.stream_info(artifacts),
        jsapi.stream_msg_get(artifacts),
        *_ephemeral_consumers(artifacts),
    ]


def _ctl(names: Names, verbs: tuple[str, ...] | None = None) -> list[str]:
    if verbs is None:
        return [f"{names.ctl_group}.>", "$SRV.>"]
    return [names.ctl_subject(v) for v in verbs] + ["$SRV.>"]


def _uploader(names: Names) -> list[str]:
    """Store artifacts: chunks and the info record (no purge: that is the controller's sweep)."""
    bucket = names.artifacts_bucket
    return [f"{jsapi.object_chunks_prefix(bucket)}>", f"{jsapi.object_meta_prefix(bucket)}>"]


def permissions(role: str, names: Names, *, host_id: str | None = None) -> Permissions:
    """The permissions of ``role`` in the fleet named by ``names``. An agent identity made
    for one host (``host_id``) may write only that host's worker entry."""
    inbox = f"{inbox_prefix(role)}.>"
    jobs_stream = names.jobs_stream
    if role == "admin":
        return Permissions(publish=(">",), subscribe=(">",), allow_responses=True)
    if role == "viewer":
        return Permissions(
            publish=tuple(_reader(names) + _ctl(names, READ_VERBS)),
            subscribe=(inbox, names.events_subject("*")),
        )
    if role == "operator":
        return Permissions(
            publish=tuple(_reader(names) + _ctl(names)),
            subscribe=(inbox, names.events_subject("*")),
        )
    if role == "agent":
        worker = host_token(host_id) if host_id else "*"
        return Permissions(
            publish=(
                *_kv_read(names, names.jobs_bucket),
                *_kv_read(names, names.specs_bucket),
                f"$KV.{names.jobs_bucket}.>",  # CAS the records it claims and holds
                f"$KV.{names.workers_bucket}.{worker}",  # its own worker entry
                jsapi.stream_info(jsapi.kv_stream(names.workers_bucket)),
                jsapi.consumer_next(jobs_stream, "*"),  # pull tickets
                f"$JS.ACK.{jobs_stream}.>",  # ack, NAK, in-progress, term
                names.logs_subject("*"),
                names.events_subject("*"),
                jsapi.stream_info(jsapi.object_stream(names.artifacts_bucket)),
                jsapi.stream_msg_get(jsapi.object_stream(names.artifacts_bucket)),
                *_uploader(names),
                names.ctl_subject("hostpolicy"),
            ),
            subscribe=(inbox, names.jobs_wildcard),  # replies, and the doorbell on new tickets
        )
    if role == "controller":
        artifacts = jsapi.object_stream(names.artifacts_bucket)
        return Permissions(
            publish=(
                *_reader(names),
                f"$KV.{names.jobs_bucket}.>",
                f"$KV.{names.specs_bucket}.>",
                names.jobs_wildcard,  # publish tickets
                jsapi.stream_info(jobs_stream),
                jsapi.stream_msg_get(jobs_stream),
                jsapi.direct_get(jobs_stream),
                f"{jsapi.API}.STREAM.MSG.DELETE.{jobs_stream}",
                # the class consumers agents bind to: create and update, never delete
                f"{jsapi.API}.CONSUMER.CREATE.{jobs_stream}.>",
                f"{jsapi.API}.CONSUMER.DURABLE.CREATE.{jobs_stream}.>",
                f"{jsapi.API}.CONSUMER.INFO.{jobs_stream}.*",
                jsapi.stream_purge(artifacts),  # the stray-chunk sweep
                "$SRV.>",
            ),
            subscribe=(
                inbox,
                f"{names.ctl_group}.>",  # the control service: only the controller may serve it
                "$SRV.>",
                names.max_deliveries_advisory(),
            ),
            allow_responses=True,
        )
    raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")


# -- server configuration ----------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """One client identity of a fleet: a role, its public nkey, and for an agent made for one
    host, that host."""

    role: str
    public_key: str
    host_id: str | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.host_id}" if self.host_id else self.role


def _quoted(subjects: tuple[str, ...]) -> str:
    """A config list, one subject a line (easy to read and to diff)."""
    inner = "".join(f'\n                "{s}"' for s in subjects)
    return f"[{inner}\n            ]"


def user_block(identity: Identity, names: Names, *, key_field: str = "nkey") -> str:
    """One ``users`` entry with its permissions (``key_field``: ``nkey``, or ``user`` for a
    certificate's subject under ``verify_and_map``)."""
    perms = permissions(identity.role, names, host_id=identity.host_id)
    lines = [
        f"    # {identity.name}",
        "    {",
        f'        {key_field}: "{identity.public_key}"',
        "        permissions: {",
        f"            publish: {{ allow: {_quoted(perms.publish)} }}",
        f"            subscribe: {{ allow: {_quoted(perms.subscribe)} }}",
    ]
    if perms.allow_responses:
        lines.append("            allow_responses: true")
    lines += ["        }", "    }"]
    return "\n".join(lines)


def authorization_config(identities: list[Identity], names: Names, *, key_field: str = "nkey") -> str:
    """A nats-server ``authorization`` block: one user per identity and nothing anonymous."""
    blocks = "\n".join(user_block(i, names, key_field=key_field) for i in identities)
    return (
        "# trainfleet roles (written by `trainfleet auth init`; see docs/security.md).\n"
        "# Every client must present one of these identities: there is no anonymous user.\n"
        f"authorization {{\n  users = [\n{blocks}\n  ]\n}}\n"
    )
