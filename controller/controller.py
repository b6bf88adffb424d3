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
import math
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from trainfleet.broker import jsapi, specs, tickets
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import (
    BrokerError,
    JobNotFound,
    NotProvisioned,
    Refused,
    StoreFull,
    TrainfleetError,
    UsageError,
)
from trainfleet.broker.jobs import Job, NameIndex, resolve
from trainfleet.broker.provision import STORE_FULL_DOCS, ensure_consumer, storage_advice
from trainfleet.broker.records import RecordCache, RecordView, cas, create_record, get_record, load_as, update_record
from trainfleet.broker.retry import patiently
from trainfleet.broker.schema import JobRecord, JobSpec, JobStatus, encode
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import Signer
from trainfleet.broker.tickets import TicketRef, publish_ticket
from trainfleet.controller.manifest import Manifest, excluded_hosts, load_manifest, parse_manifest
from trainfleet.controller.service import start_service

log = logging.getLogger("trainfleet.controller")

REQUEUEABLE = (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.COMPLETED)
# Record writes that need a read first (a record written meanwhile, a refresh) in flight during a sync.
SYNC_WINDOW = 64
# Jobs per chunk of a sync's pipeline: a chunk's records go once its specs are stored, its
# tickets once its records are settled, while later chunks' specs and records are written.
# The first chunk is SYNC_FIRST_CHUNK jobs and each next one twice the last, up to SYNC_CHUNK:
# the records' and tickets' streams start writing after a few ms, not after 1,024 fsyncs.
SYNC_CHUNK = 1024
SYNC_FIRST_CHUNK = 32
# Writes a sync has in flight per stream (published, pub-ack not yet in), and how long it waits
# for the next pub-ack: a server that cannot write (a full disk under its store) answers nothing.
SYNC_PUBLISH_WINDOW = 1024
SYNC_ACK_TIMEOUT_S = 30.0
# What a write of a sync may fail with (anything else is a bug, and propagates as it is).
SYNC_WRITE_ERRORS = (TimeoutError, nats.errors.Error, nats.js.errors.Error)

