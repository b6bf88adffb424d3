"""The metric column: a trainer written from the README's contract writes metrics.json with plain
metrics and no ``headline`` key; every place the headline metric shows (``up``'s live table and
summary, ``trainfleet jobs``, the monitor through display.headline) still shows them."""

from __future__ import annotations

import io

from rich.console import Console

from trainfleet.broker import display
from trainfleet.broker.jobs import Job
from trainfleet.broker.schema import JobRecord, JobStatus
from trainfleet.controller import ops, view

from .conftest import gbm_jobs, gbm_manifest

MANIFEST = gbm_manifest(gbm_jobs(1, prefix="plain"))
(SPEC,) = MANIFEST.jobs


def completed(metrics: dict) -> JobRecord:
    return JobRecord(
        job_id=SPEC.job_id,
        status=JobStatus.COMPLETED,
        claimed_by="box",
        attempt=1,
        started_at=100.0,
        finished_at=112.5,
        artifact="a" * 64,
        metrics=metrics,
    )


def rendered(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_a_metrics_json_without_headline_shows_its_first_numeric_metrics():
    rec = completed({"loss": 0.25})
    assert display.headline(rec) == "loss=0.25"
    # Up to the limit, numbers only (a string or a bool is no metric to headline), in the trainer's order
    rec = completed({"note": "fine", "done": True, "loss": 0.25, "accuracy": 0.9, "epochs": 3})
    assert display.headline(rec) == "loss=0.25 accuracy=0.9"
    assert display.headline(rec, limit=3) == "loss=0.25 accuracy=0.9 epochs=3"
    # Nothing numeric: nothing to show
    assert display.headline(completed({"note": "fine"})) == ""


def test_a_headline_key_still_picks_the_one_metric():
    rec = completed({"loss": 0.25, "accuracy": 0.9, "headline": "accuracy"})
    assert display.headline(rec) == "accuracy=0.9"
    # A headline naming no metric falls back like no headline at all
    assert display.headline(completed({"loss": 0.25, "headline": "r2"})) == "loss=0.25"


def test_up_summary_and_live_table_show_the_metric():
    records = {SPEC.job_id: completed({"loss": 0.25})}
    assert "loss=0.25" in rendered(view.render_table(MANIFEST, records, final=True))
    assert "loss=0.25" in rendered(view.render_table(MANIFEST, records))
    console = Console(file=io.StringIO(), width=200, color_system=None)
    view.print_changes(console, MANIFEST, records, {})
    assert "completed on box loss=0.25" in console.file.getvalue()  # type: ignore[attr-defined]


def test_jobs_listing_shows_the_metric(capsys):
    row = ops.job_row(Job(SPEC, completed({"loss": 0.25}), 1))
    assert row["metric"] == {"loss": 0.25}  # what `jobs --json` says
    view.jobs_table([row], filtered=False)
    assert capsys.readouterr().out.splitlines()[1].endswith("loss=0.25")
    row = ops.job_row(Job(SPEC, completed({"loss": 0.25, "accuracy": 0.9, "headline": "accuracy"}), 1))
    assert row["metric"] == {"accuracy": 0.9}


def test_fallback_metric_names_are_made_safe_and_never_markup():
    assert display.headline(completed({"\x1b[2Jloss": 0.5})) == "\\x1b[2Jloss=0.5"
    records = {SPEC.job_id: completed({"[red]loss[/red]": 0.25})}
    assert "[red]loss[/red]=0.25" in rendered(view.render_table(MANIFEST, records, final=True))
