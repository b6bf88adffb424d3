"""The jobs table: a virtual list over :class:`~trainfleet.tui.model.JobsModel`.

Only the lines on screen are rendered (Textual's line API), so 100k jobs cost no more to
draw than 40, and a change to the model repaints the visible lines, not a table of widgets.
The highlight follows its job, not its line: when the order changes under it (a re-sort,
a job filtered away above it) the same job stays highlighted.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.cells import set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from trainfleet.broker import display
from trainfleet.tui.model import JobsModel, Row, sparkline


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int  # 0: takes what is left


COLUMNS = (
    Column("id", "ID", 12),
    Column("name", "JOB", 0),
    Column("state", "STATE", 9),
    Column("host", "HOST", 12),
    Column("try", "TRY", 3),
    Column("priority", "PRI", 3),
    Column("duration", "TIME", 7),
    Column("progress", "PROGRESS", 18),
    Column("metric", "METRIC", 22),
    Column("trend", "TREND", 12),
)
MIN_NAME = 12
_STATE_STYLES = {state: Style.parse(style) for state, style in display.STATE_STYLE.items()}
_DIM = Style(dim=True)
_GREEN = Style(color="green")


# What gives way first when the screen is narrow (the name, the state and the metric stay longest).
DROP_ORDER = ("trend", "priority", "try", "id", "duration", "progress", "host", "metric")


def layout(width: int) -> list[tuple[Column, int]]:
    """The columns that fit in ``width`` cells and their widths."""
    columns = list(COLUMNS)
    drop = list(DROP_ORDER)
    while True:
        fixed = sum(c.width for c in columns if c.width) + len(columns) - 1
        if width - fixed >= MIN_NAME or not drop:
            return [(c, c.width or max(MIN_NAME, width - fixed)) for c in columns]
        gone = drop.pop(0)
        columns = [c for c in columns if c.key != gone]


class JobsTable(ScrollView, can_focus=True):
    """The jobs, one line each, under a header line that stays put."""

    COMPONENT_CLASSES = {"jobs-table--header", "jobs-table--cursor"}
    DEFAULT_CSS = """
    JobsTable { background: $surface; }
    JobsTable > .jobs-table--header { text-style: bold; background: $panel; }
    JobsTable > .jobs-table--cursor { background: $accent 60%; text-style: bold; }
    JobsTable:blur > .jobs-table--cursor { background: $accent 25%; }
    """
    BINDINGS = [
        Binding("up,k", "move(-1)", "up", show=False),
        Binding("down,j", "move(1)", "down", show=False),
        Binding("pageup", "page(-1)", "page up", show=False),
        Binding("pagedown", "page(1)", "page down", show=False),
        Binding("home,g", "edge(0)", "first", show=False),
        Binding("end,G", "edge(1)", "last", show=False),
        Binding("enter", "select", "detail"),
    ]

    class Highlighted(Message):
        """The highlighted job changed (``job_id`` None: the view is empty)."""

        def __init__(self, job_id: str | None):
            super().__init__()
            self.job_id = job_id

    class Selected(Message):
        """Enter on a job."""

        def __init__(self, job_id: str):
            super().__init__()
            self.job_id = job_id

    def __init__(self, model: JobsModel, *, id: str | None = None):
        super().__init__(id=id)
        self.model = model
        self.cursor = 0
        self.cursor_id: str | None = None
        self._drawn_version = -1

    # -- state -------------------------------------------------------------------
    @property
    def row_count(self) -> int:
        return len(self.model)

    def sync(self, *, force: bool = False) -> None:
        """Catch up with the model: keep the highlight on its job and repaint if anything changed."""
        if not force and self._drawn_version == self.model.version:
            return
        self._drawn_version = self.model.version
        n = len(self.model)
        self.virtual_size = Size(self.size.width, n + 1)
        index = self.model.index_of(self.cursor_id) if self.cursor_id else None
        self._set_cursor(index if index is not None else min(self.cursor, max(0, n - 1)), scroll=index is not None)
        self.refresh()

    def _set_cursor(self, index: int, *, scroll: bool = True) -> None:
        n = len(self.model)
        self.cursor = max(0, min(index, n - 1)) if n else 0
        job_id = self.model.id_at(self.cursor) if n else None
        if scroll:
            self._scroll_to_cursor()
        if job_id != self.cursor_id:
            self.cursor_id = job_id
            self.post_message(self.Highlighted(job_id))
        self.refresh()

    def _scroll_to_cursor(self) -> None:
        rows_shown = max(1, self.size.height - 1)
        top = round(self.scroll_y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + rows_shown:
            self.scroll_to(y=self.cursor - rows_shown + 1, animate=False, immediate=True)

    def select_job(self, job_id: str) -> bool:
        """Highlight ``job_id`` if it is in view."""
        index = self.model.index_of(job_id)
        if index is None:
            return False
        self._set_cursor(index)
        return True

    # -- keys and mouse -----------------------------------------------------------
    def action_move(self, delta: int) -> None:
        self._set_cursor(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self._set_cursor(self.cursor + direction * max(1, self.size.height - 2))

    def action_edge(self, end: int) -> None:
        self._set_cursor(len(self.model) - 1 if end else 0)

    def action_select(self) -> None:
        if self.cursor_id is not None:
            self.post_message(self.Selected(self.cursor_id))

    def on_click(self, event: events.Click) -> None:
        if event.y >= 1:
            self._set_cursor(round(self.scroll_y) + event.y - 1, scroll=False)
            if event.chain == 2:
                self.action_select()

    def on_resize(self, event: events.Resize) -> None:
        self.sync(force=True)

    # -- drawing --------------------------------------------------------------------
    def render_line(self, y: int) -> Strip:
        width = self.size.width
        cols = layout(width)
        if y == 0:
            style = self.get_component_rich_style("jobs-table--header")
            text = " ".join(set_cell_size(c.label, w) for c, w in cols)
            return Strip([Segment(set_cell_size(text, width), style)], width)
        index = round(self.scroll_y) + y - 1
        if index >= len(self.model):
            return Strip.blank(width, self.rich_style)
        job_id = self.model.id_at(index)
        row = self.model.rows[job_id]
        segments = self._cells(row, cols)
        base = self.rich_style
        if index == self.cursor:
            base = base + self.get_component_rich_style("jobs-table--cursor")
        out = []
        for i, (text, style) in enumerate(segments):
            if i:
                out.append(Segment(" ", base))
            out.append(Segment(text, base + style if style else base))
        used = sum(w for _, w in cols) + len(cols) - 1
        if used < width:
            out.append(Segment(" " * (width - used), base))
        return Strip(out, width).crop(0, width)

    def _cells(self, row: Row, cols: list[tuple[Column, int]]) -> list[tuple[str, Style | None]]:
        now = self.model.now()
        out: list[tuple[str, Style | None]] = []
        for col, w in cols:
            key = col.key
            style: Style | None = None
            if key == "id":
                text = row.job_id[:12]
                style = _DIM
            elif key == "name":
                text = row.name
            elif key == "state":
                text, style = row.state, _STATE_STYLES.get(row.state)
            elif key == "host":
                text = row.host or "-"
            elif key == "try":
                text = str(row.attempt)
            elif key == "priority":
                text = str(row.priority)
            elif key == "duration":
                text = display.fmt_duration(row.duration(now))
            elif key == "progress":
                text, style = row.progress, _GREEN
            elif key == "metric":
                text = row.metric
            else:  # trend
                trend = self.model.trends.get(row.job_id)
                text, style = (sparkline(trend), _GREEN) if trend else ("", None)
            out.append((set_cell_size(text, w), style))
        return out