_T = TypeVar("_T")


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
        self._records: RecordCache | None = None  # reconcile's, started by its first pass
        self._queued: tickets.QueuedTickets | None = None  # reconcile's, read whole by its first pass
        self._job_names: NameIndex | None = None  # cancel's and requeue's, built by the first lookup by name

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
        if self._records is not None:
            await self._records.stop()
            self._records = None
        self._queued = None
        if self._job_names is not None:
            await self._job_names.stop()
            self._job_names = None
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

        The stored specs and records are read once, in bulk, and compared here: only what
        changed is written (an unchanged re-sync writes nothing but the fleet's name). Writes
        go out pipelined, SYNC_CHUNK jobs at a time, the three streams overlapping: a chunk's
        tickets while later chunks' records and specs are written (each write is fsynced, and
        the server writes the three streams in parallel). A job's spec is stored before its
        record is written and its record before its ticket: an agent that sees a record or a
        ticket finds its spec. A record is created on the condition that there is none; a
        create that loses (someone wrote the record meanwhile, or a delete mark is there) is
        decided again on a fresh read, and a refresh is a read → change → CAS, as before.

        A write that fails (a full store, a server that stops answering) stops the sync: no
        further write is started, and StoreFull (BrokerError when it was not about space) says
        what stopped it and how many specs, records and tickets were written of how many. What
        was written is consistent: syncing again creates the rest, and reconcile gives a pending
        record without a ticket its ticket."""
        self.manifest = manifest
        report = SyncReport()
        wanted = sorted(manifest.jobs, key=lambda s: -s.priority)
        stored_specs, stored = await asyncio.gather(specs.load_sealed(self.b), load_as(self.b, _RecordPolicy))
        to_write = {s.job_id for s in self._specs_to_write(stored_specs, wanted, report, allow_command_change)}
        del stored_specs
        refused = {r["job_id"] for r in report.refused}
        run = _SyncRun(self, manifest, stored, to_write, refused)
        await run.write(wanted)
        respecced = set(report.updated)
        report.created = run.created
        report.updated = [j for j, c in run.existing if c or j in respecced]
        report.unchanged = [j for j, c in run.existing if not c and j not in respecced]
        report.not_in_manifest = sorted(stored.keys() - {s.job_id for s in manifest.jobs})
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

    def _specs_to_write(
        self, stored: dict[str, specs.Sealed], wanted: list[JobSpec], report: SyncReport, allow_command_change: bool
    ) -> list[JobSpec]:
        """The specs a sync writes: new ones, changed ones (command changes only when allowed),
        and any not signed by this controller's key. Existing jobs whose spec changes are
        noted in ``report.updated``; refused command changes in ``report.refused``."""
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
        """One pass over every unfinished record (from the record cache, kept current by a KV
        watch, so a pass reads the records once per controller, not once per pass) and every
        queued ticket (kept between passes too: a pass reads the tickets published since the
        last one, and drops those acked or deleted by their sequence). What the cache says only
        decides where to look: each repair re-reads the record (or CASes on its revision) before
        it writes."""
        now = time.time() if now is None else now
        if self._records is None:
            self._records = RecordCache(self.b)
        records = dict(await self._records.current())  # a copy: the watch updates the cache meanwhile
        if self._queued is None:
            self._queued = tickets.QueuedTickets(self.b)
        queued = await self._queued.current()
        # What is queued, flat (100k jobs: one tuple per ticket, not a set per job).
        live = _Queued(
            seqs={ref.seq for ref in queued},
            tickets={(t.job_id, t.generation, t.klass) for t in (ref.ticket for ref in queued) if t is not None},
            generations={(t.job_id, t.generation) for t in (ref.ticket for ref in queued) if t is not None},
        )
        stats: Counter[str] = Counter()
        stats["reordered"] = await self._reorder(records, queued)
        grace = self._grace_s()
        takeover_s = self.settings.lease_s * 2
        pending, held = JobStatus.PENDING, (JobStatus.CLAIMED, JobStatus.RUNNING)
        queued_tickets = live.tickets
        for view in records.values():
            status = view.status
            if status == pending:
                fallback = view.fallback_class
                due = fallback is not None and fallback not in view.offered and now - view.queued_at >= grace
                job, gen = view.job_id, view.generation
                missing = any((job, gen, k) not in queued_tickets for k in view.offered or (view.klass,))
                if due or missing:
                    granted, fresh = await self._grace(view, now, grace) if due else (0, None)
                    stats["grace"] += granted
                    stats["republished"] += await self._ensure_tickets(view.job_id, live, fresh)
            elif (
                status in held
                and view.lease_expired(takeover_s, now)
                and view.ticket_seq not in live.seqs
                and (view.job_id, view.generation) not in live.generations
            ):
                stats["takeover_tickets"] += await self._takeover(view, live, now)
        if any(stats.values()):
            log.info("reconcile: %s", dict(stats))
        return dict(stats)

    def _grace_s(self) -> float:
        if self.manifest and self.manifest.settings.prefer_cuda_grace_s is not None:
            return self.manifest.settings.prefer_cuda_grace_s
        return self.settings.prefer_cuda_grace_s

    async def _reorder(self, records: dict[str, RecordView], queued: list[TicketRef]) -> int:
        """Keep each class's queued tickets in priority order (a work queue is FIFO).

        When a higher-priority ticket waits behind a lower one, the queued tickets from the first
        inversion on are deleted and republished highest priority first. Only tickets of pending
        jobs move; a held job's ticket is its lease and stays. A ticket moved while an agent is
        deciding on it becomes a duplicate, which the record makes harmless."""
        by_class: dict[str, list[TicketRef]] = {}
        for ref in queued:
            view = records.get(ref.ticket.job_id) if ref.ticket else None
            if (
                ref.ticket is not None
                and view is not None
                and view.status == JobStatus.PENDING
                and view.generation == ref.ticket.generation
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
                view = records[ref.ticket.job_id] if ref.ticket else None
                if view is not None:
                    await self._ensure_classes([klass])
                    await tickets.publish_ticket(self.b, view, klass, dedupe_suffix=f".o{ref.seq}")  # type: ignore[arg-type]
            moved += len(tail)
        return moved

    async def _grace(self, view: RecordView, now: float, grace: float) -> tuple[int, JobRecord | None]:
        """prefer_cuda jobs nobody with a GPU claimed within the grace window go to cpu as well
        (decided again on a fresh read): (1, the record written) or (0, None)."""

        def offer_fallback(rec: JobRecord) -> JobRecord | None:
            fallback = rec.fallback_class
            if (
                rec.status != JobStatus.PENDING
                or rec.generation != view.generation
                or fallback is None
                or fallback in rec.offered
                or now - rec.queued_at < grace
            ):
                return None
            return rec.evolve(offered=(*rec.offered, fallback))

        try:
            done = await update_record(self.b, view.job_id, offer_fallback)
        except JobNotFound:
            return 0, None
        return (0, None) if done is None else (1, done.record)

    async def _ensure_tickets(self, job_id: str, live: _Queued, fresh: JobRecord | None) -> int:
        """Publish the tickets a pending record lacks, confirmed on ``fresh`` (the record just
        written) or a fresh read: the cache only said where to look."""
        if fresh is None:
            try:
                fresh = (await get_record(self.b, job_id)).record
            except JobNotFound:
                return 0
        if fresh.status != JobStatus.PENDING:
            return 0
        missing = [k for k in tickets.offered_classes(fresh) if (job_id, fresh.generation, k) not in live.tickets]
        for klass in missing:
            await self._ticket(fresh, klass, dedupe_suffix=f".r{int(time.time())}")
        return len(missing)

    async def _takeover(self, view: RecordView, live: _Queued, now: float) -> int:
        """A held record whose lease lapsed long ago and whose ticket is gone gets a ticket an
        agent can take it over with (decided again on a fresh read)."""
        try:
            rec = (await get_record(self.b, view.job_id)).record
        except JobNotFound:
            return 0
        if (
            not rec.status.held
            or not rec.lease_expired(self.settings.lease_s * 2, now)
            or rec.ticket_seq in live.seqs
            or (rec.job_id, rec.generation) in live.generations
        ):
            return 0
        await self._ticket(rec, rec.klass, dedupe_suffix=f".r{int(now)}")
        return 1

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
        if self._job_names is None or self._job_names.broker is not self.b:
            self._job_names = NameIndex(self.b)
        return await resolve(self.b, ref, self._job_names)

    async def cancel(self, ref: str) -> Job:
        """Cancel a job that is not terminal; its agent sees the change and stops the trainer."""
        job = await self._resolve(ref)  # resolved once, not per CAS retry
        name = job.spec.name

        def cancelled(rec: JobRecord) -> JobRecord:
            if rec.status.terminal:
                raise Refused(f"job {name} is already {rec.status.value}; nothing to cancel")
            return rec.evolve(status=JobStatus.CANCELLED, finished_at=time.time(), reason="cancelled by operator")

        # The record resolve just read is the CAS's first base (a lost CAS reads it again).
        done = await update_record(self.b, job.job_id, cancelled, known=job.stored)
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

        fresh = await update_record(self.b, job.job_id, requeued, known=job.stored)
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


@dataclass(frozen=True)
class _Queued:
    """The jobs stream as one reconcile pass read it."""

    seqs: set[int]  # every message still queued
    tickets: set[tuple[str, int, str]]  # (job id, generation, class) of each readable ticket
    generations: set[tuple[str, int]]  # (job id, generation) with any ticket queued


class _RecordPolicy(msgspec.Struct, kw_only=True, gc=False):
    """The fields of a stored record a sync refreshes from the manifest (the rest are not read)."""

    excluded_hosts: dict[str, str] = {}
    max_attempts: int = 3
    priority: int = 0
    fallback_class: str | None = None

    def matches(self, rec: JobRecord) -> bool:
        return (self.excluded_hosts, self.max_attempts, self.priority, self.fallback_class) == (
            rec.excluded_hosts,
            rec.max_attempts,
            rec.priority,
            rec.fallback_class,
        )


Outcome = int | BaseException | None  # a publish's stream sequence, its error, or None: not sent


class _Batch:
    """Publishes sent together: each one's outcome, filled in as its pub-ack comes."""

    __slots__ = ("out", "left", "sealed", "done")

    def __init__(self, size: int):
        self.out: list[Outcome] = [None] * size
        self.left = 0  # sent, not answered yet
        self.sealed = False  # every publish of the batch is sent (or will never be)
        self.done = asyncio.Event()


