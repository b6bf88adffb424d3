"""What every monitor screen shares: the fleet as the monitor sees it, and the yes/no question.

``FleetView`` is filled by the main screen (a watch of the jobs KV, the specs, live progress)
and handed to the screens pushed over it (job detail, worker detail), so they read the same
state instead of loading their own. ``read_only`` is true under the viewer role: screens then
hide their actions instead of offering ones the server would refuse.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from trainfleet.broker.connection import Broker
from trainfleet.broker.control import request
from trainfleet.broker.logs import LiveProgress
from trainfleet.broker.roles import inbox_prefix
from trainfleet.broker.schema import JobRecord, JobSpec
from trainfleet.broker.settings import Settings


def is_viewer(settings: Settings) -> bool:
    """Whether these settings connect as the viewer role (its own reply inbox gives it away)."""
    return settings.inbox_prefix == inbox_prefix("viewer")


@dataclass
class FleetView:
    """The fleet as the monitor knows it: records and specs by job id, live progress."""

    broker: Broker
    records: dict[str, JobRecord] = field(default_factory=dict)
    specs: dict[str, JobSpec] = field(default_factory=dict)
    live: LiveProgress = field(default_factory=LiveProgress)
    read_only: bool = False
    # The clock every "how long ago" is measured with (snapshot tests fix it).
    now: Callable[[], float] = time.time

    def name_of(self, job_id: str) -> str:
        spec = self.specs.get(job_id)
        return spec.name if spec else job_id[:12]

    async def control(self, verb: str, job_id: str, timeout_s: float = 10.0, **body: Any) -> Any:
        """A control request (cancel, requeue, explain…) about one job; raises TrainfleetError."""
        return await request(self.broker.nc, self.broker.names, verb, {"job": job_id, **body}, timeout_s=timeout_s)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question over the monitor; dismisses with the answer."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 64; height: auto; border: thick $warning; background: $surface;
                               padding: 1 2; }
    ConfirmScreen Horizontal { height: auto; align: center middle; margin-top: 1; }
    ConfirmScreen Button { margin: 0 2; }
    """
    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            with Horizontal():
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
