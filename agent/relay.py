"""What a held job tells the world while it runs: trainer output, progress, lifecycle marks.

One :class:`Relay` per held job, beside it (held.py): it ships the trainer's output
lines to the logs stream up to a per-job byte budget, relays progress reports at a
few per second (always the last one), and publishes the ``started`` / ``finished``
marks. Everything here is best effort: a lost line never fails a job.

Role: agent (publishes on ``<prefix>.logs.<job_id>`` and ``<prefix>.events.<job_id>``).
"""

from __future__ import annotations

import time
from typing import Any

from trainfleet.broker import logs
from trainfleet.broker.connection import Broker
from trainfleet.broker.schema import JobRecord, ProgressEvent, encode

# A trainer may report every step; at most one relayed event per this interval (and always the last).
PROGRESS_EVENT_INTERVAL_S = 0.2


class Relay:
    """Output, progress and lifecycle events of one attempt of one job."""

    def __init__(self, broker: Broker, outbox: logs.Outbox, host_id: str, record: JobRecord):
        self.broker = broker
        self.outbox = outbox
        self.host_id = host_id
        self.job_id = record.job_id
        self.attempt = record.attempt
        self.generation = record.generation
        self.limit = broker.settings.logs_max_bytes_per_job
        self.log_bytes = 0
        self.progress: dict[str, Any] = {}  # the latest report, for the record's heartbeat
        self._last_event = 0.0

    async def output(self, stream: str, line: bytes) -> None:
        """One line of trainer output (``stream`` is stdout or stderr), until the budget is spent."""
        if self.log_bytes >= self.limit:
            return
        self.log_bytes += len(line)
        if self.log_bytes >= self.limit:
            line = b"[trainfleet: log truncated at %d bytes]\n" % self.limit
        headers = logs.log_line_headers(stream, attempt=self.attempt, generation=self.generation)
        self.outbox.put(self.broker.names.logs_subject(self.job_id), line, headers)

    async def report(self, event: dict[str, Any]) -> None:
        """A progress report from the trainer (already parsed by the progress protocol)."""
        self.progress = {k: event.get(k) for k in ("step", "total", "metrics") if k in event}
        now = time.monotonic()
        last = event.get("step") is not None and event.get("step") == event.get("total")
        if not last and now - self._last_event < PROGRESS_EVENT_INTERVAL_S:
            return
        self._last_event = now
        progress = ProgressEvent(
            job_id=self.job_id,
            step=event.get("step"),
            total=event.get("total"),
            metrics=event.get("metrics") or {},
            at=event.get("at") or time.time(),
            attempt=self.attempt,
            generation=self.generation,
        )
        self.outbox.put(self.broker.names.events_subject(self.job_id), encode(progress))

    async def mark(self, kind: str, outcome: str | None = None) -> bool:
        """A lifecycle mark (``started``, ``finished``): never dropped, and waited for (up to a
        heartbeat: an election must not stall the job) so it reaches the stream even if the
        agent dies right after. False when it (or what was queued before it) is still on its way."""
        event = ProgressEvent(
            job_id=self.job_id,
            kind=kind,
            at=time.time(),
            host=self.host_id,
            attempt=self.attempt,
            generation=self.generation,
            outcome=outcome,
        )
        self.outbox.put(self.broker.names.events_subject(self.job_id), encode(event), essential=True)
        return await self.outbox.flush(self.broker.settings.heartbeat_s)
