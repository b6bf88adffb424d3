"""The monitor's job detail screen: one job, everything about it, live.

Pushed over the jobs list (Enter on a row) as ``JobDetailScreen(fleet, job_id)``. It shows the
job's spec and constraints; its record now; the revisions the jobs KV keeps of it (heartbeats
collapsed); the ``trainfleet explain`` verdict for every registered worker, computed here with
the same code (trainfleet.broker.explain) and shown with the same lines; the artifact and the
provenance stored beside it; and a curve for every numeric metric the trainer reported
through the progress protocol, read from the logs stream and followed live while the job runs.

Keys: c cancel · r requeue (both ask first, and go through the control service) · d download
the artifact (asks for a directory) · escape/q back. Under the viewer role (``fleet.read_only``)
the three actions are hidden, not offered and refused.

Everything a trainer, an agent or a manifest wrote (names, metrics, reasons, host ids,
provenance) is untrusted text: it goes through display.safe_text and is shown as rich Text,
never read as markup.

NATS, and which role does it (every one of them is allowed to a viewer unless said otherwise):
- the record: a KV watch of this one key of the jobs bucket (read);
- the spec: a get from the specs bucket, when the FleetView does not hold it yet (read);
- the history: direct gets of the key's revisions in the jobs bucket's stream (read);
- the explain verdicts: the workers bucket, re-read every few seconds (read);
- provenance and download: the artifacts object store (read; downloads are reads too);
- the curves: an ephemeral, unacknowledged consumer on the logs stream filtered to this
  job's logs and events subjects (read_logs, follow=True), which reads what is stored and
  then follows live until the job is settled;
- cancel and requeue: requests on ``<prefix>.ctl.cancel|requeue`` (operator and above only:
  hence hidden for a viewer, whom the server would refuse anyway).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Input, Static
from textual_plotext import PlotextPlot

from trainfleet.broker import display
from trainfleet.broker.artifacts import Artifacts, download_artifact
from trainfleet.broker.display import safe_text
from trainfleet.broker.errors import TrainfleetError
from trainfleet.broker.explain import Match, explain_job, explain_json, explain_lines
from trainfleet.broker.jobs import Job
from trainfleet.broker.logs import LogEntry, read_logs
from trainfleet.broker.records import Transition, history_truncated, job_history, transition_key, watch_records
from trainfleet.broker.schema import JobRecord, JobSpec
from trainfleet.broker.specs import get_spec, signed_by
from trainfleet.broker.workers import load_workers, stale_after_s
from trainfleet.tui.common import ConfirmScreen, FleetView

# How often the explain verdicts re-read the workers bucket, and curves and clocks redraw.
WORKERS_REFRESH_S = 3.0
REDRAW_S = 0.25
# At most this many curves are drawn (a trainer may name any number of metrics).
MAX_PLOTS = 12
# Where the download modal proposes to put artifacts (like `trainfleet artifacts get -o`).
DEFAULT_DOWNLOAD_DIR = "./artifacts"

Run = tuple[int, int]  # (generation, attempt)
Series = dict[str, list[tuple[float, float]]]


# -- pure helpers ------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    """``value`` as a plottable number: ints and finite floats, not bools nor strings."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def in_run(entry: LogEntry, run: Run | None) -> bool:
    """Whether ``entry`` belongs to ``run`` (None: any run)."""
    if run is None:
        return True
    generation, attempt = run
    return entry.attempt == attempt and entry.generation in (None, generation)


def metric_series(entries: Iterable[LogEntry], run: Run | None = None) -> Series:
    """Every numeric metric of the progress events among ``entries`` (of ``run``, when given) as
    ``name -> [(step, value), ...]`` in stream order. A report without a numeric step is placed
    one after the previous report; non-numeric values (strings, NaN, infinities) are skipped."""
    out: Series = {}
    x = 0.0
    for entry in entries:
        if entry.kind != "progress" or not in_run(entry, run):
            continue
        event = entry.event or {}
        step = _number(event.get("step"))
        x = step if step is not None else x + 1
        metrics = event.get("metrics")
        if not isinstance(metrics, dict):
            continue
        for name, value in metrics.items():
            number = _number(value)
            if number is not None:
                out.setdefault(str(name), []).append((x, number))
    return out


