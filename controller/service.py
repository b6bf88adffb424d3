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
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from nats import micro
from nats.aio.client import Client
from nats.micro.request import Request

from trainfleet.broker.errors import ManifestError, TrainfleetError
from trainfleet.broker.names import Names

if TYPE_CHECKING:
    from trainfleet.controller.controller import Controller

log = logging.getLogger("trainfleet.controller")

SERVICE_VERSION = "0.1.0"
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def _job_ref(body: dict[str, Any]) -> str:
    ref = body.get("job")
    if not isinstance(ref, str) or not ref:
        raise TrainfleetError('request needs {"job": "<id, id prefix or name>"}')
    return ref


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
        return await ctl.status()

    async def reconcile(body: dict[str, Any]) -> Any:
        return await ctl.reconcile()

    return {"sync": sync, "reload": reload, "cancel": cancel, "requeue": requeue, "status": status,
            "reconcile": reconcile}


def _wrap(name: str, handler: Handler) -> Callable[[Request], Awaitable[None]]:
    async def endpoint(req: Request) -> None:
        try:
            body = json.loads(req.data) if req.data.strip() else {}
            if not isinstance(body, dict):
                raise TrainfleetError("request body must be a JSON object")
            result = await handler(body)
            await req.respond(json.dumps({"ok": True, "result": result}, default=str).encode())
        except ManifestError as exc:
            reply = {"ok": False, "error": str(exc), "exit_code": exc.exit_code,
                     "problems": [p.to_dict() for p in exc.problems]}
            await req.respond_error("400", "manifest invalid", json.dumps(reply).encode())
        except (TrainfleetError, ValueError) as exc:
            code = getattr(exc, "exit_code", 2)
            reply = {"ok": False, "error": str(exc), "exit_code": code}
            await req.respond_error("400", str(exc)[:200], json.dumps(reply).encode())
        except Exception as exc:
            log.exception("control endpoint %s failed", name)
            reply = {"ok": False, "error": f"internal error: {exc!r}", "exit_code": 1}
            await req.respond_error("500", repr(exc)[:200], json.dumps(reply).encode())

    return endpoint


async def start_service(ctl: Controller) -> Any:
    names = ctl.names
    service = await micro.add_service(ctl.b.nc, name=names.service, version=SERVICE_VERSION,
                                      description="trainfleet control: sync, reload, cancel, requeue, status",
                                      queue_group=names.ctl_queue_group)
    group = service.add_group(name=names.ctl_group, queue_group=names.ctl_queue_group)
    for name, handler in handlers(ctl).items():
        await group.add_endpoint(name=name, handler=_wrap(name, handler))
    return service


async def request(nc: Client, names: Names, verb: str, body: dict[str, Any] | None = None,
                  timeout_s: float = 30.0) -> Any:
    """Call a control endpoint; raise TrainfleetError carrying the controller's message."""
    import nats.errors

    try:
        reply = await nc.request(names.ctl_subject(verb), json.dumps(body or {}).encode(), timeout=timeout_s)
    except nats.errors.NoRespondersError as exc:
        raise TrainfleetError("no controller is running (nobody answers on "
                              f"{names.ctl_subject(verb)}); start one with `trainfleet controller`") from exc
    except nats.errors.TimeoutError as exc:
        raise TrainfleetError(f"the controller did not answer {verb} within {timeout_s:g}s") from exc
    data = json.loads(reply.data or b"{}")
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
