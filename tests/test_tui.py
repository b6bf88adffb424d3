"""The Textual monitor, driven headless by Textual's pilot against a real nats-server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from trainfleet.broker.jobs import Job
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import Capability, JobStatus, WorkerRecord, encode
from trainfleet.broker.settings import Settings
from trainfleet.tui.app import ConfirmScreen, MonitorApp

from .conftest import gbm_jobs, gbm_manifest, put_job, records

SIZE = (160, 40)


async def until(pilot: Any, predicate: Callable[[], Any], what: str, timeout_s: float = 20.0) -> None:
    """Let the app run until ``predicate`` holds (the test fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def cell(app: MonitorApp, job_id: str, column: str) -> str:
    return str(app.jobs_table.get_cell(job_id, column))


def log_text(app: MonitorApp) -> str:
    return "\n".join(strip.text for strip in app.log_pane.lines)


async def create(broker, jobs: str) -> list[Job]:
    return [await put_job(broker, spec) for spec in gbm_manifest(jobs).jobs]


async def test_jobs_table_follows_the_jobs_kv_live(broker, settings):
    # Given two pending jobs and a worker
    low, high = await create(
        broker,
        gbm_jobs(1, prefix="low") + "\n" + gbm_jobs(1, prefix="high") + "priority = 5\nhyper = { max_iter = 11 }\n",
    )
    await broker.workers.put(
        "box",
        encode(
            WorkerRecord(host_id="box", capability=Capability(host_id="box"), classes=("cpu",), last_seen=time.time())
        ),
    )
    app = MonitorApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        # Then both appear, highest priority first, and the worker in its panel
        await until(pilot, lambda: app.jobs_table.row_count == 2, "two rows")
        assert [app.jobs_table.get_row_at(i)[1] for i in range(2)] == ["high-0", "low-0"]
        assert cell(app, low.job_id, "state") == "pending"
        await until(pilot, lambda: app.workers_table.row_count == 1, "the worker")
        # When a record changes in the KV, its row follows
        stored = await get_record(broker, low.job_id)
        running = stored.record.evolve(
            status=JobStatus.RUNNING,
            claimed_by="box",
            attempt=1,
            progress={"step": 2, "total": 4, "metrics": {"loss": 0.5}},
        )
        await broker.jobs.update(low.job_id, encode(running), last=stored.revision)
        await until(pilot, lambda: cell(app, low.job_id, "state") == "running", "the row to show running")
        assert cell(app, low.job_id, "host") == "box" and cell(app, low.job_id, "try") == "1"
        assert cell(app, low.job_id, "progress").endswith("2/4") and cell(app, low.job_id, "metric") == "loss=0.5"
        # And a job created later is added
        (late,) = await create(broker, gbm_jobs(1, prefix="late") + "hyper = { max_iter = 12 }\n")
        await until(pilot, lambda: app.jobs_table.row_count == 3, "the new job's row")
        assert "3 jobs" in app.title and "running 1" in app.title
        await pilot.press("q")
    assert app.return_code == 0


async def test_cancel_and_requeue_ask_first_and_go_through_the_control_service(fleet, broker, settings):
    ctl = await fleet.start_controller()
    await ctl.sync(gbm_manifest(gbm_jobs(2)))
    app = MonitorApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.jobs_table.row_count == 2, "two rows")
        job = app.selected()
        assert job is not None
        # Declining the question changes nothing
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("n")
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "the confirmation to close")
        assert (await records(broker))[job.job_id].status == JobStatus.PENDING
        # Confirming cancels the selected job, and its row shows it
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: cell(app, job.job_id, "state") == "cancelled", "the row to show cancelled")
        assert (await records(broker))[job.job_id].status == JobStatus.CANCELLED
        # Requeue brings it back as a new generation
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: cell(app, job.job_id, "state") == "pending", "the row to show pending")
        assert (await records(broker))[job.job_id].generation == 2


async def test_log_pane_follows_the_selected_job_and_toggles(broker, settings):
    (job,) = await create(broker, gbm_jobs(1))
    stored = await get_record(broker, job.job_id)
    await broker.jobs.update(
        job.job_id,
        encode(stored.record.evolve(status=JobStatus.RUNNING, attempt=1, claimed_by="box")),
        last=stored.revision,
    )
    subject = broker.names.logs_subject(job.job_id)
    await broker.js.publish(
        subject, b"epoch 1 done\n", headers={"Trainfleet-Stream": "stdout", "Trainfleet-Attempt": "1"}
    )
    app = MonitorApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "epoch 1 done" in log_text(app), "the job's output")
        assert job.spec.name in str(app.log_pane.border_title)
        # lines written while the monitor runs appear too
        await broker.js.publish(
            subject, b"epoch 2 done\n", headers={"Trainfleet-Stream": "stdout", "Trainfleet-Attempt": "1"}
        )
        await until(pilot, lambda: "epoch 2 done" in log_text(app), "a live line")
        await pilot.press("l")
        assert app.log_pane.has_class("hidden")
        await pilot.press("l")
        assert not app.log_pane.has_class("hidden")
        await until(pilot, lambda: "epoch 2 done" in log_text(app), "the output again after showing the pane")


async def test_monitor_exits_3_when_nats_is_unreachable():
    app = MonitorApp(Settings(url="nats://127.0.0.1:1"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.error is not None, "the connection error")
    assert app.return_code == 3 and "cannot connect" in str(app.error)