class _Pipelined:
    """JetStream publishes pipelined on one connection: up to SYNC_PUBLISH_WINDOW await their
    pub-ack. The first error other than a lost condition (a record written meanwhile) stops
    further sends (``fatal``); no pub-ack for SYNC_ACK_TIMEOUT_S counts as a TimeoutError.

    (Not js.publish_async: with nats-py 2.16 its future never completes when the pub-ack is
    an error, such as a full store's: a sync would wait forever.)"""

    def __init__(self, nc: Any, halted: Callable[[], bool]):
        self.nc = nc
        self.halted = halted  # the sync stopped elsewhere: send no more
        self.inbox = nc.new_inbox()
        self.fatal: BaseException | None = None
        self._window = asyncio.Semaphore(SYNC_PUBLISH_WINDOW)
        self._slots: dict[int, tuple[_Batch, int]] = {}
        self._next = 0
        self._acked_at = time.monotonic()
        self._sub: Any = None

    async def start(self) -> _Pipelined:
        self._sub = await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_ack)
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_ack(self, msg: Msg) -> None:
        slot = self._slots.pop(int(msg.subject.rsplit(".", 1)[1]), None)
        if slot is None:
            return  # answered after it was given up on
        self._window.release()
        self._acked_at = time.monotonic()
        batch, i = slot
        outcome = batch.out[i] = _pub_ack(msg)
        if isinstance(outcome, BaseException) and not _lost_condition(outcome) and self.fatal is None:
            self.fatal = outcome
        batch.left -= 1
        if batch.left == 0 and batch.sealed:
            batch.done.set()

    async def send(self, messages: list[tuple[str, bytes, dict[str, str] | None]]) -> _Batch:
        """Send ``messages`` in order (waiting for room in the window); :meth:`outcomes` waits
        for their pub-acks."""
        batch = _Batch(len(messages))
        nc, inbox = self.nc, self.inbox
        for i, (subject, payload, headers) in enumerate(messages):
            if self.fatal is not None or self.halted():
                break
            if self._window.locked():
                try:
                    await asyncio.wait_for(self._window.acquire(), SYNC_ACK_TIMEOUT_S)
                except TimeoutError as exc:
                    self.fatal = self.fatal or exc
                    break
            else:
                await self._window.acquire()
            n = self._next
            self._next += 1
            self._slots[n] = (batch, i)
            batch.left += 1
            await nc.publish(subject, payload, reply=f"{inbox}.{n}", headers=headers)
        batch.sealed = True
        if batch.left == 0:
            batch.done.set()
        # Publishes rarely wait: without a pause here one stage would send chunk after chunk
        # until its window is full, and the pub-acks and the other stages' sends wait meanwhile.
        await asyncio.sleep(0)
        return batch

    async def outcomes(self, batch: _Batch) -> list[Outcome]:
        """Each message's outcome, in order, once every one sent was answered (or given up on)."""
        while not batch.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(batch.done.wait(), SYNC_ACK_TIMEOUT_S)
            if not batch.done.is_set() and time.monotonic() - self._acked_at >= SYNC_ACK_TIMEOUT_S:
                for n, (owner, i) in list(self._slots.items()):
                    if owner is batch:
                        owner.out[i] = TimeoutError()
                        del self._slots[n]
                self.fatal = self.fatal or TimeoutError()
                batch.done.set()
        return batch.out


