"""The monitor's job detail screen, driven headless by Textual's pilot against a real nats-server.

A small host app pushes the screen over a FleetView built from a test connection (in the
monitor, the main screen pushes it on Enter)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import App
from textual.widgets import Input, Static

from trainfleet.broker.artifacts import Artifacts
from trainfleet.broker.bundle import build_bundle
from trainfleet.broker.connection import Broker
from trainfleet.broker.explain import explain_ref
from trainfleet.broker.logs import LogEntry, read_logs
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import JobStatus, WorkerRecord, encode
from trainfleet.broker.settings import Settings
from trainfleet.broker.workers import stale_after_s
from trainfleet.controller.view import render_explain
from trainfleet.tui.common import ConfirmScreen, FleetView, is_viewer
from trainfleet.tui.detail import DownloadScreen, JobDetailScreen, metric_series

from .conftest import as_role, fake_capability, gbm_jobs, gbm_manifest, linreg_manifest, put_job, records
from .conftest import pilot_until as until

SIZE = (140, 60)


class Host(App[None]):
    """Stands in for the monitor's main screen: pushes the detail screen of one job."""

    def __init__(self, fleet: FleetView, job_id: str):
        super().__init__()
        self.fleet = fleet
        self.job_id = job_id

    def on_mount(self) -> None:
        self.push_screen(JobDetailScreen(self.fleet, self.job_id))


@contextlib.asynccontextmanager
async def fleet_view(settings: Settings, role: str) -> AsyncIterator[FleetView]:
    """A FleetView over a connection of ``role``, read-only exactly when the monitor makes it so."""
    role_settings = as_role(settings, role)
    broker = await Broker.connect(role_settings, name=f"test-monitor-{role}")
    try:
        yield FleetView(broker, read_only=is_viewer(role_settings))
    finally:
        await broker.close()


async def opened(pilot: Any, app: Host) -> JobDetailScreen:
    await until(pilot, lambda: isinstance(app.screen, JobDetailScreen), "the detail screen")
    screen = app.screen
    assert isinstance(screen, JobDetailScreen)
    await until(pilot, lambda: screen.record is not None and screen.spec is not None, "the record and spec")
    return screen


def shown(screen: JobDetailScreen, wid: str) -> str:
    """The plain text a section shows; every section is rich Text, never a markup string."""
    content = screen.query_one(f"#{wid}", Static).content
    assert isinstance(content, Text), f"#{wid} shows {type(content).__name__}, not Text"
    return content.plain


async def progress_entries(broker: Broker, job_id: str) -> list[LogEntry]:
    async with contextlib.aclosing(read_logs(broker, job_id, events=True)) as entries:
        return [e async for e in entries]


async def stored_bundle(broker: Broker, tmp_path: Path) -> tuple[str, int]:
    """A bundle with one file and a provenance naming host boxA, uploaded: (artifact id, size)."""
    out = tmp_path / "output"
    out.mkdir()
    (out / "model.txt").write_text("weights\n")
    provenance = {"host": {"host_id": "boxA", "platform": "Linux"}, "attempt": 1, "generation": 1, "argv": ["train"]}
    bundle = build_bundle(out, provenance, tmp_path / "b.tar.zst")
    await Artifacts(broker).put(bundle)
    return bundle.sha256, bundle.size


# -- pure ------------------------------------------------------------------------------------------
def entry(seq: int, event: dict[str, Any], *, kind: str = "progress", attempt: int = 1, gen: int = 1) -> LogEntry:
    return LogEntry(seq=seq, at=0.0, kind=kind, attempt=attempt, generation=gen, event=event)


def test_metric_series_keeps_numeric_metrics_of_the_run_by_step():
    entries = [
        entry(1, {"step": 1, "metrics": {"loss": 0.9, "acc": 0.5, "note": "warmup"}}),
        entry(2, {"step": 2, "metrics": {"loss": 0.5, "acc": float("nan"), "flag": True}}),
        entry(3, {"kind": "started"}, kind="started"),
        entry(4, {"metrics": {"loss": 0.25}}),  # no step: placed after the previous report
        entry(5, {"step": 1, "metrics": {"loss": 7.0}}, attempt=2),  # another attempt
        entry(6, {"step": 1, "metrics": {"loss": 8.0}}, gen=2),  # another generation
        entry(7, {"step": 5, "metrics": "garbage"}),
    ]
    assert metric_series(entries, (1, 1)) == {"loss": [(1.0, 0.9), (2.0, 0.5), (3.0, 0.25)], "acc": [(1.0, 0.5)]}
    assert metric_series(entries, (1, 2)) == {"loss": [(1.0, 7.0)]}
    assert metric_series([]) == {}


