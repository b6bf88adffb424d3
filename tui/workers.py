"""The monitor's workers: a table of every registered agent with its hardware and live GPU
telemetry, and a detail screen for one of them.

:class:`WorkersPanel` is a focusable DataTable, one row per worker (a multi-GPU host gets one
line per GPU in the GPU columns). It re-reads the workers KV every ``WORKERS_REFRESH_S``: the
bucket's TTL reaps a dead agent without an event to watch, and the telemetry in each entry
changes with every heartbeat anyway. Enter opens :class:`WorkerDetailScreen`.

NATS reads, and who performs them: every read here is made with the monitor's own connection
(``FleetView.broker``), i.e. as whatever role the monitor was started with; the lowest of them,
``viewer``, may read the workers KV (``broker/roles.py``: ``_reader``), so nothing here needs more.

Worker entries are written by agents, and a host id, GPU name, note or reason is text from
another machine: every such string goes through ``display.safe_text`` into a ``rich.text.Text``
(a DataTable or Static reads a plain str as markup).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import nats.errors
import nats.js.errors
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.coordinate import Coordinate
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from trainfleet.broker import display
from trainfleet.broker.errors import TrainfleetError
from trainfleet.broker.schema import GpuStat, JobRecord, WorkerRecord, decode
from trainfleet.broker.workers import load_workers, stale_after_s, worker_key
from trainfleet.tui.common import FleetView

WORKERS_REFRESH_S = 2.0
# What a failed read of the workers KV may raise (the panel then keeps its rows and says why).
READ_ERRORS: tuple[type[BaseException], ...] = (TrainfleetError, nats.errors.Error, TimeoutError, OSError)

WORKER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("host", "HOST"),
    ("state", "STATE"),
    ("classes", "CLASSES"),
    ("cores", "CORES"),
    ("ram", "RAM GiB"),
    ("gpu", "GPU"),
    ("vram", "VRAM used/free GiB"),
    ("util", "UTIL"),
    ("jobs", "JOBS"),
    ("seen", "SEEN"),
)


def _safe(text: Any) -> str:
    """One line of text from another machine, safe for a terminal."""
    return display.safe_text(str(text), newlines=False)


def _lines(parts: Iterable[str | Text]) -> Text:
    """Parts (each one line) stacked into one multi-line cell."""
    out = Text()
    for n, part in enumerate(parts):
        if n:
            out.append("\n")
        out.append(part if isinstance(part, Text) else Text(part))
    return out


def _no_cuda(reason: str) -> str:
    return _safe(reason.removeprefix("no CUDA: ") or "no GPU")


def _vram(stat: GpuStat) -> Text:
    if stat.error:
        return Text(f"error: {_safe(stat.error)}", style="red")
    return Text(f"{stat.vram_used_gib:.1f} / {stat.vram_free_gib:.1f}")


def _util(stat: GpuStat) -> str:
    if stat.error or stat.util_pct is None:
        return "-"
    return f"{stat.util_pct:.0f}%"


def gpu_cells(worker: WorkerRecord) -> tuple[Text, Text, Text, int]:
    """The GPU, VRAM and UTIL cells of a worker and the row height (one line per GPU).

    No GPU: "no GPU" and the capability's reason. GPUs without readings (NVML failed this
    heartbeat, or an agent from before telemetry): their names, and why there are no readings."""
    cap = worker.capability
    if not cap.gpus:
        return Text("no GPU", style="dim"), Text(_no_cuda(cap.cuda_reason), style="dim"), Text("-"), 1
    names = [_safe(g.name) for g in cap.gpus]
    if not worker.gpu_stats:
        why = f"no telemetry: {_safe(worker.gpu_stats_reason)}" if worker.gpu_stats_reason else "no telemetry"
        vram = [Text(why, style="yellow")] + [Text("") for _ in cap.gpus[1:]]
        return _lines(names), _lines(vram), _lines("-" for _ in cap.gpus), len(cap.gpus)
    stats = worker.gpu_stats
    names = [_safe(s.name or f"gpu {s.index}") for s in stats]
    return _lines(names), _lines(_vram(s) for s in stats), _lines(_util(s) for s in stats), len(stats)


def seen_text(worker: WorkerRecord, now: float, stale_after: float) -> Text:
    age = max(0.0, now - worker.last_seen)
    stale = age > stale_after
    return Text(f"{age:.0f}s ago" + (" (stale)" if stale else ""), style="bold red" if stale else "")


def worker_cells(worker: WorkerRecord, now: float, stale_after: float) -> tuple[tuple[Any, ...], int]:
    """A worker's row, in WORKER_COLUMNS order, and its height."""
    cap = worker.capability
    gpu, vram, util, height = gpu_cells(worker)
    cells = (
        Text(_safe(worker.host_id)),
        Text(_safe(worker.state), style="cyan" if worker.state == "busy" else ""),
        Text(_safe(",".join(worker.classes))),
        f"{cap.cores_usable:g}/{cap.cores_logical}",
        f"{cap.ram_available_gib:.1f}/{cap.ram_total_gib:.1f}",
        gpu,
        vram,
        util,
        str(len(worker.current_jobs)),
        seen_text(worker, now, stale_after),
    )
    return cells, height


