"""SVG snapshots of the monitor (pytest-textual-snapshot's ``snap_compare``): the main screen, the
job detail, the workers panel and the worker detail, at a fixed terminal size over fixed data.

Each test starts its own nats-server, writes a fixed fleet into it (records with fixed
timestamps, specs whose ids are hashes of fixed content, two worker entries, one with GPU
telemetry, log lines and progress events of the running job), then runs the real
``MonitorApp`` against it with a fixed clock and presses the keys a user would. The snapshots
live in ``tests/__snapshots__/test_tui_snapshots/``.

What would still vary between runs is pinned here, not in the app:
- the clock: ``MonitorApp(now=lambda: FIXED)`` (every age, duration, rate and staleness), and
  TZ=UTC for the absolute times the detail prints (``display.fmt_time`` uses local time);
- the server's port, which the header's subtitle shows: once the app has drawn it, the test
  checks the subtitle is exactly ``<prefix> @ nats://127.0.0.1:<port>`` and replaces the port
  with ``PORT`` (a fixed port would collide with other test sessions on the same machine);
- the KV revision numbers the detail shows: the records are written in a fixed order into a
  fresh server, so they are the same every run; the history's times are the records' own
  ``updated_at``, not the server's;
- loading: every screenshot waits until everything it shows has arrived (rows, names, workers,
  log lines, history, explain verdicts, the curve), never a fixed sleep.

A snapshot that differs is a failing test: open the report pytest-textual-snapshot writes
(``snapshot_report.html``) and look at the difference. Update the snapshots only when the change
is intended, and look at the new SVGs before committing them:

    .venv/bin/python -m pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from textual.pilot import Pilot

from trainfleet.broker.connection import Broker
from trainfleet.broker.logs import log_line_headers
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import (
    Capability,
    GpuInfo,
    GpuStat,
    JobStatus,
    ProgressEvent,
    WorkerRecord,
    encode,
)
from trainfleet.broker.server import EmbeddedServer
from trainfleet.broker.settings import Settings
from trainfleet.controller.manifest import parse_manifest
from trainfleet.tui.app import MonitorApp
from trainfleet.tui.detail import JobDetailScreen
from trainfleet.tui.workers import WorkerDetailScreen

from .conftest import as_role, pilot_until, put_job

SIZE = (200, 50)
FIXED = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC: "now" for every snapshot
H200 = 141.0

# Fixed content: the job ids are hashes of it. The command is a plain "python3" (not this
# venv's interpreter, whose path differs between checkouts), since the detail shows it.
MANIFEST = """
schema_version = 1
[models.gbm]
command = ["python3", "-m", "trainfleet.examples.sklearn_gbm"]
modes = ["classify"]
requires = ["sklearn"]
[models.gbm.hyper.max_iter]
type = "int"
default = 100
[models.gbm.hyper.learning_rate]
type = "float"
default = 0.1

[[jobs]]
name = "sweep-lr0.30"
model = "gbm"
mode = "classify"
seed = 1
priority = 9
hyper = { learning_rate = 0.3 }

[[jobs]]
name = "sweep-lr0.10"
model = "gbm"
mode = "classify"
seed = 1
priority = 5
hyper = { learning_rate = 0.1 }

[[jobs]]
name = "sweep-lr0.03"
model = "gbm"
mode = "classify"
seed = 1
priority = 1
hyper = { learning_rate = 0.03 }

[[jobs]]
name = "sweep-lr0.01"
model = "gbm"
mode = "classify"
seed = 1
hyper = { learning_rate = 0.01 }

[[jobs]]
name = "baseline"
model = "gbm"
mode = "classify"
seed = 7

[[jobs]]
name = "deep-trees"
model = "gbm"
mode = "classify"
seed = 8
min_ram_gib = 8

