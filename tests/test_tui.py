"""The Textual monitor's main screen, driven headless by Textual's pilot against a real nats-server.

Model tests (filter, sort, counts, throughput) run without a server; every key of the main
screen is pressed at least once below (test_every_key_is_pressed_somewhere checks it).
"""

from __future__ import annotations

import random
import time
from typing import Any

from textual import events
from textual.command import CommandList, CommandPalette

from trainfleet.broker.jobs import Job
from trainfleet.broker.logs import read_logs
from trainfleet.broker.records import get_record
from trainfleet.broker.schema import Capability, JobRecord, JobStatus, WorkerRecord, encode
from trainfleet.broker.settings import Settings
from trainfleet.tui.app import KEYS, HelpScreen, MonitorApp
from trainfleet.tui.common import ConfirmScreen
from trainfleet.tui.detail import JobDetailScreen
from trainfleet.tui.logpane import entry_text
from trainfleet.tui.model import SORTS, JobsModel, Query, make_row, sparkline
from trainfleet.tui.table import JobsTable, layout
from trainfleet.tui.workers import WorkerDetailScreen

from .conftest import as_role, gbm_jobs, gbm_manifest, put_job, records
from .conftest import pilot_until as until

SIZE = (160, 40)
PRESSED: set[str] = set()  # every key a test below presses (checked against the bindings)


async def press(pilot: Any, *keys: str) -> None:
    PRESSED.update(keys)
    await pilot.press(*keys)


def shown(app: MonitorApp) -> list[str]:
    """Job names in the table, in the shown order."""
    return [app.model.rows[j].name for j in app.model.ids()]


def screen_lines(app: MonitorApp) -> list[str]:
    """The jobs table as drawn: its visible lines' text."""
    table = app.jobs_table
    return [table.render_line(y).text for y in range(table.size.height)]


def log_text(app: MonitorApp) -> str:
    return "\n".join(strip.text for strip in app.log_pane.lines)


async def create(broker, jobs: str, **changes: Any) -> list[Job]:
    return [await put_job(broker, spec, **changes) for spec in gbm_manifest(jobs).jobs]


async def set_state(broker, job_id: str, **changes: Any) -> None:
    stored = await get_record(broker, job_id)
    await broker.jobs.update(job_id, encode(stored.record.evolve(**changes)), last=stored.revision)


# -- the model, without a server --------------------------------------------------------
def rec(job_id: str, state: str = "pending", **kw: Any) -> JobRecord:
    return JobRecord(job_id=job_id, status=JobStatus(state), **kw)


def test_the_filter_matches_fields_and_words():
    row = make_row(rec("ab12", "running", claimed_by="gpu-1", priority=3), None)
    assert Query.parse("state:run").matches(row) and not Query.parse("state:pending").matches(row)
    assert Query.parse("host:gpu").matches(row) and not Query.parse("host:cpu").matches(row)
    assert Query.parse("AB1 state:running").matches(row) and not Query.parse("ab1 zz").matches(row)
    assert Query.parse("model:mlp").fields == (("model", "mlp"),) and not Query.parse("model:mlp").matches(row)
    assert Query.parse("foo:bar").words == ("foo:bar",)  # an unknown field is a word
    assert not Query.parse("   ")


def test_incremental_order_equals_a_full_sort_under_random_changes():
    rng = random.Random(7)
    clock = [1000.0]
    model = JobsModel(now=lambda: clock[0])
    ids = [f"{i:04x}" + "0" * 60 for i in range(300)]
    for sort in SORTS:
        for query in ("", "state:running", "1"):
            model.set_query(query)
            model.set_sort(sort, reverse=rng.random() < 0.5)
            for _ in range(400):
                job_id = rng.choice(ids)
                if rng.random() < 0.1:
                    model.drop(job_id)
                    continue
                state = rng.choice(list(JobStatus)).value
                metrics = {"loss": rng.random()} if rng.random() < 0.5 else {}
                model.upsert(
                    rec(
                        job_id,
                        state,
                        priority=rng.randint(0, 3),
                        started_at=900.0 if state != "pending" else None,
                        claimed_by=rng.choice(["a", "b", None]),
                        metrics=metrics if state == "completed" else {},
                        progress={"metrics": metrics} if state == "running" else {},
                    ),
                    None,
                )
            incremental = model.ids()
            model.rebuild()
            assert incremental == model.ids(), (sort, query)
            assert all(model.index_of(j) == i for i, j in enumerate(incremental))
            assert sum(model.counts.values()) == len(model.rows)


