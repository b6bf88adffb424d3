"""The jobs table's model: rows, the filter, the sort, the counts — no widgets, no NATS.

The monitor keeps one :class:`JobsModel` fed by the jobs KV watch. Every change updates one
row and the per-state counts in O(log n); the filtered, sorted view (a list of job ids) is
kept in order incrementally (bisect), so 100 changes a second over 100k jobs cost
microseconds each and the table repaints only its visible lines. A new filter or sort
rebuilds the view once.

Filter syntax (``/``): words separated by spaces, all of which must match. ``state:running``,
``host:gpu-1``, ``model:mlp``, ``name:lr-``, ``id:3fa2``, ``class:cuda`` match one field
(by substring, ``state`` and ``class`` by prefix); a bare word matches any of name, id,
model, host and state. Matching ignores case.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from trainfleet.broker import display
from trainfleet.broker.schema import JobRecord, JobSpec, JobStatus

# How far back "jobs completed per minute" looks.
THROUGHPUT_WINDOW_S = 300.0
TREND_POINTS = 12
SPARK = "▁▂▃▄▅▆▇█"

# Sort orders the table cycles through (``s``), each ascending unless reversed (``S``).
SORTS = ("priority", "state", "duration", "metric", "name")
FILTER_FIELDS = ("state", "host", "model", "name", "id", "class")
_STATE_ORDER = {s: i for i, s in enumerate(("running", "claimed", "pending", "failed", "cancelled", "completed"))}


@dataclass(slots=True)
class Row:
    """What the table shows of one job, computed once per change."""

    job_id: str
    name: str
    model: str
    state: str
    host: str
    klass: str
    attempt: int
    priority: int
    started_at: float | None
    finished_at: float | None
    progress: str
    metric: str
    metric_value: float | None
    hay: str = ""  # name, id, model, host and state in lower case: what a bare filter word searches

    def duration(self, now: float) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or now) - self.started_at


def first_number(metrics: dict[str, Any]) -> float | None:
    """The headline metric's value (or the first numeric one) as a float, for sorting."""
    name = metrics.get("headline")
    if isinstance(name, str) and isinstance(metrics.get(name), int | float) and math.isfinite(metrics[name]):
        return float(metrics[name])
    for key, value in metrics.items():
        if key != "headline" and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value) if math.isfinite(value) else None
    return None


def make_row(rec: JobRecord, spec: JobSpec | None) -> Row:
    metrics = rec.metrics if rec.status.terminal else (rec.progress or {}).get("metrics") or {}
    name = display.safe_text(spec.name, newlines=False) if spec else rec.job_id[:12]
    model = spec.model if spec else ""
    host = display.safe_text(rec.claimed_by or "", newlines=False)
    return Row(
        job_id=rec.job_id,
        name=name,
        model=model,
        state=rec.status.value,
        host=host,
        klass=rec.klass,
        attempt=rec.attempt,
        priority=rec.priority,
        started_at=rec.started_at,
        finished_at=rec.finished_at,
        progress=display.progress_text(rec),
        metric=display.headline(rec),
        metric_value=first_number(metrics) if isinstance(metrics, dict) else None,
        hay=f"{name}\n{rec.job_id}\n{model}\n{host}\n{rec.status.value}".lower(),
    )


@dataclass(frozen=True)
class Query:
    """A parsed filter: field terms and bare words, all lower case."""

    fields: tuple[tuple[str, str], ...] = ()
    words: tuple[str, ...] = ()
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> Query:
        fields, words = [], []
        for token in text.lower().split():
            key, sep, value = token.partition(":")
            if sep and key in FILTER_FIELDS and value:
                fields.append((key, value))
            else:
                words.append(token)
        return cls(tuple(fields), tuple(words), text.strip())

    def __bool__(self) -> bool:
        return bool(self.fields or self.words)

    def matches(self, row: Row) -> bool:
        for key, value in self.fields:
            if key == "state":
                if not row.state.startswith(value):
                    return False
            elif key == "class":
                if not row.klass.lower().startswith(value):
                    return False
            elif value not in _field(row, key):
                return False
        if self.words:
            return all(word in row.hay for word in self.words)
        return True


