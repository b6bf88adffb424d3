"""The trainer-side progress protocol: one JSON line per report, written to an inherited fd.

The protocol is deliberately tiny so trainers in any language can implement it:

* The agent starts a trainer with the environment variable ``TRAINFLEET_PROGRESS_FD``
  set to the number of an open, writable file descriptor (the write end of a pipe the
  trainer inherited). If the variable is absent, the trainer is not under the fleet and
  should simply not report. On Windows, which cannot pass a file descriptor, the agent sets
  ``TRAINFLEET_PROGRESS_HANDLE`` instead: an inherited Win32 pipe handle (in C, write to it
  with ``WriteFile``; in Python, ``msvcrt.open_osfhandle(handle, os.O_WRONLY)`` gives an fd).
* Each report is a single line of UTF-8 JSON terminated by ``\\n``::

      {"step": 3, "total": 10, "metrics": {"loss": 0.41, "accuracy": 0.93}, "at": 1700000000.25}

  ``step`` and ``total`` are integers or ``null``; ``metrics`` is a flat object whose
  values are JSON numbers or strings; ``at`` is the Unix time (seconds, float) of the
  report. Unknown keys are ignored by the agent.
* Write each line with a single ``write`` call: lines shorter than ``PIPE_BUF`` (4 KiB
  on Linux) then arrive whole even if the trainer has threads. If the pipe breaks, stop
  reporting and keep training: progress is advisory, the job's result is the exit status
  and the files it writes.

In Python, call :func:`report`; the agent decodes what it reads with
:func:`read_progress_lines`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

PROGRESS_FD_ENV = "TRAINFLEET_PROGRESS_FD"
PROGRESS_HANDLE_ENV = "TRAINFLEET_PROGRESS_HANDLE"

# Module state: the stream is opened lazily on the first report and kept for the life
# of the process; once anything goes wrong we stop trying rather than failing training.
_stream: Any = None
_disabled = False


def report(step: int | None = None, total: int | None = None, **metrics: Any) -> None:
    """Send one progress line to the agent, or do nothing outside the fleet.

    ``metrics`` values may be Python, numpy or torch scalars; they are converted to
    plain JSON numbers (non-finite floats and other objects become strings). Never
    raises because of the channel: a missing variable or a broken pipe is silent.
    """
    stream = _get_stream()
    if stream is None:
        return
    line = _encode_line(step, total, metrics)
    try:
        _write_all(stream, line)
    except (OSError, ValueError):
        # EPIPE (agent gone), EBADF (fd closed), or the stream closed under us.
        _disable()


def read_progress_lines(data: bytes) -> list[dict[str, Any]]:
    """Decode the complete progress lines in ``data``; malformed lines are skipped.

    Each returned dict has ``step`` and ``total`` (int or None), ``metrics`` (dict)
    and ``at`` (float; the read time when the trainer gave none). Pass only complete
    lines: a trailing partial line would be dropped as malformed.
    """
    events = []
    for raw in data.split(b"\n"):
        event = _decode_line(raw)
        if event is not None:
            events.append(event)
    return events


def _get_stream() -> Any:
    """Open the progress fd once; None when not under the fleet or after a failure."""
    global _stream
    if _stream is not None or _disabled:
        return _stream
    value = os.environ.get(PROGRESS_FD_ENV, "").strip()
    handle = os.environ.get(PROGRESS_HANDLE_ENV, "").strip()
    if not value and not handle:
        return None
    try:
        if value:
            fd = int(value)
        else:  # Windows: an inherited pipe handle, made an fd (agent/hostos.py)
            from trainfleet.agent import hostos

            fd = hostos.open_progress_handle(handle)
        # Unbuffered binary so each line goes out in one write() and nothing is left in
        # a buffer for interpreter shutdown to flush into a dead pipe; closefd=False
        # because the fd belongs to whoever passed it to us, and it stays open until exit.
        _stream = os.fdopen(fd, "wb", buffering=0, closefd=False)
    except (ValueError, OSError, ImportError):
        _disable()
    return _stream


def _disable() -> None:
    global _stream, _disabled
    _stream = None
    _disabled = True


def _reset() -> None:
    """Forget the opened stream so the environment is read again (for tests)."""
    global _stream, _disabled
    _stream = None
    _disabled = False


def _write_all(stream: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = stream.write(view)
        if not written:
            raise OSError("progress stream accepted no bytes")
        view = view[written:]


def _encode_line(step: int | None, total: int | None, metrics: dict[str, Any]) -> bytes:
    payload = {
        "step": None if step is None else int(step),
        "total": None if total is None else int(total),
        "metrics": {str(key): _json_scalar(value) for key, value in metrics.items()},
        "at": time.time(),
    }
    return (json.dumps(payload, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def _json_scalar(value: Any) -> int | float | str:
    """Coerce a metric to a strict-JSON number or string."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | str):
        return value
    try:
        number = float(value)  # numpy / torch scalars and 0-d tensors implement __float__
    except (TypeError, ValueError):
        return str(value)
    # NaN/inf are not valid JSON; a string keeps the information without breaking decoders.
    return number if math.isfinite(number) else str(number)


def _decode_line(raw: bytes) -> dict[str, Any] | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    step, total = obj.get("step"), obj.get("total")
    if not (_is_count(step) and _is_count(total)):
        return None
    metrics = obj.get("metrics")
    at = obj.get("at")
    return {
        "step": None if step is None else int(step),
        "total": None if total is None else int(total),
        "metrics": metrics if isinstance(metrics, dict) else {},
        "at": float(at) if _is_number(at) and math.isfinite(at) else time.time(),
    }


def _is_count(value: Any) -> bool:
    """None or an integral number (3.0 from a loosely typed trainer is accepted as 3)."""
    if value is None:
        return True
    return _is_number(value) and math.isfinite(value) and float(value).is_integer()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