class WorkersPanel(DataTable[Any]):
    """Every registered worker, refreshed from the workers KV every WORKERS_REFRESH_S.

    API for the app around it: ``await refresh_workers()`` (re-read now), ``worker_count``
    (workers shown), ``selected_host`` (host id under the cursor, or None), ``error`` (why the
    last read failed, or ""), ``open_detail()`` (what Enter does)."""

    def __init__(
        self,
        fleet: FleetView,
        *,
        name: str | None = None,
        id: str | None = None,  # noqa: A002 - Textual's own parameter name
        classes: str | None = None,
        refresh_s: float = WORKERS_REFRESH_S,
    ):
        super().__init__(name=name, id=id, classes=classes, cursor_type="row", zebra_stripes=True)
        self.fleet = fleet
        self.refresh_s = refresh_s
        self.shown: list[WorkerRecord] = []
        self.error = ""
        self._layout: list[tuple[str, int]] = []
        self._reading = asyncio.Lock()

    async def on_mount(self) -> None:
        for key, label in WORKER_COLUMNS:
            self.add_column(label, key=key)
        self._update_title()
        self.set_interval(self.refresh_s, self.refresh_workers)
        await self.refresh_workers()

    # -- the API -------------------------------------------------------------
    @property
    def worker_count(self) -> int:
        return len(self.shown)

    @property
    def selected_host(self) -> str | None:
        if self.row_count == 0:
            return None
        row = min(max(self.cursor_row, 0), self.row_count - 1)
        return str(self.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value)

    def worker(self, host_id: str) -> WorkerRecord | None:
        return next((w for w in self.shown if w.host_id == host_id), None)

    async def refresh_workers(self) -> None:
        """Re-read the workers KV and show it; a failed read keeps the rows and says why."""
        async with self._reading:
            try:
                # Read as the monitor's role (viewer is enough): a snapshot of the workers KV.
                workers = await load_workers(self.fleet.broker)
            except READ_ERRORS as exc:
                self.error = _safe(str(exc) or type(exc).__name__)
                self._update_title()
                return
            if not self.is_mounted:
                return
            self.error = ""
            self.show_workers(workers)

    def show_workers(self, workers: list[WorkerRecord]) -> None:
        """Show ``workers`` (in their order): cells update in place while the rows stay the
        same; otherwise the table is rebuilt with the cursor kept on the same host."""
        now = self.fleet.now()
        stale_after = stale_after_s(self.fleet.broker.settings)
        rows = [(w.host_id, *worker_cells(w, now, stale_after)) for w in workers]
        layout = [(host, height) for host, _, height in rows]
        if layout == self._layout:
            for host, cells, _ in rows:
                for (key, _), value in zip(WORKER_COLUMNS, cells, strict=True):
                    self.update_cell(host, key, value)
        else:
            keep = self.selected_host
            self.clear()
            for host, cells, height in rows:
                self.add_row(*cells, key=host, height=height)
            self._layout = layout
            hosts = [host for host, _ in layout]
            if keep in hosts:
                self.move_cursor(row=hosts.index(keep), animate=False)
        self.shown = list(workers)
        self._update_title()

    def _update_title(self) -> None:
        title = f"workers ({len(self.shown)})"
        self.border_title = f"{title} · read failed: {self.error}" if self.error else title

    # -- detail --------------------------------------------------------------
    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table is self:
            event.stop()
            self.open_detail(str(event.row_key.value))

    def open_detail(self, host_id: str | None = None) -> None:
        """Push the detail screen of ``host_id`` (default: the worker under the cursor)."""
        host = host_id or self.selected_host
        if host is not None:
            self.app.push_screen(WorkerDetailScreen(self.fleet, host, worker=self.worker(host)))


