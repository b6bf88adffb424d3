"""A held job: one job this agent holds the lease on, from its claim to its settlement.

:class:`HeldJob` owns the job's life on the agent: :meth:`HeldJob.run` starts the
trainer and holds the lease until the trainer exits, the lease is lost or the
agent hands the job back (renewing it every heartbeat and watching the record for
cancel, requeue and takeover); :meth:`HeldJob.settle` then records the outcome
once: completed (bundle uploaded first), failed, fenced, handed back, or back to
pending when an upload failed. Every write is a CAS on the record; a write that
finds the record no longer ours loses the lease, and nothing the trainer produced
is recorded then.

Role: agent (CASes the record it holds, renews and answers its ticket, uploads artifacts).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
from nats.aio.msg import Msg

from trainfleet.agent.relay import Relay
from trainfleet.agent.sandbox import Confinement, TrainerCgroup, TrainerUser
from trainfleet.agent.trainer import TrainerProcess, build_argv
from trainfleet.broker import tickets
from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import Bundle, build_bundle
from trainfleet.broker.connection import Broker
from trainfleet.broker.errors import TRANSIENT, JobNotFound, PackError, SchemaError
from trainfleet.broker.logs import Outbox
from trainfleet.broker.records import Stored, get_record, update_record, watch_records
from trainfleet.broker.schema import Capability, JobRecord, JobSpec, JobStatus
from trainfleet.broker.settings import Settings

# Told (job id, step name) at each step of a claim and a held job: how bench/fleet.py --profile
# times them (None in service).
StepHook = Callable[[str, str], None]

log = logging.getLogger("trainfleet.agent")

# A held job keeps trying through JetStream being unavailable (renewals that time out, an
# upload that fails) for a lease, and at least this long, before it gives up: a stream
# election alone can take ~10 s, and nobody can take a job over while its record's stream
# has no leader either (a takeover is a CAS too, which the next heartbeat would lose to).
ELECTION_PATIENCE_S = 30.0
# An upload that failed is tried again after this, doubling up to UPLOAD_RETRY_MAX_S.
UPLOAD_RETRY_S = 0.25
UPLOAD_RETRY_MAX_S = 5.0
# Libraries whose versions go into every run's provenance (zstandard: the bundle's bytes, so
# its artifact id, depend on its compressor's version too).
PROVENANCE_DISTRIBUTIONS = ("trainfleet", "torch", "scikit-learn", "numpy", "nats-py", "zstandard")


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    FENCED = "fenced"
    HANDED_BACK = "handed back"
    RETRY = "retry"


@dataclass
class HeldJob:
    """Everything the agent tracks about one job it holds, and what it does with it."""

    broker: Broker
    outbox: Outbox  # the agent's: logs and events on their way to the logs stream
    host: Capability  # this host, as the agent saw it at the claim
    msg: Msg  # the ticket: its ack-wait is the lease
    spec: JobSpec  # what to run: opened and verified at the claim, never re-read while held
    record: JobRecord  # as last written by us
    revision: int
    slot: str  # "cpu" or "gpu:<index>"
    workdir: Path
    threads: int  # OMP_NUM_THREADS for the trainer
    lease_lost: asyncio.Event = field(default_factory=asyncio.Event)
    handing_back: asyncio.Event = field(default_factory=asyncio.Event)
    last_renewal: float = field(default_factory=time.monotonic)
    trainer: TrainerProcess | None = None
    exit_code: int | None = None
    on_step: StepHook | None = None  # told each step of the job's life (bench/fleet.py --profile)
    relay: Relay = field(init=False)
    _renewing: list[asyncio.Task[None]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.relay = Relay(self.broker, self.outbox, self.host.host_id, self.record)

    @property
    def job_id(self) -> str:
        return self.record.job_id

    def step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(self.job_id, name)

    @property
    def settings(self) -> Settings:
        return self.broker.settings

    def hand_back(self) -> None:
        """Ask the job to stop its trainer and give the job back (the agent is shutting down)."""
        self.handing_back.set()

    # -- run ---------------------------------------------------------------
    async def run(self) -> None:
        """Start the trainer and hold the lease until it exits, the lease is lost, or we hand back."""
        await tickets.answer(self.msg.in_progress())
        env = self.trainer_env()
        device = "cpu" if self.slot == "cpu" else f"{self.slot} {env['CUDA_VISIBLE_DEVICES']}"
        now = time.time()
        running = self.record.evolve(status=JobStatus.RUNNING, started_at=now, heartbeat_at=now, device=device)
        if not await self._write(running):
            return
        self.step("running CAS answered")
        # The lease is renewed (and the record watched) from here until the job is settled:
        # through training, packing, the upload and up to the final write (_stop_renewing).
        self._renewing = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._watch())]
        confinement = self._confinement()
        self.step("confinement made (cgroup)")
        trainer = TrainerProcess(
            self.spec,
            self.workdir / "output",
            env=env,
            on_output=self.relay.output,
            on_progress=self.relay.report,
            confinement=confinement,
        )
        self.trainer = trainer
        try:
            await trainer.start()
        except OSError as exc:
            self.exit_code = 127
            trainer.stderr_tail.append(f"cannot start trainer {build_argv(self.spec, Path('OUT'))}: {exc}")
            return
        self.step("trainer spawned (exec'd; the agent's loop is back)")
        await self.relay.mark("started")
        await self._hold(trainer)
        self.step("trainer exit seen")

    async def _hold(self, trainer: TrainerProcess) -> None:
        """Wait for the trainer; stop it when the lease is lost or we hand back."""
        waiter = asyncio.create_task(trainer.wait())
        lost = asyncio.create_task(self.lease_lost.wait())
        back = asyncio.create_task(self.handing_back.wait())
        try:
            await asyncio.wait({waiter, lost, back}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                await trainer.stop(self.settings.term_grace_s)
            self.exit_code = await waiter
        finally:
            for task in (lost, back, waiter):
                task.cancel()

    async def stop_renewing(self) -> None:
        """Stop the heartbeat and the watch (before the final write, or when the agent gives up)."""
        tasks, self._renewing = self._renewing, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _confinement(self) -> Confinement:
        """Its own cgroup where one can be made, and the trainer user when one is configured
        (which then owns the job's work dir: the trainer writes only there)."""
        name = f"trainfleet-{os.getpid()}-{self.job_id[:12]}-a{self.record.attempt}"
        user = TrainerUser.lookup(self.settings.trainer_user) if self.settings.trainer_user else None
        if user is not None:
            user.hand_over(self.workdir, self.workdir / "output")
        return Confinement(cgroup=TrainerCgroup.create(name), user=user, workdir=self.workdir)

    def trainer_env(self) -> dict[str, str]:
        """What the trainer gets besides its own job's variables: which GPU, how many threads."""
        env = dict(self.spec.env)  # the model's own (never NATS_* or TRAINFLEET_*: specs.bad_names)
        env.update({"TRAINFLEET_HOST_ID": self.host.host_id, "TRAINFLEET_ATTEMPT": str(self.record.attempt)})
        if self.slot.startswith("gpu:"):
            index = int(self.slot.split(":", 1)[1])
            gpu = next((g for g in self.host.gpus if g.index == index), None)
            env["CUDA_VISIBLE_DEVICES"] = gpu.uuid if gpu and gpu.uuid else str(index)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    # -- the lease -----------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        """Renew the lease every heartbeat: the ticket's ack-wait, then the record's heartbeat."""
        settings = self.settings
        while not self.lease_lost.is_set():
            await asyncio.sleep(settings.heartbeat_s)
            await tickets.answer(self.msg.in_progress())
            try:
                beat = self.record.evolve(heartbeat_at=time.time(), progress=dict(self.relay.progress))
                if not await self._write(beat, patience_s=settings.heartbeat_s):
                    log.warning("job %s: lease lost; stopping trainer", self.job_id[:12])
                    return
            except (SchemaError, nats.js.errors.Error, *TRANSIENT) as exc:
                if time.monotonic() - self.last_renewal > max(settings.lease_s, ELECTION_PATIENCE_S):
                    log.warning(
                        "job %s: could not renew for %.0fs (%r); stopping",
                        self.job_id[:12],
                        time.monotonic() - self.last_renewal,
                        exc,
                    )
                    self.lease_lost.set()
                    return

    async def _watch(self) -> None:
        """Cancel, requeue and takeover are seen at once through a KV watch, not only at the next
        heartbeat (the heartbeat CAS stays the authority when the watch is down)."""
        try:
            async with contextlib.aclosing(watch_records(self.broker, self.job_id)) as changes:
                async for change in changes:
                    if change.record is None or change.revision <= self.revision:
                        continue
                    if not self._still_ours(change.record):
                        log.warning("job %s: record changed under us; lease lost", self.job_id[:12])
                        self.lease_lost.set()
                        return
        except (nats.js.errors.Error, *TRANSIENT) as exc:
            log.debug("job %s: record watch ended: %r", self.job_id[:12], exc)

    def _still_ours(self, record: JobRecord) -> bool:
        mine = self.record
        return (
            record.status.held
            and record.claimed_by == self.host.host_id
            and record.attempt == mine.attempt
            and record.generation == mine.generation
        )

    async def _write(self, wanted: JobRecord, patience_s: float | None = None) -> bool:
        """CAS a record we hold. A conflicting write that leaves it ours (a reload changing the
        host policy, say) is retried on top of it; one that doesn't (cancel, requeue, takeover)
        loses the lease. Transient errors are retried for ``patience_s`` (default: a lease)."""
        first = True

        def change(current: JobRecord) -> JobRecord | None:
            nonlocal wanted, first
            if first:  # the record we know, at the revision we know: no read needed
                first = False
                return wanted
            if current == wanted:  # our write landed; only its ack was lost
                return current
            if not self._still_ours(current):
                return None
            wanted = msgspec.structs.replace(
                wanted,
                excluded_hosts=current.excluded_hosts,
                max_attempts=current.max_attempts,
                priority=current.priority,
            )
            return wanted

        patience = self.settings.lease_s if patience_s is None else patience_s
        try:
            stored = await update_record(
                self.broker,
                self.job_id,
                change,
                known=Stored(self.record, self.revision),
                attempts=None,
                patience_s=patience,
            )
        except JobNotFound:
            stored = None
        if stored is None:
            self.lease_lost.set()
            return False
        self.record, self.revision = stored.record, stored.revision
        self.last_renewal = time.monotonic()
        return True

    # -- settle --------------------------------------------------------------
    async def settle(self) -> Outcome:
        """Record how the job ended, once: fenced, handed back, completed or failed."""
        if self.lease_lost.is_set():
            return await self._fenced()
        if self.handing_back.is_set():
            back = self.record.evolve(
                status=JobStatus.PENDING,
                claimed_by=None,
                ticket_seq=None,
                progress={},
                reason=f"handed back by {self.host.host_id} at shutdown",
            )
            return await self._conclude(back, Outcome.HANDED_BACK, self.msg.nak)
        if self.exit_code == 0:
            return await self._complete()
        error = self.trainer.error_tail() if self.trainer else ""
        reason = f"trainer exited with {self.exit_code}"
        return await self._fail(error or reason, reason=reason)

    async def _conclude(self, record: JobRecord, outcome: Outcome, answer: Any) -> Outcome:
        """Write the final record and answer the ticket (``answer()``: ack or NAK); fenced when
        the record is no longer ours. The lease is renewed until this write, not after it."""
        await self.stop_renewing()
        if self.lease_lost.is_set():
            return await self._fenced()
        if not await self._write(record):
            return await self._fenced()
        await tickets.answer(answer())
        return outcome

    async def _fail(self, error: str, reason: str | None = None) -> Outcome:
        failed = self.record.evolve(
            status=JobStatus.FAILED,
            finished_at=time.time(),
            metrics=self._metrics(),
            last_error=error,
            reason=reason or error.splitlines()[0][:200],
        )
        return await self._conclude(failed, Outcome.FAILED, self.msg.ack)

    async def _complete(self) -> Outcome:
        """Pack and upload the output, then CAS to completed (the lease is renewed throughout).

        What another try cannot change fails the job now, naming the stage and the file: an
        unreadable file or a link out of the output dir (pack), a bundle over the size limit.
        An upload that keeps failing past the upload patience (an election, a full store)
        hands the job back: pending again, the ticket NAKed for another try."""
        limit = self.settings.max_artifact_bytes
        try:
            # The output only, packed deterministically: the same files give the same artifact id.
            bundle = await asyncio.to_thread(
                build_bundle, self.workdir / "output", None, self.workdir / "bundle.tar.zst"
            )
        except PackError as exc:
            return await self._fail(f"pack: {exc}")
        except OSError as exc:  # the agent's own disk (full, say): another agent may manage
            return await self._hand_back_for_retry(f"pack: cannot write the bundle: {exc}")
        self.step("output packed")
        if bundle.size > limit:
            return await self._fail(
                f"pack: artifact bundle is {bundle.size} bytes, over max_artifact_bytes {limit}: write less into "
                "the output dir or raise TRAINFLEET_MAX_ARTIFACT_BYTES"
            )
        try:
            await self._upload(bundle)
        except Exception as exc:
            return await self._hand_back_for_retry(f"artifact upload failed: {exc!r}")
        self.step("provenance and bundle uploaded")
        done = self.record.evolve(
            status=JobStatus.COMPLETED,
            finished_at=time.time(),
            artifact=bundle.sha256,
            artifact_bytes=bundle.size,
            metrics=self._metrics(),
            last_error=None,
            reason=None,
        )
        return await self._conclude(done, Outcome.COMPLETED, self.msg.ack)

    async def _upload(self, bundle: Bundle) -> None:
        """Put this run's provenance object, then the bundle (its bytes stored already by another
        run are reused), trying again with backoff while the lease holds, for up to the upload
        patience (default: a lease, at least ELECTION_PATIENCE_S): an election or a reconnect
        is waited out, not a re-run. The provenance goes first, so every stored bundle was named
        by the provenance of a run that uploaded it."""
        patience = self.settings.upload_patience_s
        if patience is None:
            patience = max(self.settings.lease_s, ELECTION_PATIENCE_S)
        deadline = time.monotonic() + patience
        delay = UPLOAD_RETRY_S
        rec = self.record
        provenance = {**self._provenance(), "artifact": bundle.sha256, "artifact_bytes": bundle.size}
        provenance_stored = False  # (once stored, a retry puts only the bundle)
        while True:
            try:
                if not provenance_stored:
                    await Artifacts(self.broker).put_provenance(rec.job_id, rec.generation, rec.attempt, provenance)
                    provenance_stored = True
                await Artifacts(self.broker).put(bundle)
                return
            except Exception as exc:
                if self.lease_lost.is_set() or time.monotonic() + delay > deadline:
                    raise
                log.info("job %s: upload failed (%r); trying again in %.1fs", self.job_id[:12], exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, UPLOAD_RETRY_MAX_S)

    async def _hand_back_for_retry(self, error: str) -> Outcome:
        log.warning("job %s: %s; handing back for another try", self.job_id[:12], error)
        retry = self.record.evolve(status=JobStatus.PENDING, claimed_by=None, ticket_seq=None, last_error=error)
        return await self._conclude(retry, Outcome.RETRY, lambda: self.msg.nak(delay=self.settings.nak_delay_s))

    async def _fenced(self) -> Outcome:
        """Our lease is gone: record nothing. Ack only a ticket nobody else can be using."""
        await self.stop_renewing()
        with contextlib.suppress(Exception):
            current = (await get_record(self.broker, self.job_id)).record
            if current.status == JobStatus.CANCELLED or current.generation != self.record.generation:
                await tickets.answer(self.msg.ack())
        log.warning("job %s: fenced (lease lost); result discarded", self.job_id[:12])
        return Outcome.FENCED

    def _metrics(self) -> dict[str, Any]:
        path = self.workdir / "output" / "metrics.json"
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _provenance(self) -> dict[str, Any]:
        rec = self.record
        versions = {"python": sys.version.split()[0]}
        for dist in PROVENANCE_DISTRIBUTIONS:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                versions[dist] = importlib.metadata.version(dist)
        now = time.time()
        return {
            "job": msgspec.to_builtins(self.spec),
            "host": msgspec.to_builtins(self.host),
            "code_commit": self.host.code_commit,
            "versions": versions,
            "attempt": rec.attempt,
            "generation": rec.generation,
            "argv": build_argv(self.spec, Path("OUT")),
            "timings": {
                "claimed_at": rec.claimed_at,
                "started_at": rec.started_at,
                "finished_at": now,
                "duration_s": now - (rec.started_at or now),
            },
        }

    def discard_workdir(self) -> None:
        """Remove this attempt's work dir, and the job's folder above it once it is empty."""
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(OSError):  # (not empty: another attempt of the job is here)
            self.workdir.parent.rmdir()
