"""The controller: sync the manifest into job records, publish tickets, reconcile, serve control.

Every write is a CAS on the record's revision, so several controllers (one
queue group) and the agents never overwrite each other blindly. The
controller never runs a trainer; agents never create records.

Reconcile (every ``reconcile_s``) repairs what crashes leave behind: a pending
record with no ticket in the stream gets one; a held record whose lease
lapsed long ago and whose ticket is gone gets one (an agent then takes it
over); a ``prefer_cuda`` job unclaimed after the grace window is also offered
to ``cpu``. Duplicate tickets are harmless: the record decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from trainfleet.broker import tickets
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import BrokerError, Refused, TrainfleetError, UsageError
from trainfleet.broker.records import (
    Stored,
    cas,
    create_record,
    get_record,
    job_ids,
    load_records,
    resolve,
    update_record,
)
from trainfleet.broker.schema import JobRecord, JobSpec, JobStatus
from trainfleet.broker.settings import Settings
from trainfleet.broker.tickets import TicketRef, publish_ticket
from trainfleet.controller.manifest import Manifest, excluded_hosts, load_manifest, parse_manifest
from trainfleet.controller.service import start_service

log = logging.getLogger("trainfleet.controller")

REQUEUEABLE = (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.COMPLETED)
# Record writes in flight during a sync.
SYNC_WINDOW = 64


@dataclass
class SyncReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    not_in_manifest: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.__dict__.items()}


class Controller:
    def __init__(self, settings: Settings, *, manifest_path: str | None = None, handle_signals: bool = True):
        self.settings = settings
        self.names = settings.names
        self.manifest_path = manifest_path
        self.manifest: Manifest | None = None
        self.handle_signals = handle_signals
        self.broker: Broker | None = None
        self._stopping = asyncio.Event()
        self._service: Any = None
        self._advisory_sub: Any = None

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        self.broker = await Broker.connect(
            self.settings, name="trainfleet-controller", provision=True, wait_s=self.settings.connect_wait_s
        )
        if self.manifest_path:
            await self.sync(load_manifest(self.manifest_path))
        self._advisory_sub = await self.broker.nc.subscribe(
            self.names.max_deliveries_advisory(), queue=self.names.ctl_queue_group, cb=self._on_max_deliveries
        )
        self._service = await start_service(self)

    async def run(self) -> None:
        """Start, reconcile until asked to stop, then stop serving and close."""
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        next_sweep = time.monotonic() + self.settings.artifact_sweep_s
        try:
            while not self._stopping.is_set():
                try:
                    await self.reconcile()
                except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                    log.warning("reconcile failed (will retry): %r", exc)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.settings.artifact_sweep_s
                    await self.sweep_artifacts()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.settings.reconcile_s)
        finally:
            await asyncio.shield(self.stop())

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
            self._service = None
        if self.broker is not None:
            await self.broker.close()
            self.broker = None

    @property
    def b(self) -> Broker:
        assert self.broker is not None, "controller not started"
        return self.broker

    # -- sync ---------------------------------------------------------------
    def _new_record(self, manifest: Manifest, spec: JobSpec) -> JobRecord:
        now = time.time()
        klass = tickets.ticket_class(spec)
        return JobRecord(
            job_id=spec.job_id,
            spec=spec,
            klass=klass,
            offered=(klass,),
            created_at=now,
            updated_at=now,
            queued_at=now,
            excluded_hosts=excluded_hosts(manifest, spec),
            max_attempts=manifest.settings.max_attempts or self.settings.max_attempts,
        )

    async def sync(self, manifest: Manifest) -> SyncReport:
        """Idempotent: new jobs become pending with a ticket; existing records keep their state
        (only non-identity fields such as name, priority and host policy are refreshed).

        Record writes run SYNC_WINDOW at a time (each is an fsynced CAS, so one at a time is
        bound by disk latency); tickets then go out pipelined, highest priority first."""
        self.manifest = manifest
        report = SyncReport()
        window = asyncio.Semaphore(SYNC_WINDOW)
        fresh = [self._new_record(manifest, s) for s in sorted(manifest.jobs, key=lambda s: -s.priority)]

        async def create(rec: JobRecord) -> bool:
            async with window:
                return await create_record(self.b, rec)

        async def refresh(rec: JobRecord) -> bool:
            async with window:
                return await self._refresh(rec)

        created = await asyncio.gather(*(create(r) for r in fresh))
        new = [r for r, ok in zip(fresh, created, strict=True) if ok]
        existing = [r for r, ok in zip(fresh, created, strict=True) if not ok]
        changed = await asyncio.gather(*(refresh(r) for r in existing))
        await tickets.publish_tickets(self.b, new)
        report.created = [r.job_id for r in new]
        report.updated = [r.job_id for r, c in zip(existing, changed, strict=True) if c]
        report.unchanged = [r.job_id for r, c in zip(existing, changed, strict=True) if not c]
        wanted = {s.job_id for s in manifest.jobs}
        report.not_in_manifest = sorted(await job_ids(self.b) - wanted)
        log.info(
            "sync %s: %d new, %d updated, %d unchanged, %d only in KV",
            manifest.path,
            len(report.created),
            len(report.updated),
            len(report.unchanged),
            len(report.not_in_manifest),
        )
        return report

    async def _refresh(self, fresh: JobRecord) -> bool:
        """Bring an existing record's non-identity fields to the manifest's; False when they were."""

        def refreshed(rec: JobRecord) -> JobRecord | None:
            keep = (rec.spec, rec.excluded_hosts, rec.max_attempts)
            if keep == (fresh.spec, fresh.excluded_hosts, fresh.max_attempts):
                return None
            return rec.evolve(spec=fresh.spec, excluded_hosts=fresh.excluded_hosts, max_attempts=fresh.max_attempts)

        return await update_record(self.b, fresh.job_id, refreshed) is not None

    async def reload(self) -> SyncReport:
        if not self.manifest_path:
            raise UsageError("this controller was started without --manifest; use `trainfleet sync FILE`")
        return await self.sync(load_manifest(self.manifest_path))

    async def sync_text(self, text: str, file: str) -> SyncReport:
        manifest = parse_manifest(text, file=file)
        report = await self.sync(manifest)
        if Path(file).is_file():
            self.manifest_path = file
        return report

    async def sweep_artifacts(self) -> int:
        """Purge stray artifact chunks (uploads cut off mid-way); returns the chunk sets purged."""
        try:
            stray = await Artifacts(self.b).sweep(self.settings.stray_chunk_age_s)
        except (TimeoutError, nats.errors.Error, BrokerError) as exc:
            log.warning("artifact sweep failed (will retry): %r", exc)
            return 0
        if stray:
            log.info("artifact sweep: purged %d stray chunk set(s), %d chunk(s)", len(stray), sum(stray.values()))
        return len(stray)

    # -- reconcile ----------------------------------------------------------
    async def reconcile(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        records = await load_records(self.b)
        queued = await tickets.scan_tickets(self.b)
        live: dict[str, set[tuple[int, str]]] = {}
        seqs = set()
        for ref in queued:
            seqs.add(ref.seq)
            if ref.ticket is not None:
                live.setdefault(ref.ticket.job_id, set()).add((ref.ticket.generation, ref.ticket.klass))
        stats: Counter[str] = Counter()
        stats["reordered"] = await self._reorder(records, queued)
        for stored in records.values():
            rec = stored.record
            have = live.get(rec.job_id, set())
            if rec.status == JobStatus.PENDING:
                granted = await self._grace(stored, now)
                stats["grace"] += granted
                stats["republished"] += await self._ensure_tickets(rec, have, changed=bool(granted))
            elif (
                rec.status.held
                and rec.lease_expired(self.settings.lease_s * 2, now)
                and rec.ticket_seq not in seqs
                and not any(g == rec.generation for g, _ in have)
            ):
                await publish_ticket(self.b, rec, rec.klass, dedupe_suffix=f".r{int(now)}")
                stats["takeover_tickets"] += 1
        if any(stats.values()):
            log.info("reconcile: %s", dict(stats))
        return dict(stats)

    async def _reorder(self, records: dict[str, Stored], queued: list[TicketRef]) -> int:
        """Keep each class's queued tickets in priority order (a work queue is FIFO).

        When a higher-priority ticket waits behind a lower one, the queued tickets from the first
        inversion on are deleted and republished highest priority first. Only tickets of pending
        jobs move; a held job's ticket is its lease and stays. A ticket moved while an agent is
        deciding on it becomes a duplicate, which the record makes harmless."""
        by_class: dict[str, list[TicketRef]] = {}
        for ref in queued:
            stored = records.get(ref.ticket.job_id) if ref.ticket else None
            if (
                ref.ticket is not None
                and stored is not None
                and stored.record.status == JobStatus.PENDING
                and stored.record.generation == ref.ticket.generation
            ):
                by_class.setdefault(ref.ticket.klass, []).append(ref)
        moved = 0
        for klass, queue in by_class.items():
            start = _first_inversion([r.ticket.priority for r in queue if r.ticket])
            if start is None:
                continue
            tail = sorted(queue[start:], key=lambda r: (-(r.ticket.priority if r.ticket else 0), r.seq))
            for ref in tail:
                await tickets.delete_ticket(self.b, ref.seq)
            for ref in tail:
                rec = records[ref.ticket.job_id].record if ref.ticket else None
                if rec is not None:
                    await publish_ticket(self.b, rec, klass, dedupe_suffix=f".o{ref.seq}")
            moved += len(tail)
        return moved

    async def _grace(self, stored: Stored, now: float) -> int:
        """prefer_cuda jobs nobody with a GPU claimed within the grace window go to cpu as well."""
        rec = stored.record
        grace = self.settings.prefer_cuda_grace_s
        if self.manifest and self.manifest.settings.prefer_cuda_grace_s is not None:
            grace = self.manifest.settings.prefer_cuda_grace_s
        cpu = tickets.cpu_class()
        if not rec.spec.constraints.prefer_cuda or cpu in rec.offered or now - rec.queued_at < grace:
            return 0
        await cas(self.b, rec.evolve(offered=(*rec.offered, cpu)), stored.revision)
        return 1

    async def _ensure_tickets(self, loaded: JobRecord, have: set[tuple[int, str]], *, changed: bool) -> int:
        """Publish the tickets a pending record lacks. The record just loaded decides whether to
        look at all (most have their tickets); a possible repair is confirmed on a fresh read."""
        if not changed and not tickets.missing_classes(loaded, have):
            return 0
        rec = (await get_record(self.b, loaded.job_id)).record
        if rec.status != JobStatus.PENDING:
            return 0
        missing = tickets.missing_classes(rec, have)
        for klass in missing:
            await publish_ticket(self.b, rec, klass, dedupe_suffix=f".r{int(time.time())}")
        return len(missing)

    # -- advisories ---------------------------------------------------------
    async def _on_max_deliveries(self, msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            seq = int(advisory["stream_seq"])
            deliveries = int(advisory.get("deliveries", 0))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring malformed max-deliveries advisory: %s", exc)
            return
        try:
            await self.exhausted_ticket(seq, deliveries)
        except (TimeoutError, TrainfleetError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("handling max-deliveries of ticket %d failed: %r", seq, exc)

    async def exhausted_ticket(self, seq: int, deliveries: int) -> str:
        """A ticket hit max_deliver. Remove it (a work queue keeps it forever otherwise, nats-server
        #5564); fail the job if its attempts are spent, else re-offer it with a fresh ticket."""
        ref = await tickets.get_ticket(self.b, seq)
        if ref is None:
            return "gone"
        await tickets.delete_ticket(self.b, seq)
        ticket = ref.ticket
        if ticket is None:
            log.warning("removed exhausted ticket %d: it is not a ticket", seq)
            return "dropped"
        try:
            stored = await get_record(self.b, ticket.job_id)
        except TrainfleetError as exc:
            log.warning("removed exhausted ticket %d: %s", seq, exc)
            return "dropped"
        rec = stored.record
        if rec.status.terminal or rec.generation != ticket.generation:
            return "stale"
        if rec.status.held and not rec.lease_expired(self.settings.lease_s):
            return "held"
        # Deliveries also count NAKs (ineligible agents, early redeliveries): only spent attempts
        # fail a job; otherwise a fresh ticket re-offers it (a lapsed holder is then taken over).
        if rec.attempt >= rec.max_attempts:
            reason = (
                f"ticket delivered {deliveries} times without completing (max_deliver "
                f"{self.settings.max_deliver}) after {rec.attempt} attempt(s); last error: "
                f"{rec.last_error or 'none'}"
            )
            failed = rec.evolve(status=JobStatus.FAILED, finished_at=time.time(), reason=reason)
            if await cas(self.b, failed, stored.revision) is not None:
                log.warning("job %s failed: %s", rec.job_id[:12], reason)
                return "failed"
            return "raced"
        await publish_ticket(self.b, rec, ticket.klass, dedupe_suffix=f".x{seq}")
        return "reoffered"

    # -- operator actions ---------------------------------------------------
    async def cancel(self, ref: str) -> JobRecord:
        """Cancel a job that is not terminal; its agent sees the change and stops the trainer."""
        job_id = (await resolve(self.b, ref)).record.job_id  # resolved once, not per CAS retry

        def cancelled(rec: JobRecord) -> JobRecord:
            if rec.status.terminal:
                raise Refused(f"job {rec.spec.name} is already {rec.status.value}; nothing to cancel")
            return rec.evolve(status=JobStatus.CANCELLED, finished_at=time.time(), reason="cancelled by operator")

        done = await update_record(self.b, job_id, cancelled)
        assert done is not None
        return done.record

    async def requeue(self, ref: str) -> JobRecord:
        """Put a failed, cancelled or completed job back to pending as a new generation, with a ticket."""
        job_id = (await resolve(self.b, ref)).record.job_id

        def requeued(rec: JobRecord) -> JobRecord:
            if rec.status not in REQUEUEABLE:
                raise Refused(
                    f"job {rec.spec.name} is {rec.status.value}; only failed, cancelled or "
                    "completed jobs can be requeued"
                )
            return rec.evolve(
                status=JobStatus.PENDING,
                generation=rec.generation + 1,
                attempt=0,
                claimed_by=None,
                claimed_at=None,
                heartbeat_at=None,
                started_at=None,
                finished_at=None,
                ticket_seq=None,
                reason="requeued by operator",
                offered=(rec.klass,),
                queued_at=time.time(),
                progress={},
                artifact=None,
                artifact_bytes=None,
                metrics={},
                device=None,
            )

        fresh = await update_record(self.b, job_id, requeued)
        assert fresh is not None
        await publish_ticket(self.b, fresh.record, fresh.record.klass)
        return fresh.record

    def host_policy(self, host_id: str) -> dict[str, Any]:
        """The manifest's overrides for ``host_id`` (caps on what its agent offers), or {}."""
        policy = self.manifest.hosts.get(host_id) if self.manifest else None
        if policy is None:
            return {}
        keys = ("max_cores", "max_ram_gib", "max_vram_gib", "cpu_slots", "gpu_slots", "serve_cpu")
        return {k: getattr(policy, k) for k in keys if getattr(policy, k) is not None}


def _first_inversion(priorities: list[int]) -> int | None:
    """Index of the first entry with a strictly higher priority somewhere after it."""
    best_after = None
    first = None
    for i in range(len(priorities) - 1, -1, -1):
        if best_after is not None and priorities[i] < best_after:
            first = i
        best_after = priorities[i] if best_after is None else max(best_after, priorities[i])
    return first