def _field(row: Row, key: str) -> str:
    return {"host": row.host, "model": row.model, "name": row.name, "id": row.job_id}[key].lower()


def sort_key(sort: str, row: Row, now: float) -> tuple[Any, ...]:
    """The ascending key of ``row`` under ``sort``; the job id breaks ties (keys are unique)."""
    if sort == "state":
        return (_STATE_ORDER.get(row.state, 9), -row.priority, row.name, row.job_id)
    if sort == "duration":
        # Longest first reads best; the running ones' durations grow, re-sorted every few seconds.
        d = row.duration(now)
        return (d is None, -(d or 0.0), row.name, row.job_id)
    if sort == "metric":
        return (row.metric_value is None, row.metric_value or 0.0, row.name, row.job_id)
    if sort == "name":
        return (row.name, row.job_id)
    return (-row.priority, row.name, row.job_id)


def sparkline(values: Iterable[float]) -> str:
    """``▁▃▅█``: each value scaled between the smallest and largest of them."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo
    return "".join(SPARK[0 if span == 0 else round((v - lo) / span * (len(SPARK) - 1))] for v in vals)


class JobsModel:
    """Rows by job id, per-state counts, recent completions, and the ordered filtered view."""

    def __init__(self, now: Callable[[], float] = time.time):
        self.now = now
        self.rows: dict[str, Row] = {}
        self.counts: dict[str, int] = {}
        self.query = Query()
        self.sort = SORTS[0]
        self.reverse = False
        # Every row's sort key, sorted; with a filter, the keys of the rows it matches too
        # (without one, the view is the whole list: the same objects).
        self._all: list[tuple[Any, ...]] = []
        self._all_key: dict[str, tuple[Any, ...]] = {}
        self._keys: list[tuple[Any, ...]] = self._all  # the view: sorted keys of the rows in it
        self._key_of: dict[str, tuple[Any, ...]] = self._all_key
        self._sorted_at = 0.0
        self._finished: dict[str, float] = {}  # completed job -> when, within the window
        self.trends: dict[str, deque[float]] = {}
        self.version = 0  # bumped on every change the table must repaint for

    # -- changes -------------------------------------------------------------
    def upsert(self, rec: JobRecord, spec: JobSpec | None) -> Row:
        row = self._put(rec, spec)
        self._place(row)
        self.version += 1
        return row

    def _put(self, rec: JobRecord, spec: JobSpec | None) -> Row:
        """The row of ``rec`` made and counted (not placed in the view yet)."""
        row = make_row(rec, spec)
        old = self.rows.get(rec.job_id)
        if old is not None:
            self.counts[old.state] -= 1
        self.counts[row.state] = self.counts.get(row.state, 0) + 1
        self.rows[rec.job_id] = row
        if rec.status == JobStatus.COMPLETED and rec.finished_at and rec.finished_at > self.now() - THROUGHPUT_WINDOW_S:
            self._finished[rec.job_id] = rec.finished_at
        else:
            self._finished.pop(rec.job_id, None)
        if not rec.status.held:
            self.trends.pop(rec.job_id, None)
        return row

    def drop(self, job_id: str) -> None:
        old = self.rows.pop(job_id, None)
        if old is None:
            return
        self.counts[old.state] -= 1
        self._finished.pop(job_id, None)
        self.trends.pop(job_id, None)
        self._unplace(job_id)
        self.version += 1

    def add_point(self, job_id: str, metrics: dict[str, Any]) -> None:
        """A progress report of a held job: its first metric joins the job's trend."""
        value = first_number(metrics)
        if value is not None and job_id in self.rows:
            self.trends.setdefault(job_id, deque(maxlen=TREND_POINTS)).append(value)
            self.version += 1

    def bulk_load(self, items: Iterable[tuple[JobRecord, JobSpec | None]]) -> None:
        """Many rows at once (start-up): rows first, then one sort."""
        for rec, spec in items:
            self._put(rec, spec)
        self.rebuild()

    # -- the view ------------------------------------------------------------
    def set_query(self, text: str) -> None:
        self.query = Query.parse(text)
        self._filter()

    def set_sort(self, sort: str, reverse: bool = False) -> None:
        if sort not in SORTS:
            raise ValueError(f"unknown sort {sort!r}; one of {', '.join(SORTS)}")
        self.sort, self.reverse = sort, reverse
        self.rebuild()

    def rebuild(self) -> None:
        """Sort every row again (a new sort order), then filter."""
        now = self.now()
        sort = self.sort
        self._all_key = {job_id: sort_key(sort, row, now) for job_id, row in self.rows.items()}
        self._all = sorted(self._all_key.values())
        self._sorted_at = now
        self._filter()

    def _filter(self) -> None:
        """The view from the sorted list: a pass over it, no sort (a filter typed at 100k jobs)."""
        query, rows = self.query, self.rows
        if query:
            self._keys = [k for k in self._all if query.matches(rows[k[-1]])]
            self._key_of = {k[-1]: k for k in self._keys}
        else:
            self._keys, self._key_of = self._all, self._all_key
        self.version += 1

    def maybe_resort(self, every_s: float = 5.0) -> bool:
        """Durations grow while jobs run: under the duration sort, re-sort every few seconds."""
        if self.sort == "duration" and self.now() - self._sorted_at >= every_s:
            self.rebuild()
            return True
        return False

    def _place(self, row: Row) -> None:
        self._unplace(row.job_id)
        key = sort_key(self.sort, row, self._sorted_at or self.now())
        self._all_key[row.job_id] = key
        bisect.insort(self._all, key)
        if self.query and self.query.matches(row):
            self._key_of[row.job_id] = key
            bisect.insort(self._keys, key)

    def _unplace(self, job_id: str) -> None:
        _remove(self._all, self._all_key.pop(job_id, None))
        if self.query:
            _remove(self._keys, self._key_of.pop(job_id, None))

    def __len__(self) -> int:
        """Rows in view (after the filter)."""
        return len(self._keys)

    def id_at(self, index: int) -> str:
        """The job id at ``index`` of the view, in the shown order."""
        i = len(self._keys) - 1 - index if self.reverse else index
        return self._keys[i][-1]

    def index_of(self, job_id: str) -> int | None:
        key = self._key_of.get(job_id)
        if key is None:
            return None
        i = bisect.bisect_left(self._keys, key)
        if i >= len(self._keys) or self._keys[i] != key:
            return None
        return len(self._keys) - 1 - i if self.reverse else i

    def ids(self) -> list[str]:
        """Every job id in view, in the shown order."""
        out = [k[-1] for k in self._keys]
        return out[::-1] if self.reverse else out

    # -- the header ----------------------------------------------------------
    def per_minute(self) -> float:
        """Jobs completed per minute over the last THROUGHPUT_WINDOW_S (or since the first one)."""
        now = self.now()
        cutoff = now - THROUGHPUT_WINDOW_S
        for job_id in [j for j, at in self._finished.items() if at < cutoff]:
            del self._finished[job_id]
        if not self._finished:
            return 0.0
        span = max(60.0, now - min(self._finished.values()))
        return len(self._finished) * 60.0 / min(span, THROUGHPUT_WINDOW_S)

    def eta_s(self) -> float | None:
        """How long the pending and held jobs take at the current throughput (None: no rate yet)."""
        rate = self.per_minute()
        backlog = sum(self.counts.get(s, 0) for s in ("pending", "claimed", "running"))
        if backlog == 0:
            return 0.0
        return backlog / rate * 60.0 if rate > 0 else None

    def resolve(self, ref: str) -> str | None:
        """A job id from a name, an id or an id prefix (the first match in view order first)."""
        ref = ref.strip()
        if not ref:
            return None
        if ref in self.rows:
            return ref
        by_name = [j for j, row in self.rows.items() if row.name == ref]
        if by_name:
            return by_name[0]
        prefixed = [j for j in self.rows if j.startswith(ref.lower())]
        if len(prefixed) == 1:
            return prefixed[0]
        partial = sorted(j for j, row in self.rows.items() if ref.lower() in row.name.lower())
        return partial[0] if partial else (prefixed[0] if prefixed else None)


def _remove(keys: list[tuple[Any, ...]], key: tuple[Any, ...] | None) -> None:
    if key is not None:
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            del keys[i]
