"""The monitor's workers panel and worker detail (tui/workers.py), driven by Textual's pilot in a
small host app, reading a real nats-server as the viewer role."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from rich.text import Text
from textual.app import App, ComposeResult

from trainfleet.agent.capability import detect
from trainfleet.broker.connection import Broker
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import GpuInfo, GpuStat, JobRecord, JobStatus, WorkerRecord, encode
from trainfleet.broker.settings import Settings
from trainfleet.broker.workers import load_workers
from trainfleet.controller.ops import list_workers
from trainfleet.controller.view import workers_table
from trainfleet.tui.common import FleetView
from trainfleet.tui.workers import WorkerDetailScreen, WorkersPanel

from .conftest import as_role, fake_capability, gbm_jobs, gbm_manifest, put_job, wait_for
from .conftest import pilot_until as until

SIZE = (200, 40)
H200 = 141.0


class Host(App[None]):
    """Just the panel, as the monitor's main screen will hold it."""

    def __init__(self, fleet: FleetView):
        super().__init__()
        self.fleet = fleet

    def compose(self) -> ComposeResult:
        yield WorkersPanel(self.fleet, id="workers")

    @property
    def panel(self) -> WorkersPanel:
        return self.query_one(WorkersPanel)


def cell(panel: WorkersPanel, host: str, column: str) -> str:
    return str(panel.get_cell(host, column))


@pytest.fixture
async def viewer(settings: Settings) -> AsyncIterator[Broker]:
    """The monitor's connection under the least role that may run it."""
    b = await Broker.connect(as_role(settings, "viewer"), name="test-monitor")
    try:
        yield b
    finally:
        await b.close()


def gpu_worker(host: str = "gpu-box", *, util: float = 87.0, free: float = 100.0, **changes: Any) -> WorkerRecord:
    gpus = (
        GpuInfo(index=0, name="NVIDIA H200", uuid="GPU-aaaa", vram_total_gib=H200, vram_free_gib=free),
        GpuInfo(index=1, name="NVIDIA H200", uuid="GPU-bbbb", vram_total_gib=H200, vram_free_gib=H200),
    )
    cap = fake_capability(
        host,
        cores_logical=32,
        cores_usable=24.0,
        gpus=gpus,
        cuda_reason="",
        driver_version="580.159.04",
        cuda_version="13.0",
        torch_version="2.9.0+cu128",
        torch_cuda=True,
        modules=("sklearn", "torch"),
        notes=("override: max_cores=24 caps 32 cores to 24",),
    )
    stats = (
        GpuStat(
            index=0,
            name="NVIDIA H200",
            uuid="GPU-aaaa",
            vram_used_gib=H200 - free,
            vram_free_gib=free,
            vram_total_gib=H200,
            util_pct=util,
            temp_c=71.0,
        ),
        GpuStat(index=1, name="NVIDIA H200", uuid="GPU-bbbb", vram_total_gib=H200, error="GPU is lost"),
    )
    fields: dict[str, Any] = dict(
        host_id=host,
        capability=cap,
        classes=(f"host.{host}", "gpu.141", "cpu"),
        state="idle",
        last_seen=time.time(),
        started_at=time.time() - 600,
        pid=4242,
        gpu_stats=stats,
    )
    fields.update(changes)
    return WorkerRecord(**fields)


def cpu_worker(host: str = "cpu-box", **changes: Any) -> WorkerRecord:
    cap = fake_capability(host, cuda_reason="no CUDA: NVML init failed: Driver Not Loaded")
    fields: dict[str, Any] = dict(host_id=host, capability=cap, classes=("cpu",), last_seen=time.time())
    return WorkerRecord(**{**fields, **changes})


async def put(broker: Broker, worker: WorkerRecord) -> None:
    await broker.workers.put(worker.host_id, encode(worker))


async def test_gpu_worker_shows_its_gpus_with_vram_and_utilisation(broker, viewer):
    await put(broker, gpu_worker())
    app = Host(FleetView(broker=viewer))
    async with app.run_test(size=SIZE) as pilot:
        panel = app.panel
        await until(pilot, lambda: panel.worker_count == 1, "the worker")
        assert panel.selected_host == "gpu-box" and panel.border_title == "workers (1)"
        assert cell(panel, "gpu-box", "gpu") == "NVIDIA H200\nNVIDIA H200"  # one line per GPU
        assert cell(panel, "gpu-box", "vram") == "41.0 / 100.0\nerror: GPU is lost"
        assert cell(panel, "gpu-box", "util") == "87%\n-"
        assert cell(panel, "gpu-box", "cores") == "24/32" and cell(panel, "gpu-box", "ram") == "12.0/16.0"
        assert cell(panel, "gpu-box", "classes") == "host.gpu-box,gpu.141,cpu"
        assert cell(panel, "gpu-box", "jobs") == "0" and cell(panel, "gpu-box", "state") == "idle"
        assert panel.get_row_height("gpu-box") == 2
        assert panel.can_focus


