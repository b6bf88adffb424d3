"""The control protocol on ``<prefix>.ctl.<verb>``: its verbs, the reply envelope, the client.

The controller serves these verbs as a NATS micro service (controller/service.py);
the CLI, the monitor and agents call them with :func:`request`. Requests and replies
are JSON. A reply is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
"...", "exit_code": N}`` with the micro error headers set, so ``nats req
trainfleet.ctl.status ''`` works from any client.

Roles: the controller is the only subscriber; operators call every verb, viewers the
read verbs, agents ``hostpolicy``.
"""

from __future__ import annotations

import json
from typing import Any

import nats.errors
from nats.aio.client import Client

from trainfleet.broker import jsapi
from trainfleet.broker.errors import (
    ManifestError,
    NoController,
    RemoteError,
    RemoteManifestError,
    TrainfleetError,
    UsageError,
)
from trainfleet.broker.names import Names

# verb → (effect, request body, what it does): what `nats micro info trainfleet` shows.
ENDPOINT_DOCS: dict[str, tuple[str, str, str]] = {
    "sync": (
        "write",
        '{"manifest": "<toml text>", "file": "<name>", "allow_command_change": false}',
        "create specs, records and tickets for new jobs of a manifest; existing jobs keep their state "
        "(a changed command is refused unless allow_command_change)",
    ),
    "reload": (
        "write",
        '{"allow_command_change": false}',
        "re-read the controller's --manifest file and sync it",
    ),
    "cancel": (
        "write",
        '{"job": "<id, id prefix or name>"}',
        "cancel a job that is not terminal; a running trainer is stopped by its agent",
    ),
    "requeue": (
        "write",
        '{"job": "<id, id prefix or name>"}',
        "put a failed, cancelled or completed job back to pending as a new generation",
    ),
    "reconcile": ("write", "{}", "run one reconcile pass now (ticket repair, grace, takeover tickets)"),
    "status": ("read", "{}", "job counts by state and workers alive/stale"),
    "jobs": (
        "read",
        '{"state": "<state>", "model": "<model>", "host": "<host>"} (all optional)',
        "job rows sorted by priority, filtered",
    ),
    "show": (
        "read",
        '{"job": "<id, id prefix or name>", "provenance": true}',
        "record, state history and artifact provenance of one job",
    ),
    "workers": ("read", "{}", "registered agents with capability, age_s and alive"),
    "hostpolicy": (
        "read",
        '{"host_id": "<id>"}',
        "the manifest's caps for one host (max_cores, max_ram_gib, slots...); agents ask at start",
    ),
    "explain": (
        "read",
        '{"job": "<id, id prefix or name>"}',
        "for every registered worker: can it run the job, and which constraint fails if not",
    ),
    "health": (
        "read",
        '{"brief": false}',
        "server, streams and buckets, this controller, agents alive, backlog and oldest pending age; "
        '{"status": "healthy|degraded", "exit_code": 0|1, "problems": [...]} (brief: only who answers)',
    ),
}


# -- the reply envelope (served by the controller) -------------------------------
def one_line(text: str) -> str:
    """A header value: no newlines, not too long."""
    return " ".join(text.split())[:200]


def ok_reply(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}, default=str).encode()


def error_reply(exc: Exception) -> tuple[str, str, bytes]:
    """(micro error code, one-line description, body) for a refused request. Errors of ours
    carry their exit code; a ValueError is bad usage; anything else is an internal error."""
    if isinstance(exc, ManifestError):
        body = {
            "ok": False,
            "error": str(exc),
            "exit_code": exc.exit_code,
            "problems": [p.to_dict() for p in exc.problems],
        }
        return exc.service_code, "manifest invalid", json.dumps(body).encode()
    if isinstance(exc, (TrainfleetError, ValueError)):
        error = exc if isinstance(exc, TrainfleetError) else UsageError(str(exc))
        body = {"ok": False, "error": str(exc), "exit_code": error.exit_code}
        return error.service_code, one_line(str(exc)), json.dumps(body).encode()
    body = {"ok": False, "error": f"internal error: {exc!r}", "exit_code": 1}
    return "500", one_line(repr(exc)), json.dumps(body).encode()


# -- the client -------------------------------------------------------------------
async def request(
    nc: Client, names: Names, verb: str, body: dict[str, Any] | None = None, timeout_s: float = 30.0
) -> Any:
    """Call a control endpoint: its result, or the controller's error raised as a RemoteError
    carrying the controller's exit code (NoController when nobody answers)."""
    try:
        reply = await nc.request(names.ctl_subject(verb), json.dumps(body or {}).encode(), timeout=timeout_s)
    except nats.errors.NoRespondersError as exc:
        raise NoController(
            f"no controller is running (nobody answers on {names.ctl_subject(verb)}); "
            "start one with `trainfleet controller`"
        ) from exc
    except nats.errors.TimeoutError as exc:
        raise NoController(f"the controller did not answer {verb} within {timeout_s:g}s") from exc
    try:
        data = json.loads(reply.data or b"{}")
    except ValueError:
        error = (reply.headers or {}).get(jsapi.SERVICE_ERROR) or reply.data.decode(errors="replace")[:200]
        raise RemoteError(f"the controller answered {verb} with something that is not JSON: {error}") from None
    if not data.get("ok"):
        message, exit_code = data.get("error", "failed"), int(data.get("exit_code", 1))
        if data.get("problems"):
            raise RemoteManifestError(data.get("error", "manifest invalid"), data["problems"], exit_code)
        raise RemoteError(message, exit_code)
    return data.get("result")
