"""Is the fleet healthy? ``trainfleet health`` and the ``ctl.health`` control endpoint.

One report, the same from both: the server reachable (with JetStream), every stream,
bucket and object store present, a controller answering ``ctl.health``, agents alive
(workers KV), and the backlog (pending jobs, the oldest pending job's age, tickets queued).

Exit codes (a container ``HEALTHCHECK``, a systemd ``ExecStartPost``/timer, a Kubernetes
exec probe): 0 healthy · 1 degraded (resources missing, no controller answering, no live
agent while jobs are pending, or the oldest pending job older than ``max_pending_age_s``)
· 3 unreachable (no connection to NATS, within ``timeout_s``).

Roles: reads only (records, workers, stream infos, ``ctl.health``): the viewer's rights.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from trainfleet.broker import jsapi
from trainfleet.broker.connection import Broker, connect_nats
from trainfleet.broker.control import request
from trainfleet.broker.display import safe_text
from trainfleet.broker.errors import EXIT_OK, NoController, RemoteError, TrainfleetError, Unreachable
from trainfleet.broker.records import load_records
from trainfleet.broker.schema import JobStatus
from trainfleet.broker.security import redact_url
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import get_fleet_info
from trainfleet.broker.workers import load_workers, stale_after_s

HEALTHY, DEGRADED, UNREACHABLE = "healthy", "degraded", "unreachable"
EXIT_DEGRADED, EXIT_UNREACHABLE = 1, 3
STATUS_EXIT = {HEALTHY: EXIT_OK, DEGRADED: EXIT_DEGRADED, UNREACHABLE: EXIT_UNREACHABLE}
DEFAULT_TIMEOUT_S = 10.0
CONTROLLER_TIMEOUT_S = 3.0
INFO_TIMEOUT_S = 2.0


def resources(settings: Settings) -> dict[str, str]:
    """Every stream behind the fleet: what it is → its JetStream stream name."""
    names = settings.names
    return {
        f"stream {names.jobs_stream}": names.jobs_stream,
        f"stream {names.logs_stream}": names.logs_stream,
        f"bucket {names.jobs_bucket}": jsapi.kv_stream(names.jobs_bucket),
        f"bucket {names.specs_bucket}": jsapi.kv_stream(names.specs_bucket),
        f"bucket {names.workers_bucket}": jsapi.kv_stream(names.workers_bucket),
        f"object store {names.artifacts_bucket}": jsapi.object_stream(names.artifacts_bucket),
    }


def controller_identity(manifest_path: str | None) -> dict[str, Any]:
    """What a controller says of itself when it answers ``ctl.health``."""
    return {"answering": True, "host": socket.gethostname(), "pid": os.getpid(), "manifest": manifest_path or ""}


async def _resources(nc: Client, settings: Settings) -> tuple[dict[str, Any], int | None]:
    """(the resources check, tickets queued in the jobs stream or None when unknown)."""
    js = nc.jetstream(timeout=INFO_TIMEOUT_S)
    present, missing, unknown = [], [], {}
    tickets = None
    for what, stream in resources(settings).items():
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            missing.append(what)
            continue
        except (nats.errors.Error, TimeoutError) as exc:
            unknown[what] = f"{type(exc).__name__}: {exc}".strip(": ")
            continue
        present.append(what)
        if stream == settings.names.jobs_stream:
            tickets = info.state.messages
    return {"ok": not missing and not unknown, "present": present, "missing": missing, "unknown": unknown}, tickets


async def _controller(nc: Client, settings: Settings, me: dict[str, Any] | None) -> dict[str, Any]:
    if me is not None:
        return me
    try:
        answer = await request(nc, settings.names, "health", {"brief": True}, timeout_s=CONTROLLER_TIMEOUT_S)
    except NoController as exc:
        return {"answering": False, "detail": str(exc)}
    except RemoteError as exc:  # it answered, with an error: alive, but say what it said
        return {"answering": True, "detail": str(exc)}
    return {"answering": True, **(answer.get("controller", {}) if isinstance(answer, dict) else {})}


async def _fleet(broker: Broker, now: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(agents, backlog) from the workers KV and the job records."""
    workers = await load_workers(broker)
    stale_s = stale_after_s(broker.settings)
    alive = [w.host_id for w in workers if now - w.last_seen <= stale_s]
    stale = [w.host_id for w in workers if w.host_id not in alive]
    records = [s.record for s in (await load_records(broker)).values()]
    pending = [r for r in records if r.status == JobStatus.PENDING]
    queued = [r.queued_at for r in pending if r.queued_at > 0]
    active = sum(1 for r in records if r.status in (JobStatus.CLAIMED, JobStatus.RUNNING))
    agents = {"alive": len(alive), "stale": len(stale), "hosts": {"alive": alive, "stale": stale}}
    backlog = {
        "jobs": len(records),
        "pending": len(pending),
        "active": active,
        "oldest_pending_age_s": round(now - min(queued), 3) if queued else None,
    }
    return agents, backlog


