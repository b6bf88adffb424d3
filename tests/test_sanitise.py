"""Trainer-written text never reaches an operator's terminal raw: escape sequences in output lines,
the stderr tail (reason, last_error), metric names and values and provenance fields are shown
escaped (broker/display.py: safe_text) by `trainfleet logs`, `show`, `up` and the monitor, and
text shown through Rich is never read as markup."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from typing import Any

import msgspec
from rich.console import Console
from rich.text import Text

from trainfleet.broker import display
from trainfleet.broker.display import safe_text
from trainfleet.broker.logs import LogEntry
from trainfleet.broker.schema import JobRecord, JobStatus
from trainfleet.controller import view
from trainfleet.tui.app import MonitorApp
from trainfleet.tui.logpane import entry_text
from trainfleet.tui.model import make_row

from .conftest import gbm_jobs, gbm_manifest, put_job, role_env
from .conftest import pilot_until as until

CLI = [sys.executable, "-m", "trainfleet.controller.cli"]
# What the brief's attacker prints: set the window title, clear the screen, turn the text red.
ATTACK = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred"
ATTACK_SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mred"
# Any control character a terminal acts on, other than newline and tab (C0, DEL, C1).
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
RAW_BYTES = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")  # the same, UTF-8 encoded


# -- the rule ---------------------------------------------------------------------------
def test_escape_sequences_are_shown_escaped():
    assert safe_text(ATTACK) == ATTACK_SHOWN
    assert safe_text("\x00\x08\x0b\x0c\x1b\x7f") == "\\x00\\x08\\x0b\\x0c\\x1b\\x7f"
    # printable text, markup-looking or not, is unchanged (backslashes too: the text is for reading)
    text = "loss=0.25 acc=97% [red]not markup[/] ünïcödé 日本語 😀 █░ back\\slash \\x1b literal"
    assert safe_text(text + "\x1b") == text + "\\x1b"


def test_newline_and_tab_stay_and_cr_is_escaped():
    assert safe_text("epoch\t1\nepoch\t2") == "epoch\t1\nepoch\t2"
    # a bare CR would let the rest of the line overwrite its start ("loss=9.9" hidden by "ok")
    assert safe_text("loss=9.9\rok") == "loss=9.9\\rok"
    assert safe_text("a\r\nb") == "a\\r\nb"


def test_one_line_fields_escape_newline_too():
    assert safe_text("boom\n  state  completed", newlines=False) == "boom\\n  state  completed"
    assert safe_text("a\tb", newlines=False) == "a\tb"


def test_c1_controls_bidi_controls_and_lone_surrogates_are_escaped():
    # 0x9b is a one-byte CSI on terminals that honour C1; 0x85 is NEL
    assert safe_text("\x9b2J\x85\x80\x9f") == "\\x9b2J\\x85\\x80\\x9f"
    # right-to-left override: "txt.exe" that reads as "exe.txt"
    assert safe_text("\u202etxt.exe") == "\\u202etxt.exe"
    assert safe_text("\u2066\u2069\u200e\u200f\u061c") == "\\u2066\\u2069\\u200e\\u200f\\u061c"
    # a lone surrogate (JSON allows "\ud800") could not even be encoded to print
    shown = safe_text(json.loads('"loss\\ud800"'))
    assert shown == "loss\\ud800" and shown.encode("utf-8")


def test_no_code_point_comes_through_as_a_control_character():
    everything = "".join(map(chr, range(0x110000)))
    shown = safe_text(everything, newlines=False)
    assert not RAW_CONTROL.search(shown)
    assert not re.search("[\ud800-\udfff\u202a-\u202e\u2066-\u2069]", shown)
    assert safe_text(shown) == shown  # what it shows is already safe


def test_formatters_of_trainer_text_apply_the_rule():
    metrics = {"\x1b[2Jloss": "\x1b[31m0.5", "acc": 0.5}
    assert display.fmt_metrics(metrics) == "\\x1b[2Jloss=\\x1b[31m0.5 acc=0.5"
    rec = JobRecord(job_id="j", status=JobStatus.COMPLETED, metrics={"headline": "\x1b[2Jacc", "\x1b[2Jacc": 1.0})
    assert display.headline(rec) == "\\x1b[2Jacc=1"
    event = {"step": 1, "total": 2, "metrics": {"loss\x07": 1.5}}
    assert display.event_text("progress", event, 1).endswith("1/2 loss\\x07=1.5")
    assert display.event_text("finished", {"outcome": "ok\x1b[2J\nforged"}, 1) == (
        "[finished] attempt 1: ok\\x1b[2J\\nforged"
    )


# -- printers (no NATS) ---------------------------------------------------------------------
def test_log_printer_escapes_trainer_lines(capsys):
    printer = view.LogPrinter(as_json=False)
    printer.entry(LogEntry(seq=1, at=0.0, kind="log", attempt=1, stream="stdout", line=ATTACK))
    printer.entry(LogEntry(seq=2, at=0.0, kind="log", attempt=1, stream="stderr", line="err\x1b[2J\r"))
    out, err = capsys.readouterr()
    assert out == ATTACK_SHOWN + "\n" and err == "err\\x1b[2J\\r\n"
    # --json stays JSON: the exact text, escaped by JSON itself
    view.LogPrinter(as_json=True).entry(LogEntry(seq=1, at=0.0, kind="log", attempt=1, stream="stdout", line=ATTACK))
    out, _ = capsys.readouterr()
    assert json.loads(out)["line"] == ATTACK and "\x1b" not in out


def test_provenance_fields_are_escaped(capsys):
    prov = {
        "host": {"host_id": "a1\x1b[2J", "platform": "Linux\r", "gpus": [{"name": "H200\x07"}]},
        "code_commit": "\x1b]0;pwned\x07",
        "versions": {"torch\x1b[31m": "2.0\x9b"},
        "argv": ["python", "-c", "\x1b[2J\nrm"],
        "timings": {},
    }
    view._print_provenance(prov)
    out = capsys.readouterr().out
    assert not RAW_CONTROL.search(out)
    assert "a1\\x1b[2J" in out and "H200\\x07" in out and "\\x1b]0;pwned\\x07" in out and "\\x1b[2J\\nrm" in out
    assert len(out.splitlines()) == 7  # a newline in argv does not start a line of its own


def test_up_table_and_change_lines_do_not_read_metric_names_as_markup():
    manifest = gbm_manifest(gbm_jobs(1))
    spec = manifest.jobs[0]
    rec = JobRecord(
        job_id=spec.job_id,
        status=JobStatus.COMPLETED,
        attempt=1,
        metrics={"headline": "[red]acc[/red]", "[red]acc[/red]": 1.0},
    )
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(view.render_table(manifest, {spec.job_id: rec}, final=True))
    view.print_changes(console, manifest, {spec.job_id: rec}, {})
    shown = console.file.getvalue()
    assert shown.count("[red]acc[/red]=1") == 2


def test_monitor_cells_and_log_lines_are_text_not_markup():
    spec = gbm_manifest(gbm_jobs(1)).jobs[0]
    rec = JobRecord(
        job_id=spec.job_id,
        status=JobStatus.RUNNING,
        attempt=1,
        progress={"step": 1, "total": 2, "metrics": {"[b]loss\x1b[2J": 0.5}},
    )
    metric = make_row(rec, spec).metric
    assert metric == "[b]loss\\x1b[2J=0.5"  # drawn as segments: never read as markup
    line = entry_text(LogEntry(seq=1, at=0.0, kind="log", attempt=1, stream="stdout", line="[red]" + ATTACK))
    assert isinstance(line, Text) and line.plain == "[red]" + ATTACK_SHOWN


def _as_shown(cell: Any) -> str:
    """What a DataTable shows for a cell: a str is read as Rich markup, a Text as it is."""
    return Text.from_markup(cell).plain if isinstance(cell, str) else cell.plain


# -- end to end: the CLI as a subprocess, the monitor under Textual's pilot -------------------------
async def run_cli_bytes(*args: str, url: str) -> tuple[int, bytes, bytes]:
    """The CLI as an operator runs it; stdout and stderr as the terminal would get them (bytes)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env={**os.environ, **role_env("operator"), "NATS_URL": url, "PYTHONIOENCODING": "utf-8"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out, err


async def put_record(broker, name: str, **changes: Any) -> JobRecord:
    """A job record written straight to the KV as the admin (no controller needed)."""
    spec = gbm_manifest(gbm_jobs(1)).jobs[0]
    spec = msgspec.structs.replace(spec, name=name, job_id=hashlib.sha256(name.encode()).hexdigest())
    return (await put_job(broker, spec, created_at=1.0, updated_at=1.0, **changes)).record


async def publish_line(broker, job_id: str, line: str, *, stream: str = "stdout") -> None:
    """A line of trainer output, as the agent publishes it."""
    await broker.js.publish(
        broker.names.logs_subject(job_id),
        line.encode() + b"\n",
        headers={"Trainfleet-Stream": stream, "Trainfleet-Attempt": "1"},
    )


async def test_trainfleet_logs_shows_escape_sequences_escaped(broker, settings):
    rec = await put_record(broker, "evil", status=JobStatus.RUNNING, attempt=1, claimed_by="box")
    await publish_line(broker, rec.job_id, ATTACK)
    await publish_line(broker, rec.job_id, "progress 50%\r\x9b2Jgone", stream="stderr")
    await broker.js.publish(
        broker.names.events_subject(rec.job_id),
        json.dumps(
            {"job_id": rec.job_id, "kind": "progress", "step": 1, "total": 2, "metrics": {"\x1b[2J": 1}}
        ).encode(),
    )
    code, out, err = await run_cli_bytes("logs", "evil", "--events", url=settings.url)
    assert code == 0, err
    assert b"\x1b" not in out + err and b"\x07" not in out + err and b"\r" not in out + err
    assert not RAW_BYTES.search(out) and not RAW_BYTES.search(err)
    assert ATTACK_SHOWN.encode() in out and b"progress 50%\\r\\x9b2Jgone" in err
    assert b"1/2 \\x1b[2J=1" in out
    # --json stays JSON: the exact line, escaped by JSON
    code, out, _ = await run_cli_bytes("logs", "evil", "--json", url=settings.url)
    assert code == 0 and b"\x1b" not in out
    assert [json.loads(line)["line"] for line in out.splitlines()] == [ATTACK, "progress 50%\r\x9b2Jgone"]


async def test_trainfleet_show_shows_last_error_reason_and_metrics_escaped(broker, settings):
    await put_record(
        broker,
        "evil",
        status=JobStatus.FAILED,
        attempt=1,
        claimed_by="box",
        reason="\x1b[31mboom",
        last_error="Traceback (most recent call last):\n" + ATTACK + "\nloss=9.9\rok\n",
        metrics={"\x1b[2Jloss": 1.5, "acc": "\x1b]0;pwned\x07"},
    )
    code, out, err = await run_cli_bytes("show", "evil", url=settings.url)
    assert code == 0, err
    assert b"\x1b" not in out and b"\x07" not in out and b"\r" not in out and not RAW_BYTES.search(out)
    text = out.decode()
    assert "    " + ATTACK_SHOWN + "\n" in text and "    loss=9.9\\rok\n" in text
    assert "reason      \\x1b[31mboom\n" in text
    assert "\\x1b[2Jloss=1.5" in text and "acc=\\x1b]0;pwned\\x07" in text
    # --json stays JSON
    code, out, _ = await run_cli_bytes("show", "evil", "--json", url=settings.url)
    assert code == 0 and b"\x1b" not in out and json.loads(out)["reason"] == "\x1b[31mboom"


async def test_monitor_shows_trainer_output_escaped_and_metrics_not_as_markup(broker, settings):
    rec = await put_record(
        broker,
        "evil",
        status=JobStatus.RUNNING,
        attempt=1,
        claimed_by="box",
        progress={"step": 1, "total": 2, "metrics": {"[red]loss\x1b[2J": 0.5}},
    )
    await publish_line(broker, rec.job_id, ATTACK)
    app = MonitorApp(settings)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: app.jobs_table.row_count == 1, "the job's row")
        assert app.model.rows[rec.job_id].metric == "[red]loss\\x1b[2J=0.5"
        table = app.jobs_table
        drawn = lambda: "\n".join(table.render_line(y).text for y in range(table.size.height))  # noqa: E731
        await until(pilot, lambda: "[red]loss\\x1b[2J=0.5" in drawn(), "the metric drawn as text")
        assert not RAW_CONTROL.search(drawn())
        shown = lambda: "\n".join(strip.text for strip in app.log_pane.lines)  # noqa: E731
        await until(pilot, lambda: "pwned" in shown(), "the job's output")
        assert ATTACK_SHOWN in shown() and not RAW_CONTROL.search(shown())
        await pilot.press("q")
