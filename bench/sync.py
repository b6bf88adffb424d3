"""Manifest sync time: parse + the controller's idempotent sync of N new jobs, then a re-sync.

Baseline, same run: the writes a sync cannot avoid (one KV create and one
ticket publish per job, sequential, on a fresh server), without the
controller's logic around them.
"""

from __future__ import annotations

import time
import uuid

import msgspec

from bench.env import fleet_env, publish_ticket
from bench.report import Row
from trainfleet.broker.schema import JobRecord, encode
from trainfleet.controller.controller import Controller
from trainfleet.controller.manifest import Manifest, parse_manifest

MODEL = """schema_version = 1

[models.noop]
command = ["{python}", "-c", "pass"]
modes = ["run"]
data = { nonce = "%s" }
[models.noop.hyper.lr]
type = "float"
default = 0.1
"""


def manifest_text(jobs: int, nonce: str | None = None) -> str:
    """A manifest of ``jobs`` distinct no-op jobs (the nonce makes every run's ids new)."""
    parts = [MODEL % (nonce or uuid.uuid4().hex)]
    for i in range(jobs):
        parts.append(
            f'[[jobs]]\nname = "job-{i}"\nmodel = "noop"\nmode = "run"\nseed = {i}\n'
            f"hyper = {{ lr = {0.001 * (i % 7 + 1):.3f} }}\npriority = {i % 5}\n"
        )
    return "\n".join(parts)


async def controller_sync(settings, manifest: Manifest) -> tuple[float, float]:
    """(first sync, re-sync) seconds for ``manifest`` through the shipped Controller."""
    async with fleet_env(**settings) as env:
        controller = Controller(env.settings, handle_signals=False)
        controller.broker = env.broker  # sync needs only the connection, not the service
        started = time.perf_counter()
        report = await controller.sync(manifest)
        first = time.perf_counter() - started
        if len(report.created) != len(manifest.jobs):
            raise RuntimeError(f"sync created {len(report.created)} of {len(manifest.jobs)} jobs")
        started = time.perf_counter()
        again = await controller.sync(manifest)
        second = time.perf_counter() - started
        if again.created or again.updated:
            raise RuntimeError("re-sync was not idempotent")
        controller.broker = None
    return first, second


async def raw_writes(manifest: Manifest) -> float:
    """The floor: the same records and tickets written one after another."""
    async with fleet_env() as env:
        now = time.time()
        records = [
            JobRecord(job_id=s.job_id, klass="cpu", offered=("cpu",), created_at=now, updated_at=now, queued_at=now)
            for s in manifest.jobs
        ]
        started = time.perf_counter()
        for spec, rec in zip(manifest.jobs, records, strict=True):
            await env.broker.specs.put(spec.job_id, msgspec.json.encode(spec))
            await env.broker.jobs.create(rec.job_id, encode(rec))
            await publish_ticket(env.broker, rec)
        return time.perf_counter() - started


async def run(sizes: list[int]) -> list[Row]:
    rows = []
    for n in sizes:
        text = manifest_text(n)
        started = time.perf_counter()
        manifest = parse_manifest(text, file=f"bench-{n}.toml")
        parse_s = time.perf_counter() - started
        first, again = await controller_sync({}, manifest)
        floor = await raw_writes(manifest)
        label = f"{n // 1000}k" if n >= 1000 else str(n)
        rows.append(
            Row(
                "sync",
                f"manifest sync, {label} new jobs",
                parse_s + first,
                "s",
                floor,
                "same KV creates + tickets, raw",
                note=f"parse {parse_s:.2f} s + sync {first:.2f} s",
            )
        )
        rows.append(
            Row(
                "sync",
                f"manifest re-sync, {label} unchanged jobs",
                again,
                "s",
                floor,
                "same KV creates + tickets, raw",
                note="idempotent: 0 created, 0 updated",
            )
        )
    return rows
