"""Result rows, percentiles and the final table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# The shipped setting: JetStream file store, every stored message fsynced before its ack.
SHIPPED = "file, sync always"
# Benches whose server runs otherwise (the rest run fleet_env's default: the shipped setting).
BENCH_DURABILITY = {
    "monitor": "file, sync 2 min (default)",  # it measures the monitor, not the disk
    "durability": "always vs default",
    "failover": "R3 cluster, sync always",
}


@dataclass
class Row:
    """One measured figure and the baseline it is judged against (same run, same machine)."""

    bench: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # The server's durability for this row ("" = the bench's usual setting: BENCH_DURABILITY).
    durability: str = ""

    @property
    def storage(self) -> str:
        """How durable the writes this row measures were: every row says it (issue 17 item 7)."""
        return self.durability or BENCH_DURABILITY.get(self.bench, SHIPPED)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline or math.isnan(self.value):
            return None
        return self.value / self.baseline

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["durability"] = self.storage
        return out


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 50 samples is the largest but none: honest for small n)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def median(samples: Iterable[float]) -> float:
    values = list(samples)
    return statistics.median(values) if values else math.nan


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if abs(value) >= 100 or float(value).is_integer():
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table: benchmark, measured, baseline, measured/baseline, note."""
    header = ("benchmark", "measured", "baseline", "ratio", "durability", "note")
    lines = []
    for row in rows:
        base = f"{_fmt(row.baseline, row.unit)} ({row.baseline_label})" if row.baseline is not None else "—"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "—"
        lines.append((row.name, _fmt(row.value, row.unit), base, ratio, row.storage, row.note))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in lines]
    return "\n".join(out)
