"""``trainfleet monitor``: a Textual view of the fleet, live from NATS.

The jobs table is a virtual list over a model fed by a watch of the jobs KV (every record
change arrives as it is written; start-up loads every record once, then sorts once) with
progress overlaid from the events subjects; the workers panel re-reads the workers KV every
two seconds (its TTL expiries leave no trace to watch); the log pane follows the highlighted
job's output from the logs stream. Cancel and requeue go through the control service, like
``trainfleet cancel``; under the viewer role they are not offered.

Every key is in :data:`KEYS` (``?`` shows them; docs/operations.md lists them too).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import Hit, Hits, Provider
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import Footer, Header, Input, Static

from trainfleet.broker.connection import Broker
from trainfleet.broker.display import STATE_STYLE
from trainfleet.broker.errors import TrainfleetError
from trainfleet.broker.records import watch_records
from trainfleet.broker.schema import JobRecord
from trainfleet.broker.security import redact_url
from trainfleet.broker.settings import Settings
from trainfleet.broker.specs import fleet_name, get_fleet_info, get_spec, load_specs
from trainfleet.tui.common import ConfirmScreen, FleetView, is_viewer
from trainfleet.tui.logpane import LogPane
from trainfleet.tui.model import SORTS, JobsModel, Query
from trainfleet.tui.table import JobsTable
from trainfleet.tui.workers import WorkersPanel

TICK_S = 0.25  # the table and header catch up with the model this often, not per change
# Up to this many jobs the filter follows every key; above, it waits for the typing to pause.
LIVE_FILTER_ROWS = 20_000
FILTER_PAUSE_S = 0.3

# Every key of the main screen, in the order `?` and docs/operations.md list them.
KEYS: tuple[tuple[str, str], ...] = (
    ("↑ ↓ / j k", "move the highlight"),
    ("PgUp PgDn / Home End / g G", "page, first, last job"),
    ("Enter", "job detail: spec, history, explain, provenance, curves, actions"),
    ("/", "filter jobs: text, state:running, host:gpu-1, model:mlp, name:, id:, class:"),
    ("Esc", "clear the filter (or close a screen)"),
    (":", "jump to a job by name, id or id prefix (ctrl+p, the command palette, finds jobs too)"),
    ("s", f"sort by the next column ({' → '.join(SORTS)})"),
    ("S", "reverse the sort"),
    ("c", "cancel the highlighted job (asks first; not for the viewer role)"),
    ("r", "requeue the highlighted job (asks first; not for the viewer role)"),
    ("l", "show or hide the log pane"),
    ("w / Tab", "move between the jobs table and the workers panel (Enter: worker detail)"),
    ("?", "this help"),
    ("q", "quit"),
)


# The main screen's actions: not offered while another screen is on top of it.
MAIN_SCREEN_ACTIONS = frozenset(
    {"help", "prompt", "sort", "reverse", "cancel_job", "requeue_job", "toggle_logs", "switch_panel", "clear_filter"}
)


class JobsCommands(Provider):
    """The command palette (ctrl+p) finds jobs too: by name, id or model; picking one jumps to it."""

    LIMIT = 200  # candidates scored per keystroke (a substring pass over 100k rows stays cheap)

    async def search(self, query: str) -> Hits:
        app = self.app
        if not isinstance(app, MonitorApp) or not query.strip():
            return
        matcher = self.matcher(query)
        needle = query.strip().lower()
        found = 0
        for job_id, row in app.model.rows.items():
            if needle not in row.hay:
                continue
            label = f"{row.name}  {row.state}  {job_id[:12]}"
            score = matcher.match(label)
            yield Hit(
                max(score, 0.01),
                matcher.highlight(label),
                partial(app.jump, job_id),
                help=f"jump to {row.name} ({row.model or 'no spec'}, {row.host or 'no host'})",
            )
            found += 1
            if found >= self.LIMIT:
                return


class HelpScreen(ModalScreen[None]):
    """Every key of the monitor."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 96; height: auto; max-height: 90%; border: thick $primary;
                                   background: $surface; padding: 1 2; }
    """
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        text = Text("trainfleet monitor — keys\n\n", style="bold")
        for key, meaning in KEYS:
            text.append(f"{key:>28}  ", style="bold cyan")
            text.append(f"{meaning}\n")
        with VerticalScroll():
            yield Static(text, id="help-text")


class MonitorApp(App[None]):
    """The fleet monitor. ``error`` holds why it could not start (it then exits non-zero)."""

    TITLE = "trainfleet monitor"
    COMMANDS = App.COMMANDS | {JobsCommands}
    CSS = """
    #summary { height: 1; padding: 0 1; background: $panel; }
    #jobs { height: 1fr; border: round $primary; }
    #jobs:focus { border: round $accent; }
    #bottom { height: 40%; }
    #logs { width: 1fr; height: 100%; border: round $primary; }
    #logs.hidden { display: none; }
    #workers { width: 55%; min-width: 48; height: 100%; border: round $primary; }
    #workers:focus { border: round $accent; }
    #prompt { dock: bottom; display: none; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "keys"),
        Binding("slash", "prompt('filter')", "filter"),
        Binding("colon", "prompt('jump')", "jump"),
        Binding("s", "sort", "sort"),
        Binding("S", "reverse", "reverse", show=False),
        Binding("c", "cancel_job", "cancel"),
        Binding("r", "requeue_job", "requeue"),
        Binding("l", "toggle_logs", "logs"),
        Binding("w", "switch_panel", "workers"),
        Binding("escape", "clear_filter", "clear filter", show=False),
    ]

    def __init__(self, settings: Settings, *, now: Callable[[], float] = time.time, read_only: bool | None = None):
        super().__init__()
        self.settings = settings
        self.now = now
        self.read_only = is_viewer(settings) if read_only is None else read_only
        self.model = JobsModel(now=now)
        self.fleet: FleetView | None = None
        self.error: TrainfleetError | None = None
        self.loaded = False  # every record stored at start-up is in the table
        self.prompt_mode = "filter"
        self._prompt_before = ""
        self._spec_wanted: set[str] = set()
        self._header_version = -1
        self._filter_timer: Timer | None = None

    # -- layout ----------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("connecting…", id="summary")
        yield JobsTable(self.model, id="jobs")
        with Horizontal(id="bottom"):
            yield LogPane(id="logs")
        yield Input(id="prompt")
        yield Footer()

    @property
    def jobs_table(self) -> JobsTable:
        return self.query_one("#jobs", JobsTable)

    @property
    def workers_panel(self) -> WorkersPanel:
        return self.query_one("#workers", WorkersPanel)

    @property
    def log_pane(self) -> LogPane:
        return self.query_one("#logs", LogPane)

    @property
    def prompt(self) -> Input:
        return self.query_one("#prompt", Input)

    async def on_mount(self) -> None:
        self.jobs_table.border_title = "jobs"
        self.log_pane.border_title = "logs"
        self.jobs_table.focus()
        try:
            broker = await Broker.connect(self.settings, name="trainfleet-monitor")
        except TrainfleetError as exc:
            self.error = exc
            self.exit(return_code=exc.exit_code)
            return
        self.fleet = FleetView(broker=broker, read_only=self.read_only, now=self.now)
        self.log_pane.fleet = self.fleet
        await self.query_one("#bottom", Horizontal).mount(WorkersPanel(self.fleet, id="workers"))
        where = f"{self.settings.prefix} @ {redact_url(self.settings.url)}"
        name = fleet_name(await get_fleet_info(broker))  # the manifest's `name`, when it has one
        where = f"{name} · {where}" if name else where
        self.sub_title = f"read-only (viewer) · {where}" if self.read_only else where
        self.fleet.live.listeners.append(self._on_progress)
        await self.fleet.live.start(broker)
        self.watch_jobs()
        self.set_interval(TICK_S, self.tick)

    async def on_unmount(self) -> None:
        # Stop the watchers before the connection they read from goes away.
        self.workers.cancel_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.workers.wait_for_complete(), 5.0)
        if self.fleet is not None:
            await self.fleet.live.stop()
            await self.fleet.broker.close()

    # -- jobs ----------------------------------------------------------------------
    @work(group="jobs", exclusive=True)
    async def watch_jobs(self) -> None:
        # Role: the monitor's own (viewer or operator): reads the specs bucket, watches the jobs KV.
        fleet = self.fleet
        assert fleet is not None
        fleet.specs = await load_specs(fleet.broker)
        start: dict[str, JobRecord] = {}
        # Start-up collects every stored record, then sorts once (when the watch has caught up).
        watch = watch_records(fleet.broker, on_caught_up=lambda: self._load(start))
        async with contextlib.aclosing(watch) as changes:
            async for change in changes:
                if not self.loaded:
                    if change.record is None:
                        start.pop(change.job_id, None)
                    else:
                        start[change.job_id] = change.record
                elif change.record is None:
                    fleet.records.pop(change.job_id, None)
                    self.model.drop(change.job_id)
                else:
                    self._show(change.record)

    def _load(self, start: dict[str, JobRecord]) -> None:
        fleet = self.fleet
        assert fleet is not None
        fleet.records.update(start)
        self.model.bulk_load((rec, fleet.specs.get(job_id)) for job_id, rec in start.items())
        self._spec_wanted.update(j for j in start if j not in fleet.specs)
        self.loaded = True
        # What start-up loaded lives as long as the monitor: keep it out of the collector's full
        # passes (at 100k jobs each took ~200 ms, a key press that waited for one felt it).
        gc.freeze()
        self.tick()

    def _show(self, rec: JobRecord) -> None:
        fleet = self.fleet
        assert fleet is not None
        before = fleet.records.get(rec.job_id)
        fleet.records[rec.job_id] = rec
        spec = fleet.specs.get(rec.job_id)
        if spec is None:
            self._spec_wanted.add(rec.job_id)
        self.model.upsert(fleet.live.apply(rec), spec)
        if (
            rec.job_id == self.log_pane.job_id
            and before is not None
            and before.status.terminal
            and not rec.status.terminal
        ):
            self.log_pane.follow(rec.job_id)  # requeued: its reader had stopped at the end; start again

    def _on_progress(self, event: dict[str, Any]) -> None:
        if self.fleet is None or not self.loaded:
            return
        job_id = str(event.get("job_id"))
        rec = self.fleet.records.get(job_id)
        if rec is None or not rec.status.held:
            return
        self.model.upsert(self.fleet.live.apply(rec), self.fleet.specs.get(job_id))
        metrics = event.get("metrics")
        if isinstance(metrics, dict):
            self.model.add_point(job_id, metrics)

    @work(group="specs", exclusive=True)
    async def fetch_specs(self, job_ids: list[str]) -> None:
        """Specs of jobs synced after start-up (read once each, then their rows get names)."""
        fleet = self.fleet
        assert fleet is not None
        for job_id in job_ids:
            with contextlib.suppress(TrainfleetError):
                fleet.specs[job_id] = await get_spec(fleet.broker, job_id, identity=False)
            rec = fleet.records.get(job_id)
            if rec is not None and job_id in fleet.specs:
                self.model.upsert(fleet.live.apply(rec), fleet.specs[job_id])

    def tick(self) -> None:
        """Bring the table, the header and the log pane up to date with the model."""
        if self._spec_wanted:
            wanted, self._spec_wanted = sorted(self._spec_wanted), set()
            self.fetch_specs(wanted)
        self.model.maybe_resort()
        table = self.jobs_table
        table.sync()
        if self.model.version != self._header_version:
            self._header_version = self.model.version
            self.query_one("#summary", Static).update(self.summary())
            table.border_title = f"jobs ({len(self.model):,} of {len(self.model.rows):,})"
        self.follow_selected()

    def summary(self) -> Text:
        """The header line: counts per state, throughput, ETA of the backlog, filter and sort."""
        model = self.model
        if not self.loaded:
            return Text(f"loading jobs… {len(model.rows):,}", style="dim")
        text = Text(f"{len(model.rows):,} jobs", style="bold")
        for state in ("running", "claimed", "pending", "completed", "failed", "cancelled"):
            n = model.counts.get(state, 0)
            if n:
                text.append("  ")
                text.append(f"{state} {n:,}", style=STATE_STYLE.get(state, ""))
        rate = model.per_minute()
        text.append(f"  ·  {rate:.1f} done/min")
        eta = model.eta_s()
        if eta is None:
            text.append("  ·  ETA —")
        elif eta > 0:
            text.append(f"  ·  ETA {_eta(eta)}")
        if model.query:
            text.append(f"  ·  filter: {model.query.text}", style="bold yellow")
        text.append(f"  ·  sort: {model.sort} {'↑' if model.reverse else '↓'}", style="dim")
        return text

    def selected(self) -> JobRecord | None:
        job_id = self.jobs_table.cursor_id
        return self.fleet.records.get(job_id) if job_id and self.fleet else None

    # -- keys ------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in MAIN_SCREEN_ACTIONS and len(self.screen_stack) > 1:
            return False  # a screen over the list (detail, help, a question) has keys of its own
        if action in ("cancel_job", "requeue_job") and self.read_only:
            return False  # the viewer role may not: hidden, not failing
        return True

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_prompt(self, mode: str) -> None:
        prompt = self.prompt
        self.prompt_mode = mode
        self._prompt_before = self.model.query.text
        prompt.placeholder = (
            "filter: words, state:running host:gpu-1 model:mlp (Enter keeps it, Esc restores)"
            if mode == "filter"
            else "jump to a job: name, id or id prefix (Enter)"
        )
        prompt.value = self._prompt_before if mode == "filter" else ""
        # At once, not at the next refresh (a class) or after the queued messages (focus()): keys typed
        # right after the `/` (a paste, a fast typist, tmux send-keys) are already in the queue.
        prompt.display = True
        self.screen.set_focus(prompt)

    def on_key(self, event: events.Key) -> None:
        prompt = self.prompt
        if prompt.display and self.focused is prompt and event.is_printable and event.character:
            # Typed ahead of the prompt: keys that arrived in one burst with the `/` were handed to
            # the table before the prompt took the focus. They belong to the prompt.
            prompt.insert_text_at_cursor(event.character)
            event.stop()

    @on(Input.Changed, "#prompt")
    def _typed(self, event: Input.Changed) -> None:
        if self.prompt_mode != "filter" or not self.prompt.display:
            return
        if self._filter_timer is not None:
            self._filter_timer.stop()
            self._filter_timer = None
        if len(self.model.rows) <= LIVE_FILTER_ROWS:
            self._apply_filter(event.value)
        else:  # a pass over 100k rows per key would lag the typing: filter once it pauses
            self._filter_timer = self.set_timer(FILTER_PAUSE_S, lambda: self._apply_filter(event.value))

    def _apply_filter(self, text: str) -> None:
        self._filter_timer = None
        if Query.parse(text) != self.model.query:
            self.model.set_query(text)
        self.tick()

    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        self._close_prompt()
        if self.prompt_mode == "jump":
            self.jump(event.value)
        else:  # the Changed messages of the last keys may come after this (keys typed in one burst)
            if self._filter_timer is not None:
                self._filter_timer.stop()
            self._apply_filter(event.value)

    def _close_prompt(self) -> None:
        self.prompt.display = False
        self.screen.set_focus(self.jobs_table)

    def jump(self, ref: str) -> bool:
        job_id = self.model.resolve(ref)
        if job_id is None:
            self.notify(f"no job named {ref!r} (nor an id or prefix of one)", severity="warning")
            return False
        if self.model.index_of(job_id) is None:  # hidden by the filter: show everything
            self.model.set_query("")
            self.tick()
        self.jobs_table.select_job(job_id)
        return True

    def action_clear_filter(self) -> None:
        if self._filter_timer is not None:
            self._filter_timer.stop()
            self._filter_timer = None
        if self.prompt.display:
            if self.prompt_mode == "filter":
                self.model.set_query(self._prompt_before)
            self._close_prompt()
        elif self.model.query:
            self.model.set_query("")
        self.tick()

    def action_sort(self) -> None:
        self.model.set_sort(SORTS[(SORTS.index(self.model.sort) + 1) % len(SORTS)], self.model.reverse)
        self.tick()

    def action_reverse(self) -> None:
        self.model.set_sort(self.model.sort, not self.model.reverse)
        self.tick()

    def action_switch_panel(self) -> None:
        if self.jobs_table.has_focus:
            self.workers_panel.focus()
        else:
            self.jobs_table.focus()

    @on(JobsTable.Selected)
    def _open_job(self, event: JobsTable.Selected) -> None:
        from trainfleet.tui.detail import JobDetailScreen

        if self.fleet is not None:
            self.push_screen(JobDetailScreen(self.fleet, event.job_id))

    # -- logs --------------------------------------------------------------------------------
    @on(JobsTable.Highlighted)
    def _highlighted(self, event: JobsTable.Highlighted) -> None:
        self.follow_selected()

    def follow_selected(self) -> None:
        job_id = self.jobs_table.cursor_id
        pane = self.log_pane
        if job_id is None or job_id == pane.job_id or pane.has_class("hidden") or self.fleet is None:
            return
        if job_id not in self.fleet.records:
            return
        pane.follow(job_id)

    def action_toggle_logs(self) -> None:
        pane = self.log_pane
        pane.toggle_class("hidden")
        if pane.has_class("hidden"):
            pane.stop()
        else:
            self.follow_selected()

    # -- control -----------------------------------------------------------------------------
    def action_cancel_job(self) -> None:
        self._confirm("cancel", "Cancel")

    def action_requeue_job(self) -> None:
        self._confirm("requeue", "Requeue")

    def _confirm(self, verb: str, label: str) -> None:
        rec = self.selected()
        if rec is None or self.fleet is None or self.read_only:
            return
        name = self.fleet.name_of(rec.job_id)

        def answered(yes: bool | None) -> None:
            if yes:
                self.control(verb, rec)

        self.push_screen(ConfirmScreen(f"{label} {name} ({rec.job_id[:12]}), now {rec.status.value}?"), answered)

    @work(group="control")
    async def control(self, verb: str, rec: JobRecord) -> None:
        # Role: operator or admin (the control service refuses the viewer; its keys are hidden).
        assert self.fleet is not None
        try:
            result = await self.fleet.control(verb, rec.job_id)
        except TrainfleetError as exc:
            self.notify(str(exc), title=f"{verb} failed", severity="error")
            return
        self.notify(f"{self.fleet.name_of(rec.job_id)} is now {result['status']}", title=verb)


def _eta(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def run_monitor(settings: Settings) -> int:
    """Run the monitor in this terminal; the exit code says why it stopped."""
    app = MonitorApp(settings)
    app.run()
    if app.error is not None:
        print(f"trainfleet: {app.error}", file=sys.stderr)
        return app.error.exit_code
    return app.return_code or 0
