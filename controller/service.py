"""The control service: a NATS micro service (``trainfleet``) with endpoints ``trainfleet.ctl.*``.

Requests and replies are JSON. A reply is ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "...", "exit_code": N}`` (with the micro error
headers set), so ``nats req trainfleet.ctl.status ''`` works from any client
and ``nats micro ls/info/stats`` see the service. Controllers share one queue
group, so each request is handled by exactly one of them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from nats import micro
from nats.aio.client import Client
from nats.micro.request import Request

from trainfleet.broker.errors import BrokerError, ManifestError, TrainfleetError
from trainfleet.broker.names import Names
from trainfleet.broker.schema import JobStatus
from trainfleet.controller import ops

if TYPE_CHECKING:
    from trainfleet.controller.controller import Controller

log = logging.getLogger("trainfleet.controller")

SERVICE_VERSION = "0.2.0"
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def _job_ref(body: dict[str, Any]) -> str:
    ref = body.get("job")
    if not isinstance(ref, str) or not ref:
        raise TrainfleetError('request needs {"job": "<id, id prefix or name>"}')
    return ref


def _filters(body: dict[str, Any]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key in ("state", "model", "host"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key!r} must be a string")
        out[key] = value
    if out["state"] and out["state"] not in {s.value for s in JobStatus}:
        raise ValueError(f"unknown state {out['state']!r}; one of {', '.join(s.value for s in JobStatus)}")
    return out


def handlers(ctl: Controller) -> dict[str, Handler]:
    """Endpoint name → coroutine taking the decoded request body."""

    async def sync(body: dict[str, Any]) -> Any:
        text, file = body.get("manifest"), body.get("file", "<request>")
        if not isinstance(text, str):
            raise TrainfleetError('request needs {"manifest": "<toml text>", "file": "<name>"}')
        return (await ctl.sync_text(text, str(file))).to_dict()

    async def reload(body: dict[str, Any]) -> Any:
        return (await ctl.reload()).to_dict()

    async def cancel(body: dict[str, Any]) -> Any:
        return msgspec.to_builtins(await ctl.cancel(_job_ref(body)))

    async def requeue(body: dict[str, Any]) -> Any:
        return msgspec.to_builtins(await ctl.requeue(_job_ref(body)))

    async def status(body: dict[str, Any]) -> Any:
        return await ops.fleet_status(ctl.b)

    async def reconcile(body: dict[str, Any]) -> Any:
        return await ctl.reconcile()

    async def jobs(body: dict[str, Any]) -> Any:
        return await ops.list_jobs(ctl.b, **_filters(body))

    async def show(body: dict[str, Any]) -> Any:
        return await ops.job_detail(ctl.b, _job_ref(body), provenance=bool(body.get("provenance", True)))

    async def workers(body: dict[str, Any]) -> Any:
        return await ops.list_workers(ctl.b)

    async def hostpolicy(body: dict[str, Any]) -> Any:
        return ctl.host_policy(str(body.get("host_id") or ""))

    async def explain(body: dict[str, Any]) -> Any:
        from trainfleet.controller.explain import explain_json, explain_ref

        return explain_json(*await explain_ref(ctl.b, _job_ref(body), stale_after_s=ops.stale_after_s(ctl.b)))

    return {
        "sync": sync,
        "reload": reload,
        "cancel": cancel,
        "requeue": requeue,
        "status": status,
        "reconcile": reconcile,
        "jobs": jobs,
        "show": show,
        "workers": workers,
        "hostpolicy": hostpolicy,
        "explain": explain,
    }


# What `nats micro info trainfleet` shows for each endpoint: what it does and what to send.
ENDPOINT_DOCS: dict[str, tuple[str, str, str]] = {
    "sync": (
        "write",
        '{"manifest": "<toml text>", "file": "<name>"}',
        "create records and tickets for new jobs of a manifest; existing jobs keep their state",
    ),
    "reload": ("write", "{}", "re-read the controller's --manifest file and sync it"),
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
}


# Micro error codes (the Nats-Service-Error-Code header) for the CLI exit codes in the body.
ERROR_CODES = {1: "409", 2: "400", 3: "503", 4: "404", 5: "422"}


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]  # a header value: no newlines


def _wrap(name: str, handler: Handler) -> Callable[[Request], Awaitable[None]]:
    async def endpoint(req: Request) -> None:
        try:
            body = json.loads(req.data) if req.data.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object (or empty)")
            result = await handler(body)
            await req.respond(json.dumps({"ok": True, "result": result}, default=str).encode())
        except ManifestError as exc:
            reply = {
                "ok": False,
                "error": str(exc),
                "exit_code": exc.exit_code,
                "problems": [p.to_dict() for p in exc.problems],
            }
            await req.respond_error("400", "manifest invalid", json.dumps(reply).encode())
        except (TrainfleetError, ValueError) as exc:
            code = getattr(exc, "exit_code", 2)
            reply = {"ok": False, "error": str(exc), "exit_code": code}
            await req.respond_error(ERROR_CODES.get(code, "400"), _one_line(str(exc)), json.dumps(reply).encode())
        except Exception as exc:
            log.exception("control endpoint %s failed", name)
            reply = {"ok": False, "error": f"internal error: {exc!r}", "exit_code": 1}
            await req.respond_error("500", _one_line(repr(exc)), json.dumps(reply).encode())

    return endpoint


def service_metadata(ctl: Controller) -> dict[str, str]:
    """Per-instance metadata for `nats micro info`: which fleet, and which controller process."""
    names = ctl.names
    return {
        "prefix": names.prefix,
        "jobs_bucket": names.jobs_bucket,
        "workers_bucket": names.workers_bucket,
        "artifacts_bucket": names.artifacts_bucket,
        "logs_stream": names.logs_stream,
        "queue_group": names.ctl_queue_group,
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "manifest": ctl.manifest_path or "",
        "docs": "docs/operations.md",
    }


async def start_service(ctl: Controller) -> Any:
    """Serve every endpoint as ``<prefix>.ctl.<name>`` in the controllers' queue group: with
    several controllers each request is handled by exactly one of them."""
    names = ctl.names
    service = await micro.add_service(
        ctl.b.nc,
        name=names.service,
        version=SERVICE_VERSION,
        metadata=service_metadata(ctl),
        description="trainfleet control: sync, reload, cancel, requeue, reconcile; read status, jobs, show, "
        "workers. JSON in, {ok, result | error, exit_code} out.",
        queue_group=names.ctl_queue_group,
    )
    group = service.add_group(name=names.ctl_group, queue_group=names.ctl_queue_group)
    for name, handler in handlers(ctl).items():
        effect, request_doc, description = ENDPOINT_DOCS[name]
        await group.add_endpoint(
            name=name,
            handler=_wrap(name, handler),
            metadata={"description": description, "request": request_doc, "effect": effect},
        )
    return service


async def request(
    nc: Client, names: Names, verb: str, body: dict[str, Any] | None = None, timeout_s: float = 30.0
) -> Any:
    """Call a control endpoint; raise TrainfleetError carrying the controller's message."""
    import nats.errors

    try:
        reply = await nc.request(names.ctl_subject(verb), json.dumps(body or {}).encode(), timeout=timeout_s)
    except nats.errors.NoRespondersError as exc:
        raise BrokerError(
            "no controller is running (nobody answers on "
            f"{names.ctl_subject(verb)}); start one with `trainfleet controller`"
        ) from exc
    except nats.errors.TimeoutError as exc:
        raise BrokerError(f"the controller did not answer {verb} within {timeout_s:g}s") from exc
    try:
        data = json.loads(reply.data or b"{}")
    except ValueError:
        error = (reply.headers or {}).get("Nats-Service-Error") or reply.data.decode(errors="replace")[:200]
        raise TrainfleetError(f"the controller answered {verb} with something that is not JSON: {error}") from None
    if not data.get("ok"):
        err = ManifestErrorReply(data) if data.get("problems") else TrainfleetError(data.get("error", "failed"))
        err.exit_code = int(data.get("exit_code", 1))
        raise err
    return data.get("result")


class ManifestErrorReply(TrainfleetError):
    """A manifest error reported by a remote controller."""

    def __init__(self, data: dict[str, Any]):
        self.problems = data.get("problems", [])
        super().__init__(data.get("error", "manifest invalid"))
