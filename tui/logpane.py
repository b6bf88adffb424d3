"""The log pane: the highlighted job's output and events, followed live from the logs stream.

Each job shown is a *session*: selecting another job starts a new one and every write of
an older reader is dropped, however far it got before it noticed it was cancelled. The
"end of its output" line is written only by the current session's reader, and only once
that reader has read everything the stream holds for the job (``read_logs`` never ends
with messages still to read), so a cut log can never read as a finished one.
"""

from __future__ import annotations

import contextlib

from rich.text import Text
from textual import work
from textual.widgets import RichLog

from trainfleet.broker import display
from trainfleet.broker.errors import TrainfleetError
from trainfleet.broker.logs import LogEntry, read_logs
from trainfleet.tui.common import FleetView

MAX_LINES = 5000


def entry_text(entry: LogEntry) -> Text:
    """A log pane line: Text (never markup), control characters escaped (display.safe_text)."""
    if entry.kind == "log":
        return Text(display.safe_text(entry.line or ""), style="red" if entry.stream == "stderr" else "")
    return Text(display.event_text(entry.kind, entry.event or {}, entry.attempt), style="cyan")


class LogPane(RichLog):
    """Follows one job's output at a time (``follow``); ``stop`` leaves it idle."""

    def __init__(self, fleet: FleetView | None = None, *, id: str | None = None):
        super().__init__(id=id, max_lines=MAX_LINES, markup=False, highlight=False)
        self.fleet = fleet
        self.job_id: str | None = None
        self.session = 0
        self.entries: list[LogEntry] = []  # what the current session has shown
        self.finished = False  # the current session read the job's whole output and the job is over

    def follow(self, job_id: str) -> None:
        """Show ``job_id``'s output from the start, then live until it is finished."""
        if self.fleet is None:
            return
        self.session += 1
        self.job_id = job_id
        self.entries = []
        self.finished = False
        self.clear()
        name = self.fleet.name_of(job_id)
        self.border_title = f"logs · {name}"
        self._read(self.session, job_id, name)

    def stop(self) -> None:
        self.session += 1
        self.job_id = None
        self.workers.cancel_group(self, "logs")

    @work(group="logs", exclusive=True, exit_on_error=False)
    async def _read(self, session: int, job_id: str, name: str) -> None:
        # Role: the monitor's own (viewer or operator): an ephemeral consumer on the logs stream.
        assert self.fleet is not None
        reader = read_logs(self.fleet.broker, job_id, follow=True, events=True)
        try:
            async with contextlib.aclosing(reader) as entries:
                async for entry in entries:
                    if session != self.session:
                        return
                    self.entries.append(entry)
                    self.write(entry_text(entry))
        except TrainfleetError as exc:
            if session == self.session:
                self.write(Text(f"--- stopped following: {exc} (select the job again to retry) ---", style="red"))
                self.job_id = None
            return
        if session != self.session:
            return
        self.finished = True
        self.write(Text(f"--- {name} is finished; end of its output ---", style="dim"))