# --------------------------------------------------------------------------- detail


def running_jobs(fleet: FleetView, host_id: str) -> list[JobRecord]:
    """The jobs the monitor sees held by ``host_id`` (claimed or running there), by name."""
    held = [r for r in fleet.records.values() if r.claimed_by == host_id and r.status.held]
    return sorted(held, key=lambda r: (fleet.name_of(r.job_id), r.job_id))


def _row(out: Text, label: str, value: str | Text, style: str = "") -> None:
    out.append(f"  {label:<11}", style="bold")
    out.append(value if isinstance(value, Text) else Text(value, style=style))
    out.append("\n")


def _gpu_line(stat: GpuStat, cc: str) -> Text:
    if stat.error:
        return Text(f"{_safe(stat.name)}  error: {_safe(stat.error)}", style="red")
    parts = [
        _safe(stat.name),
        f"VRAM {stat.vram_used_gib:.1f} used, {stat.vram_free_gib:.1f} free of {stat.vram_total_gib:.1f} GiB",
        f"util {stat.util_pct:.0f}%" if stat.util_pct is not None else "util ?",
    ]
    if stat.temp_c is not None:
        parts.append(f"{stat.temp_c:.0f}°C")
    if cc:
        parts.append(f"cc {_safe(cc)}")
    if stat.uuid:
        parts.append(_safe(stat.uuid))
    return Text("  ·  ".join(parts))


def _gpus_section(out: Text, worker: WorkerRecord) -> None:
    cap = worker.capability
    if not cap.gpus:
        _row(out, "gpus", f"none ({_no_cuda(cap.cuda_reason)})", "dim")
        return
    stats = {s.index: s for s in worker.gpu_stats}
    for gpu in cap.gpus:
        stat = stats.get(gpu.index)
        if stat is None:
            line = Text(
                f"{_safe(gpu.name)}  ·  VRAM {gpu.vram_free_gib:.1f} free of {gpu.vram_total_gib:.1f} GiB "
                f"(at the last VRAM check)  ·  cc {_safe(gpu.compute_capability or '?')}  ·  {_safe(gpu.uuid or '?')}"
            )
        else:
            line = _gpu_line(stat, gpu.compute_capability)
        _row(out, f"gpu {gpu.index}", line)
    if not worker.gpu_stats:
        why = _safe(worker.gpu_stats_reason) if worker.gpu_stats_reason else "this agent sends none"
        _row(out, "telemetry", f"none: {why}", "yellow")


def _job_line(fleet: FleetView, rec: JobRecord) -> Text:
    rec = fleet.live.apply(rec)
    line = Text(f"  {_safe(fleet.name_of(rec.job_id)):<28} {rec.job_id[:12]}  ")
    line.append(f"{rec.status.value:<8}", style=display.STATE_STYLE.get(rec.status.value, ""))
    line.append(f" try {rec.attempt}  ")
    line.append(display.progress_text(rec), style="green")
    head = display.headline(rec)
    if head:
        line.append(f"  {head}")
    if rec.device:
        line.append(f"  on {_safe(rec.device)}", style="dim")
    return line