def test_throughput_and_eta_come_from_completion_times():
    clock = [10_000.0]
    model = JobsModel(now=lambda: clock[0])
    model.bulk_load(
        [(rec(f"{i:064x}", "completed", finished_at=clock[0] - 120 + i * 10), None) for i in range(10)]
        + [(rec(f"{i + 100:064x}"), None) for i in range(20)]
    )
    # 10 completed in the last 2 minutes (the window counts from at least one minute)
    assert 4.0 < model.per_minute() < 6.0
    assert model.eta_s() == 20 / model.per_minute() * 60
    clock[0] += 1000  # all of them fall out of the window: no rate, no ETA
    assert model.per_minute() == 0.0 and model.eta_s() is None
    assert sparkline([1, 2, 3, 4]) == "▁▃▆█" and sparkline([2, 2]) == "▁▁" and sparkline([]) == ""


def test_columns_give_way_to_the_job_name_on_narrow_screens():
    assert [c.key for c, _ in layout(160)][-1] == "trend"
    narrow = layout(60)
    keys = [c.key for c, _ in narrow]
    assert {"name", "state", "metric"} <= set(keys) and "trend" not in keys
    assert dict((c.key, w) for c, w in narrow)["name"] >= 12
    assert sum(w for _, w in narrow) + len(narrow) - 1 <= 60


# -- the app, against a real server -----------------------------------------------------------
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
        # Then both appear, highest priority first, and are drawn
        await until(pilot, lambda: app.jobs_table.row_count == 2, "two rows")
        assert shown(app) == ["high-0", "low-0"]
        await until(pilot, lambda: any("low-0" in line for line in screen_lines(app)), "the rows drawn")
        lines = screen_lines(app)
        assert lines[0].split()[:3] == ["ID", "JOB", "STATE"]
        assert "high-0" in lines[1] and "pending" in lines[2]
        # When a record changes in the KV, its row follows
        await set_state(
            broker,
            low.job_id,
            status=JobStatus.RUNNING,
            claimed_by="box",
            attempt=1,
            started_at=time.time(),
            progress={"step": 2, "total": 4, "metrics": {"loss": 0.5}},
        )
        await until(pilot, lambda: app.model.rows[low.job_id].state == "running", "the row to show running")
        row = app.model.rows[low.job_id]
        assert row.host == "box" and row.attempt == 1 and row.progress.endswith("2/4") and row.metric == "loss=0.5"
        await until(pilot, lambda: any("box" in line and "loss=0.5" in line for line in screen_lines(app)), "redrawn")
        # And a job created later is added, and the header counts it
        (late,) = await create(broker, gbm_jobs(1, prefix="late") + "hyper = { max_iter = 12 }\n")
        await until(pilot, lambda: app.jobs_table.row_count == 3, "the new job's row")
        await until(pilot, lambda: app.model.rows[late.job_id].name == "late-0", "its name from its spec")
        summary = str(app.query_one("#summary").render())
        assert "3 jobs" in summary and "running 1" in summary and "pending 2" in summary
        await press(pilot, "q")
    assert app.return_code == 0


