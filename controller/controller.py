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
import functools
import json
import logging
import math
import signal
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from trainfleet.broker import jsapi, specs, tickets
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import BrokerError, NotProvisioned, Refused, StoreFull, TrainfleetError, UsageError
from trainfleet.broker.jobs import Job, NameIndex, resolve
from trainfleet.broker.provision import STORE_FULL_DOCS, ensure_consumer, storage_advice
from trainfleet.broker.records import Stored, cas, create_record, get_record, job_ids, load_records, update_record
from trainfleet.broker.retry import patiently
from trainfleet.broker.schema import JobRecord, JobSpec, JobStatus
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import Signer
from trainfleet.broker.tickets import TicketRef, publish_ticket
from trainfleet.controller.manifest import Manifest, excluded_hosts, load_manifest, parse_manifest
from trainfleet.controller.service import start_service

log = logging.getLogger("trainfleet.controller")

REQUEUEABLE = (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.COMPLETED)
# Record writes in flight during a sync.
SYNC_WINDOW = 64
# Specs and tickets a sync has in flight (published, pub-ack not yet in), and how long it waits
# for the next pub-ack: a server that cannot write (a full disk under its store) answers nothing.
SYNC_PUBLISH_WINDOW = 1024
SYNC_ACK_TIMEOUT_S = 30.0
# What a write of a sync may fail with (anything else is a bug, and propagates as it is).
SYNC_WRITE_ERRORS = (TimeoutError, nats.errors.Error, nats.js.errors.Error)


@dataclass
class SyncReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    not_in_manifest: list[str] = field(default_factory=list)
    # Jobs whose command (or required modules) the manifest changes, left as they were:
    # {"job_id", "name", "reason"} each. Sync again allowing command changes to apply them.
    refused: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.__dict__.items()}


@dataclass
class SyncProgress:
    """How far a sync got: (written, wanted) per kind, in the order a sync writes them."""

    specs: tuple[int, int] = (0, 0)
    records: tuple[int, int] | None = None  # None: not reached
    tickets: tuple[int, int] | None = None

    def text(self) -> str:
        def of(done: tuple[int, int], what: str) -> str:
            return f"{done[0]} of {done[1]} {what}"

        if self.records is None:
            return f"Wrote {of(self.specs, 'specs')}; no records or tickets yet"
        tickets_part = of(self.tickets or (0, 0), "tickets (one per record created now)")
        return f"Wrote {of(self.specs, 'specs')}, {of(self.records, 'records')} and {tickets_part}"


