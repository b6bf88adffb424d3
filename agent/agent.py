"""The agent: pull eligible tickets, claim by CAS, run the trainer under a lease, ship the artifact.

A job's life on an agent is three steps: :meth:`Agent._claim` (decode the
ticket, judge the record, CAS it to claimed), :meth:`Agent._run` (start the
trainer, renew the lease every heartbeat) and :meth:`Agent._finish` (bundle,
upload, CAS to completed or failed, ack). Any CAS that finds the record no
longer ours means the lease is lost: the trainer is stopped and nothing it
produced is recorded.

Shutdown order (SIGTERM/SIGINT, or :meth:`Agent.request_stop`): stop taking
tickets → let running jobs finish for up to ``drain_timeout_s`` → hand the
rest back (record to pending, ticket NAKed for immediate redelivery) →
remove the worker entry → close the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import importlib.metadata
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from trainfleet.agent import artifacts
from trainfleet.agent.eligibility import ineligibility
from trainfleet.agent.trainer import TrainerProcess, build_argv
from trainfleet.broker import names as namesmod
from trainfleet.broker.connection import WATCH_INACTIVE_S, Broker, ConsumerUnavailable, TicketPuller
from trainfleet.broker.errors import SchemaError
from trainfleet.broker.schema import (
    Capability,
    JobRecord,
    JobStatus,
    ProgressEvent,
    Ticket,
    WorkerRecord,
    decode,
    encode,
)
from trainfleet.broker.settings import Settings

log = logging.getLogger("trainfleet.agent")

TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    asyncio.TimeoutError,
    OSError,
)


PROGRESS_EVENT_INTERVAL_S = 0.2
# How long a pull on a class whose doorbell rang waits for the ticket (returns as soon as it lands).
RUNG_WAIT_S = 0.1
# After a failed pull (server restarting, consumer gone) the loop waits this long before the next.
PULL_RETRY_S = 0.5


class Verdict(enum.Enum):
    CLAIM = "claim"
    DROP = "drop"
    WAIT = "wait"


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    FENCED = "fenced"
    HANDED_BACK = "handed back"
    RETRY = "retry"


@dataclass
class JobRun:
    """Everything the agent tracks about one job it holds."""

    msg: Msg
    record: JobRecord
    revision: int
    slot: str  # "cpu" or "gpu:<index>"
    workdir: Path
    lease_lost: asyncio.Event = field(default_factory=asyncio.Event)
    hand_back: asyncio.Event = field(default_factory=asyncio.Event)
    progress: dict[str, Any] = field(default_factory=dict)
    last_renewal: float = field(default_factory=time.monotonic)
    trainer: TrainerProcess | None = None
    exit_code: int | None = None
    log_bytes: int = 0
    last_event: float = 0.0

    @property
    def job_id(self) -> str:
        return self.record.job_id


@dataclass(frozen=True)
class AgentOptions:
    host_id: str | None = None
    cpu_slots: int = 1
    gpu_slots: int | None = None  # None: one per visible GPU
    serve_cpu: bool = True
    workdir: str | None = None
    handle_signals: bool = True
    keep_outputs: bool = False


class Agent:
    """One agent process: serves every class its host can, one job per slot."""

    def __init__(
        self, settings: Settings, options: AgentOptions = AgentOptions(), capability: Capability | None = None
    ):
        self.settings = settings
        self.options = options
        self.names = settings.names
        self.capability = capability
        self.broker: Broker | None = None
        self.running: dict[str, JobRun] = {}
        self.counters: dict[str, int] = {o.value: 0 for o in Outcome}
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._doorbell = asyncio.Event()
        self._rung: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumers: dict[str, str] = {}
        self._puller: TicketPuller | None = None
        self.free_cpu = 0
        self.free_gpus: list[int] = []
        self.started_at = time.time()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # -- setup -------------------------------------------------------------
    @property
    def host_id(self) -> str:
        assert self.capability is not None
        return self.capability.host_id

    def _detect(self) -> Capability:
        from trainfleet.agent.capability import detect

        return detect(self.options.host_id)

    def classes(self) -> list[str]:
        """Classes this agent serves, best fit first: pinned, big GPU tiers, then cpu."""
        assert self.capability is not None
        out = [namesmod.host_class(self.host_id)]
        if self.free_gpus or (self.capability.has_cuda and self.options.gpu_slots != 0):
            out += [namesmod.gpu_class(t) for t in namesmod.tiers_served(self.capability.vram_total_gib)]
        if self.options.serve_cpu or not self.capability.has_cuda:
            out.append(namesmod.cpu_class())
        return out

    def _init_slots(self) -> None:
        assert self.capability is not None
        gpus = [g.index for g in self.capability.gpus]
        if self.options.gpu_slots is not None:
            gpus = gpus[: self.options.gpu_slots]
        self.free_gpus = gpus
        self.free_cpu = self.options.cpu_slots if (self.options.serve_cpu or not gpus) else 0

    @property
    def workdir(self) -> Path:
        if self.options.workdir:
            return Path(self.options.workdir)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="trainfleet-agent-")
        return Path(self._tmp.name)

    # -- main loop ---------------------------------------------------------
    async def run(self) -> None:
        """Serve until asked to stop; then drain and hand back in the documented order."""
        if self.capability is None:
            self.capability = await asyncio.to_thread(self._detect)
        self._init_slots()
        if self.options.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        self.broker = await Broker.connect(
            self.settings, name=f"trainfleet-agent-{self.host_id}", provision=True, wait_s=self.settings.connect_wait_s
        )
        await self._apply_host_policy()
        await self._ring_on_new_tickets()
        self._puller = await TicketPuller(self.broker).start()
        log.info("agent %s serving %s", self.host_id, ", ".join(self.classes()))
        registry = asyncio.create_task(self._registry_loop())
        try:
            await self._fetch_loop()
        finally:
            await asyncio.shield(self._shutdown(registry))

    async def _apply_host_policy(self) -> None:
        """The manifest's [hosts.<id>] overrides, from the controller; the more restrictive of
        them and this agent's own flags and detection wins. No controller: keep our own."""
        from trainfleet.agent.capability import apply_overrides
        from trainfleet.controller.service import request

        assert self.broker is not None and self.capability is not None
        try:
            policy = await request(self.broker.nc, self.names, "hostpolicy", {"host_id": self.host_id}, timeout_s=3.0)
        except Exception as exc:  # no controller yet, or an older one: flags and detection rule
            log.info("no host policy from a controller (%s); using local settings", exc)
            return
        if not policy:
            return
        self.capability = apply_overrides(
            self.capability,
            max_cores=policy.get("max_cores"),
            max_ram_gib=policy.get("max_ram_gib"),
            max_vram_gib=policy.get("max_vram_gib"),
        )
        opts = self.options
        cpu_slots = min(opts.cpu_slots, policy["cpu_slots"]) if policy.get("cpu_slots") is not None else opts.cpu_slots
        gpu_slots = policy.get("gpu_slots")
        if opts.gpu_slots is not None:
            gpu_slots = opts.gpu_slots if gpu_slots is None else min(gpu_slots, opts.gpu_slots)
        serve_cpu = opts.serve_cpu and policy.get("serve_cpu") is not False
        self.options = dataclasses.replace(opts, cpu_slots=cpu_slots, gpu_slots=gpu_slots, serve_cpu=serve_cpu)
        self._init_slots()
        log.info("applied host policy %s", policy)

    def request_stop(self) -> None:
        """Signal-safe: only sets a flag; the loops do the rest."""
        self._stopping.set()
        self._slot_freed.set()

    async def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            await self.tick()

    async def tick(self) -> bool:
        """One round: fetch at most one ticket from the best class that has a free slot; when
        every class is empty, sleep until a ticket is published (the doorbell) or a short idle
        timeout passes (redeliveries of NAKed tickets ring no bell)."""
        servable = [k for k in self.classes() if self._has_slot_for(k)]
        if not servable:
            self._slot_freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), self.settings.fetch_timeout_s)
            return False
        # Classes whose doorbell rang go first (best fit among them): a fresh ticket is then one
        # fetch away, instead of waiting out short pulls on empty classes ahead of it.
        rung, self._rung = self._rung, set()
        self._doorbell.clear()
        for klass in [k for k in servable if k in rung] + [k for k in servable if k not in rung]:
            # A rung class's ticket may reach the doorbell a moment before the consumer can
            # deliver it: wait briefly for it there; empty classes answer at once.
            msg = await self._fetch_one(klass, RUNG_WAIT_S if klass in rung else 0.0)
            if msg is None or self._stopping.is_set():
                if msg is not None:
                    await self._safe(msg.nak())
                continue
            # Claim inline: the slot is taken before the next fetch, so an agent never holds
            # tickets it has no room for (that would NAK them and upset priority order).
            job = await self._claim_guarded(msg, klass)
            if job is not None:
                task = asyncio.create_task(self._serve(job))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._doorbell.wait(), self.settings.fetch_timeout_s)
        return False

    async def _ring_on_new_tickets(self) -> None:
        """A core subscription on our classes' subjects: every published ticket wakes the loop."""
        assert self.broker is not None

        async def ring(msg: Msg) -> None:
            self._rung.add(self.names.class_of_subject(msg.subject))
            self._doorbell.set()

        for klass in self.classes():
            await self.broker.nc.subscribe(self.names.jobs_subject(klass), cb=ring)

    async def _fetch_one(self, klass: str, wait_s: float = 0.0) -> Msg | None:
        """The class's next ticket if one is waiting now (a no_wait pull: an empty class costs one
        round trip, so a ticket published mid-round never waits out a pull on another class)."""
        assert self.broker is not None
        try:
            durable = self._consumers.get(klass)
            if durable is None:
                durable = self._consumers[klass] = await self.broker.ensure_consumer(klass)
            assert self._puller is not None
            return await self._puller.pull(durable, wait_s)
        except (ConsumerUnavailable, nats.js.errors.Error, *TRANSIENT) as exc:
            log.debug("fetch from %s failed: %r", klass, exc)
            self._consumers.pop(klass, None)
            await asyncio.sleep(PULL_RETRY_S)
            return None

    # -- slots -------------------------------------------------------------
    def _has_slot_for(self, klass: str) -> bool:
        if klass.startswith("gpu."):
            return bool(self.free_gpus)
        if klass == "cpu":
            return self.free_cpu > 0
        return self.free_cpu > 0 or bool(self.free_gpus)

    def _take_slot(self, record: JobRecord) -> str | None:
        c = record.spec.constraints
        wants_gpu = c.require_cuda or (c.prefer_cuda and bool(self.free_gpus))
        if wants_gpu or (record.klass.startswith("gpu.") and self.free_gpus):
            if self.free_gpus:
                return f"gpu:{self.free_gpus.pop(0)}"
            return None
        if self.free_cpu > 0:
            self.free_cpu -= 1
            return "cpu"
        return None

    def _release_slot(self, slot: str) -> None:
        if slot.startswith("gpu:"):
            self.free_gpus.append(int(slot.split(":", 1)[1]))
            self.free_gpus.sort()
        else:
            self.free_cpu += 1
        self._slot_freed.set()

    # -- one job -----------------------------------------------------------
    async def _claim_guarded(self, msg: Msg, klass: str) -> JobRun | None:
        try:
            return await self._claim(msg)
        except Exception:
            log.exception("claiming a ticket from %s failed; handing it back", klass)
            await self._safe(msg.nak(delay=self.settings.nak_delay_s))
            return None

    async def _serve(self, job: JobRun) -> None:
        """Run and finish a claimed job; the slot is released whatever happens."""
        self.running[job.job_id] = job
        await self._register()  # `workers` shows the new job at once, not at the next refresh
        try:
            await self._run(job)
            outcome = await self._finish(job)
            self.counters[outcome.value] += 1
            await self._event(job, "finished", outcome.value)
            log.info("job %s (%s) %s on %s", job.job_id[:12], job.record.spec.name, outcome.value, self.host_id)
        except Exception:
            log.exception("job %s failed in the agent; the lease will lapse and another agent retries", job.job_id[:12])
        finally:
            self.running.pop(job.job_id, None)
            self._release_slot(job.slot)
            await self._register()
            if not self.options.keep_outputs:
                shutil.rmtree(job.workdir, ignore_errors=True)

    def judge(self, record: JobRecord, ticket: Ticket, seq: int, now: float | None = None) -> tuple[Verdict, float]:
        """What a ticket means given the record (the truth): claim it, drop it, or wait."""
        now = time.time() if now is None else now
        if record.generation != ticket.generation or record.status.terminal:
            return Verdict.DROP, 0.0
        if record.status == JobStatus.PENDING:
            return Verdict.CLAIM, 0.0
        if record.lease_expired(self.settings.lease_s, now) and record.job_id not in self.running:
            return Verdict.CLAIM, 0.0  # takeover: the holder stopped renewing
        if record.ticket_seq is not None and record.ticket_seq != seq:
            return Verdict.DROP, 0.0  # a duplicate: the holder's own ticket covers the job
        last = record.heartbeat_at or record.claimed_at or now
        return Verdict.WAIT, max(1.0, self.settings.lease_s - (now - last) + 1.0)

    async def _claim(self, msg: Msg) -> JobRun | None:
        assert self.broker is not None and self.capability is not None
        try:
            ticket: Ticket = decode(msg.data, Ticket)
            if not namesmod.is_token(ticket.job_id):
                raise SchemaError(f"job id {ticket.job_id!r} is not a valid key")
        except SchemaError as exc:
            log.warning("dropping garbage ticket on %s: %s", msg.subject, exc)
            await self._safe(msg.term())
            return None
        seq = msg.metadata.sequence.stream
        for _ in range(5):
            try:
                entry = await self.broker.jobs.get(ticket.job_id)
            except nats.js.errors.KeyNotFoundError:
                log.warning("dropping ticket for unknown job %s", ticket.job_id)
                await self._safe(msg.ack())
                return None
            try:
                record: JobRecord = decode(entry.value, JobRecord)
            except SchemaError as exc:
                log.warning("job %s: record unreadable (%s); leaving it for a newer agent", ticket.job_id, exc)
                await self._safe(msg.nak(delay=self.settings.nak_delay_s * 6))
                return None
            verdict, delay = self.judge(record, ticket, seq)
            if verdict is Verdict.DROP:
                await self._safe(msg.ack())
                return None
            if verdict is Verdict.WAIT:
                await self._safe(msg.nak(delay=delay))
                return None
            result = await self._try_claim(msg, record, entry.revision or 0, seq)
            if isinstance(result, JobRun):
                return result
            if result:
                return None  # the ticket was answered (declined or failed)
            # Lost the CAS to another write: re-read and judge again.
        await self._safe(msg.nak(delay=self.settings.nak_delay_s))
        return None

    async def _try_claim(self, msg: Msg, record: JobRecord, revision: int, seq: int) -> JobRun | bool:
        """CAS the record to claimed. Returns the run, True when the ticket was answered
        (declined, or the job failed for too many attempts), False when another write won."""
        assert self.broker is not None and self.capability is not None
        reasons = ineligibility(record.spec, self._claim_time_capability(record), record=record)
        if reasons:
            await self._decline(msg, record, revision, reasons)
            return True
        if record.attempt >= record.max_attempts:
            failed = record.evolve(
                status=JobStatus.FAILED,
                finished_at=time.time(),
                claimed_by=None,
                reason=f"gave up after {record.attempt} attempts (max_attempts="
                f"{record.max_attempts}); last error: {record.last_error or 'none'}",
            )
            if await self._cas(record.job_id, failed, revision) is None:
                return False
            await self._safe(msg.ack())
            return True
        slot = self._take_slot(record)
        if slot is None:
            await self._safe(msg.nak(delay=1.0))
            return True
        now = time.time()
        claimed = record.evolve(
            status=JobStatus.CLAIMED,
            claimed_by=self.host_id,
            attempt=record.attempt + 1,
            claimed_at=now,
            heartbeat_at=now,
            ticket_seq=seq,
            reason=None,
            started_at=None,
            progress={},
        )
        new_rev = await self._cas(record.job_id, claimed, revision)
        if new_rev is None:
            self._release_slot(slot)
            return False
        workdir = self.workdir / "jobs" / record.job_id / f"attempt-{claimed.attempt}"
        shutil.rmtree(workdir, ignore_errors=True)
        return JobRun(msg=msg, record=claimed, revision=new_rev, slot=slot, workdir=workdir)

    def _claim_time_capability(self, record: JobRecord) -> Capability:
        """Free VRAM changes under other users' feet: re-read it when it matters."""
        assert self.capability is not None
        if record.spec.constraints.min_vram_gib and self.capability.has_cuda:
            from trainfleet.agent.capability import refresh_gpus

            return refresh_gpus(self.capability)
        return self.capability

    async def _decline(self, msg: Msg, record: JobRecord, revision: int, reasons: list[str]) -> None:
        """Ineligible: record why (once) and put the ticket back after a delay, never a hot loop."""
        reason = f"{self.host_id}: " + "; ".join(reasons)
        if record.reason != reason and record.status == JobStatus.PENDING:
            await self._cas(record.job_id, record.evolve(reason=reason), revision)
        await self._safe(msg.nak(delay=self.settings.nak_delay_s))

    async def _cas(self, job_id: str, record: JobRecord, revision: int) -> int | None:
        assert self.broker is not None and record.job_id == job_id
        return await self.broker.cas_record(record, revision)

    # -- run ---------------------------------------------------------------
    def _trainer_env(self, job: JobRun) -> dict[str, str]:
        assert self.capability is not None
        env = {"TRAINFLEET_HOST_ID": self.host_id, "TRAINFLEET_ATTEMPT": str(job.record.attempt)}
        if job.slot.startswith("gpu:"):
            index = int(job.slot.split(":", 1)[1])
            gpu = next((g for g in self.capability.gpus if g.index == index), None)
            env["CUDA_VISIBLE_DEVICES"] = gpu.uuid if gpu and gpu.uuid else str(index)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
        slots = max(1, self.options.cpu_slots + len(self.capability.gpus))
        env["OMP_NUM_THREADS"] = str(max(1, math.floor(self.capability.cores_usable / slots)))
        return env

    async def _run(self, job: JobRun) -> None:
        """Start the trainer and hold the lease until it exits, the lease is lost, or we hand back."""
        await self._safe(job.msg.in_progress())
        env = self._trainer_env(job)
        device = "cpu" if job.slot == "cpu" else f"{job.slot} {env['CUDA_VISIBLE_DEVICES']}"
        running = job.record.evolve(
            status=JobStatus.RUNNING, started_at=time.time(), heartbeat_at=time.time(), device=device
        )
        if not await self._write_held(job, running):
            return
        trainer = TrainerProcess(
            job.record.spec,
            job.workdir / "output",
            env=env,
            on_output=lambda stream, line: self._ship_log(job, stream, line),
            on_progress=lambda event: self._on_progress(job, event),
        )
        job.trainer = trainer
        try:
            await trainer.start()
        except OSError as exc:
            job.exit_code = 127
            trainer.stderr_tail.append(f"cannot start trainer {build_argv(job.record.spec, Path('OUT'))}: {exc}")
            return
        await self._event(job, "started")
        heartbeat = asyncio.create_task(self._heartbeat_loop(job))
        watch = asyncio.create_task(self._watch_record(job))
        waiter = asyncio.create_task(trainer.wait())
        lost = asyncio.create_task(job.lease_lost.wait())
        back = asyncio.create_task(job.hand_back.wait())
        try:
            await asyncio.wait({waiter, lost, back}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                await trainer.stop(self.settings.term_grace_s)
            job.exit_code = await waiter
        finally:
            for task in (heartbeat, watch, lost, back, waiter):
                task.cancel()

    async def _watch_record(self, job: JobRun) -> None:
        """Cancel, requeue and takeover are seen at once through a KV watch, not only at the next
        heartbeat (the heartbeat CAS stays the authority when the watch is down)."""
        assert self.broker is not None
        watcher = None
        try:
            watcher = await self.broker.jobs.watch(job.job_id, inactive_threshold=WATCH_INACTIVE_S)
            async for entry in watcher:
                if entry is None or entry.value is None or (entry.revision or 0) <= job.revision:
                    continue
                with contextlib.suppress(SchemaError):
                    if not self._still_ours(job, decode(entry.value, JobRecord)):
                        log.warning("job %s: record changed under us; lease lost", job.job_id[:12])
                        job.lease_lost.set()
                        return
        except (nats.js.errors.Error, *TRANSIENT) as exc:
            log.debug("job %s: record watch ended: %r", job.job_id[:12], exc)
        finally:
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()

    def _still_ours(self, job: JobRun, record: JobRecord) -> bool:
        mine = job.record
        return (
            record.status.held
            and record.claimed_by == self.host_id
            and record.attempt == mine.attempt
            and record.generation == mine.generation
        )

    async def _write_held(self, job: JobRun, record: JobRecord, patience_s: float | None = None) -> bool:
        """CAS a record we hold. A conflicting write that leaves it ours (a reload editing the
        name, say) is retried; one that doesn't (cancel, requeue, takeover) loses the lease.
        Transient errors (a leader election, a reconnect) are retried for ``patience_s``."""
        assert self.broker is not None
        deadline = time.monotonic() + (self.settings.lease_s if patience_s is None else patience_s)
        while True:
            try:
                revision = await self._cas(job.job_id, record, job.revision)
                if revision is None:
                    entry = await self.broker.jobs.get(job.job_id)
            except nats.js.errors.KeyNotFoundError:
                job.lease_lost.set()
                return False
            except (nats.js.errors.Error, *TRANSIENT):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)
                continue
            if revision is not None:
                job.revision, job.record = revision, record
                job.last_renewal = time.monotonic()
                return True
            current: JobRecord = decode(entry.value, JobRecord)
            if current == record:  # our write landed; only its ack was lost
                job.revision, job.record = entry.revision or 0, record
                job.last_renewal = time.monotonic()
                return True
            if not self._still_ours(job, current):
                job.lease_lost.set()
                return False
            job.revision = entry.revision or 0
            record = msgspec.structs.replace(record, spec=current.spec, excluded_hosts=current.excluded_hosts)

    async def _heartbeat_loop(self, job: JobRun) -> None:
        while not job.lease_lost.is_set():
            await asyncio.sleep(self.settings.heartbeat_s)
            await self._safe(job.msg.in_progress())
            try:
                beat = job.record.evolve(heartbeat_at=time.time(), progress=dict(job.progress))
                if not await self._write_held(job, beat, patience_s=self.settings.heartbeat_s):
                    log.warning("job %s: lease lost; stopping trainer", job.job_id[:12])
                    return
            except (SchemaError, nats.js.errors.Error, *TRANSIENT) as exc:
                if time.monotonic() - job.last_renewal > self.settings.lease_s:
                    log.warning("job %s: could not renew for a whole lease (%r); stopping", job.job_id[:12], exc)
                    job.lease_lost.set()
                    return

    async def _ship_log(self, job: JobRun, stream: str, line: bytes) -> None:
        assert self.broker is not None
        limit = self.settings.logs_max_bytes_per_job
        if job.log_bytes >= limit:
            return
        job.log_bytes += len(line)
        if job.log_bytes >= limit:
            line = b"[trainfleet: log truncated at %d bytes]\n" % limit
        with contextlib.suppress(*TRANSIENT, nats.errors.Error):
            await self.broker.nc.publish(
                self.names.logs_subject(job.job_id),
                line,
                headers={
                    "Trainfleet-Stream": stream,
                    "Trainfleet-Attempt": str(job.record.attempt),
                    "Trainfleet-Generation": str(job.record.generation),
                },
            )

    async def _on_progress(self, job: JobRun, event: dict[str, Any]) -> None:
        job.progress = {k: event.get(k) for k in ("step", "total", "metrics") if k in event}
        # A trainer may report every step; relay at most a few per second, and always the last.
        now = time.monotonic()
        last = event.get("step") is not None and event.get("step") == event.get("total")
        if not last and now - job.last_event < PROGRESS_EVENT_INTERVAL_S:
            return
        job.last_event = now
        await self._publish_event(
            job,
            ProgressEvent(
                job_id=job.job_id,
                step=event.get("step"),
                total=event.get("total"),
                metrics=event.get("metrics") or {},
                at=event.get("at") or time.time(),
                attempt=job.record.attempt,
                generation=job.record.generation,
            ),
        )

    async def _event(self, job: JobRun, kind: str, outcome: str | None = None) -> None:
        """Lifecycle marks are flushed: they must reach the stream even if we die right after."""
        assert self.broker is not None
        await self._publish_event(
            job,
            ProgressEvent(
                job_id=job.job_id,
                kind=kind,
                at=time.time(),
                host=self.host_id,
                attempt=job.record.attempt,
                generation=job.record.generation,
                outcome=outcome,
            ),
        )
        with contextlib.suppress(*TRANSIENT, nats.errors.Error):
            await self.broker.nc.flush(timeout=2)

    async def _publish_event(self, job: JobRun, event: ProgressEvent) -> None:
        assert self.broker is not None
        with contextlib.suppress(*TRANSIENT, nats.errors.Error):
            await self.broker.nc.publish(self.names.events_subject(job.job_id), encode(event))

    # -- finish ------------------------------------------------------------
    async def _finish(self, job: JobRun) -> Outcome:
        if job.lease_lost.is_set():
            return await self._fenced(job)
        if job.hand_back.is_set():
            return await self._hand_back(job)
        if job.exit_code == 0:
            return await self._complete(job)
        error = job.trainer.error_tail() if job.trainer else ""
        return await self._fail(
            job, error or f"trainer exited with {job.exit_code}", reason=f"trainer exited with {job.exit_code}"
        )

    async def _fail(self, job: JobRun, error: str, reason: str | None = None) -> Outcome:
        failed = job.record.evolve(
            status=JobStatus.FAILED,
            finished_at=time.time(),
            metrics=self._metrics(job),
            last_error=error,
            reason=reason or error.splitlines()[0][:200],
        )
        if not await self._write_held(job, failed):
            return await self._fenced(job)
        await self._safe(job.msg.ack())
        return Outcome.FAILED

    async def _complete(self, job: JobRun) -> Outcome:
        assert self.broker is not None
        try:
            bundle = await asyncio.to_thread(
                artifacts.build_bundle, job.workdir / "output", self._provenance(job), job.workdir / "bundle.tar.zst"
            )
            if bundle.size > self.settings.max_artifact_bytes:
                return await self._fail(
                    job,
                    f"artifact bundle is {bundle.size} bytes, over max_artifact_bytes "
                    f"{self.settings.max_artifact_bytes}: write less into the output dir "
                    "or raise TRAINFLEET_MAX_ARTIFACT_BYTES",
                )
            await artifacts.upload(self.broker, bundle)
        except Exception as exc:  # any upload failure leaves the job retryable
            log.warning("job %s: artifact upload failed: %r; handing back for retry", job.job_id[:12], exc)
            retry = job.record.evolve(
                status=JobStatus.PENDING,
                claimed_by=None,
                ticket_seq=None,
                last_error=f"artifact upload failed: {exc!r}",
            )
            if await self._write_held(job, retry):
                await self._safe(job.msg.nak(delay=self.settings.nak_delay_s))
                return Outcome.RETRY
            return await self._fenced(job)
        done = job.record.evolve(
            status=JobStatus.COMPLETED,
            finished_at=time.time(),
            artifact=bundle.sha256,
            artifact_bytes=bundle.size,
            metrics=self._metrics(job),
            last_error=None,
            reason=None,
        )
        if not await self._write_held(job, done):
            return await self._fenced(job)
        await self._safe(job.msg.ack())
        return Outcome.COMPLETED

    async def _fenced(self, job: JobRun) -> Outcome:
        """Our lease is gone: record nothing. Ack only a ticket nobody else can be using."""
        assert self.broker is not None
        with contextlib.suppress(Exception):
            entry = await self.broker.jobs.get(job.job_id)
            current: JobRecord = decode(entry.value, JobRecord)
            if current.status == JobStatus.CANCELLED or current.generation != job.record.generation:
                await self._safe(job.msg.ack())
        log.warning("job %s: fenced (lease lost); result discarded", job.job_id[:12])
        return Outcome.FENCED

    async def _hand_back(self, job: JobRun) -> Outcome:
        back = job.record.evolve(
            status=JobStatus.PENDING,
            claimed_by=None,
            ticket_seq=None,
            progress={},
            reason=f"handed back by {self.host_id} at shutdown",
        )
        if await self._write_held(job, back):
            await self._safe(job.msg.nak())
            return Outcome.HANDED_BACK
        return await self._fenced(job)

    def _metrics(self, job: JobRun) -> dict[str, Any]:
        path = job.workdir / "output" / "metrics.json"
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _provenance(self, job: JobRun) -> dict[str, Any]:
        rec = job.record
        versions = {"python": sys.version.split()[0]}
        for dist in ("trainfleet", "torch", "scikit-learn", "numpy", "nats-py"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                versions[dist] = importlib.metadata.version(dist)
        return {
            "job": msgspec.to_builtins(rec.spec),
            "host": msgspec.to_builtins(self.capability),
            "code_commit": self.capability.code_commit if self.capability else "",
            "versions": versions,
            "attempt": rec.attempt,
            "generation": rec.generation,
            "argv": build_argv(rec.spec, Path("OUT")),
            "timings": {
                "claimed_at": rec.claimed_at,
                "started_at": rec.started_at,
                "finished_at": time.time(),
                "duration_s": time.time() - (rec.started_at or time.time()),
            },
        }

    # -- registry and shutdown ----------------------------------------------
    def worker_record(self) -> WorkerRecord:
        assert self.capability is not None
        return WorkerRecord(
            host_id=self.host_id,
            capability=self.capability,
            classes=tuple(self.classes()),
            current_jobs=tuple(self.running),
            state="busy" if self.running else "idle",
            started_at=self.started_at,
            last_seen=time.time(),
            pid=os.getpid(),
        )

    async def _register(self) -> None:
        assert self.broker is not None
        with contextlib.suppress(*TRANSIENT, nats.js.errors.Error):
            await self.broker.workers.put(self.host_id, encode(self.worker_record()))

    async def _registry_loop(self) -> None:
        assert self.broker is not None
        period = min(self.settings.heartbeat_s, self.settings.worker_ttl_s / 3)
        while True:
            if self.capability is not None and self.capability.has_cuda:
                from trainfleet.agent.capability import refresh_gpus

                # Free VRAM moves with other users of the card; explain and plan read it here.
                self.capability = await asyncio.to_thread(refresh_gpus, self.capability)
            await self._register()
            await asyncio.sleep(period)

    async def _shutdown(self, registry: asyncio.Task[None]) -> None:
        self._stopping.set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.drain_timeout_s)
            if pending:
                log.info("handing back %d running job(s)", len(self.running))
                for job in list(self.running.values()):
                    job.hand_back.set()
                await asyncio.wait(pending, timeout=self.settings.term_grace_s + 10)
        registry.cancel()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.workers.delete(self.host_id)
            await self.broker.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    @staticmethod
    async def _safe(coro: Any) -> None:
        """Acks and NAKs are best effort: a lost ack means a redelivery the record will judge."""
        try:
            await coro
        except (*TRANSIENT, nats.errors.Error) as exc:
            log.debug("ack/nak failed: %r", exc)