async def test_filter_sort_jump_and_the_header(broker, settings):
    now = time.time()
    jobs = await create(broker, gbm_jobs(8, prefix="mlp"))
    done = jobs[6:]
    for i, job in enumerate(jobs[:2]):
        await set_state(broker, job.job_id, status=JobStatus.RUNNING, claimed_by=f"gpu-{i}", started_at=now - 10 * i)
    for i, job in enumerate(done):
        await set_state(
            broker,
            job.job_id,
            status=JobStatus.COMPLETED,
            claimed_by="cpu-1",
            started_at=now - 100,
            finished_at=now - 30 + i,
            metrics={"accuracy": 0.5 + i / 10},
        )
    app = MonitorApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.jobs_table.row_count == 8 and app.loaded, "eight rows")
        summary = str(app.query_one("#summary").render())
        assert "8 jobs" in summary and "running 2" in summary and "completed 2" in summary
        assert "done/min" in summary and "ETA" in summary
        # / filters by field and by word, live as it is typed; Enter keeps it
        await press(pilot, "slash")
        assert app.prompt.has_focus
        await press(pilot, *"state:running")
        await until(pilot, lambda: app.jobs_table.row_count == 2, "the running ones")
        await press(pilot, "enter")
        assert app.jobs_table.has_focus and sorted(shown(app)) == ["mlp-0", "mlp-1"]
        assert "filter: state:running" in str(app.query_one("#summary").render())
        # Esc clears it
        await press(pilot, "escape")
        await until(pilot, lambda: app.jobs_table.row_count == 8, "everything again")
        await press(pilot, "slash", *"host:gpu-1", "enter")
        await until(pilot, lambda: shown(app) == ["mlp-1"], "the job on gpu-1")
        await press(pilot, "escape", "slash", *"mlp-6", "enter")
        await until(pilot, lambda: shown(app) == ["mlp-6"], "the job named mlp-6")
        await press(pilot, "escape")
        # s cycles the sort: state puts the running first; S reverses
        await until(pilot, lambda: app.jobs_table.row_count == 8, "everything again")
        assert app.model.sort == "priority"
        await press(pilot, "s")
        assert app.model.sort == "state" and shown(app)[:2] == ["mlp-0", "mlp-1"]
        await press(pilot, "S")
        assert app.model.reverse and shown(app)[-2:] == ["mlp-1", "mlp-0"]
        await press(pilot, "S", "s")
        assert app.model.sort == "duration" and shown(app)[:4] == ["mlp-7", "mlp-6", "mlp-1", "mlp-0"]  # 71s 70s 10s 0s
        await press(pilot, "s")
        assert app.model.sort == "metric" and shown(app)[:2] == ["mlp-6", "mlp-7"]  # accuracy 0.5, 0.6
        await press(pilot, "s")
        assert app.model.sort == "name" and shown(app) == sorted(shown(app))
        # : jumps by name and by id prefix, and the highlight stays on its job through a re-sort
        await press(pilot, "colon", *"mlp-4", "enter")
        await until(pilot, lambda: app.jobs_table.cursor_id == jobs[4].job_id, "the jump to mlp-4")
        await press(pilot, "s")
        assert app.jobs_table.cursor_id == jobs[4].job_id
        await press(pilot, "colon", *jobs[2].job_id[:10], "enter")
        await until(pilot, lambda: app.jobs_table.cursor_id == jobs[2].job_id, "the jump by id prefix")
        # moving: down, up, page, first, last
        await press(pilot, "home")
        first = app.jobs_table.cursor_id
        await press(pilot, "down", "j")
        assert app.jobs_table.cursor == 2
        await press(pilot, "up", "k")
        assert app.jobs_table.cursor_id == first
        await press(pilot, "end")
        assert app.jobs_table.cursor == 7
        await press(pilot, "g")
        assert app.jobs_table.cursor == 0
        await press(pilot, "G", "pageup")
        assert app.jobs_table.cursor == 0
        await press(pilot, "pagedown")
        assert app.jobs_table.cursor == 7
        # a jump to no such job says so and moves nothing
        await press(pilot, "colon", *"nosuchjob", "enter")
        assert app.jobs_table.cursor == 7


async def test_keys_typed_in_one_burst_after_slash_and_colon_reach_the_prompt(broker, settings):
    """A paste or a fast typist delivers `/tmux-1⏎` at once: the keys after `/` are queued for the
    table before the prompt has the focus (a real terminal showed it; test_tui_tmux sends such a burst)."""
    jobs = await create(broker, gbm_jobs(3, prefix="burst"))
    app = MonitorApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.jobs_table.row_count == 3, "the jobs")
        for text in ("/burst-1\r", ":" + jobs[2].job_id[:8] + "\r"):
            for ch in text:
                key = {"/": "slash", ":": "colon", "\r": "enter", "-": "minus"}.get(ch, ch)
                app.post_message(events.Key(key, ch))
            await pilot.pause(0.5)
        assert shown(app) == ["burst-0", "burst-1", "burst-2"]  # the jump to burst-2 cleared the filter
        assert app.jobs_table.cursor_id == jobs[2].job_id and not app.prompt.display
        for ch in "/burst-1\r":
            app.post_message(events.Key({"/": "slash", "\r": "enter", "-": "minus"}.get(ch, ch), ch))
        await until(pilot, lambda: shown(app) == ["burst-1"], "the filter typed in one burst")
        assert app.model.query.text == "burst-1" and app.jobs_table.has_focus


async def test_the_command_palette_finds_jobs(broker, settings):
    jobs = await create(broker, gbm_jobs(4, prefix="pal"))
    app = MonitorApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.jobs_table.row_count == 4, "the jobs")
        assert app.jobs_table.cursor_id != jobs[2].job_id
        await press(pilot, "ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette")
        await pilot.press(*"pal-2")
        options = app.screen.query_one(CommandList)
        await until(pilot, lambda: options.option_count > 0, "a hit")
        assert "pal-2" in str(options.get_option_at_index(0).prompt)
        await pilot.press("down", "enter")
        await until(pilot, lambda: app.jobs_table.cursor_id == jobs[2].job_id, "the jump to pal-2")