def detail_text(fleet: FleetView, host_id: str, worker: WorkerRecord | None, missing: str = "") -> Text:
    """Everything the monitor knows about one worker: its capability in full with the latest
    telemetry, and the jobs it holds."""
    now = fleet.now()
    out = Text()
    out.append(f"worker {_safe(host_id)}\n", style="bold")
    if worker is None:
        out.append(f"  {missing or 'not read yet'}\n\n", style="yellow")
    else:
        cap = worker.capability
        settings = fleet.broker.settings
        seen = seen_text(worker, now, stale_after_s(settings))
        state = Text(_safe(worker.state), style="cyan" if worker.state == "busy" else "")
        state.append(f"  ·  seen {seen.plain}", style=seen.style)
        started = f"  ·  up {display.fmt_duration(now - worker.started_at)}" if worker.started_at else ""
        state.append(f"  ·  pid {worker.pid}{started}")
        _row(out, "state", state)
        _row(out, "classes", _safe(", ".join(worker.classes)) or "-")
        cores = f"{cap.cores_usable:g} usable of {cap.cores_logical} logical ({cap.cores_physical} physical)"
        _row(out, "cores", cores)
        _row(out, "ram", f"{cap.ram_available_gib:.1f} GiB available of {cap.ram_total_gib:.1f} GiB")
        _gpus_section(out, worker)
        if cap.driver_version or cap.cuda_version:
            _row(out, "driver", f"{_safe(cap.driver_version or '?')}, CUDA {_safe(cap.cuda_version or '?')}")
        torch = "not available"
        if cap.torch_version is not None:
            cuda = {True: "yes", False: "no", None: "unknown"}[cap.torch_cuda]
            torch = f"{_safe(cap.torch_version)} (cuda: {cuda})"
        _row(out, "torch", torch)
        _row(out, "python", f"{_safe(cap.python or '?')} on {_safe(cap.platform or '?')}")
        _row(out, "modules", _safe(", ".join(cap.modules)) or "-")
        _row(out, "container", "yes" if cap.in_container else "no")
        _row(out, "commit", _safe(cap.code_commit) or "unknown")
        for n, note in enumerate(cap.notes):
            _row(out, "notes" if n == 0 else "", _safe(note), "dim")
        out.append("\n")
    jobs = running_jobs(fleet, host_id)
    out.append(f"running jobs ({len(jobs)})\n", style="bold")
    for rec in jobs:
        out.append(_job_line(fleet, rec))
        out.append("\n")
    known = {r.job_id for r in jobs}
    for job_id in worker.current_jobs if worker else ():
        if job_id not in known:  # the agent holds it, the monitor's records do not say so (yet)
            out.append(f"  {_safe(fleet.name_of(job_id)):<28} {_safe(job_id[:12])}  (per the worker entry)\n")
    if not jobs and not (worker and worker.current_jobs):
        out.append("  none\n", style="dim")
    return out


class WorkerDetailScreen(ModalScreen[None]):
    """One worker in full, refreshed like the panel; escape or q closes it."""

    DEFAULT_CSS = """
    WorkerDetailScreen { align: center middle; }
    WorkerDetailScreen > VerticalScroll { width: 90%; height: 90%; border: thick $primary;
                                          background: $surface; padding: 0 1; }
    """
    BINDINGS = [Binding("escape,q", "close", "close")]

    def __init__(self, fleet: FleetView, host_id: str, *, worker: WorkerRecord | None = None):
        super().__init__()
        self.fleet = fleet
        self.host_id = host_id
        self.worker = worker
        self.missing = ""
        self.text = Text()

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(id="worker-detail")

    async def on_mount(self) -> None:
        self.query_one(VerticalScroll).border_title = f"worker {_safe(self.host_id)} (escape closes)"
        self.show()
        self.set_interval(WORKERS_REFRESH_S, self.reload)
        await self.reload()

    async def reload(self) -> None:
        """Read this worker's entry again (as the monitor's role; viewer may) and show it."""
        try:
            entry = await self.fleet.broker.workers.get(worker_key(self.host_id))
        except nats.js.errors.KeyNotFoundError:  # deleted, purged or reaped by the TTL
            self.worker, self.missing = None, "not registered: it left, or its entry expired"
        except READ_ERRORS as exc:
            self.missing = f"read failed: {_safe(str(exc) or type(exc).__name__)}"
        else:
            try:
                self.worker, self.missing = decode(entry.value or b"", WorkerRecord), ""
            except TrainfleetError as exc:
                self.worker, self.missing = None, f"unreadable entry: {_safe(exc)}"
        if self.is_mounted:
            self.show()

    def show(self) -> None:
        self.text = detail_text(self.fleet, self.host_id, self.worker, self.missing)
        if self.worker is not None and self.missing:  # a failed re-read: keep the last, say so
            self.text.append(f"\n{self.missing}\n", style="yellow")
        self.query_one("#worker-detail", Static).update(self.text)

    def action_close(self) -> None:
        self.dismiss(None)
