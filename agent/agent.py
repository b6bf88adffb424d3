"""The agent: pull eligible tickets, claim by CAS, run the trainer under a lease, ship the artifact.

:class:`Agent` is the coordinator: its loop (:meth:`Agent.tick`) fetches at most one
ticket per round from the best class with a free slot and hands it to the
:class:`~trainfleet.agent.claim.Claimer`; a claimed job becomes a
:class:`~trainfleet.agent.held.HeldJob` that runs, renews its lease and settles
itself. The agent keeps the slots, the worker registry entry and the shutdown.

Shutdown order (SIGTERM/SIGINT; on Windows SIGINT/SIGBREAK or the stop file, see
agent/hostos.py and ``AgentOptions.stop_file``; or :meth:`Agent.request_stop`):
1. stop taking tickets (the loop ends; tickets fetched meanwhile are NAKed);
2. let running jobs finish for up to ``drain_timeout_s``;
3. hand the rest back (record to pending, ticket NAKed for immediate redelivery);
4. remove the worker entry;
5. close the connection (flushing the last acks).
A stop requested while the agent is still connecting ends the connect at once. Where the agent
is PID 1 (a container), agent/pid1.py keeps a tiny init in front of it that forwards these
signals and reaps orphans. ``AgentOptions.health_file``: the file agent/health.py judges,
rewritten every heartbeat (state, connected, jobs).

Roles: agent (pulls and acks tickets, reads the records and specs of the tickets its
doorbell brings, CASes records it claims, writes its own worker entry, calls
``ctl.hostpolicy``). Provisioning at start needs the admin role.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg

from trainfleet.agent import health, hostos, logfmt
from trainfleet.agent.claim import Claimer
from trainfleet.agent.held import HeldJob, Outcome
from trainfleet.agent.sandbox import TrainerCgroup
from trainfleet.broker import jsapi, tickets
from trainfleet.broker.connection import Broker
from trainfleet.broker.control import request
from trainfleet.broker.errors import TRANSIENT, ConsumerUnavailable
from trainfleet.broker.logs import Outbox
from trainfleet.broker.schema import Capability, GpuStat, JobRecord, JobSpec, WorkerRecord
from trainfleet.broker.settings import Settings
from trainfleet.broker.tickets import TicketPuller
from trainfleet.broker.workers import put_worker, remove_worker

log = logging.getLogger("trainfleet.agent")
# Said when a job's events have not reached the logs stream yet (its leader being elected):
# the outbox keeps sending them, and they are lost only if this process dies first.
MARKS_ON_THEIR_WAY = "its events are not in the logs stream yet (an election?); they follow"

# How long a pull on a class whose doorbell rang waits for the ticket (returns as soon as it lands).
RUNG_WAIT_S = 0.1
# An idle agent parks one pull per class it serves; each waits this long at most, then the
# agent pulls again. One per class per 15 s per idle agent is the standing cost (2,000 idle
# agents: ~133 re-pulls/s a class). Its expiry does not bound what a pull can strand: a pull
# takes one ticket at most, and a crashed agent's connection (and its waiting pulls) is gone
# with it; a hung but connected agent strands at most that one ticket per class until
# ack-wait, as a rung pull would. A stopping or full agent withdraws its pulls (unpark).
PARK_S = 15.0
# A class whose consumer refused a pull with 409 Exceeded MaxWaiting is rung by the doorbell
# instead of parked on for this long (times a jitter of 0.5-1.5, so refused agents spread out).
MAX_WAITING_BACKOFF_S = 1.0
# After a failed pull (server restarting) the loop waits this long before the next.
PULL_RETRY_S = 0.5
# A class whose consumer does not exist (nothing ticketed there yet) is tried again after this.
CONSUMER_RECHECK_S = 5.0
# How long the agent waits for a controller's host policy at start.
HOST_POLICY_TIMEOUT_S = 3.0
# How long a heartbeat waits for NVML's readings; past it the entry goes out without them.
GPU_TELEMETRY_TIMEOUT_S = 2.0
# How often the stop file (AgentOptions.stop_file) is looked for.
STOP_FILE_POLL_S = 1.0


class Slots:
    """What this agent can still take on: CPU slots (a count) and GPU slots (free GPU indexes).
    A slot is named ``cpu`` or ``gpu:<index>``; releasing one wakes a loop waiting for room."""

    def __init__(self, cpu: int, gpus: list[int], freed: asyncio.Event):
        self.free_cpu = cpu
        self.free_gpus = list(gpus)
        self._freed = freed

    def has_room_for(self, klass: str, *, taken: int = 0) -> bool:
        """Whether a ticket of ``klass`` could be run now (a pinned class: on any slot), with
        ``taken`` of the slots it could use counted as gone already (tickets kept to claim)."""
        if tickets.is_gpu_class(klass):
            return len(self.free_gpus) > taken
        if klass == tickets.cpu_class():
            return self.free_cpu > taken
        return self.free_cpu + len(self.free_gpus) > taken

    def take(self, record: JobRecord, spec: JobSpec) -> str | None:
        """A slot for the job (a GPU when it needs or prefers one and one is free), or None."""
        c = spec.constraints
        wants_gpu = c.require_cuda or (c.prefer_cuda and bool(self.free_gpus))
        if wants_gpu or (tickets.is_gpu_class(record.klass) and self.free_gpus):
            if self.free_gpus:
                return f"gpu:{self.free_gpus.pop(0)}"
            return None
        if self.free_cpu > 0:
            self.free_cpu -= 1
            return "cpu"
        return None

    def release(self, slot: str) -> None:
        if slot.startswith("gpu:"):
            self.free_gpus.append(int(slot.split(":", 1)[1]))
            self.free_gpus.sort()
        else:
            self.free_cpu += 1
        self._freed.set()


@dataclass(frozen=True)
class AgentOptions:
    host_id: str | None = None
    cpu_slots: int = 1
    gpu_slots: int | None = None  # None: one per visible GPU
    serve_cpu: bool = True
    workdir: str | None = None
    handle_signals: bool = True
    keep_outputs: bool = False
    health_file: str | None = None  # None: none written (the CLI always names one)
    stop_file: str | None = None  # drain and stop when it appears (the CLI's default: Windows only)


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
        self.outbox: Outbox | None = None
        self.running: dict[str, HeldJob] = {}
        self.counters: dict[str, int] = {o.value: 0 for o in Outcome}
        self.claimer = Claimer(self)
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._doorbell = asyncio.Event()
        self._rung: set[str] = set()
        self._idle = False  # waiting on the doorbell (or parked pulls) after every class was empty
        self._tasks: set[asyncio.Task[None]] = set()
        self._tasks_aside: set[asyncio.Task[None]] = set()  # not jobs: the stop-file watcher
        self._absent: dict[str, float] = {}  # class → when to look for its consumer again
        self._no_park: dict[str, float] = {}  # class → until when its consumer refuses more waiting pulls
        self._bells: dict[str, Any] = {}  # class → its doorbell subscription (classes not parked on)
        self._class_of: dict[str, str] = {}  # consumer → class, for parked pulls' answers
        # Tickets parked pulls brought, to claim next: at most one per class (a pull brings one).
        self._landed: dict[str, Msg] = {}
        self._puller: TicketPuller | None = None
        self.slots = Slots(0, [], self._slot_freed)
        self.started_at = time.time()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        from trainfleet.agent.capability import GpuTelemetry

        # Live GPU readings for the worker entry (NVML opened once, at the first read).
        self.telemetry = GpuTelemetry()
        self.gpu_stats: tuple[GpuStat, ...] = ()
        self.gpu_stats_reason = ""
        self._telemetry_read: asyncio.Future[tuple[tuple[GpuStat, ...], str]] | None = None
        self._health_failed = False  # said once that the health file cannot be written

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
        cap = self.capability
        gpu = bool(self.slots.free_gpus) or (cap.has_cuda and self.options.gpu_slots != 0)
        return tickets.classes_served(cap, gpu=gpu, cpu=self.options.serve_cpu or not cap.has_cuda)

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
        # Trainers of an agent that was killed may have left their (empty) cgroups behind.
        TrainerCgroup.sweep_stale()
        if self.options.handle_signals:
            hostos.install_stop_handlers(asyncio.get_running_loop(), self.request_stop)
        if self.options.stop_file:
            watcher = asyncio.create_task(self._watch_stop_file(Path(self.options.stop_file)))
            self._tasks_aside.add(watcher)
            watcher.add_done_callback(self._tasks_aside.discard)
        self._write_health("starting")
        # Bind only: provisioning is the admin's (or the controller's) job, never an agent's.
        connect = Broker.connect(
            self.settings, name=f"trainfleet-agent-{self.host_id}", wait_s=self.settings.connect_wait_s
        )
        self.broker = await self._unless_stopped(connect)
        if self.broker is None:  # stopped while still waiting for the server: nothing to hand back
            log.info("agent %s stopped before it connected", self.host_id)
            await self._shutdown(None)
            return
        if not self.settings.trust_keys:
            log.warning(
                "no trusted controller key (--trust-key / TRAINFLEET_TRUST_KEY): this agent runs job specs "
                "without checking who signed them; see docs/security.md"
            )
        self.outbox = Outbox(self.broker).start()
        await self._apply_host_policy()
        self._puller = await TicketPuller(self.broker).start()
        await self._ring_on_new_tickets()
        log.info("agent %s serving %s", self.host_id, ", ".join(self.classes()))
        registry = asyncio.create_task(self._registry_loop())
        try:
            while not self._stopping.is_set():
                await self.tick()
        finally:
            await asyncio.shield(self._stop_pulling())
            await asyncio.shield(self._shutdown(registry))

    async def _unless_stopped(self, coro: Any) -> Any:
        """``coro``'s result, or None when a stop is requested first (``coro`` is cancelled)."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return task.result() if not task.cancelled() else None

    async def _apply_host_policy(self) -> None:
        """The manifest's [hosts.<id>] overrides, from the controller; the more restrictive of
        them and this agent's own flags and detection wins. No controller: keep our own."""
        from trainfleet.agent.capability import apply_overrides

        assert self.broker is not None and self.capability is not None
        try:
            policy = await request(
                self.broker.nc, self.names, "hostpolicy", {"host_id": self.host_id}, timeout_s=HOST_POLICY_TIMEOUT_S
            )
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
        self._doorbell.set()

    async def _watch_stop_file(self, path: Path) -> None:
        """Request a stop when ``path`` appears (how a Scheduled Task's agent is stopped gently:
        Windows has no SIGTERM from outside). A file left from an earlier stop is removed first;
        the one that stops us is removed once seen."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        while not self._stopping.is_set():
            if path.exists():
                log.info("stop file %s found: draining", path)
                with contextlib.suppress(OSError):
                    path.unlink()
                self.request_stop()
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), STOP_FILE_POLL_S)

    async def tick(self, now: float | None = None) -> bool:
        """One round: claim the ticket a parked pull brought, or fetch at most one ticket from the
        best class that has a free slot (no_wait pulls: best fit while tickets wait). When every
        class is empty, park one pull per class and sleep until one brings a ticket or expires
        (a class that cannot be parked on, its consumer missing or full of waiting pulls, is
        rung by its doorbell and polled every ``fetch_timeout_s``). ``now``: the clock the
        claim judges leases by (default: the wall clock)."""
        servable = [k for k in self.classes() if self._has_slot_for(k)]
        for klass in [k for k in self._landed if k not in servable or self._stopping.is_set()]:
            await tickets.answer(self._landed.pop(klass).nak())  # no room after all: another agent's, at once
        if not servable:
            await self._unpark_full()
            self._slot_freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), self.settings.fetch_timeout_s)
            return False
        if self._landed:
            # Best fit first; the others stay for the next rounds (each checks its room again).
            klass = next(k for k in servable if k in self._landed)
            self.claimer.step("", f"pull (parked {klass})")
            await self._claim_and_serve(self._landed.pop(klass), klass, now)
            return True
        # Classes whose doorbell rang go first (best fit among them): a fresh ticket is then one
        # fetch away, instead of waiting out short pulls on empty classes ahead of it.
        rung, self._rung = self._rung, set()
        self._doorbell.clear()
        assert self._puller is not None
        # A class with a pull parked on it is empty (its next ticket comes on that pull).
        servable = [k for k in servable if self._present(k, rung) and not self._puller.parked(self.names.consumer(k))]
        for klass in [k for k in servable if k in rung] + [k for k in servable if k not in rung]:
            # A rung class's ticket may reach the doorbell a moment before the consumer can
            # deliver it: wait briefly for it there; empty classes answer at once.
            self.claimer.step("", f"pull ({'rung' if klass in rung else 'idle'} {klass})")
            msg = await self._fetch_one(klass, RUNG_WAIT_S if klass in rung else 0.0)
            if msg is None or self._stopping.is_set():
                if msg is not None:
                    await tickets.answer(msg.nak())
                continue
            await self._claim_and_serve(msg, klass, now)
            return True
        if self._stopping.is_set() or self._landed:
            return False
        await self._park_idle()
        self._idle = True
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                # Parked classes wake us with their answer; a polled class every fetch_timeout_s
                # (redeliveries of NAKed tickets ring no bell).
                # (Every fetch_timeout_s regardless: a round over parked classes sends nothing, and
                # one after a reconnect, which loses the server's waiting pulls, parks again.)
                await asyncio.wait_for(self._doorbell.wait(), self.settings.fetch_timeout_s)
        finally:
            self._idle = False
        return False

    async def _claim_and_serve(self, msg: Msg, klass: str, now: float | None) -> None:
        # Claim inline: the slot is taken before the next fetch, so an agent never holds
        # tickets it has no room for (that would NAK them and upset priority order).
        job = await self._claim_guarded(msg, klass, now)
        if job is not None:
            task = asyncio.create_task(self._serve(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await self._unpark_full()

    # -- parked pulls and the doorbell ----------------------------------------
    async def _park_idle(self) -> bool:
        """Every class with room is empty: park one pull on each class whose consumer takes it
        (its doorbell goes quiet: the pull brings its ticket) and ring the others' doorbells.
        True when some class is left to the doorbell (and polling)."""
        assert self._puller is not None
        polling = False
        clock = time.monotonic()
        for klass in self.classes():
            if not self._has_slot_for(klass):
                continue
            if self._absent.get(klass, 0.0) > clock or self._no_park.get(klass, 0.0) > clock:
                polling = True
                await self._bell(klass, True)
                continue
            durable = self.names.consumer(klass)
            self._class_of[durable] = klass
            await self._puller.park(durable, PARK_S, self._parked_answer)
            await self._bell(klass, False)
        return polling

    async def _parked_answer(self, durable: str, msg: Msg) -> None:
        """A parked pull's answer (its inbox's callback). A ticket is kept for the next rounds
        when its class has room beside the tickets kept already (several classes' pulls can
        answer at once); otherwise (stopping, no room, one kept for its class already) it is
        NAKed at once, so another agent's waiting pull gets it without delay."""
        klass = self._class_of.get(durable, "")
        status = jsapi.status_of(msg)
        if status is None:
            if self._stopping.is_set() or klass in self._landed or not self._room_beside_landed(klass):
                await tickets.answer(msg.nak())
                return
            self._landed[klass] = msg
        elif status == jsapi.STATUS_TIMEOUT or status == jsapi.STATUS_HEARTBEAT:
            pass  # expired: the next idle round parks again
        elif tickets.is_max_waiting(msg):
            self._no_park[klass] = time.monotonic() + MAX_WAITING_BACKOFF_S * random.uniform(0.5, 1.5)
            log.debug("class %s holds its max_waiting pulls: doorbell for a while", klass)
        else:  # 503 no responders, 409 consumer deleted: as a no_wait pull's ConsumerUnavailable
            log.debug("parked pull on %s: %s %s", klass, status, jsapi.description_of(msg))
            self._absent[klass] = time.monotonic() + CONSUMER_RECHECK_S
        self._doorbell.set()

    async def _unpark_full(self) -> None:
        """Withdraw the pulls parked on classes this agent has no room for now (a ticket they
        brought would be NAKed, one more delivery towards max_deliver)."""
        assert self._puller is not None
        for durable in self._puller.parked_on():
            klass = self._class_of.get(durable, "")
            # (a pull already answered needs no withdrawal: its inbox is kept for the next one)
            if self._puller.parked(durable) and (self._stopping.is_set() or not self._has_slot_for(klass)):
                await self._puller.unpark(durable)

    async def _stop_pulling(self) -> None:
        """Step 1 of the shutdown: withdraw every parked pull (a ticket already on its way is
        NAKed at once) and hand back a ticket kept for a claim that will not come."""
        if self._puller is not None:
            with contextlib.suppress(Exception):
                await self._puller.stop()
        landed, self._landed = self._landed, {}
        for msg in landed.values():
            await tickets.answer(msg.nak())

    async def _bell(self, klass: str, on: bool) -> None:
        """Subscribe (or drop) ``klass``'s doorbell: a core subscription on its ticket subject."""
        assert self.broker is not None
        sub = self._bells.get(klass)
        if on and sub is None:
            self._bells[klass] = await self.broker.nc.subscribe(self.names.jobs_subject(klass), cb=self._ring)
        elif not on and sub is not None:
            del self._bells[klass]
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _ring(self, msg: Msg) -> None:
        klass = self.names.class_of_subject(msg.subject)
        self._rung.add(klass)
        self._doorbell.set()
        self.claimer.step("", "doorbell")

    async def _ring_on_new_tickets(self) -> None:
        """Every class starts on its doorbell: a published ticket wakes the loop. A class goes
        quiet once a pull is parked on it (the pull brings the ticket)."""
        for klass in self.classes():
            await self._bell(klass, True)

    async def _fetch_one(self, klass: str, wait_s: float = 0.0) -> Msg | None:
        """The class's next ticket if one is waiting now (a no_wait pull: an empty class costs one
        round trip, so a ticket published mid-round never waits out a pull on another class).

        Agents never create consumers (the controller does, before it tickets a class): a class
        whose consumer does not exist yet is skipped until its doorbell rings or a while passes."""
        assert self.broker is not None and self._puller is not None
        try:
            return await self._puller.pull(self.names.consumer(klass), wait_s)
        except tickets.MaxWaitingExceeded as exc:
            log.debug("class %s holds its max_waiting pulls: %s", klass, exc)
            self._no_park[klass] = time.monotonic() + MAX_WAITING_BACKOFF_S * random.uniform(0.5, 1.5)
            return None
        except ConsumerUnavailable as exc:
            log.debug("class %s has no consumer yet: %s", klass, exc)
            self._absent[klass] = time.monotonic() + CONSUMER_RECHECK_S
            return None
        except (nats.js.errors.Error, *TRANSIENT) as exc:
            log.debug("fetch from %s failed: %r", klass, exc)
            await asyncio.sleep(PULL_RETRY_S)
            return None

    def _present(self, klass: str, rung: set[str]) -> bool:
        """False while ``klass`` is known to have no consumer (and no ticket rang since)."""
        if klass in rung:
            self._absent.pop(klass, None)
        return self._absent.get(klass, 0.0) <= time.monotonic()

    # -- slots (and the rest of what a claim needs: claim.Seat) ---------------
    def _init_slots(self) -> None:
        assert self.capability is not None
        gpus = [g.index for g in self.capability.gpus]
        if self.options.gpu_slots is not None:
            gpus = gpus[: self.options.gpu_slots]
        cpu = self.options.cpu_slots if (self.options.serve_cpu or not gpus) else 0
        self.slots = Slots(cpu, gpus, self._slot_freed)

    def _has_slot_for(self, klass: str) -> bool:
        return self.slots.has_room_for(klass)

    def _room_beside_landed(self, klass: str) -> bool:
        """Room for one more ticket of ``klass`` once those kept already are claimed."""
        return self.slots.has_room_for(klass, taken=len(self._landed))

    def take_slot(self, record: JobRecord, spec: JobSpec) -> str | None:
        return self.slots.take(record, spec)

    def release_slot(self, slot: str) -> None:
        self.slots.release(slot)

    def holds(self, job_id: str) -> bool:
        return job_id in self.running

    def claim_capability(self, spec: JobSpec) -> Capability:
        """Free VRAM changes under other users' feet: re-read it when it matters."""
        assert self.capability is not None
        if spec.constraints.min_vram_gib and self.capability.has_cuda:
            from trainfleet.agent.capability import refresh_gpus

            return refresh_gpus(self.capability)
        return self.capability

    def job_workdir(self, job_id: str, attempt: int) -> Path:
        return self.workdir / "jobs" / job_id / f"attempt-{attempt}"

    def trainer_threads(self) -> int:
        """Cores per slot: every slot's trainer may run at once."""
        assert self.capability is not None
        slots = max(1, self.options.cpu_slots + len(self.capability.gpus))
        return max(1, math.floor(self.capability.cores_usable / slots))

    # -- one job -----------------------------------------------------------
    async def _claim_guarded(self, msg: Msg, klass: str, now: float | None = None) -> HeldJob | None:
        try:
            return await self.claimer.claim(msg, now)
        except Exception:
            log.exception("claiming a ticket from %s failed; handing it back", klass)
            await tickets.answer(msg.nak(delay=self.settings.nak_delay_s))
            return None

    async def _serve(self, job: HeldJob) -> None:
        """Run and settle a claimed job; the slot is released whatever happens."""
        logfmt.JOB_ID.set(job.job_id)  # this task's log lines name the job (--log-format json)
        self.running[job.job_id] = job
        await self._register()  # `workers` shows the new job at once, not at the next refresh
        job.step("worker entry written")
        try:
            await job.run()
            outcome = await job.settle()
            self.counters[outcome.value] += 1
            sent = await job.relay.mark("finished", outcome.value)
            log.info(
                "job %s (%s) %s on %s%s",
                job.job_id[:12],
                job.spec.name,
                outcome.value,
                self.host_id,
                "" if sent else f"; {MARKS_ON_THEIR_WAY}",
            )
        except Exception:
            log.exception("job %s failed in the agent; the lease will lapse and another agent retries", job.job_id[:12])
        finally:
            await job.stop_renewing()
            self.running.pop(job.job_id, None)
            self.release_slot(job.slot)
            await self._register()
            if not self.options.keep_outputs:
                job.discard_workdir()

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
            gpu_stats=self.gpu_stats,
            gpu_stats_reason=self.gpu_stats_reason,
        )

    async def _register(self) -> None:
        assert self.broker is not None
        with contextlib.suppress(*TRANSIENT, nats.js.errors.Error):
            await put_worker(self.broker, self.worker_record())

    async def _registry_loop(self) -> None:
        period = min(self.settings.heartbeat_s, self.settings.worker_ttl_s / 3)
        while True:
            await self._read_gpus()
            await self._register()
            self._write_health("draining" if self._stopping.is_set() else "serving", period)
            await asyncio.sleep(period)

    def _write_health(self, state: str, period_s: float | None = None) -> None:
        """Rewrite the health file (agent/health.py), if this agent keeps one."""
        if not self.options.health_file:
            return
        if period_s is None:
            period_s = min(self.settings.heartbeat_s, self.settings.worker_ttl_s / 3)
        connected = self.broker is not None and self.broker.nc.is_connected
        status = health.Health(
            host_id=self.host_id,
            pid=os.getpid(),
            state=state,
            connected=connected and state != "stopped",
            running_jobs=len(self.running),
            heartbeat_s=period_s,
            written_at=time.time(),
        )
        try:
            health.write(Path(self.options.health_file), status)
        except OSError as exc:
            if not self._health_failed:
                log.warning("cannot write the health file %s: %s", self.options.health_file, exc)
            self._health_failed = True

    async def _read_gpus(self) -> None:
        """This heartbeat's GPU telemetry, and free VRAM from it (it moves with other users of the
        card; explain and plan read it from the entry). NVML runs in a thread and gets
        GPU_TELEMETRY_TIMEOUT_S: a driver that hangs costs the entry its readings, never its
        heartbeat, and no second read starts while one is still stuck."""
        from trainfleet.agent.capability import with_free_vram

        cap = self.capability
        if cap is None or not cap.gpus:
            self.gpu_stats, self.gpu_stats_reason = (), ""  # capability.cuda_reason says why
            return
        if self._telemetry_read is None or self._telemetry_read.done():
            self._telemetry_read = asyncio.ensure_future(asyncio.to_thread(self.telemetry.read, cap.gpus))
        try:
            stats, reason = await asyncio.wait_for(asyncio.shield(self._telemetry_read), GPU_TELEMETRY_TIMEOUT_S)
        except TimeoutError:
            stats, reason = (), f"NVML did not answer within {GPU_TELEMETRY_TIMEOUT_S:g} s"
        except Exception as exc:  # read() never raises; a broken thread pool must not end the loop
            stats, reason = (), f"gpu telemetry failed: {exc!r}"
        self.gpu_stats, self.gpu_stats_reason = stats, reason
        if self.capability is not None:
            self.capability = with_free_vram(self.capability, stats)

    async def _shutdown(self, registry: asyncio.Task[None] | None) -> None:
        """Steps 2-5 of the shutdown order (the loop has stopped taking tickets)."""
        self._stopping.set()
        self._write_health("draining")
        if self._tasks:
            # 2. Running jobs get drain_timeout_s to finish on their own...
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.drain_timeout_s)
            if pending:
                # 3. ...the rest stop their trainers and hand their jobs back.
                log.info("handing back %d running job(s)", len(self.running))
                for job in list(self.running.values()):
                    job.hand_back()
                await asyncio.wait(pending, timeout=self.settings.term_grace_s + 10)
        if registry is not None:
            registry.cancel()
        if self._telemetry_read is None or self._telemetry_read.done():
            self.telemetry.close()
        if self.outbox is not None:
            # What trainers said last reaches the stream before we go (an election is waited out
            # for a while, not forever).
            await self.outbox.close(self.settings.drain_timeout_s)
        if self.broker is not None:
            # 4. Leave the registry at once (not after the TTL), 5. then close.
            with contextlib.suppress(Exception):
                await remove_worker(self.broker, self.host_id)
            await self.broker.close()
        self._write_health("stopped")
        if self._tmp is not None:
            self._tmp.cleanup()