[[jobs]]
name = "old-run"
model = "gbm"
mode = "classify"
seed = 9
"""
RUNNING = "sweep-lr0.30"  # the first row (highest priority): the log pane and the detail show it
LOG_ENTRIES = 9  # what is published for it below: 1 lifecycle event, 4 log lines, 4 progress events


def at(seconds_ago: float) -> float:
    return FIXED - seconds_ago


def gpu_box(job_ids: tuple[str, ...]) -> WorkerRecord:
    gpus = (
        GpuInfo(index=0, name="NVIDIA H200", uuid="GPU-aaaa", vram_total_gib=H200, vram_free_gib=100.0),
        GpuInfo(index=1, name="NVIDIA H200", uuid="GPU-bbbb", vram_total_gib=H200, vram_free_gib=H200),
    )
    cap = Capability(
        host_id="gpu-box",
        cores_physical=16,
        cores_logical=32,
        cores_usable=24.0,
        ram_total_gib=256.0,
        ram_available_gib=200.5,
        gpus=gpus,
        driver_version="580.159.04",
        cuda_version="13.0",
        torch_version="2.9.0+cu128",
        torch_cuda=True,
        python="3.11",
        platform="Linux-x86_64",
        code_commit="3c59818",
        in_container=True,
        modules=("sklearn", "torch"),
        notes=("override: max_cores=24 caps 32 cores to 24",),
    )
    stats = (
        GpuStat(
            index=0,
            name="NVIDIA H200",
            uuid="GPU-aaaa",
            vram_used_gib=41.0,
            vram_free_gib=100.0,
            vram_total_gib=H200,
            util_pct=87.0,
            temp_c=71.0,
        ),
        GpuStat(
            index=1,
            name="NVIDIA H200",
            uuid="GPU-bbbb",
            vram_used_gib=0.5,
            vram_free_gib=140.5,
            vram_total_gib=H200,
            util_pct=0.0,
            temp_c=34.0,
        ),
    )
    return WorkerRecord(
        host_id="gpu-box",
        capability=cap,
        classes=("gpu.141", "cpu"),
        current_jobs=job_ids,
        state="busy",
        started_at=at(3725),
        last_seen=at(1),
        pid=4242,
        gpu_stats=stats,
    )


def cpu_box() -> WorkerRecord:
    cap = Capability(
        host_id="cpu-box",
        cores_physical=4,
        cores_logical=8,
        cores_usable=8.0,
        ram_total_gib=16.0,
        ram_available_gib=12.0,
        cuda_reason="no CUDA: NVML init failed: Driver Not Loaded",
        python="3.11",
        platform="Linux-x86_64",
    )
    return WorkerRecord(
        host_id="cpu-box", capability=cap, classes=("cpu",), started_at=at(86_400), last_seen=at(2), pid=977
    )


async def seed(settings: Settings) -> None:
    """The fixed fleet, written in a fixed order (so KV revisions are the same every run)."""
    broker = await Broker.connect(settings, provision=True, name="test-snapshot-seed")
    try:
        jobs = {spec.name: spec for spec in parse_manifest(MANIFEST, file="snap.toml").jobs}
        ids = {name: spec.job_id for name, spec in jobs.items()}
        for spec in jobs.values():
            await put_job(broker, spec, created_at=at(600), updated_at=at(600), queued_at=at(600))

        async def change(name: str, **changes: Any) -> None:
            stored = await get_record(broker, ids[name])
            await broker.jobs.update(ids[name], encode(stored.record.evolve(**changes)), last=stored.revision)

        run1 = dict(claimed_by="gpu-box", attempt=1)
        await change(RUNNING, status=JobStatus.CLAIMED, claimed_at=at(130), updated_at=at(130), **run1)
        await change(RUNNING, status=JobStatus.RUNNING, started_at=at(125.5), updated_at=at(125.5), **run1)
        await change(
            RUNNING,
            heartbeat_at=at(1.5),
            updated_at=at(1.5),
            device="gpu:0 GPU-aaaa",
            progress={"step": 40, "total": 100, "metrics": {"loss": 0.3412}},
        )  # a heartbeat: collapsed in the history
        await change("sweep-lr0.10", status=JobStatus.CLAIMED, claimed_at=at(3), updated_at=at(3), **run1)
        cpu1 = dict(claimed_by="cpu-box", attempt=1)
        await change("baseline", status=JobStatus.RUNNING, started_at=at(400), updated_at=at(400), **cpu1)
        await change(
            "baseline",
            status=JobStatus.COMPLETED,
            finished_at=at(100.25),
            updated_at=at(100.25),
            metrics={"accuracy": 0.9375, "loss": 0.1823, "headline": "accuracy"},
        )
        await change(
            "deep-trees",
            status=JobStatus.FAILED,
            claimed_by="cpu-box",
            attempt=3,
            started_at=at(310),
            finished_at=at(290),
            updated_at=at(290),
            reason="failed 3 times",
            last_error="Traceback (most recent call last):\nValueError: max_depth must be positive",
        )
        await change("old-run", status=JobStatus.CANCELLED, updated_at=at(500), reason="cancelled by operator")

        running = ids[RUNNING]
        events, logs = broker.names.events_subject(running), broker.names.logs_subject(running)
        started = ProgressEvent(job_id=running, kind="started", at=at(125.5), host="gpu-box", attempt=1, generation=1)
        await broker.js.publish(events, encode(started))
        lines = ("loading data: 4000 rows, 20 features", "fold 1/5", "fold 2/5", "fold 3/5")
        losses = (0.6105, 0.4821, 0.3977, 0.3412)
        for step, (line, loss) in enumerate(zip(lines, losses, strict=True), start=1):
            headers = log_line_headers("stdout", attempt=1, generation=1)
            await broker.js.publish(logs, line.encode() + b"\n", headers=headers)
            event = {"job_id": running, "kind": "progress", "step": step * 10, "total": 100}
            event.update(metrics={"loss": loss}, at=at(125 - step * 30), attempt=1, generation=1)
            await broker.js.publish(events, json.dumps(event).encode())

        await broker.workers.put("gpu-box", encode(gpu_box((running, ids["sweep-lr0.10"]))))
        await broker.workers.put("cpu-box", encode(cpu_box()))
    finally:
        await broker.close()


@pytest.fixture
def utc() -> Iterator[None]:
    """Local time is UTC while the test runs (the detail prints absolute times)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()