async def test_cpu_only_worker_says_so_and_a_stale_one_is_red(broker, viewer):
    await put(broker, cpu_worker())
    await put(broker, cpu_worker("old-box", last_seen=time.time() - 120))
    app = Host(FleetView(broker=viewer))
    async with app.run_test(size=SIZE) as pilot:
        panel = app.panel
        await until(pilot, lambda: panel.worker_count == 2, "both workers")
        assert cell(panel, "cpu-box", "gpu") == "no GPU"
        assert cell(panel, "cpu-box", "vram") == "NVML init failed: Driver Not Loaded"
        assert cell(panel, "cpu-box", "util") == "-"
        fresh, stale = panel.get_cell("cpu-box", "seen"), panel.get_cell("old-box", "seen")
        assert isinstance(stale, Text) and "red" in str(stale.style) and "stale" in stale.plain
        assert isinstance(fresh, Text) and "red" not in str(fresh.style)


async def test_untrusted_worker_text_is_escaped_never_markup(broker, viewer):
    evil = "NVIDIA [bold red]H200[/]\x1b[2J"
    await put(broker, gpu_worker(gpu_stats=(GpuStat(index=0, name=evil, vram_total_gib=H200, util_pct=1.0),)))
    app = Host(FleetView(broker=viewer))
    async with app.run_test(size=SIZE) as pilot:
        panel = app.panel
        await until(pilot, lambda: panel.worker_count == 1, "the worker")
        assert cell(panel, "gpu-box", "gpu") == "NVIDIA [bold red]H200[/]\\x1b[2J"


async def test_telemetry_changing_in_the_kv_shows_up_after_refresh(broker, viewer):
    await put(broker, gpu_worker(util=87.0, free=100.0))
    app = Host(FleetView(broker=viewer))
    async with app.run_test(size=SIZE) as pilot:
        panel = app.panel
        await until(pilot, lambda: panel.worker_count == 1, "the worker")
        # The periodic refresh picks up a new heartbeat's readings by itself
        await put(broker, gpu_worker(util=12.0, free=30.0))
        await until(pilot, lambda: cell(panel, "gpu-box", "util").startswith("12%"), "the new reading", 10.0)
        assert cell(panel, "gpu-box", "vram").startswith("111.0 / 30.0")
        # A worker joining rebuilds the rows; the cursor stays on the host it was on
        await pilot.press("down")
        await put(broker, cpu_worker("a-box"))
        await put(broker, gpu_worker(util=55.0, state="busy"))
        await panel.refresh_workers()
        assert panel.worker_count == 2 and panel.selected_host == "gpu-box"
        assert cell(panel, "gpu-box", "util").startswith("55%") and cell(panel, "gpu-box", "state") == "busy"
        # And one whose entry is gone is dropped
        await broker.workers.delete("a-box")
        await panel.refresh_workers()
        assert panel.worker_count == 1 and panel.selected_host == "gpu-box"


async def running_on(broker: Broker, job_id: str, host: str, status: JobStatus) -> JobRecord:
    stored = await get_record(broker, job_id)
    rec = stored.record.evolve(status=status, claimed_by=host, attempt=1, progress={"step": 3, "total": 10})
    await broker.jobs.update(job_id, encode(rec), last=stored.revision)
    return rec


