"""The control service: a NATS micro service (``trainfleet``) serving ``<prefix>.ctl.*``.

The protocol (verbs, reply envelope, client) is broker/control.py; this is the
controller's side of it. ``nats micro ls/info/stats`` see the service. Controllers
share one queue group, so each request is handled by exactly one of them.

Role: controller (the only subscriber on ``<prefix>.ctl.*``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nats import micro
from nats.micro.request import Request

from trainfleet.broker.connection import Broker, settle
from trainfleet.broker.control import ENDPOINT_DOCS, error_reply, ok_reply
from trainfleet.broker.errors import UsageError
from trainfleet.broker.explain import explain_json, explain_ref
from trainfleet.broker.jobs import Job
from trainfleet.broker.names import Names
from trainfleet.broker.schema import JobStatus
from trainfleet.broker.workers import stale_after_s
from trainfleet.controller import health as health_check
from trainfleet.controller import ops


class Served(Protocol):
    """What the service needs of the controller it serves (controller.Controller)."""

    names: Names
    manifest_path: str | None

    @property
    def b(self) -> Broker: ...

    async def sync_text(self, text: str, file: str, *, allow_command_change: bool = False) -> Any: ...
    async def reload(self, *, allow_command_change: bool = False) -> Any: ...
    async def cancel(self, ref: str) -> Job: ...
    async def requeue(self, ref: str) -> Job: ...
    async def reconcile(self) -> dict[str, int]: ...
    def host_policy(self, host_id: str) -> dict[str, Any]: ...


log = logging.getLogger("trainfleet.controller")

SERVICE_VERSION = "0.2.0"
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def _job_ref(body: dict[str, Any]) -> str:
    ref = body.get("job")
    if not isinstance(ref, str) or not ref:
        raise UsageError('request needs {"job": "<id, id prefix or name>"}')
    return ref


def _allow(body: dict[str, Any]) -> bool:
    """A sync's explicit consent to change jobs' commands (``"allow_command_change": true``)."""
    allow = body.get("allow_command_change", False)
    if not isinstance(allow, bool):
        raise UsageError('"allow_command_change" must be true or false')
    return allow


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


def _health(ctl: Served) -> Handler:
    async def health(body: dict[str, Any]) -> Any:
        me = health_check.controller_identity(ctl.manifest_path)
        if body.get("brief"):  # `trainfleet health` asks only whether a controller answers
            return {"controller": me}
        return await health_check.check(ctl.b.settings, broker=ctl.b, controller=me)

    return health


def handlers(ctl: Served) -> dict[str, Handler]:
    """Endpoint name → coroutine taking the decoded request body."""

    async def sync(body: dict[str, Any]) -> Any:
        text, file = body.get("manifest"), body.get("file", "<request>")
        if not isinstance(text, str):
            raise UsageError('request needs {"manifest": "<toml text>", "file": "<name>"}')
        return (await ctl.sync_text(text, str(file), allow_command_change=_allow(body))).to_dict()

    async def reload(body: dict[str, Any]) -> Any:
        return (await ctl.reload(allow_command_change=_allow(body))).to_dict()

    async def cancel(body: dict[str, Any]) -> Any:
        return ops.job_json(await ctl.cancel(_job_ref(body)))

    async def requeue(body: dict[str, Any]) -> Any:
        return ops.job_json(await ctl.requeue(_job_ref(body)))

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
        stale = stale_after_s(ctl.b.settings)
        return explain_json(*await explain_ref(ctl.b, _job_ref(body), stale_after_s=stale))

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
        "health": _health(ctl),
    }


def _wrap(name: str, handler: Handler) -> Callable[[Request], Awaitable[None]]:
    async def endpoint(req: Request) -> None:
        try:
            body = json.loads(req.data) if req.data.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object (or empty)")
            reply = ok_reply(await handler(body))
        except Exception as exc:
            code, description, error = error_reply(exc)
            if code == "500":
                log.exception("control endpoint %s failed", name)
            await req.respond_error(code, description, error)
            return
        await req.respond(reply)

    return endpoint


def service_metadata(ctl: Served) -> dict[str, str]:
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


async def start_service(ctl: Served) -> Any:
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
    # Endpoints added after the service started are not flushed by nats-py (and its flush() can
    # answer before they are sent): without this, a request sent right after start (an agent
    # asking for its host policy, an operator's requeue) could find no one.
    await settle(ctl.b.nc)
    return service