def execution_change(stored: JobSpec, wanted: JobSpec) -> str | None:
    """What a spec change alters in what an agent runs (None: nothing, only name, priority or
    constraints). The job id covers model, mode, hyper, data and seed; command and requires not."""
    if stored.command != wanted.command:
        return f"command {list(stored.command)} → {list(wanted.command)}"
    if stored.requires != wanted.requires:
        return f"requires {list(stored.requires)} → {list(wanted.requires)}"
    if stored.env != wanted.env:
        return f"trainer environment {sorted(stored.env)} → {sorted(wanted.env)}"
    return None


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
        self.signer = Signer.from_file(settings.signing_key) if settings.signing_key else None
        self._consumers: set[str] = set()  # classes whose consumer this controller ensured

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        self.broker = await self._connect()
        if self.signer is None:
            log.warning(
                "no signing key (--signing-key / TRAINFLEET_SIGNING_KEY): job specs go out unsigned, and agents "
                "that trust a controller key will refuse them; see docs/security.md"
            )
        # Every agent's usual classes exist from the start; pinned host classes as they are ticketed.
        # Both wait out an election (a long-running process never exits for one).
        usual = [tickets.cpu_class(), *(tickets.gpu_class(t) for t in tickets.VRAM_TIERS_GIB)]
        await patiently(lambda: self._ensure_classes(usual), what="creating the ticket consumers", limit_s=math.inf)
        if self.manifest_path:
            manifest = load_manifest(self.manifest_path)
            await patiently(lambda: self.sync(manifest), what=f"syncing {self.manifest_path}", limit_s=math.inf)
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
        next_prune = time.monotonic() + self.settings.artifact_prune_s
        try:
            while not self._stopping.is_set():
                try:
                    await self.reconcile()
                except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError, BrokerError) as exc:
                    log.warning("reconcile failed (will retry): %s", exc if isinstance(exc, BrokerError) else repr(exc))
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.settings.artifact_sweep_s
                    await self.sweep_artifacts()
                if self.settings.artifact_prune_s > 0 and time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self.settings.artifact_prune_s
                    await self.prune_artifacts()
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

    async def _connect(self) -> Broker:
        """Bind to the fleet's resources; provision them first when they are missing (that needs
        admin rights: with a controller-only credential, `trainfleet provision` must run first)."""
        name = "trainfleet-controller"
        try:
            return await Broker.connect(self.settings, name=name, wait_s=self.settings.connect_wait_s)
        except NotProvisioned:
            log.info("resources not provisioned; provisioning them")
        try:
            return await Broker.connect(self.settings, name=name, provision=True)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise NotProvisioned(
                f"trainfleet resources are not provisioned and this controller could not create them ({exc!r}): "
                "run `trainfleet provision` with admin credentials"
            ) from exc

    async def _ensure_classes(self, classes: Iterable[str]) -> None:
        """The durable consumer of every class about to be ticketed (agents only bind to them)."""
        for klass in classes:
            if klass not in self._consumers:
                await ensure_consumer(self.b.js, self.settings, klass)
                self._consumers.add(klass)

    async def _ticket(self, rec: JobRecord, klass: str, *, dedupe_suffix: str = "") -> None:
        await self._ensure_classes([klass])
        await publish_ticket(self.b, rec, klass, dedupe_suffix=dedupe_suffix)

    @property
    def b(self) -> Broker:
        assert self.broker is not None, "controller not started"
        return self.broker

    # -- sync ---------------------------------------------------------------
    def _new_record(self, manifest: Manifest, spec: JobSpec) -> JobRecord:
        now = time.time()
        klass = tickets.ticket_class(spec)
        eventual = tickets.eventual_classes(spec, klass)
        return JobRecord(
            job_id=spec.job_id,
            klass=klass,
            offered=(klass,),
            fallback_class=eventual[1] if len(eventual) > 1 else None,
            priority=spec.priority,
            created_at=now,
            updated_at=now,
            queued_at=now,
            excluded_hosts=excluded_hosts(manifest, spec),
            max_attempts=manifest.settings.max_attempts or self.settings.max_attempts,
        )

    async def sync(self, manifest: Manifest, *, allow_command_change: bool = False) -> SyncReport:
        """Idempotent: new jobs get a signed spec, a pending record and a ticket; existing jobs
        keep their state (their spec's name, priority and constraints and their record's host
        policy are refreshed). A changed command is applied only with ``allow_command_change``,
        and logged; without it the job is reported as refused and keeps its command.

        Specs and tickets go out pipelined; record writes run SYNC_WINDOW at a time (each is an
        fsynced CAS, so one at a time is bound by disk latency). Specs are written first: an
        agent that sees a record or a ticket finds its spec.

        A write that fails (a full store, a server that stops answering) stops the sync: no
        further write is started, and StoreFull (BrokerError when it was not about space) says
        what stopped it and how many specs, records and tickets were written of how many. What
        was written is consistent: syncing again creates the rest, and reconcile gives a pending
        record without a ticket its ticket."""
        self.manifest = manifest
        report = SyncReport()
        wanted = sorted(manifest.jobs, key=lambda s: -s.priority)
        to_write = await self._specs_to_write(wanted, report, allow_command_change)
        bucket = self.names.specs_bucket
        stored, error = await self._publish_all(
            [(jsapi.kv_subject(bucket, s.job_id), specs.seal(s, self.signer), None) for s in to_write]
        )
        progress = SyncProgress(specs=(stored, len(to_write)))
        if error is not None:
            raise self._sync_stopped(error, progress, f"the specs bucket {bucket}") from error
        refused = {r["job_id"] for r in report.refused}
        fresh = [self._new_record(manifest, s) for s in wanted if s.job_id not in refused]
        window = asyncio.Semaphore(SYNC_WINDOW)
        failed: list[BaseException] = []  # the first write that failed (a full store): no more are started

        async def write(op: Any) -> bool | None:
            """``op()``'s answer; None when it failed (noted in ``failed``) or was not started."""
            async with window:
                if failed:
                    return None
                try:
                    return bool(await op())
                except SYNC_WRITE_ERRORS as exc:
                    failed.append(exc)
                    return None

        created = await asyncio.gather(*(write(functools.partial(create_record, self.b, r)) for r in fresh))
        new = [r for r, ok in zip(fresh, created, strict=True) if ok is True]
        existing = [r for r, ok in zip(fresh, created, strict=True) if ok is False]
        changed: list[bool | None] = [False] * len(existing)
        if not failed:
            changed = await asyncio.gather(*(write(functools.partial(self._refresh, r)) for r in existing))
        in_place = len(new) + sum(1 for c in changed if c is not None)
        progress.records = (in_place, len(fresh))
        progress.tickets = (0, len(new))
        error = None
        try:
            await self._ensure_classes({r.klass for r in new})
            sent, error = await self._publish_all([tickets.ticket_message(self.b, r, r.klass) for r in new])
            progress.tickets = (sent, len(new))
        except SYNC_WRITE_ERRORS as exc:
            error = exc
        if failed:  # the records' failure came first: it is the one to report
            raise self._sync_stopped(failed[0], progress, f"the jobs bucket {self.names.jobs_bucket}") from failed[0]
        if error is not None:
            raise self._sync_stopped(error, progress, f"the jobs stream {self.names.jobs_stream}") from error
        respecced = set(report.updated)
        report.created = [r.job_id for r in new]
        report.updated = [r.job_id for r, c in zip(existing, changed, strict=True) if c or r.job_id in respecced]
        report.unchanged = [
            r.job_id for r, c in zip(existing, changed, strict=True) if not c and r.job_id not in respecced
        ]
        report.not_in_manifest = sorted(await job_ids(self.b) - {s.job_id for s in manifest.jobs})
        # The fleet's name (status, the monitor and `up` show it): the manifest synced last names it.
        await specs.put_fleet_info(self.b, name=manifest.name, manifest=manifest.path)
        log.info(
            "sync %s: %d new, %d updated, %d unchanged, %d refused, %d only in KV",
            manifest.path,
            len(report.created),
            len(report.updated),
            len(report.unchanged),
            len(report.refused),
            len(report.not_in_manifest),
        )
        return report

    async def _publish_all(
        self, messages: list[tuple[str, bytes, dict[str, str] | None]]
    ) -> tuple[int, BaseException | None]:
        """Publish (subject, payload, headers) messages to JetStream in order, pipelined: up to
        SYNC_PUBLISH_WINDOW awaiting their pub-ack. Returns how many were stored, and the first
        error (a refused pub-ack as an APIError; TimeoutError when no pub-ack came for
        SYNC_ACK_TIMEOUT_S), after which nothing more is sent.

        (Not js.publish_async: with nats-py 2.16 its future never completes when the pub-ack is
        an error, such as a full store's: a sync would wait forever.)"""
        nc = self.b.nc
        inbox = nc.new_inbox()
        window = asyncio.Semaphore(SYNC_PUBLISH_WINDOW)
        answered = asyncio.Event()
        stored = outstanding = 0
        errors: list[BaseException] = []

        async def on_ack(msg: Msg) -> None:
            nonlocal stored, outstanding
            outstanding -= 1
            window.release()
            error = _pub_ack_error(msg)
            if error is None:
                stored += 1
            else:
                errors.append(error)
            if outstanding == 0:
                answered.set()

        sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
        try:
            for i, (subject, payload, headers) in enumerate(messages):
                if errors:
                    break
                try:
                    await asyncio.wait_for(window.acquire(), SYNC_ACK_TIMEOUT_S)
                except TimeoutError as exc:
                    return stored, exc
                outstanding += 1
                answered.clear()
                await nc.publish(subject, payload, reply=f"{inbox}.{i}", headers=headers)
            if outstanding:
                try:
                    await asyncio.wait_for(answered.wait(), SYNC_ACK_TIMEOUT_S)
                except TimeoutError as exc:
                    return stored, errors[0] if errors else exc
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        return stored, errors[0] if errors else None

    def _sync_stopped(self, exc: BaseException, progress: SyncProgress, where: str) -> BrokerError:
        """The error of a sync a write stopped: what stopped it, how far it got, and what to do."""
        code = getattr(exc, "err_code", None)
        description = getattr(exc, "description", None) or str(exc) or type(exc).__name__
        then = (
            f"{progress.text()}. What was written is consistent: once there is room, sync the same manifest "
            "again (it creates what is missing and keeps what exists); a pending record without its ticket "
            "gets one from the controller's reconcile"
        )
        limit = jsapi.storage_limit(code, description)
        if limit is not None:
            return StoreFull(
                f"sync stopped: {where} has no room (err_code {code}, {description}): {limit} is reached. {then}. "
                f"To make room, {storage_advice(limit, self.names.logs_stream)} ({STORE_FULL_DOCS})"
            )
        if isinstance(exc, TimeoutError):
            return BrokerError(
                f"sync stopped: {where} did not acknowledge writes in time (the server is not storing: a full "
                f"disk under its JetStream store does this, as does an overloaded or leaderless server). {then} "
                f"({STORE_FULL_DOCS})"
            )
        return BrokerError(f"sync stopped: writing to {where} failed ({description}). {then}")

    async def _specs_to_write(
        self, wanted: list[JobSpec], report: SyncReport, allow_command_change: bool
    ) -> list[JobSpec]:
        """The specs a sync writes: new ones, changed ones (command changes only when allowed),
        and any not signed by this controller's key. Existing jobs whose spec changes are
        noted in ``report.updated``; refused command changes in ``report.refused``."""
        stored = await specs.load_sealed(self.b)
        key = self.signer.public_key if self.signer else ""
        out = []
        for spec in wanted:
            old = stored.get(spec.job_id)
            if old is None:
                out.append(spec)
                continue
            change = execution_change(old.spec, spec)
            if change and not allow_command_change:
                log.warning("sync: job %s (%s) would change its %s; refused", spec.job_id[:12], spec.name, change)
                report.refused.append(
                    {
                        "job_id": spec.job_id,
                        "name": spec.name,
                        "reason": f"{change}: refused (sync again allowing command changes to apply it)",
                    }
                )
                continue
            if change:
                log.warning(
                    "sync: job %s (%s) changes its %s (allowed by the operator)", spec.job_id[:12], spec.name, change
                )
            if old.spec != spec or old.key != key:
                out.append(spec)
                if old.spec != spec:
                    report.updated.append(spec.job_id)
        return out

    async def _refresh(self, fresh: JobRecord) -> bool:
        """Bring an existing record's scheduling and policy fields to the manifest's; False when they were."""

        def refreshed(rec: JobRecord) -> JobRecord | None:
            keep = (rec.excluded_hosts, rec.max_attempts, rec.priority, rec.fallback_class)
            if keep == (fresh.excluded_hosts, fresh.max_attempts, fresh.priority, fresh.fallback_class):
                return None
            return rec.evolve(
                excluded_hosts=fresh.excluded_hosts,
                max_attempts=fresh.max_attempts,
                priority=fresh.priority,
                fallback_class=fresh.fallback_class,
            )

        return await update_record(self.b, fresh.job_id, refreshed) is not None

    async def reload(self, *, allow_command_change: bool = False) -> SyncReport:
        """Re-read the --manifest file this controller was started with (only that file)."""
        if not self.manifest_path:
            raise UsageError("this controller was started without --manifest; use `trainfleet sync FILE`")
        return await self.sync(load_manifest(self.manifest_path), allow_command_change=allow_command_change)

    async def sync_text(self, text: str, file: str, *, allow_command_change: bool = False) -> SyncReport:
        """Sync manifest text an operator sent. ``file`` only names it in messages: it never
        changes which file `reload` reads, and is never opened."""
        return await self.sync(parse_manifest(text, file=file), allow_command_change=allow_command_change)

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

    async def prune_artifacts(self) -> list[str]:
        """Remove stored artifacts no job record points at, once older than artifact_prune_age_s
        (what a requeue leaves behind); returns the artifact ids removed."""
        try:
            report = await Artifacts(self.b).prune(self.settings.artifact_prune_age_s)
        except (TimeoutError, nats.errors.Error, TrainfleetError) as exc:
            log.warning("artifact prune failed (will retry): %r", exc)
            return []
        if report.removed:
            shown = sorted(report.removed)[:20]
            more = f" and {len(report.removed) - len(shown)} more" if len(report.removed) > len(shown) else ""
            log.info(
                "artifact prune: removed %d unreferenced artifact(s), %d bytes: %s%s; kept %d referenced, %d recent",
                len(report.removed),
                report.bytes,
                ", ".join(shown),
                more,
                report.kept_referenced,
                report.kept_recent,
            )
        return report.removed

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
                await self._ticket(rec, rec.klass, dedupe_suffix=f".r{int(now)}")
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
                    await self._ticket(rec, klass, dedupe_suffix=f".o{ref.seq}")
            moved += len(tail)
        return moved

    async def _grace(self, stored: Stored, now: float) -> int:
        """prefer_cuda jobs nobody with a GPU claimed within the grace window go to cpu as well."""
        rec = stored.record
        grace = self.settings.prefer_cuda_grace_s
        if self.manifest and self.manifest.settings.prefer_cuda_grace_s is not None:
            grace = self.manifest.settings.prefer_cuda_grace_s
        fallback = rec.fallback_class
        if fallback is None or fallback in rec.offered or now - rec.queued_at < grace:
            return 0
        await cas(self.b, rec.evolve(offered=(*rec.offered, fallback)), stored.revision)
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
            await self._ticket(rec, klass, dedupe_suffix=f".r{int(time.time())}")
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
        await self._ticket(rec, ticket.klass, dedupe_suffix=f".x{seq}")
        return "reoffered"

    # -- operator actions ---------------------------------------------------
    async def _resolve(self, ref: str) -> Job:
        """The job ``ref`` names, reading only what it must: a full id is one record and one
        spec; a name goes through this controller's index of names (built from the specs
        bucket on the first lookup by name, then kept by a watch); an id prefix lists the
        jobs bucket's keys. Same answers and errors as resolving over every job."""
        index: NameIndex | None = getattr(self, "_job_names", None)
        if index is None or index.broker is not self.b:
            index = self._job_names = NameIndex(self.b)
        return await resolve(self.b, ref, index)

    async def cancel(self, ref: str) -> Job:
        """Cancel a job that is not terminal; its agent sees the change and stops the trainer."""
        job = await self._resolve(ref)  # resolved once, not per CAS retry
        name = job.spec.name

        def cancelled(rec: JobRecord) -> JobRecord:
            if rec.status.terminal:
                raise Refused(f"job {name} is already {rec.status.value}; nothing to cancel")
            return rec.evolve(status=JobStatus.CANCELLED, finished_at=time.time(), reason="cancelled by operator")

        done = await update_record(self.b, job.job_id, cancelled)
        assert done is not None
        return Job(job.spec, done.record, done.revision)

    async def requeue(self, ref: str) -> Job:
        """Put a failed, cancelled or completed job back to pending as a new generation, with a ticket."""
        job = await self._resolve(ref)
        name = job.spec.name

        def requeued(rec: JobRecord) -> JobRecord:
            if rec.status not in REQUEUEABLE:
                raise Refused(
                    f"job {name} is {rec.status.value}; only failed, cancelled or completed jobs can be requeued"
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

        fresh = await update_record(self.b, job.job_id, requeued)
        assert fresh is not None
        await self._ticket(fresh.record, fresh.record.klass)
        return Job(job.spec, fresh.record, fresh.revision)

    def host_policy(self, host_id: str) -> dict[str, Any]:
        """The manifest's overrides for ``host_id`` (caps on what its agent offers), or {}."""
        policy = self.manifest.hosts.get(host_id) if self.manifest else None
        if policy is None:
            return {}
        keys = ("max_cores", "max_ram_gib", "max_vram_gib", "cpu_slots", "gpu_slots", "serve_cpu")
        return {k: getattr(policy, k) for k in keys if getattr(policy, k) is not None}


def _pub_ack_error(msg: Msg) -> BaseException | None:
    """The error a pub-ack reports (None: the message is stored)."""
    if jsapi.status_of(msg) == jsapi.STATUS_NO_RESPONDERS:
        return nats.errors.NoRespondersError()
    try:
        ack = json.loads(msg.data)
    except ValueError:
        return nats.js.errors.APIError(description=f"unreadable pub-ack {msg.data[:80]!r}")
    if not isinstance(ack, dict):
        return nats.js.errors.APIError(description=f"unexpected pub-ack {msg.data[:80]!r}")
    error = ack.get("error")
    if error is not None:
        fields = error if isinstance(error, dict) else {"description": str(error)}
        return nats.js.errors.APIError(
            code=fields.get("code"), err_code=fields.get("err_code"), description=fields.get("description")
        )
    return None


def _first_inversion(priorities: list[int]) -> int | None:
    """Index of the first entry with a strictly higher priority somewhere after it."""
    best_after = None
    first = None
    for i in range(len(priorities) - 1, -1, -1):
        if best_after is not None and priorities[i] < best_after:
            first = i
        best_after = priorities[i] if best_after is None else max(best_after, priorities[i])
    return first