async def test_enter_opens_the_worker_detail_with_its_running_jobs(broker, viewer):
    jobs = [await put_job(broker, spec) for spec in gbm_manifest(gbm_jobs(4, prefix="train")).jobs]
    held = [
        await running_on(broker, jobs[0].job_id, "gpu-box", JobStatus.RUNNING),
        await running_on(broker, jobs[1].job_id, "gpu-box", JobStatus.CLAIMED),
        await running_on(broker, jobs[2].job_id, "gpu-box", JobStatus.COMPLETED),  # done: not running
        await running_on(broker, jobs[3].job_id, "cpu-box", JobStatus.RUNNING),  # another host's
    ]
    await put(broker, gpu_worker(state="busy", current_jobs=(jobs[0].job_id, jobs[1].job_id)))
    await put(broker, cpu_worker())
    fleet = FleetView(
        broker=viewer, records={r.job_id: r for r in held}, specs={j.job_id: j.spec for j in jobs}, read_only=True
    )
    app = Host(fleet)
    async with app.run_test(size=SIZE) as pilot:
        panel = app.panel
        await until(pilot, lambda: panel.worker_count == 2, "both workers")
        panel.focus()
        await pilot.press("down")
        assert panel.selected_host == "gpu-box"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, WorkerDetailScreen), "the worker detail")
        screen = app.screen
        assert isinstance(screen, WorkerDetailScreen) and screen.host_id == "gpu-box"
        await until(pilot, lambda: "running jobs (2)" in screen.text.plain, "its jobs")
        text = screen.text.plain
        assert "train-0" in text and "train-1" in text and "train-2" not in text and "train-3" not in text
        assert "24 usable of 32 logical" in text and "12.0 GiB available of 16.0 GiB" in text
        assert "VRAM 41.0 used, 100.0 free of 141.0 GiB" in text and "util 87%" in text and "71°C" in text
        assert "error: GPU is lost" in text
        assert "580.159.04, CUDA 13.0" in text and "2.9.0+cu128 (cuda: yes)" in text
        assert "sklearn, torch" in text and "override: max_cores=24" in text and "container" in text
        # It follows the worker's entry while open
        await put(broker, gpu_worker(util=3.0, state="busy", current_jobs=(jobs[0].job_id, jobs[1].job_id)))
        await until(pilot, lambda: "util 3%" in screen.text.plain, "the detail to refresh", 10.0)
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, WorkerDetailScreen), "the detail to close")
        # q closes it too; the CPU-only host's detail says why it has no GPU
        await pilot.press("up")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, WorkerDetailScreen), "the other detail")
        other = app.screen
        assert isinstance(other, WorkerDetailScreen) and other.host_id == "cpu-box"
        await until(pilot, lambda: "NVML init failed: Driver Not Loaded" in other.text.plain, "its reason")
        assert "running jobs (1)" in other.text.plain and "train-3" in other.text.plain
        await pilot.press("q")
        await until(pilot, lambda: not isinstance(app.screen, WorkerDetailScreen), "the detail to close")


async def test_detail_of_a_worker_that_left(broker, viewer):
    await put(broker, cpu_worker())
    app = Host(FleetView(broker=viewer))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.panel.worker_count == 1, "the worker")
        await broker.workers.delete("cpu-box")
        app.panel.open_detail()
        await until(pilot, lambda: isinstance(app.screen, WorkerDetailScreen), "the detail")
        screen = app.screen
        assert isinstance(screen, WorkerDetailScreen)
        await until(pilot, lambda: "not registered" in screen.text.plain, "it to say the worker left")


async def test_an_agent_on_this_cpu_box_registers_without_gpu_stats_and_says_why(fleet, broker, viewer):
    # Real detection on this machine (no GPU here): the agent's heartbeats carry no readings
    cap = detect("cpu-box", probe_torch=False)
    assert not cap.gpus, "this test expects a host without GPUs"
    fleet.start_agent("cpu-box", capability=cap)

    async def registered() -> WorkerRecord | None:
        return next((w for w in await load_workers(broker) if w.host_id == "cpu-box"), None)

    worker = await wait_for(registered, 30.0, what="the agent's worker entry")
    assert worker.gpu_stats == () and worker.gpu_stats_reason == ""
    assert worker.capability.cuda_reason.startswith("no CUDA: ")
    app = Host(FleetView(broker=viewer))
    async with app.run_test(size=SIZE) as pilot:
        panel = app.panel
        await until(pilot, lambda: panel.worker_count == 1, "the agent's row")
        assert cell(panel, "cpu-box", "gpu") == "no GPU"
        assert cell(panel, "cpu-box", "vram") == worker.capability.cuda_reason.removeprefix("no CUDA: ")


async def test_cli_workers_listing_shows_gpu_use_and_json_has_the_telemetry(broker, viewer, capsys):
    await put(broker, gpu_worker())
    await put(broker, cpu_worker())
    rows = await list_workers(viewer)
    assert [r["host_id"] for r in rows] == ["cpu-box", "gpu-box"]
    assert not rows[0]["gpu_stats"] and rows[1]["gpu_stats"][0]["util_pct"] == 87.0  # what --json prints
    workers_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("GPU USE")
    assert lines[1].startswith("cpu-box") and lines[1].endswith(" -")
    assert lines[2].startswith("gpu-box") and lines[2].endswith("41/141G 87%; gpu1 error")