async def test_help_lists_every_key(broker, settings):
    app = MonitorApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await press(pilot, "question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help")
        text = str(app.screen.query_one("#help-text").render())
        for key, meaning in KEYS:
            assert key in text and meaning[:30] in text
        await press(pilot, "escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen), "the help to close")


async def test_cancel_and_requeue_ask_first_and_go_through_the_control_service(fleet, broker, settings):
    ctl = await fleet.start_controller()
    await ctl.sync(gbm_manifest(gbm_jobs(2)))
    app = MonitorApp(as_role(settings, "operator"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.jobs_table.row_count == 2, "two rows")
        job = app.selected()
        assert job is not None and not app.read_only
        # Declining the question changes nothing
        await press(pilot, "c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await press(pilot, "n")
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "the confirmation to close")
        assert (await records(broker))[job.job_id].status == JobStatus.PENDING
        # Confirming cancels the selected job, and its row shows it
        await press(pilot, "c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await press(pilot, "y")
        await until(pilot, lambda: app.model.rows[job.job_id].state == "cancelled", "the row to show cancelled")
        assert (await records(broker))[job.job_id].status == JobStatus.CANCELLED
        # Requeue brings it back as a new generation
        await press(pilot, "r")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await press(pilot, "y")
        await until(pilot, lambda: app.model.rows[job.job_id].state == "pending", "the row to show pending")
        assert (await records(broker))[job.job_id].generation == 2


async def test_the_viewer_role_gets_no_actions(broker, settings):
    (job,) = await create(broker, gbm_jobs(1))
    app = MonitorApp(as_role(settings, "viewer"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.jobs_table.row_count == 1, "the job")
        assert app.read_only and "read-only" in app.sub_title
        # hidden from the footer and the bindings, and pressing them does nothing
        footer_keys = {b.action for _, b, enabled, _ in app.active_bindings.values() if enabled}
        assert "cancel_job" not in footer_keys and "requeue_job" not in footer_keys and "toggle_logs" in footer_keys
        await press(pilot, "c", "r")
        await pilot.pause(0.3)
        assert not isinstance(app.screen, ConfirmScreen)
        assert (await records(broker))[job.job_id].status == JobStatus.PENDING
    operator = MonitorApp(as_role(settings, "operator"))
    async with operator.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: operator.jobs_table.row_count == 1, "the job")
        enabled = {b.action for _, b, on, _ in operator.active_bindings.values() if on}
        assert {"cancel_job", "requeue_job"} <= enabled


async def test_log_pane_follows_the_selected_job_and_toggles(broker, settings):
    (job,) = await create(broker, gbm_jobs(1))
    await set_state(broker, job.job_id, status=JobStatus.RUNNING, attempt=1, claimed_by="box")
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
        await press(pilot, "l")
        assert app.log_pane.has_class("hidden")
        await press(pilot, "l")
        assert not app.log_pane.has_class("hidden")
        await until(pilot, lambda: "epoch 2 done" in log_text(app), "the output again after showing the pane")
        assert not app.log_pane.finished
        # the job ends: the pane says so only after the last line
        await broker.js.publish(
            subject, b"epoch 3 done\n", headers={"Trainfleet-Stream": "stdout", "Trainfleet-Attempt": "1"}
        )
        await set_state(broker, job.job_id, status=JobStatus.COMPLETED, finished_at=time.time())
        await until(pilot, lambda: app.log_pane.finished, "the end of its output", timeout_s=30)
        assert log_text(app).index("epoch 3 done") < log_text(app).index("end of its output")


async def test_the_log_pane_never_shows_a_cut_log_as_finished_whatever_the_key_speed(broker, settings):
    # Given finished jobs with long logs (several read batches each)
    jobs = await create(broker, gbm_jobs(5, prefix="long"))
    expected: dict[str, list[str]] = {}
    for n, job in enumerate(jobs):
        await set_state(broker, job.job_id, status=JobStatus.COMPLETED, attempt=1, finished_at=time.time())
        subject = broker.names.logs_subject(job.job_id)
        lines = [f"{job.spec.name} line {i}" for i in range(700 + 150 * n)]
        acks = [
            broker.js.publish(
                subject, (line + "\n").encode(), headers={"Trainfleet-Stream": "stdout", "Trainfleet-Attempt": "1"}
            )
            for line in lines
        ]
        for ack in acks:
            await ack
        expected[job.job_id] = [entry_text(entry).plain async for entry in read_logs(broker, job.job_id, events=True)]
        assert len(expected[job.job_id]) == len(lines)
    app = MonitorApp(settings)
    rng = random.Random(3)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.jobs_table.row_count == 5, "the jobs")
        for _ in range(8):
            # When keys arrive at full speed, across jobs
            await pilot.press(*[rng.choice(["down", "up", "down"]) for _ in range(rng.randint(1, 9))])
            pane = app.log_pane
            # Then whatever the pane ends up showing as finished is the whole log of the highlighted job
            await until(
                pilot,
                lambda: app.log_pane.finished and log_text(app).rstrip().endswith("end of its output ---"),
                "the pane to reach the end",
                timeout_s=60,
            )
            assert pane.job_id == app.jobs_table.cursor_id
            shown_lines = log_text(app).splitlines()
            assert shown_lines[:-1] == expected[pane.job_id], app.model.rows[pane.job_id].name
            assert "end of its output" in shown_lines[-1]


async def test_a_read_that_comes_back_empty_mid_log_does_not_end_it(broker, monkeypatch):
    """Under load a pull can expire before the server delivers (what cut the pane's log after two
    lines and called it finished): the reader asks again until the stream has nothing left."""
    import nats.js.client

    (job,) = await create(broker, gbm_jobs(1))
    await set_state(broker, job.job_id, status=JobStatus.COMPLETED, attempt=1, finished_at=time.time())
    subject = broker.names.logs_subject(job.job_id)
    for i in range(600):
        await broker.js.publish(subject, f"line {i}\n".encode(), headers={"Trainfleet-Stream": "stdout"})
    real_fetch = nats.js.client.JetStreamContext.PullSubscription.fetch
    calls = [0]

    async def flaky_fetch(self, batch: int = 1, timeout: float | None = 5, heartbeat: float | None = None):
        calls[0] += 1
        if calls[0] in (2, 3):  # the second and third reads expire empty, with lines still to read
            raise nats.errors.TimeoutError
        return await real_fetch(self, batch, timeout, heartbeat)

    monkeypatch.setattr(nats.js.client.JetStreamContext.PullSubscription, "fetch", flaky_fetch)
    for follow in (False, True):
        calls[0] = 0
        lines = [e.line async for e in read_logs(broker, job.job_id, follow=follow, poll_s=0.2)]
        assert lines == [f"line {i}" for i in range(600)], follow
        assert calls[0] > 3


async def test_monitor_exits_3_when_nats_is_unreachable():
    app = MonitorApp(Settings(url="nats://127.0.0.1:1"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.error is not None, "the connection error")
    assert app.return_code == 3 and "cannot connect" in str(app.error)


async def test_enter_opens_the_job_detail_and_w_the_workers_panel(broker, settings):
    (job,) = await create(broker, gbm_jobs(1))
    await broker.workers.put(
        "box",
        encode(
            WorkerRecord(host_id="box", capability=Capability(host_id="box"), classes=("cpu",), last_seen=time.time())
        ),
    )
    app = MonitorApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.jobs_table.row_count == 1, "the job")
        await press(pilot, "enter")
        await until(pilot, lambda: isinstance(app.screen, JobDetailScreen), "the job detail")
        assert app.screen.job_id == job.job_id
        await press(pilot, "escape")
        await until(pilot, lambda: not isinstance(app.screen, JobDetailScreen), "back to the list")
        assert app.jobs_table.has_focus
        await until(pilot, lambda: app.workers_panel.worker_count == 1, "the worker")
        await press(pilot, "w")
        assert app.workers_panel.has_focus
        await press(pilot, "enter")
        await until(pilot, lambda: isinstance(app.screen, WorkerDetailScreen), "the worker detail")
        await press(pilot, "escape")
        await until(pilot, lambda: not isinstance(app.screen, WorkerDetailScreen), "back again")
        await press(pilot, "w")
        assert app.jobs_table.has_focus


def test_every_key_is_pressed_somewhere_and_listed():
    """Each binding of the main screen and the table is in KEYS and pressed by a test in this file."""
    names = {
        "question_mark": "?",
        "slash": "/",
        "colon": ":",
        "escape": "Esc",
        "enter": "Enter",
        "up": "↑",
        "down": "↓",
        "pageup": "PgUp",
        "pagedown": "PgDn",
        "home": "Home",
        "end": "End",
    }
    listed = " ".join(k for k, _ in KEYS)
    for binding in [*MonitorApp.BINDINGS, *JobsTable.BINDINGS]:
        for key in binding.key.split(","):
            shown_as = names.get(key, key)
            assert shown_as in listed, key
            # pressed by a test above (pytest runs this file in order: this test is its last)
            assert key in PRESSED, key
