"""The benchmark suite runs end to end at its smallest size and prints every row beside a baseline.

Behaviour only: no figure is judged here (speed is for BENCHMARKS.md, on a quiet machine).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

EXPECTED_ROWS = [
    "ticket → claimed p50",
    "ticket → claimed p99",
    "claim floor p50",
    "claim floor p99",
    "claim floor, revision in ticket p50",
    "claim floor, revision in ticket p99",
    "ticket → claimed p50 vs claim floor",
    "ticket → claimed p99 vs claim floor",
    "ticket → trainer start p50",
    "ticket → trainer start p99",
    "job end to end (ticket → completed), mean",
    "claim → complete, K=1 agents",
    "claim → complete, K=10 agents",
    "claim → complete, K=100 agents",
    "requeue by full id p50, 300 jobs",
    "requeue by name p99, 300 jobs",
    "manifest sync, 50 new jobs",
    "manifest re-sync, 50 unchanged jobs",
    "artifact upload 1 MiB",
    "artifact download 1 MiB",
    "stock nats-py put 1 MiB",
    "artifact upload 4 MiB @20 ms RTT",
    "artifact download 4 MiB @20 ms RTT",
    "sync publishes/s, sequential (always)",
    "object put 4 MiB, 1 MiB chunks (always)",
    "longest record-write gap, jobs-KV leader killed (worst of 1)",
    "takeover of a killed agent's jobs, leader killed too (worst of 1)",
]


def test_quick_benchmark_prints_a_table_with_every_row_and_its_baseline(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("== results", 1)[1]
    for name in EXPECTED_ROWS:
        assert name in table, f"row {name!r} missing from the final table"

    rows = {r["name"].strip(): r for r in json.loads(out.read_text())["rows"]}
    assert set(EXPECTED_ROWS) <= set(rows)
    # Every figure except the scale run's has a baseline from the same run, and a ratio.
    for name in EXPECTED_ROWS:
        assert rows[name]["baseline"] and rows[name]["ratio"] is not None, name
        assert rows[name]["value"] > 0, name
    # The monitor's row (2k jobs here): started, keys measured, and its header agrees with the KV.
    assert rows["monitor start-up, 2k jobs"]["value"] > 0
    assert rows["monitor key → repaint p99, down, 2k jobs"]["value"] > 0
    counts = rows["monitor header counts vs KV, 2k jobs"]
    assert counts["value"] == 0 and counts["note"].startswith("agree"), counts
    # Every row says how durable the server it measured was (issue 17 item 7), in the table too.
    for row in rows.values():
        assert row["durability"], row["name"]
    assert "| durability" in table
    assert rows["monitor start-up, 2k jobs"]["durability"] != rows["ticket → claimed p50"]["durability"]


def test_scale_run_machinery_completes_every_job_exactly_once(tmp_path):
    # The 100k / 200-agent run in miniature: same code path, separate processes, full verification.
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "scale", "--scale-jobs", "200", "--scale-agents", "20"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("== results", 1)[1]
    assert "scale: jobs lost / doubled" in table
    assert "scale: claim → complete, 20 agents, 200 backlog" in table