class _SyncRun:
    """The writes of one sync, chunk by chunk, the three streams overlapping (see sync).

    Three stages, one per stream, each sending its chunks in order and going on with the next
    chunk while the pub-acks of the last are still coming: a chunk's records are sent once
    all its specs are stored, its tickets once all its records are settled."""

    def __init__(
        self,
        ctl: Controller,
        manifest: Manifest,
        stored: dict[str, tuple[_RecordPolicy, int]],
        to_write: set[str],
        refused: set[str],
    ):
        self.ctl, self.b, self.manifest = ctl, ctl.b, manifest
        self.stored, self.to_write, self.refused = stored, to_write, refused
        self.created: list[str] = []
        self.existing: list[tuple[str, bool]] = []  # (job id, whether its record was refreshed)
        self.progress = SyncProgress(specs=(0, len(to_write)))
        self.failed: tuple[BaseException, str] | None = None
        self._gates: list[asyncio.Event] = []  # set on a failure, so no stage waits for ever
        self._specs_in: list[asyncio.Event] = []  # per chunk: its specs are stored
        self._records_in: list[asyncio.Event] = []  # per chunk: its records are settled
        self._recorded: dict[int, list[JobRecord]] = {}  # per chunk: its records created, awaiting tickets
        self._pending: list[asyncio.Task[None]] = []
        self._records_wanted = 0
        self._records_done = 0
        self._tickets_sent = 0
        self._tickets_wanted = 0

    def _fail(self, exc: BaseException, where: str) -> None:
        if self.failed is None:
            self.failed = (exc, where)
        for gate in self._gates:
            gate.set()

    def _halted(self) -> bool:
        return self.failed is not None

    async def write(self, wanted: list[JobSpec]) -> None:
        chunks = _chunked(wanted, SYNC_FIRST_CHUNK, SYNC_CHUNK)
        self._records_wanted = sum(1 for s in wanted if s.job_id not in self.refused)
        self._specs_in = [asyncio.Event() for _ in chunks]
        self._records_in = [asyncio.Event() for _ in chunks]
        self._gates = self._specs_in + self._records_in
        self._pending: list[asyncio.Task[None]] = []  # the tasks waiting for a chunk's pub-acks
        pubs = [await _Pipelined(self.b.nc, self._halted).start() for _ in range(3)]
        try:
            await asyncio.gather(
                self._spec_stage(pubs[0], chunks), self._record_stage(pubs[1], chunks), self._ticket_stage(pubs[2])
            )
            while self._pending:
                await self._pending.pop(0)
        finally:
            for task in self._pending:
                task.cancel()
            for pub in pubs:
                await pub.stop()
        if self.failed is not None:
            exc, where = self.failed
            raise self.ctl._sync_stopped(exc, self.progress, where) from exc

    async def _spec_stage(self, pub: _Pipelined, chunks: list[list[JobSpec]]) -> None:
        bucket, signer = self.ctl.names.specs_bucket, self.ctl.signer
        for i, chunk in enumerate(chunks):
            if self.failed is not None:
                return
            chosen = [s for s in chunk if s.job_id in self.to_write]
            batch = await pub.send([(jsapi.kv_subject(bucket, s.job_id), specs.seal(s, signer), None) for s in chosen])
            self._pending.append(asyncio.create_task(self._specs_stored(pub, batch, self._specs_in[i])))

    async def _specs_stored(self, pub: _Pipelined, batch: _Batch, stored: asyncio.Event) -> None:
        try:
            done = sum(1 for o in await pub.outcomes(batch) if isinstance(o, int))
            self.progress.specs = (self.progress.specs[0] + done, self.progress.specs[1])
            if pub.fatal is not None:
                self._fail(pub.fatal, f"the specs bucket {self.ctl.names.specs_bucket}")
        finally:
            stored.set()

    async def _record_stage(self, pub: _Pipelined, chunks: list[list[JobSpec]]) -> None:
        for i, chunk in enumerate(chunks):
            await self._specs_in[i].wait()
            if self.failed is not None:
                return
            if self.progress.records is None:
                self.progress.records = (0, self._records_wanted)
                self.progress.tickets = (0, 0)
            await self._records(pub, chunk, i)

    async def _ticket_stage(self, pub: _Pipelined) -> None:
        for i, settled in enumerate(self._records_in):
            await settled.wait()
            if self.failed is not None:
                return
            await self._tickets(pub, self._recorded.pop(i, []))

    async def _records(self, pub: _Pipelined, chunk: list[JobSpec], index: int) -> None:
        """Send the chunk's record creates; once answered (in a task of its own, while the next
        chunk is sent), settle what needs a read, note the records created (in the chunk's
        priority order) for the ticket stage and let it go on."""
        creates: list[JobRecord] = []
        refresh: list[JobRecord] = []
        for spec in chunk:
            if spec.job_id in self.refused:
                continue
            fresh = self.ctl._new_record(self.manifest, spec)
            have = self.stored.get(spec.job_id)
            if have is None:
                creates.append(fresh)
            elif have[0].matches(fresh):
                self.existing.append((spec.job_id, False))
                self._records_done += 1
            else:
                refresh.append(fresh)
        bucket = self.ctl.names.jobs_bucket
        header = {jsapi.EXPECTED_LAST_SUBJECT_SEQ: "0"}
        batch = await pub.send([(jsapi.kv_subject(bucket, r.job_id), encode(r), header) for r in creates])
        self._pending.append(asyncio.create_task(self._records_settled(pub, batch, creates, refresh, index)))

    async def _records_settled(
        self, pub: _Pipelined, batch: _Batch, creates: list[JobRecord], refresh: list[JobRecord], index: int
    ) -> None:
        try:
            outcomes = await pub.outcomes(batch)
            made = [isinstance(o, int) for o in outcomes]
            self._records_done += sum(made)
            if pub.fatal is not None:
                self._fail(pub.fatal, f"the jobs bucket {self.ctl.names.jobs_bucket}")
            else:
                # Written by someone else meanwhile (or a delete mark): decided on a fresh read.
                again = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException) and _lost_condition(o)]
                await self._one_by_one(creates, again, made, refresh)
            self._recorded[index] = [r for r, ok in zip(creates, made, strict=True) if ok]
            self.created += [r.job_id for r in self._recorded[index]]
            self.progress.records = (self._records_done, self._records_wanted)
        finally:
            self._records_in[index].set()

    async def _one_by_one(
        self, creates: list[JobRecord], again: list[int], made: list[bool], refresh: list[JobRecord]
    ) -> None:
        """The record writes that need a read first: SYNC_WINDOW at a time."""
        window = asyncio.Semaphore(SYNC_WINDOW)

        async def settle(rec: JobRecord, index: int | None) -> None:
            async with window:
                if self.failed is not None:
                    return
                try:
                    if index is not None and await create_record(self.b, rec):
                        made[index] = True
                    else:
                        self.existing.append((rec.job_id, await self.ctl._refresh(rec)))
                except SYNC_WRITE_ERRORS as exc:
                    self._fail(exc, f"the jobs bucket {self.ctl.names.jobs_bucket}")
                    return
                self._records_done += 1

        await asyncio.gather(*(settle(creates[i], i) for i in again), *(settle(r, None) for r in refresh))

    async def _tickets(self, pub: _Pipelined, recs: list[JobRecord]) -> None:
        self._tickets_wanted += len(recs)
        self.progress.tickets = (self._tickets_sent, self._tickets_wanted)
        if not recs:
            return
        where = f"the jobs stream {self.ctl.names.jobs_stream}"
        try:
            await self.ctl._ensure_classes({r.klass for r in recs})
        except SYNC_WRITE_ERRORS as exc:
            self._fail(exc, where)
            return
        batch = await pub.send([tickets.ticket_message(self.b, r, r.klass) for r in recs])
        self._pending.append(asyncio.create_task(self._tickets_answered(pub, batch, where)))

    async def _tickets_answered(self, pub: _Pipelined, batch: _Batch, where: str) -> None:
        outcomes = await pub.outcomes(batch)
        self._tickets_sent += sum(1 for o in outcomes if isinstance(o, int))
        self.progress.tickets = (self._tickets_sent, self._tickets_wanted)
        if pub.fatal is not None:
            self._fail(pub.fatal, where)


def _chunked(items: list[_T], first: int, most: int) -> list[list[_T]]:
    """``items`` in order, in chunks of ``first``, twice that, ... up to ``most`` items."""
    chunks, start, size = [], 0, max(1, min(first, most))
    while start < len(items):
        chunks.append(items[start : start + size])
        start += size
        size = min(most, size * 2)
    return chunks


def _lost_condition(exc: BaseException) -> bool:
    """A conditional write lost to another write (the subject's last sequence moved)."""
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code == jsapi.ERR_WRONG_LAST_SEQUENCE


def _pub_ack(msg: Msg) -> int | BaseException:
    """The stream sequence a pub-ack reports, or its error."""
    error = _pub_ack_error(msg)
    if error is not None:
        return error
    try:
        return int(json.loads(msg.data)["seq"])
    except (ValueError, KeyError, TypeError):
        return nats.js.errors.APIError(description=f"unexpected pub-ack {msg.data[:80]!r}")


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