# -- with a real fleet -------------------------------------------------------------------------------
async def test_a_job_the_fleet_runs_shows_state_history_explain_artifact_and_live_curves(fleet, broker, settings):
    # Given a synced job, its detail screen opened while it is still pending
    manifest = linreg_manifest(1, epochs=4000)
    (job_id,) = [spec.job_id for spec in manifest.jobs]
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    async with fleet_view(settings, "operator") as view:
        app = Host(view, job_id)
        async with app.run_test(size=SIZE) as pilot:
            screen = await opened(pilot, app)
            assert screen.record is not None and screen.record.status == JobStatus.PENDING
            await until(pilot, lambda: "no metrics reported yet" in shown(screen, "no-metrics"), "the empty note")
            assert screen.plots == {}
            # When an agent runs it (the trainer reports loss every epoch)
            fleet.start_agent("laptop")
            await until(
                pilot,
                lambda: screen.record is not None and screen.record.status == JobStatus.COMPLETED,
                "completed",
                timeout_s=60,
            )
            await until(
                pilot,
                lambda: "loss" in screen.plots and screen.plots["loss"].points[-1][0] == 4000,
                "the loss curve to reach the last epoch",
            )
            # Then the record, its history, the explain row, the artifact and its provenance show
            rec = (await records(broker))[job_id]
            assert rec.artifact and "completed on laptop" in shown(screen, "record")
            statuses = [r.status for r in screen.history]
            assert statuses[0] == "pending" and statuses[-1] == "completed" and "running" in statuses
            assert statuses.index("running") < statuses.index("completed")
            assert "completed" in shown(screen, "history") and "laptop" in shown(screen, "history")
            assert "laptop" in shown(screen, "explain") and screen.explain_data is not None
            assert [w["host_id"] for w in screen.explain_data["workers"]] == ["laptop"]
            await until(pilot, lambda: "host        laptop" in shown(screen, "provenance"), "the provenance")
            assert rec.artifact in shown(screen, "provenance")
            # And the curve the screen followed live is the loss series the events stream holds
            expected = metric_series(await progress_entries(broker, job_id), (rec.generation, rec.attempt))
            assert len(expected["loss"]) >= 2
            assert screen.plots["loss"].points == expected["loss"]
            assert screen.series == expected and not screen.query_one("#no-metrics").display
            # Reopened after the fact, the curves load from the logs stream alone
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, JobDetailScreen), "the screen to close")
            app.push_screen(JobDetailScreen(view, job_id))
            again = await opened(pilot, app)
            await until(pilot, lambda: again.plots.get("loss") is not None, "the reloaded curve")
            await until(pilot, lambda: again.plots["loss"].points == expected["loss"], "the same series")


async def test_explain_section_is_what_trainfleet_explain_gives(fleet, broker, settings):
    # Given a job needing 8 GiB and two registered workers, one too small
    from .test_cli import arun_cli

    ctl = await fleet.start_controller()
    manifest = gbm_manifest(gbm_jobs(1, min_ram_gib=8))
    await ctl.sync(manifest)
    job_id = manifest.jobs[0].job_id
    now = time.time()
    for host, ram in (("big", 64.0), ("small", 2.0)):
        cap = fake_capability(host, ram_total_gib=ram, ram_available_gib=ram, modules=("sklearn",))
        await broker.workers.put(
            host, encode(WorkerRecord(host_id=host, capability=cap, classes=("cpu",), last_seen=now))
        )
    async with fleet_view(settings, "viewer") as view:
        app = Host(view, job_id)
        async with app.run_test(size=SIZE) as pilot:
            screen = await opened(pilot, app)
            await until(pilot, lambda: screen.explain_data and len(screen.explain_data["workers"]) == 2, "2 rows")
            # Then the verdicts are the control service's (`trainfleet explain --json`)...
            reply = await view.control("explain", job_id)
            assert screen.explain_data == reply
            eligible = {w["host_id"]: w["eligible"] for w in reply["workers"]}
            assert eligible == {"big": True, "small": False}
            # ...and the lines are the CLI's, as it prints them
            job, matches = await explain_ref(broker, job_id, stale_after_s=stale_after_s(settings))
            assert shown(screen, "explain") == render_explain(job, matches)
            assert "min_ram_gib 8" in shown(screen, "explain")
            code, out, _ = await arun_cli("explain", job_id, url=settings.url)
            assert code == 0 and out.rstrip("\n") == shown(screen, "explain")


