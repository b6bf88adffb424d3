"""Manifest sync time: parse + the controller's idempotent sync of N new jobs, then a re-sync.

Baselines, same run: the writes a sync cannot avoid (one spec put, one KV create
and one ticket publish per job, on a fresh server), without the controller's
logic around them, done two ways: one after another (the first sync's way), and
the server's ceiling for them: the three streams written at once, each with
RAW_WINDOW publishes awaiting their pub-ack (every write is fsynced, so a stream
stores about one message per disk write; three streams write in parallel).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec

from bench.env import fleet_env, publish_ticket
from bench.report import Row
from trainfleet.broker import jsapi, tickets
from trainfleet.broker.connection import Broker
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


# Publishes in flight per stream in the parallel baseline (the controller's own window).
RAW_WINDOW = 1024


async def _pipelined(broker: Broker, messages: list[tuple[str, bytes, dict[str, str] | None]]) -> None:
    """Publish in order, RAW_WINDOW awaiting their pub-ack, with plain nats-py."""
    nc = broker.nc
    inbox = nc.new_inbox()
    window = asyncio.Semaphore(RAW_WINDOW)
    left = len(messages)
    done = asyncio.Event()

    async def acked(msg) -> None:
        nonlocal left
        window.release()
        left -= 1
        if left == 0:
            done.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=acked)
    try:
        for i, (subject, payload, headers) in enumerate(messages):
            await window.acquire()
            await nc.publish(subject, payload, reply=f"{inbox}.{i}", headers=headers)
        if messages:
            await asyncio.wait_for(done.wait(), 60)
    finally:
        await sub.unsubscribe()


async def raw_parallel(manifest: Manifest) -> float:
    """The server's ceiling for the same writes: specs, records and tickets on their three
    streams at once, each pipelined (no per-job order, no reads, no checks)."""
    async with fleet_env() as env:
        b = env.broker
        now = time.time()
        records = [
            JobRecord(job_id=s.job_id, klass="cpu", offered=("cpu",), created_at=now, updated_at=now, queued_at=now)
            for s in manifest.jobs
        ]
        names = b.names
        create = {jsapi.EXPECTED_LAST_SUBJECT_SEQ: "0"}
        spec_msgs = [
            (jsapi.kv_subject(names.specs_bucket, s.job_id), msgspec.json.encode(s), None) for s in manifest.jobs
        ]
        record_msgs = [(jsapi.kv_subject(names.jobs_bucket, r.job_id), encode(r), create) for r in records]
        ticket_msgs = [tickets.ticket_message(b, r, r.klass) for r in records]
        started = time.perf_counter()
        await asyncio.gather(_pipelined(b, spec_msgs), _pipelined(b, record_msgs), _pipelined(b, ticket_msgs))
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
        ceiling = await raw_parallel(manifest)
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
                f"manifest sync, {label} new jobs (sync alone)",
                first,
                "s",
                ceiling,
                "same writes, 3 streams at once, pipelined",
                note=f"server ceiling {3 * n / ceiling:,.0f} writes/s",
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