def _line(text: Text, label: str, value: str, style: str = "") -> None:
    """One ``label  value`` line; ``value`` is made safe and never read as markup."""
    text.append(f"  {label:<11} ", style="bold")
    text.append(safe_text(value, newlines=False), style=style)
    text.append("\n")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def spec_text(spec: JobSpec, rec: JobRecord | None, signer: str | None, argv: list[str] | None) -> Text:
    text = Text()
    _line(text, "model", f"{spec.model}/{spec.mode}  seed={spec.seed}  priority={spec.priority}")
    if rec is not None:
        offered = f"  (offered: {', '.join(rec.offered)})" if rec.offered and tuple(rec.offered) != (rec.klass,) else ""
        _line(text, "class", rec.klass + offered)
    _line(text, "hyper", _json(spec.hyper))
    _line(text, "data", _json(spec.data))
    _line(text, "command", " ".join(spec.command))
    if argv:
        _line(text, "ran as", " ".join(map(str, argv)))
    if signer is not None:
        _line(text, "signed by", signer or "(unsigned)")
    needs = [
        f"{k}={','.join(v) if isinstance(v, list) else v}"
        for k, v in msgspec.to_builtins(spec.constraints).items()
        if v
    ]
    if spec.requires:
        needs.append(f"requires={','.join(spec.requires)}")
    _line(text, "needs", "  ".join(needs) or "nothing special")
    if spec.env:
        _line(text, "env", " ".join(sorted(spec.env)))
    if rec is not None:
        for host_id, why in sorted(rec.excluded_hosts.items()):
            _line(text, "excluded", f"{host_id}: {why}")
    text.rstrip()
    return text


def record_text(rec: JobRecord, revision: int | None, now: float) -> Text:
    text = Text()
    state = rec.status.value
    text.append(f"  {'state':<11} ", style="bold")
    text.append(state, style=display.STATE_STYLE.get(state, ""))
    text.append(safe_text(f" on {rec.claimed_by}" if rec.claimed_by else "", newlines=False))
    text.append(
        f"  (attempt {rec.attempt} of {rec.max_attempts}, generation {rec.generation}"
        + (f", revision {revision})" if revision is not None else ")")
        + "\n"
    )
    if rec.reason:
        _line(text, "reason", rec.reason, style="yellow")
    if rec.device:
        _line(text, "device", rec.device)
    if rec.status.held and (progress := display.progress_text(rec)):
        _line(text, "progress", f"{progress}  {display.fmt_metrics((rec.progress or {}).get('metrics') or {})}")
    if rec.metrics:
        head = rec.metrics.get("headline")
        ordered = {head: rec.metrics[head]} if head in rec.metrics else {}
        ordered.update((k, v) for k, v in sorted(rec.metrics.items(), key=lambda kv: str(kv[0])) if k != "headline")
        _line(text, "metrics", display.fmt_metrics(ordered))
    if rec.artifact:
        _line(text, "artifact", f"{rec.artifact}  ({display.fmt_bytes(rec.artifact_bytes)})")
    _line(text, "created", display.fmt_time(rec.created_at))
    _line(text, "claimed", display.fmt_time(rec.claimed_at))
    _line(text, "started", display.fmt_time(rec.started_at))
    _line(text, "finished", display.fmt_time(rec.finished_at))
    if rec.status.held:
        _line(text, "heartbeat", display.fmt_time(rec.heartbeat_at))
    if rec.started_at:
        _line(text, "duration", display.fmt_duration(display.duration(rec, now)))
    if rec.last_error:
        text.append("  last error:\n", style="bold")
        for line in rec.last_error.rstrip("\n").split("\n"):  # not splitlines: a CR is shown, not a break
            text.append(f"    {safe_text(line, newlines=False)}\n", style="red")
    text.rstrip()
    return text