@pytest.fixture
def monitor(settings: Settings, nats_server: EmbeddedServer, utc: None) -> Callable[[], MonitorApp]:
    """The fixed fleet in a fresh server; returns a maker of the monitor (operator role) over it.

    The workers bucket's TTL is long: the entries must outlive a slow run, their ``last_seen``
    (what the screens show) is fixed anyway."""
    fleet_settings = settings.with_(worker_ttl_s=600.0)
    asyncio.run(seed(fleet_settings))
    assert fleet_settings.url == f"nats://127.0.0.1:{nats_server.port}"
    return lambda: MonitorApp(as_role(fleet_settings, "operator"), now=lambda: FIXED)


async def until(pilot: Pilot[Any], predicate: Callable[[], Any], what: str, timeout_s: float = 30.0) -> None:
    await pilot_until(pilot, predicate, what, timeout_s)


def stable_subtitle(app: MonitorApp) -> None:
    """The subtitle as the app wrote it, with the server's (free, varying) port replaced."""
    port = urlsplit(app.settings.url).port
    expected = f"{app.settings.prefix} @ nats://127.0.0.1:{port}"
    assert app.sub_title == expected, app.sub_title
    app.sub_title = expected.replace(f":{port}", ":PORT")


async def main_loaded(pilot: Pilot[Any]) -> None:
    """Every row with its name, both workers and the highlighted job's log lines are shown."""
    app = pilot.app
    assert isinstance(app, MonitorApp)
    await until(pilot, lambda: app.loaded and app.jobs_table.row_count == 7, "the 7 rows")
    await until(pilot, lambda: all(r.name != r.job_id[:12] for r in app.model.rows.values()), "the names")
    await until(pilot, lambda: app.query("#workers") and app.workers_panel.worker_count == 2, "both workers")
    await until(pilot, lambda: len(app.log_pane.entries) == LOG_ENTRIES, "the running job's log")
    assert app.model.rows[app.jobs_table.cursor_id or ""].name == RUNNING
    stable_subtitle(app)
    await pilot.pause()


