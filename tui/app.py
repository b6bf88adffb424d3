"""``trainfleet monitor``: a Textual view of the fleet, live from NATS.

The jobs table follows a watch of the jobs KV (every record change arrives as it
is written) with progress overlaid from the events subjects; the workers panel
re-reads the workers KV every two seconds (its TTL expiries leave no trace to
watch); the log pane follows the highlighted job's output from the logs stream.
Cancel and requeue go through the control service, like ``trainfleet cancel``.

Keys: q quit · c cancel (asks first) · r requeue (asks first) · l show/hide logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.coordinate import Coordinate
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Header, Label, RichLog

from trainfleet.broker import display
from trainfleet.broker.connection import Broker
from trainfleet.broker.control import request
from trainfleet.broker.errors import TrainfleetError
from trainfleet.broker.logs import LiveProgress, LogEntry, read_logs
from trainfleet.broker.records import watch_records
from trainfleet.broker.schema import JobRecord, JobSpec
from trainfleet.broker.security import redact_url
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import get_spec, load_specs
from trainfleet.broker.workers import load_workers, stale_after_s

JOB_COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("id", "ID", 12),
    ("job", "JOB", None),
    ("state", "STATE", 10),
    ("host", "HOST", 12),
    ("try", "TRY", 3),
    ("progress", "PROGRESS", 16),
    ("metric", "METRIC", 30),
)
WORKER_COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("host", "HOST", None),
    ("state", "STATE", 5),
    ("jobs", "JOBS", 4),
    ("seen", "SEEN", 6),
)
WORKERS_REFRESH_S = 2.0
PROGRESS_REFRESH_S = 0.5


def job_cells(rec: JobRecord, spec: JobSpec) -> tuple[Any, ...]:
    """The jobs-table row of a job, in JOB_COLUMNS order."""
    state = rec.status.value
    return (
        rec.job_id[:12],
        spec.name,
        Text(state, style=display.STATE_STYLE.get(state, "")),
        rec.claimed_by or "-",
        str(rec.attempt),
        Text(display.progress_text(rec), style="green"),
        # Trainer-named metrics (made safe by display): a Text, since DataTable reads a str as markup.
        Text(display.headline(rec)),
    )


def entry_text(entry: LogEntry) -> Text:
    """A log pane line: Text (never markup), control characters escaped (display.safe_text)."""
    if entry.kind == "log":
        return Text(display.safe_text(entry.line or ""), style="red" if entry.stream == "stderr" else "")
    return Text(display.event_text(entry.kind, entry.event or {}, entry.attempt), style="cyan")


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question over the monitor; dismisses with the answer."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 64; height: auto; border: thick $warning; background: $surface;
                               padding: 1 2; }
    ConfirmScreen Horizontal { height: auto; align: center middle; margin-top: 1; }
    ConfirmScreen Button { margin: 0 2; }
    """
    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            with Horizontal():
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class MonitorApp(App[None]):
    """The fleet monitor. ``error`` holds why it could not start (it then exits non-zero)."""

    TITLE = "trainfleet monitor"
    CSS = """
    #top { height: 1fr; }
    #jobs { width: 1fr; height: 100%; border: round $primary; }
    #workers { width: 38; height: 100%; border: round $primary; }
    #logs { height: 40%; border: round $primary; }
    #logs.hidden { display: none; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("c", "cancel_job", "cancel"),
        Binding("r", "requeue_job", "requeue"),
        Binding("l", "toggle_logs", "logs"),
    ]

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings
        self.broker: Broker | None = None
        self.records: dict[str, JobRecord] = {}
        self.specs: dict[str, JobSpec] = {}
        self.live = LiveProgress()
        self.error: TrainfleetError | None = None
        self.log_job: str | None = None
        self._order: dict[str, tuple[int, str]] = {}  # id prefix -> sort key (priority first)

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="top"):
            yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="workers", cursor_type="none", show_cursor=False)
        yield RichLog(id="logs", max_lines=5000, markup=False, highlight=False)
        yield Footer()

    @property
    def jobs_table(self) -> DataTable[Any]:
        return self.query_one("#jobs", DataTable)

    @property
    def workers_table(self) -> DataTable[Any]:
        return self.query_one("#workers", DataTable)

    @property
    def log_pane(self) -> RichLog:
        return self.query_one("#logs", RichLog)

    async def on_mount(self) -> None:
        for table, columns in ((self.jobs_table, JOB_COLUMNS), (self.workers_table, WORKER_COLUMNS)):
            for key, label, width in columns:
                table.add_column(label, key=key, width=width)
        self.log_pane.border_title = "logs"
        self.jobs_table.border_title = "jobs"
        self.workers_table.border_title = "workers"
        try:
            self.broker = await Broker.connect(self.settings, name="trainfleet-monitor")
        except TrainfleetError as exc:
            self.error = exc
            self.exit(return_code=exc.exit_code)
            return
        self.sub_title = f"{self.settings.prefix} @ {redact_url(self.settings.url)}"
        await self.live.start(self.broker)
        self.watch_jobs()
        await self.refresh_workers()
        self.set_interval(WORKERS_REFRESH_S, self.refresh_workers)
        self.set_interval(PROGRESS_REFRESH_S, self.refresh_progress)
        self.jobs_table.focus()

    async def on_unmount(self) -> None:
        # Stop the watchers before the connection they read from goes away.
        self.workers.cancel_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.workers.wait_for_complete(), 5.0)
        await self.live.stop()
        if self.broker is not None:
            await self.broker.close()

    # -- jobs --------------------------------------------------------------
    @work(group="jobs", exclusive=True)
    async def watch_jobs(self) -> None:
        assert self.broker is not None
        self.specs = await load_specs(self.broker)
        async with contextlib.aclosing(watch_records(self.broker)) as changes:
            async for change in changes:
                if change.record is None:
                    self.drop_job(change.job_id)
                elif await self._know_spec(change.job_id):
                    self.show_job(change.record)

    async def _know_spec(self, job_id: str) -> bool:
        """Whether the job's spec is known (a job synced after start is read once)."""
        if job_id not in self.specs and self.broker is not None:
            with contextlib.suppress(TrainfleetError):
                self.specs[job_id] = await get_spec(self.broker, job_id, identity=False)
        return job_id in self.specs

    def show_job(self, rec: JobRecord) -> None:
        """Add or update the row of ``rec``."""
        before = self.records.get(rec.job_id)
        self.records[rec.job_id] = rec
        if rec.job_id == self.log_job and before is not None and before.status.terminal and not rec.status.terminal:
            self.log_job = None  # requeued: its log follower had stopped at the end; start again
            self.follow_selected()
        table = self.jobs_table
        spec = self.specs[rec.job_id]
        cells = job_cells(self.live.apply(rec), spec)
        if rec.job_id in table.rows:
            for (key, _, _), value in zip(JOB_COLUMNS, cells, strict=True):
                table.update_cell(rec.job_id, key, value)
        else:
            table.add_row(*cells, key=rec.job_id)
            self._order[rec.job_id[:12]] = (-spec.priority, spec.name)
            table.sort("id", key=lambda id12: self._order.get(id12, (0, "")))
            # Sorting moves rows under the cursor without a highlight event: keep the log pane in step.
            self.follow_selected()
        self._update_title()

    def name_of(self, rec: JobRecord) -> str:
        spec = self.specs.get(rec.job_id)
        return spec.name if spec else rec.job_id[:12]

    def drop_job(self, job_id: str) -> None:
        self.records.pop(job_id, None)
        if job_id in self.jobs_table.rows:
            self.jobs_table.remove_row(job_id)
        self._update_title()

    def refresh_progress(self) -> None:
        """Overlay the latest progress events on the rows of held jobs."""
        for rec in self.records.values():
            if rec.status.held and rec.job_id in self.live.latest:
                live = job_cells(self.live.apply(rec), self.specs[rec.job_id])
                self.jobs_table.update_cell(rec.job_id, "progress", live[5])
                self.jobs_table.update_cell(rec.job_id, "metric", live[6])

    def _update_title(self) -> None:
        counts: dict[str, int] = {}
        for rec in self.records.values():
            counts[rec.status.value] = counts.get(rec.status.value, 0) + 1
        self.title = f"trainfleet · {len(self.records)} jobs · " + " ".join(
            f"{state} {n}" for state, n in sorted(counts.items())
        )

    def selected(self) -> JobRecord | None:
        table = self.jobs_table
        if table.row_count == 0:
            return None
        row_key = table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key
        return self.records.get(str(row_key.value))

    # -- workers -----------------------------------------------------------
    async def refresh_workers(self) -> None:
        if self.broker is None:
            return
        with contextlib.suppress(TrainfleetError, TimeoutError):
            workers = await load_workers(self.broker)
            table = self.workers_table
            table.clear()
            stale_after = stale_after_s(self.broker.settings)
            for w in workers:
                age = time.time() - w.last_seen
                seen = Text(f"{age:.0f}s", style="" if age <= stale_after else "bold red")
                table.add_row(w.host_id, w.state, str(len(w.current_jobs)), seen, key=w.host_id)
            table.border_title = f"workers ({len(workers)})"

    # -- logs --------------------------------------------------------------
    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "jobs":
            self.follow_selected()

    def follow_selected(self) -> None:
        rec = self.selected()
        if rec is None or rec.job_id == self.log_job or self.log_pane.has_class("hidden"):
            return
        self.log_job = rec.job_id
        self.follow_logs(rec)

    @work(group="logs", exclusive=True, exit_on_error=False)
    async def follow_logs(self, rec: JobRecord) -> None:
        assert self.broker is not None
        pane = self.log_pane
        pane.clear()
        name = self.name_of(rec)
        pane.border_title = f"logs · {name}"
        reader = read_logs(self.broker, rec.job_id, follow=True, events=True)
        try:
            async with contextlib.aclosing(reader) as entries:
                async for entry in entries:
                    pane.write(entry_text(entry))
        except TrainfleetError as exc:
            pane.write(Text(f"--- stopped following: {exc} (select the job again to retry) ---", style="red"))
            self.log_job = None
            return
        pane.write(Text(f"--- {name} is finished; end of its output ---", style="dim"))

    def action_toggle_logs(self) -> None:
        pane = self.log_pane
        pane.toggle_class("hidden")
        if pane.has_class("hidden"):
            self.workers.cancel_group(self, "logs")
            self.log_job = None
        else:
            self.follow_selected()

    # -- control -----------------------------------------------------------
    def action_cancel_job(self) -> None:
        self._confirm("cancel", "Cancel")

    def action_requeue_job(self) -> None:
        self._confirm("requeue", "Requeue")

    def _confirm(self, verb: str, label: str) -> None:
        rec = self.selected()
        if rec is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.control(verb, rec)

        self.push_screen(
            ConfirmScreen(f"{label} {self.name_of(rec)} ({rec.job_id[:12]}), now {rec.status.value}?"), answered
        )

    @work(group="control")
    async def control(self, verb: str, rec: JobRecord) -> None:
        assert self.broker is not None
        try:
            result = await request(self.broker.nc, self.broker.names, verb, {"job": rec.job_id}, timeout_s=10.0)
        except TrainfleetError as exc:
            self.notify(str(exc), title=f"{verb} failed", severity="error")
            return
        self.notify(f"{self.name_of(rec)} is now {result['status']}", title=verb)


def run_monitor(settings: Settings) -> int:
    """Run the monitor in this terminal; the exit code says why it stopped."""
    app = MonitorApp(settings)
    app.run()
    if app.error is not None:
        print(f"trainfleet: {app.error}", file=sys.stderr)
        return app.error.exit_code
    return app.return_code or 0
