"""How records and events read as text: state colours, progress bars, durations, sizes.

Shared by every front end (the CLI and ``trainfleet up`` in controller/, the monitor in
tui/), which may not import each other; each keeps its own layouts (controller/view.py
for the CLI). Only formatting lives here: no I/O, no NATS. Markup strings use Rich's
``[style]…[/]`` syntax, which both Rich tables and Textual widgets render.

Trainers are untrusted code, so everything they write (output lines, the stderr tail in a
record's ``last_error`` and ``reason``, metric names and values, provenance fields) is
untrusted text. :func:`safe_text` is the one rule every front end applies before such text
reaches a terminal; the formatters here that show trainer text (``fmt_metrics``,
``headline``, ``event_text``) apply it themselves. It does not stop Rich from reading
``[red]`` as markup: front ends that print through Rich wrap untrusted text in
``rich.text.Text`` (or ``rich.markup.escape`` it) as well.
"""

from __future__ import annotations

import time
from typing import Any

from trainfleet.broker.schema import JobRecord, JobStatus

STATE_STYLE = {
    "pending": "dim",
    "claimed": "yellow",
    "running": "cyan",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}

BAR_WIDTH = 10

# Unicode bidi controls (embeddings, overrides, isolates, marks): not terminal escapes, but they
# reorder what is shown around them ("Trojan Source"), so a line could read as something it is not.
_BIDI = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))


def _escape(code: int) -> str:
    if code == 0x0D:
        return "\\r"
    if code == 0x0A:
        return "\\n"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


# C0 controls (ESC, BEL, BS, CR...) but tab and newline, DEL, the C1 controls (0x9b is a one-byte
# CSI on some terminals), lone surrogates (not encodable: printing one would raise) and bidi controls.
_UNSAFE = [*(c for c in range(0x20) if c not in (0x09, 0x0A)), 0x7F, *range(0x80, 0xA0), *range(0xD800, 0xE000), *_BIDI]
_MULTILINE = {code: _escape(code) for code in _UNSAFE}
_ONE_LINE = {**_MULTILINE, 0x0A: _escape(0x0A)}


def safe_text(text: str, *, newlines: bool = True) -> str:
    """``text`` with every control character a terminal would act on shown escaped instead.

    Tab and newline stay (``newlines=False`` escapes newline too, as ``\\n``, for a field shown
    on one line); CR becomes ``\\r`` (a bare CR would return to the start of the line and let
    the rest overwrite what came before); every other C0 control, DEL and C1 control becomes
    ``\\xNN`` (ESC is ``\\x1b``); lone surrogates and Unicode bidi controls become ``\\uNNNN``.
    Backslashes are left alone, so a trainer that prints a literal ``\\x1b`` looks the same as
    one that printed ESC: the text is for reading, ``--json`` has the exact bytes.
    """
    return text.translate(_MULTILINE if newlines else _ONE_LINE)


def progress_of(rec: JobRecord) -> tuple[int, int] | None:
    """(step, total) from the record's last progress report, when the trainer gave both."""
    step, total = (rec.progress or {}).get("step"), (rec.progress or {}).get("total")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        return max(0, min(step, total)), total
    return None


def bar(step: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = max(0, min(width, round(width * step / total))) if total > 0 else 0
    return "█" * filled + "░" * (width - filled)


def progress_text(rec: JobRecord, width: int = BAR_WIDTH) -> str:
    """``███░░░░░░░ 3/10`` while the trainer reports, a full bar once completed, else empty."""
    if rec.status == JobStatus.COMPLETED:
        return bar(1, 1, width)
    frac = progress_of(rec)
    if frac is None or rec.status.terminal or rec.status == JobStatus.PENDING:
        return ""
    return f"{bar(*frac, width)} {frac[0]}/{frac[1]}"


def fmt_value(value: Any) -> str:
    """A metric value as text (trainer-written: made safe for a terminal)."""
    return safe_text(f"{value:.4g}" if isinstance(value, float) else str(value), newlines=False)


def fmt_metrics(metrics: dict[str, Any], limit: int | None = None) -> str:
    items = list(metrics.items())[:limit] if limit else list(metrics.items())
    return " ".join(f"{safe_text(str(k), newlines=False)}={fmt_value(v)}" for k, v in items)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def headline_metrics(metrics: dict[str, Any], limit: int = 2) -> dict[str, Any]:
    """The metrics a one-line view shows of a trainer's ``metrics.json``: the one its optional
    ``"headline"`` key names, else its first ``limit`` numeric metrics in the order written
    (the trainer contract requires no ``headline`` key; README, docs/operations.md)."""
    name = metrics.get("headline")
    if isinstance(name, str) and name != "headline" and name in metrics:
        return {name: metrics[name]}
    numeric = [(k, v) for k, v in metrics.items() if k != "headline" and _numeric(v)]
    return dict(numeric[: max(limit, 0)])


def headline(rec: JobRecord, limit: int = 2) -> str:
    """The final headline metric (see :func:`headline_metrics`) once the job has ended, else the
    latest reported metrics."""
    if not rec.status.terminal:  # metrics of an earlier generation would mislead: show this run's
        return fmt_metrics((rec.progress or {}).get("metrics") or {}, limit)
    return fmt_metrics(headline_metrics(rec.metrics or {}, limit))


def styled_state(state: str) -> str:
    return f"[{STATE_STYLE.get(state, '')}]{state}[/]" if state in STATE_STYLE else state


def duration(rec: JobRecord, now: float | None = None) -> float | None:
    if rec.started_at is None:
        return None
    return (rec.finished_at or (time.time() if now is None else now)) - rec.started_at


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def fmt_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def event_text(kind: str, event: dict[str, Any], attempt: int | None) -> str:
    """One line for an event on a job's events subject (progress, or the agent's started/finished),
    safe for a terminal (:func:`safe_text`)."""
    return safe_text(_event_text(kind, event, attempt), newlines=False)


def _event_text(kind: str, event: dict[str, Any], attempt: int | None) -> str:
    if kind == "progress":
        step, total = event.get("step"), event.get("total")
        where = ""
        if isinstance(step, int) and isinstance(total, int) and total > 0:
            where = f"{bar(min(step, total), total)} {step}/{total} "
        elif step is not None:
            where = f"step {step} "
        return f"[progress] {where}{fmt_metrics(event.get('metrics') or {})}".rstrip()
    host = f" on {event['host']}" if event.get("host") else ""
    outcome = f": {event['outcome']}" if event.get("outcome") else ""
    return f"[{kind}] attempt {attempt if attempt is not None else '?'}{host}{outcome}"