def then(*steps: Callable[[Pilot[Any]], Awaitable[None]]) -> Callable[[Pilot[Any]], Awaitable[None]]:
    async def run(pilot: Pilot[Any]) -> None:
        for step in steps:
            await step(pilot)

    return run


async def open_job_detail(pilot: Pilot[Any]) -> None:
    """Enter on the highlighted (running) job; wait for every section to be filled."""
    app = pilot.app
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, JobDetailScreen), "the job detail")
    screen = app.screen
    assert isinstance(screen, JobDetailScreen)
    await until(pilot, lambda: screen.revision is not None and screen.signer is not None, "the record and signer")
    await until(pilot, lambda: [r.status for r in screen.history] == ["pending", "claimed", "running"], "history")
    await until(pilot, lambda: len(screen.matches) == 2, "the explain verdicts of both workers")
    await until(pilot, lambda: len(getattr(screen.plots.get("loss"), "points", ())) == 4, "the loss curve")
    await pilot.pause()


async def focus_workers(pilot: Pilot[Any]) -> None:
    """``w`` moves to the workers panel; ``down`` puts the cursor on the GPU host."""
    app = pilot.app
    assert isinstance(app, MonitorApp)
    await pilot.press("w")
    await until(pilot, lambda: app.workers_panel.has_focus, "the panel's focus")
    await pilot.press("down")
    await until(pilot, lambda: app.workers_panel.selected_host == "gpu-box", "the cursor on gpu-box")


async def scroll_workers_right(pilot: Pilot[Any]) -> None:
    """``right`` until the panel's last columns (UTIL, JOBS, SEEN) are in view: the panel is at
    most 100 cells wide, narrower than its columns."""
    app = pilot.app
    assert isinstance(app, MonitorApp)
    panel = app.workers_panel
    for _ in range(200):
        if panel.max_scroll_x and panel.scroll_x >= panel.max_scroll_x:
            break
        await pilot.press("right")
        await pilot.wait_for_scheduled_animations()
    assert panel.max_scroll_x and panel.scroll_x == panel.max_scroll_x


async def open_worker_detail(pilot: Pilot[Any]) -> None:
    app = pilot.app
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, WorkerDetailScreen), "the worker detail")
    screen = app.screen
    assert isinstance(screen, WorkerDetailScreen)
    await until(pilot, lambda: screen.worker is not None and "running jobs (2)" in screen.text.plain, "its entry")
    await pilot.pause()


# -- the snapshots ---------------------------------------------------------------------------------
def test_main_screen(snap_compare, monitor):
    # The header counts every state, the table shows running/claimed/pending/completed/failed/
    # cancelled rows, the log pane the running job's output, the workers panel a GPU and a CPU host.
    assert snap_compare(monitor(), terminal_size=SIZE, run_before=main_loaded)


def test_job_detail(snap_compare, monitor):
    # Spec, record, history (heartbeat collapsed), explain for both workers, no artifact, the curve.
    assert snap_compare(monitor(), terminal_size=SIZE, run_before=then(main_loaded, open_job_detail))


def test_workers_panel(snap_compare, monitor):
    # The panel focused, its cursor on the GPU host (two GPUs: two lines), the CPU host says why it
    # has none; scrolled right to the GPU utilisation, job count and last-seen columns.
    run_before = then(main_loaded, focus_workers, scroll_workers_right)
    assert snap_compare(monitor(), terminal_size=SIZE, run_before=run_before)


def test_worker_detail(snap_compare, monitor):
    # w, down, Enter: the GPU host in full, with its telemetry and the two jobs it holds.
    assert snap_compare(monitor(), terminal_size=SIZE, run_before=then(main_loaded, focus_workers, open_worker_detail))