def history_text(rows: list[Transition]) -> Text:
    text = Text()
    if not rows:
        return Text("  (the jobs KV keeps no revision of this job)", style="dim")
    if history_truncated(rows):
        text.append("  (older revisions already dropped)\n", style="dim")
    for row in rows:
        text.append(f"  rev {row.revision:<6} {display.fmt_time(row.at)}  ")
        text.append(f"{row.status:<10}", style=display.STATE_STYLE.get(row.status, ""))
        text.append(safe_text(f" {row.host or '-':<12} attempt {row.attempt}  gen {row.generation}", newlines=False))
        if row.reason:
            text.append(f"  {safe_text(row.reason, newlines=False)}", style="yellow")
        text.append("\n")
    text.rstrip()
    return text


def provenance_text(prov: dict[str, Any]) -> Text:
    """A run's provenance (read from the object store: every field shown made safe)."""
    text = Text()
    host = prov.get("host") if isinstance(prov.get("host"), dict) else {}
    timings = prov.get("timings") if isinstance(prov.get("timings"), dict) else {}
    gpus = ", ".join(str(g.get("name", "?")) for g in host.get("gpus") or [] if isinstance(g, dict)) or "none"
    _line(
        text,
        "host",
        f"{host.get('host_id', '-')}  {host.get('platform', '')}  {host.get('cores_usable', '?')} cores  "
        f"{host.get('ram_total_gib', '?')} GiB  GPU: {gpus}",
    )
    _line(text, "code", str(prov.get("code_commit") or "-"))
    versions = prov.get("versions") if isinstance(prov.get("versions"), dict) else {}
    _line(text, "versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "-")
    _line(text, "attempt", f"{prov.get('attempt', '-')} (generation {prov.get('generation', '-')})")
    started, finished = _number(timings.get("started_at")), _number(timings.get("finished_at"))
    dur = _number(timings.get("duration_s"))
    _line(
        text,
        "timings",
        f"started {display.fmt_time(started)}, finished {display.fmt_time(finished)}"
        + (f" ({display.fmt_duration(dur)})" if dur else ""),
    )
    if isinstance(prov.get("argv"), list):
        _line(text, "argv", " ".join(map(str, prov["argv"])))
    text.rstrip()
    return text


# -- widgets -------------------------------------------------------------------------------
class MetricPlot(PlotextPlot):
    """The curve of one metric; ``points`` is what it draws."""

    DEFAULT_CSS = "MetricPlot { height: 14; width: 1fr; }"

    def __init__(self, metric: str, **kw: Any):
        super().__init__(**kw)
        self.metric = metric
        self.points: list[tuple[float, float]] = []

    def show(self, points: list[tuple[float, float]]) -> None:
        self.points = list(points)
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        # The name is the trainer's: escaped, and plotext's output is read as ANSI (no markup).
        plt.title(safe_text(self.metric, newlines=False))
        plt.xlabel("step")
        if self.points:
            plt.plot([p[0] for p in self.points], [p[1] for p in self.points], marker="braille")
        self.refresh()


class DownloadScreen(ModalScreen[str | None]):
    """Asks where to download the artifact; dismisses with the directory, or None."""

    DEFAULT_CSS = """
    DownloadScreen { align: center middle; }
    DownloadScreen > Vertical { width: 72; height: auto; border: thick $accent; background: $surface;
                                padding: 1 2; }
    DownloadScreen Horizontal { height: auto; align: center middle; margin-top: 1; }
    DownloadScreen Button { margin: 0 2; }
    """
    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, question: Text, default: str = DEFAULT_DOWNLOAD_DIR):
        super().__init__()
        self.question = question
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.question)
            yield Input(value=self.default, id="dir")
            with Horizontal():
                yield Button("Download", id="ok", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#dir", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._answer(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self._answer(self.query_one("#dir", Input).value)
        else:
            self.dismiss(None)

    def _answer(self, value: str) -> None:
        self.dismiss(value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


# -- the screen ------------------------------------------------------------------------------
ACTIONS = ("cancel_job", "requeue_job", "download")


class JobDetailScreen(Screen[None]):
    """Everything about one job, live; cancel, requeue and download from here."""

    DEFAULT_CSS = """
    JobDetailScreen > VerticalScroll { height: 1fr; }
    JobDetailScreen .section { height: auto; border: round $primary-darken-1; padding: 0 1; margin: 0 0 0 0; }
    JobDetailScreen #curves { height: auto; border: round $primary-darken-1; padding: 0 1; }
    """
    BINDINGS = [
        Binding("escape,q", "close", "back"),
        Binding("c", "cancel_job", "cancel"),
        Binding("r", "requeue_job", "requeue"),
        Binding("d", "download", "download"),
    ]

    def __init__(self, fleet: FleetView, job_id: str):
        super().__init__()
        self.fleet = fleet
        self.job_id = job_id
        self.spec: JobSpec | None = fleet.specs.get(job_id)
        self.record: JobRecord | None = fleet.records.get(job_id)
        self.revision: int | None = None
        self.signer: str | None = None
        self.history: list[Transition] = []
        self.worker_records: list[Any] = []
        self.matches: list[Match] = []
        self.explain_data: dict[str, Any] | None = None
        self.provenance: dict[str, Any] | None = None
        self.provenance_error: str | None = None
        self._provenance_of: tuple[str, int, int] | None = None  # (artifact, generation, attempt)
        # The curves of the run shown (the record's current generation and attempt).
        self.run: Run | None = None
        self.entries: list[LogEntry] = []
        self.series: Series = {}
        self.plots: dict[str, MetricPlot] = {}
        self._dirty = False
        self._history_key: tuple[Any, ...] | None = None
        self.error: str | None = None
        self.last_download: dict[str, Any] | None = None

    # -- layout ------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(id="title")
            yield Static(id="spec", classes="section")
            yield Static(id="record", classes="section")
            yield Static(id="history", classes="section")
            yield Static(id="explain", classes="section")
            yield Static(id="provenance", classes="section")
            with Vertical(id="curves"):
                yield Static(Text("no metrics reported yet", style="dim"), id="no-metrics")
        yield Footer()

    def on_mount(self) -> None:
        for wid, title in (
            ("spec", "spec"),
            ("record", "record"),
            ("history", "history (jobs KV revisions, heartbeats collapsed)"),
            ("explain", "explain: who can run it"),
            ("provenance", "artifact and provenance"),
            ("curves", "curves (progress events of the current run)"),
        ):
            self.query_one(f"#{wid}").border_title = title
        self._render_all()
        self.run_worker(self._load_spec(), group="spec")
        self.run_worker(self._watch_record(), group="record")
        self.set_interval(WORKERS_REFRESH_S, self._reload_workers)
        self.set_interval(REDRAW_S, self._redraw)

    @property
    def name_text(self) -> str:
        return safe_text(self.spec.name if self.spec else self.job_id[:12], newlines=False)

    # -- loading (every NATS read here is allowed to a viewer) ---------------------------------
    async def _load_spec(self) -> None:
        broker = self.fleet.broker
        try:
            if self.spec is None:
                self.spec = await get_spec(broker, self.job_id, identity=False)  # specs KV get
            self.signer = await signed_by(broker, self.job_id)
        except TrainfleetError as exc:
            self.error = f"spec: {exc}"
        self._explain()
        self._render_all()

    async def _watch_record(self) -> None:
        """The record as written: a watch of the one key in the jobs KV."""
        async with contextlib.aclosing(watch_records(self.fleet.broker, self.job_id)) as changes:
            async for change in changes:
                if change.record is None:
                    self.error = "the job's record was deleted"
                    self._render_all()
                    continue
                await self._on_record(change.record, change.revision)

    async def _on_record(self, rec: JobRecord, revision: int) -> None:
        self.record, self.revision = rec, revision
        key = transition_key(rec)
        if key != self._history_key:
            self._history_key = key
            self.history, _ = await job_history(self.fleet.broker, self.job_id)  # KV direct gets
            if not self.worker_records:
                await self._reload_workers()
        if rec.artifact and (rec.artifact, rec.generation, rec.attempt) != self._provenance_of:
            self._provenance_of = (rec.artifact, rec.generation, rec.attempt)
            self.run_worker(self._load_provenance(rec), group="provenance")
        run = (rec.generation, rec.attempt)
        if run != self.run:
            self._follow(run)
        self._explain()
        self.refresh_bindings()
        self._render_all()

    async def _reload_workers(self) -> None:
        try:
            self.worker_records = await load_workers(self.fleet.broker)  # workers KV snapshot
        except TrainfleetError as exc:
            self.error = f"workers: {exc}"
            return
        self._explain()
        self._render_explain()

    def _explain(self) -> None:
        """The verdicts, computed as ``trainfleet explain`` and the control service compute them."""
        if self.spec is None or self.record is None:
            return
        job = Job(self.spec, self.record, self.revision or 0)
        self.matches = explain_job(
            job, self.worker_records, stale_after_s=stale_after_s(self.fleet.broker.settings), now=self.fleet.now()
        )
        self.explain_data = explain_json(job, self.matches)

    async def _load_provenance(self, rec: JobRecord) -> None:
        """The run's provenance: its own object beside the artifact (an old bundle's from inside it)."""
        try:
            found = await Artifacts(self.fleet.broker).run_provenance(  # object store reads
                rec.job_id, rec.generation, rec.attempt, rec.artifact
            )
            self.provenance = found.provenance
            self.provenance_error = None
        except TrainfleetError as exc:
            self.provenance, self.provenance_error = None, str(exc)
        self._render_all()

    def _follow(self, run: Run) -> None:
        """Start reading the curves of ``run`` (the reader of an earlier run is cancelled)."""
        self.run = run
        self.entries = []
        self.series = {}
        self._dirty = True
        self.run_worker(self._read_progress(run), group="curves", exclusive=True)

    async def _read_progress(self, run: Run) -> None:
        """Progress events of ``run``: what the logs stream holds, then live until the job settles."""
        try:
            async with contextlib.aclosing(
                read_logs(self.fleet.broker, self.job_id, events=True, follow=True, poll_s=0.5)
            ) as entries:
                async for entry in entries:
                    if entry.kind == "progress" and in_run(entry, run) and self.run == run:
                        self.entries.append(entry)
                        self._dirty = True
        except TrainfleetError as exc:
            self.error = f"curves: {exc}"
            self._dirty = True

    # -- drawing ----------------------------------------------------------------------------------
    def _render_all(self) -> None:
        if not self.is_attached:  # closed while a read was on its way
            return
        title = Text()
        title.append(self.name_text, style="bold")
        title.append(f"  ({self.job_id})", style="dim")
        if self.error:
            title.append(f"\n{safe_text(self.error, newlines=False)}", style="red")
        self.query_one("#title", Static).update(title)
        spec = self.spec
        argv = self.provenance.get("argv") if self.provenance else None
        self.query_one("#spec", Static).update(
            spec_text(spec, self.record, self.signer, argv if isinstance(argv, list) else None)
            if spec
            else Text("loading…", style="dim")
        )
        self.query_one("#record", Static).update(
            record_text(self.record, self.revision, self.fleet.now()) if self.record else Text("loading…", style="dim")
        )
        self.query_one("#history", Static).update(history_text(self.history))
        self._render_explain()
        self._render_provenance()

    def _render_explain(self) -> None:
        if not self.is_attached:  # closed while a read was on its way
            return
        if self.spec is None or self.record is None:
            return
        job = Job(self.spec, self.record, self.revision or 0)
        # The very lines `trainfleet explain` prints (already made safe), as Text: never markup.
        self.query_one("#explain", Static).update(Text("\n".join(explain_lines(job, self.matches))))

    def _render_provenance(self) -> None:
        if not self.is_attached:  # closed while a read was on its way
            return
        rec = self.record
        text = Text()
        if rec is None or not rec.artifact:
            text.append("no artifact yet", style="dim")
        else:
            _line(text, "artifact", f"{rec.artifact}  ({display.fmt_bytes(rec.artifact_bytes)})")
            if self.provenance is not None:
                text.append_text(provenance_text(self.provenance))
            elif self.provenance_error:
                _line(text, "provenance", f"unavailable ({self.provenance_error})", style="yellow")
            else:
                text.append("  provenance: loading…", style="dim")
        self.query_one("#provenance", Static).update(text)

    def _redraw(self) -> None:
        if not self.is_attached:  # closed while a read was on its way
            return
        if self.record is not None and self.record.status.held:
            self.query_one("#record", Static).update(record_text(self.record, self.revision, self.fleet.now()))
        if not self._dirty:
            return
        self._dirty = False
        self.series = metric_series(self.entries)
        curves = self.query_one("#curves", Vertical)
        for name in [n for n in self.plots if n not in self.series]:
            self.plots.pop(name).remove()
        for name, points in list(self.series.items())[:MAX_PLOTS]:
            plot = self.plots.get(name)
            if plot is None:
                plot = self.plots[name] = MetricPlot(name)
                curves.mount(plot)
            plot.show(points)
        note = self.query_one("#no-metrics", Static)
        if not self.series:
            note.update(Text("no metrics reported yet", style="dim"))
        elif len(self.series) > MAX_PLOTS:
            note.update(Text(f"{len(self.series) - MAX_PLOTS} more metric(s) not drawn", style="dim"))
        else:
            note.update("")
        note.display = not self.series or len(self.series) > MAX_PLOTS

    # -- actions ------------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action not in ACTIONS:
            return True
        if self.fleet.read_only:
            return False  # a viewer: not offered at all (the server would refuse cancel and requeue)
        rec = self.record
        if rec is None:
            return None
        if action == "cancel_job":
            return None if rec.status.terminal else True
        if action == "requeue_job":
            return True if rec.status.terminal else None
        return True if rec.artifact else None

    def action_close(self) -> None:
        self.dismiss()

    def action_cancel_job(self) -> None:
        self._confirm("cancel", "Cancel")

    def action_requeue_job(self) -> None:
        self._confirm("requeue", "Requeue")

    def _confirm(self, verb: str, label: str) -> None:
        if self.fleet.read_only:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._control(verb), group="control")

        # ConfirmScreen's Label reads markup: the (manifest-written) name is escaped for it.
        self.app.push_screen(ConfirmScreen(f"{label} {escape(self.name_text)}?"), answered)

    async def _control(self, verb: str) -> None:
        """The control service does it (role: operator or above)."""
        try:
            reply = await self.fleet.control(verb, self.job_id)
        except TrainfleetError as exc:
            self.app.notify(safe_text(f"{verb} failed: {exc}", newlines=False), severity="error", markup=False)
            return
        state = reply.get("status") if isinstance(reply, dict) else None
        message = f"{verb}: {self.name_text} is now {state}" if state else f"{verb}: {self.name_text}: done"
        self.app.notify(safe_text(message, newlines=False), markup=False)

    def action_download(self) -> None:
        rec = self.record
        if self.fleet.read_only or rec is None or not rec.artifact:
            return
        artifact = rec.artifact
        question = Text()
        question.append(f"Download the artifact of {self.name_text} ({artifact[:12]}, ")
        question.append(f"{display.fmt_bytes(rec.artifact_bytes)}) and extract it into DIR/{self.job_id[:12]}…:\n")

        def answered(directory: str | None) -> None:
            if directory:
                self.run_worker(self._download(artifact, Path(directory).expanduser()), group="download")

        self.app.push_screen(DownloadScreen(question), answered)

    async def _download(self, artifact: str, out: Path) -> None:
        try:
            # What `trainfleet artifacts get JOB -o OUT --extract` does (any reader may get artifacts)
            result = await download_artifact(
                self.fleet.broker, artifact, out, into=self.job_id, provenance=self.provenance
            )
        except (TrainfleetError, OSError) as exc:
            self.app.notify(safe_text(f"download failed: {exc}", newlines=False), severity="error", markup=False)
            return
        self.last_download = result
        self.app.notify(
            safe_text(
                f"artifact {artifact[:12]} ({display.fmt_bytes(result['bytes'])}) extracted into {result['extracted']}",
                newlines=False,
            ),
            markup=False,
        )