async def check(
    settings: Settings,
    *,
    broker: Broker | None = None,
    controller: dict[str, Any] | None = None,
    max_pending_age_s: float | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The health report. ``broker``: an open connection to use (the controller's own);
    without one a connection is opened and closed here. ``controller``: the answering
    controller's identity when the controller itself checks (it need not ask itself)."""
    now = time.time() if now is None else now
    report: dict[str, Any] = {"status": UNREACHABLE, "checked_at": now, "problems": []}
    own = broker is None
    nc = broker.nc if broker is not None else None
    try:
        if nc is None:
            try:
                nc = await connect_nats(settings, name="trainfleet-health", connect_timeout_s=INFO_TIMEOUT_S)
            except TrainfleetError as exc:
                report["server"] = {"ok": False, "url": redact_url(settings.url), "detail": str(exc)}
                report["problems"].append(f"NATS unreachable: {exc}")
                return _verdict(report)
        report["server"] = {
            "ok": True,
            "url": redact_url(settings.url),
            "version": str(nc.connected_server_version) if nc.connected_server_version else "",
            "server_name": (getattr(nc, "_server_info", None) or {}).get("server_name", ""),
        }
        report["resources"], tickets = await _resources(nc, settings)
        report["problems"] += [f"{what} is missing" for what in report["resources"]["missing"]]
        report["problems"] += [
            f"{what} could not be checked ({why})" for what, why in report["resources"]["unknown"].items()
        ]
        report["controller"] = await _controller(nc, settings, controller)
        if not report["controller"]["answering"]:
            report["problems"].append("no controller answers (start one: `trainfleet controller`)")
        if report["resources"]["ok"] or broker is not None:
            if broker is None:  # the same connection, now bound to the fleet's buckets
                broker = await Broker.bind(nc, settings)
            report["fleet"] = (await get_fleet_info(broker)).get("name", "")
            report["agents"], report["backlog"] = await _fleet(broker, now)
            report["backlog"]["tickets"] = tickets
            pending, alive = report["backlog"]["pending"], report["agents"]["alive"]
            if pending and not alive:
                report["problems"].append(f"no live agent while {pending} job(s) are pending")
            age = report["backlog"]["oldest_pending_age_s"]
            if max_pending_age_s is not None and age is not None and age > max_pending_age_s:
                report["problems"].append(f"the oldest pending job has waited {age:.0f}s (> {max_pending_age_s:g}s)")
        report["status"] = DEGRADED if report["problems"] else HEALTHY
        return _verdict(report)
    finally:
        if own and nc is not None:  # the one connection opened here (a broker bound to it closes it)
            with contextlib.suppress(Exception):
                await nc.close()


def _verdict(report: dict[str, Any]) -> dict[str, Any]:
    report["exit_code"] = STATUS_EXIT[report["status"]]
    return report


async def check_within(settings: Settings, timeout_s: float = DEFAULT_TIMEOUT_S, **kw: Any) -> dict[str, Any]:
    """:func:`check`, given up after ``timeout_s``: a check that hangs is degraded when the
    server answered (it did not, in time, say more) and unreachable when it did not."""
    try:
        return await asyncio.wait_for(check(settings, **kw), timeout_s)
    except TimeoutError:
        problem = f"the health check did not finish within {timeout_s:g}s"
        return _verdict({"status": UNREACHABLE, "checked_at": time.time(), "problems": [problem]})
    except Unreachable as exc:
        return _verdict({"status": UNREACHABLE, "checked_at": time.time(), "problems": [str(exc)]})


def resources_of(check: dict[str, Any]) -> list[str]:
    return [*check["present"], *check["missing"], *check["unknown"]]


def render(report: dict[str, Any]) -> str:
    """The report as ``trainfleet health`` prints it: a verdict, then one line per check."""
    lines = [f"{report['status']}" + (f": {report['fleet']}" if report.get("fleet") else "")]

    def line(ok: bool, text: str) -> None:
        lines.append(f"  {'✓' if ok else '✗'} {text}")

    server = report.get("server")
    if server:
        line(
            server["ok"],
            f"server {server['url']}" + (f" (nats-server {server['version']})" if server.get("version") else ""),
        )
    res = report.get("resources")
    if res:
        line(
            res["ok"],
            f"{len(res['present'])} of {len(resources_of(res))} streams, buckets and object stores present",
        )
    ctl = report.get("controller")
    if ctl:
        where = f" ({ctl.get('host')}, pid {ctl.get('pid')})" if ctl.get("host") else ""
        line(ctl["answering"], "a controller answers" + where if ctl["answering"] else "no controller answers")
    agents = report.get("agents")
    if agents:
        line(
            agents["alive"] > 0 or not report["backlog"]["pending"],
            f"{agents['alive']} agent(s) alive, {agents['stale']} stale",
        )
        backlog = report["backlog"]
        age = backlog["oldest_pending_age_s"]
        oldest = f", oldest waiting {age:.0f}s" if age is not None else ""
        line(
            True,
            f"backlog: {backlog['pending']} pending{oldest}, {backlog['active']} claimed or running "
            f"of {backlog['jobs']} jobs",
        )
    lines += [f"  problem: {p}" for p in report["problems"]]
    return "\n".join(safe_text(text, newlines=False) for text in lines)