async def test_cancel_and_requeue_ask_first_and_go_through_the_control_service(fleet, broker, settings):
    ctl = await fleet.start_controller()
    manifest = gbm_manifest(gbm_jobs(1))
    await ctl.sync(manifest)
    job_id = manifest.jobs[0].job_id
    async with fleet_view(settings, "operator") as view:
        app = Host(view, job_id)
        async with app.run_test(size=SIZE) as pilot:
            screen = await opened(pilot, app)
            assert "c" in screen.active_bindings and screen.active_bindings["c"].enabled
            # Declining changes nothing
            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
            await pilot.press("n")
            await until(pilot, lambda: app.screen is screen, "the question to close")
            await pilot.pause(0.3)
            assert (await records(broker))[job_id].status == JobStatus.PENDING
            # Confirming cancels it through the controller, and the screen follows the record
            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
            await pilot.press("y")
            await until(pilot, lambda: screen.record.status == JobStatus.CANCELLED, "the screen to show cancelled")
            assert (await records(broker))[job_id].status == JobStatus.CANCELLED
            assert [r.status for r in screen.history][-2:] == ["pending", "cancelled"]
            # Requeue: also asked, and a new generation
            await pilot.press("r")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
            await pilot.press("y")
            await until(pilot, lambda: screen.record.generation == 2, "generation 2")
            rec = (await records(broker))[job_id]
            assert rec.status == JobStatus.PENDING and rec.generation == 2


async def test_download_asks_for_a_directory_and_extracts_into_it(broker, settings, tmp_path, monkeypatch):
    (spec,) = gbm_manifest(gbm_jobs(1)).jobs
    artifact, size = await stored_bundle(broker, tmp_path)
    await put_job(
        broker, spec, status=JobStatus.COMPLETED, attempt=1, claimed_by="boxA", artifact=artifact, artifact_bytes=size
    )
    monkeypatch.chdir(tmp_path)
    async with fleet_view(settings, "operator") as view:
        app = Host(view, spec.job_id)
        async with app.run_test(size=SIZE) as pilot:
            screen = await opened(pilot, app)
            await until(pilot, lambda: "host        boxA" in shown(screen, "provenance"), "the provenance")
            # Escape at the question downloads nothing
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, DownloadScreen), "the question")
            field = app.screen.query_one("#dir", Input)
            assert field.value == "./artifacts"
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is screen, "the question to close")
            await pilot.pause(0.3)
            assert not (tmp_path / "artifacts").exists()
            # A directory given: the bundle lands there, extracted into DIR/<job id>
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, DownloadScreen), "the question")
            app.screen.query_one("#dir", Input).value = str(tmp_path / "dl")
            await pilot.press("enter")
            extracted = tmp_path / "dl" / spec.job_id / "output" / "model.txt"
            await until(pilot, extracted.exists, "the extracted artifact")
            assert extracted.read_text() == "weights\n"
            assert (tmp_path / "dl" / f"{artifact}.tar.zst").stat().st_size == size


async def test_a_viewer_is_not_offered_the_actions(broker, settings, tmp_path):
    # Given a running job whose record carries a hostile reason, and an artifact
    (spec,) = gbm_manifest(gbm_jobs(1)).jobs
    artifact, size = await stored_bundle(broker, tmp_path)
    reason = "[bold red]pwned[/] \x1b[2J"
    await put_job(
        broker,
        spec,
        status=JobStatus.RUNNING,
        attempt=1,
        claimed_by="boxA",
        artifact=artifact,
        artifact_bytes=size,
        reason=reason,
    )
    actions = ("cancel_job", "requeue_job", "download")
    # An operator is offered cancel and download here (the contrast that makes the viewer's check mean something)
    async with fleet_view(settings, "operator") as view:
        app = Host(view, spec.job_id)
        async with app.run_test(size=SIZE) as pilot:
            screen = await opened(pilot, app)
            assert screen.active_bindings["c"].enabled and screen.active_bindings["d"].enabled
    async with fleet_view(settings, "viewer") as view:
        assert view.read_only
        app = Host(view, spec.job_id)
        async with app.run_test(size=SIZE) as pilot:
            screen = await opened(pilot, app)
            # Then no action is offered: not in the bindings the footer shows, refused by check_action
            assert [screen.check_action(a, ()) for a in actions] == [False, False, False]
            assert not {"c", "r", "d"} & set(screen.active_bindings)
            assert "escape" in screen.active_bindings
            # And pressing their keys asks nothing and changes nothing
            for key in ("c", "r", "d"):
                await pilot.press(key)
                await pilot.pause(0.2)
                assert app.screen is screen
            assert (await get_record(broker, spec.job_id)).record.status == JobStatus.RUNNING
            # While everything is still readable, and untrusted text is shown escaped, not as markup
            await until(pilot, lambda: "host        boxA" in shown(screen, "provenance"), "the provenance")
            assert "[bold red]pwned[/] \\x1b[2J" in shown(screen, "record")
            assert "rev " in shown(screen, "history")
