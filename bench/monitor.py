"""Monitor: the Textual monitor over N stored jobs, driven headless by Textual's pilot.

A fresh server is seeded with N jobs (a spec in the specs bucket and a record in the jobs KV
each: most pending, some running, some completed), then the monitor runs in its own process
(``python -m bench.monitor app``: its peak RSS is its own) as ``trainfleet monitor`` would,
in a 160x50 headless terminal. Measured there:

* start-up: from creating ``MonitorApp`` to ``app.loaded`` with all N rows in the table, split
  into mount + connect, loading the specs, watching every record until caught up, the one
  bulk load + sort, and what is left until the bench sees it (plus the first paint after);
* keys under load: while this process makes ~100 record changes a second (CAS updates of
  random jobs: pending → running with progress → completed), how long ``down``, ``pagedown``,
  one sort ``s``, opening the filter prompt, typing a filter and clearing it take: the time
  ``await pilot.press(key)`` takes, and that time up to the end of the screen's next
  repaint when one was still due after the press returned ("→ painted");
* counts: once the changes stop, the model's count per state and the header line against a
  snapshot of the jobs KV (they must agree; a mismatch is printed loudly);
* the monitor process's peak RSS (``resource.getrusage``), beside its RSS before the app.

Targets (issue #14): start-up ≤ 3 s at 10k jobs, every key ≤ 100 ms; the rows' baselines are
those targets, so the ratio is measured / target. ``python -m bench.monitor run --jobs 10000
--profile`` also prints a cProfile of the start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import resource
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats.js.errors

from bench.env import fleet_env, noop_spec
from bench.report import Row, percentile
from trainfleet.broker.connection import Broker
from trainfleet.broker.records import load_records
from trainfleet.broker.schema import JobRecord, JobStatus, encode
from trainfleet.broker.specs import put_spec
from trainfleet.tui.app import FILTER_PAUSE_S, LIVE_FILTER_ROWS

REPO = Path(__file__).resolve().parent.parent
MSG = "@@monitor "  # the app role's lines to this process start with this
SIZE = (160, 50)
STARTUP_TARGET_S = 3.0  # at 10k jobs
KEY_TARGET_S = 0.100
FILTER_TEXT = "state:run"
STATES = ("pending", "claimed", "running", "completed", "failed", "cancelled")


def _label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _rss_mib(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set. Linux's getrusage ru_maxrss
    keeps the parent's high-water mark across fork + exec (it would count the bench's own
    memory), so /proc is read where there is one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- this process: the jobs, the changes -------------------------------------------------------
def _seed_record(job_id: str, i: int, now: float) -> JobRecord:
    """Job ``i`` as stored at start: one in 4 completed, one in 20 running, the rest pending."""
    rec = JobRecord(job_id=job_id, priority=i % 5, offered=("cpu",), created_at=now, updated_at=now, queued_at=now)
    if i % 4 == 1:
        return rec.evolve(
            status=JobStatus.COMPLETED,
            attempt=1,
            claimed_by=f"host-{i % 50}",
            started_at=now - 120,
            finished_at=now - 60 - i % 600,
            metrics={"accuracy": round(0.5 + (i % 97) / 200, 4), "loss": round(1 / (1 + i % 13), 4)},
        )
    if i % 20 == 0:
        return rec.evolve(
            status=JobStatus.RUNNING,
            attempt=1,
            claimed_by=f"host-{i % 50}",
            claimed_at=now - 30,
            started_at=now - 30,
            progress={"step": 1, "total": 4, "metrics": {"loss": 0.9}},
        )
    return rec


async def seed(broker: Broker, n: int, *, concurrency: int = 512) -> dict[str, tuple[JobRecord, int]]:
    """N specs and records, many writes in flight; returns each record and its KV revision."""
    nonce = uuid.uuid4().hex
    now = time.time()
    specs = [noop_spec(i, nonce, name="mon") for i in range(n)]
    records = [_seed_record(s.job_id, i, now) for i, s in enumerate(specs)]
    out: dict[str, tuple[JobRecord, int]] = {}
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await put_spec(broker, specs[i], None)
            out[records[i].job_id] = (records[i], await broker.jobs.create(records[i].job_id, encode(records[i])))

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


def advance(rec: JobRecord, rng: random.Random) -> JobRecord:
    """The next step of a job's life: pending → running (step 1/4) → … → completed."""
    now = time.time()
    if rec.status == JobStatus.PENDING:
        return rec.evolve(
            status=JobStatus.RUNNING,
            attempt=rec.attempt + 1,
            claimed_by=f"host-{rng.randrange(50)}",
            claimed_at=now,
            heartbeat_at=now,
            started_at=now,
            progress={"step": 1, "total": 4, "metrics": {"loss": round(rng.random(), 4)}},
        )
    step = int((rec.progress or {}).get("step", 0))
    if step < 4:
        return rec.evolve(
            heartbeat_at=now, progress={"step": step + 1, "total": 4, "metrics": {"loss": round(rng.random(), 4)}}
        )
    return rec.evolve(
        status=JobStatus.COMPLETED,
        finished_at=now,
        metrics={"accuracy": round(rng.random(), 4), "loss": round(rng.random(), 4)},
    )


class Changer:
    """~``rate`` CAS updates of random unfinished jobs a second, until stopped."""

    def __init__(self, broker: Broker, state: dict[str, tuple[JobRecord, int]], rate: float):
        self.broker, self.state, self.rate = broker, state, rate
        self.open = [j for j, (rec, _) in state.items() if not rec.status.terminal]
        self.made = 0
        self.lost_cas = 0
        self.elapsed = 0.0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        rng = random.Random(14)
        loop = asyncio.get_running_loop()
        start = loop.time()
        due = start
        while not self._stop.is_set() and self.open:
            due = max(due + 1 / self.rate, loop.time() - 0.5)  # catch up at most half a second
            delay = due - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            k = rng.randrange(len(self.open))
            job_id = self.open[k]
            rec, revision = self.state[job_id]
            new = advance(rec, rng)
            try:
                revision = await self.broker.jobs.update(job_id, encode(new), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self.lost_cas += 1  # nobody else writes: would be a bench bug
                continue
            self.state[job_id] = (new, revision)
            self.made += 1
            if new.status.terminal:
                self.open[k] = self.open[-1]
                self.open.pop()
        self.elapsed = loop.time() - start


async def _read(proc: asyncio.subprocess.Process, event: str, timeout_s: float) -> dict[str, Any]:
    """The app role's next message, which must be ``event``."""
    assert proc.stdout is not None

    async def next_msg() -> dict[str, Any]:
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"monitor process ended (rc {await proc.wait()}) before {event!r}")
            text = line.decode(errors="replace")
            if text.startswith(MSG):
                return json.loads(text[len(MSG) :])

    msg = await asyncio.wait_for(next_msg(), timeout_s)
    if msg.get("event") != event:
        raise RuntimeError(f"monitor process said {msg.get('event')!r}, expected {event!r}: {msg}")
    return msg


async def _send(proc: asyncio.subprocess.Process, msg: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(msg) + "\n").encode())
    await proc.stdin.drain()


async def measure(n: int, *, rate: float = 100.0, profile: bool = False, timeout_s: float = 600) -> dict[str, Any]:
    """One run at N jobs: everything the app role reports, plus this side's facts."""
    async with fleet_env(sync_always=False) as env:
        started = time.perf_counter()
        state = await seed(env.broker, n)
        seed_s = time.perf_counter() - started
        argv = [sys.executable, "-m", "bench.monitor", "app", "--url", env.server.url, "--jobs", str(n)]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            *(["--profile"] if profile else []),
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        changer = Changer(env.broker, state, rate)
        task: asyncio.Task[None] | None = None
        try:
            loaded = await _read(proc, "loaded", timeout_s)
            task = asyncio.create_task(changer.run())
            await asyncio.sleep(1.0)  # the keys start with the changes already flowing
            await _send(proc, {"event": "go"})
            keys = await _read(proc, "keys", timeout_s)
            changer.stop()
            await task
            kv = Counter(s.record.status.value for s in (await load_records(env.broker)).values())
            await _send(proc, {"event": "counts", "counts": dict(kv)})
            done = await _read(proc, "done", timeout_s)
            rc = await asyncio.wait_for(proc.wait(), 60)
        finally:
            changer.stop()
            if task is not None and not task.done():
                task.cancel()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    if rc:
        raise RuntimeError(f"monitor process exited {rc}")
    return {
        "jobs": n,
        "seed_s": seed_s,
        "changes": changer.made,
        "change_rate": changer.made / changer.elapsed if changer.elapsed else 0.0,
        "lost_cas": changer.lost_cas,
        "kv_counts": dict(kv),
        **loaded,
        **keys,
        **done,
    }


def rows_of(m: dict[str, Any]) -> list[Row]:
    n = m["jobs"]
    label = _label(n)
    ph = m["phases"]
    load_note = (
        f"mount+connect {ph['connect']:.2f} s, specs {ph['specs']:.2f} s, records {ph['records']:.2f} s, "
        f"bulk load+sort {ph['bulk']:.2f} s, rest {ph['rest']:.2f} s; first paint +{m['first_paint_s'] * 1000:.0f} ms; "
        f"GC {m['startup_gc']['total_s']:.2f} s of it ({m['startup_gc']['full']} full collections)"
    )
    target = "#14's target, at 10k"
    rows = [
        Row("monitor", f"monitor start-up, {label} jobs", m["startup_s"], "s", STARTUP_TARGET_S, target, load_note),
    ]
    for kind, samples in m["latency"].items():
        press, painted = samples["press"], samples["painted"]
        paused = kind.startswith("filter: rows shown") and m["jobs"] > LIVE_FILTER_ROWS
        rows.append(
            Row(
                "monitor",
                f"monitor key → repaint p99, {kind}, {label} jobs",
                percentile(painted, 99) * 1000,
                "ms",
                (FILTER_PAUSE_S + KEY_TARGET_S) * 1000 if paused else KEY_TARGET_S * 1000,
                f"the typing pause ({FILTER_PAUSE_S * 1000:.0f} ms) + #14's target" if paused else "#14's target",
                note=(
                    f"{len(painted)} presses: p50 {percentile(painted, 50) * 1000:.1f} ms, "
                    f"max {max(painted) * 1000:.1f} ms; await pilot.press p50 {percentile(press, 50) * 1000:.0f} / "
                    f"p99 {percentile(press, 99) * 1000:.0f} / max {max(press) * 1000:.0f} ms"
                ),
                extra={"press_s": press, "painted_s": painted},
            )
        )
    gc_keys = m["keys_gc"]
    rows.append(
        Row(
            "monitor",
            f"monitor longest full GC while keys pressed, {label} jobs",
            gc_keys["full_max_s"] * 1000,
            "ms",
            note=f"{gc_keys['full']} full collections, {gc_keys['total_s'] * 1000:.0f} ms in GC in all",
        )
    )
    agree = "agree" if m["counts_match"] else "MISMATCH"
    rows.append(
        Row(
            "monitor",
            f"monitor header counts vs KV, {label} jobs",
            m["count_diff"],
            "jobs off",
            note=(
                f"{agree} after {m['changes']} changes at {m['change_rate']:.0f}/s "
                f"(caught up in {m['converge_s'] * 1000:.0f} ms; header line {'ok' if m['header_ok'] else 'WRONG'})"
            ),
            extra={"kv": m["kv_counts"], "model": m["model_counts"]},
        )
    )
    rows.append(
        Row(
            "monitor",
            f"monitor peak RSS, {label} jobs",
            m["peak_rss_mib"],
            "MiB",
            m["rss_before_mib"],
            "same process before the app",
            note=f"{(m['peak_rss_mib'] - m['rss_before_mib']) * 1024 / n:.1f} KiB per job over the imports",
        )
    )
    return rows


async def run(sizes: list[int], *, rate: float = 100.0, profile: bool = False) -> list[Row]:
    rows: list[Row] = []
    for n in sizes:
        m = await measure(n, rate=rate, profile=profile)
        if not m["counts_match"] or not m["header_ok"]:
            print(
                f"!!! MONITOR COUNTS MISMATCH at {n} jobs: KV {m['kv_counts']} vs model {m['model_counts']} "
                f"(header: {m['header']!r})",
                file=sys.stderr,
                flush=True,
            )
        print(
            f"monitor {_label(n)}: seeded in {m['seed_s']:.1f} s; start-up {m['startup_s']:.2f} s "
            f"({m['startup_s'] / STARTUP_TARGET_S:.2f}x the 3 s target); peak RSS {m['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
        rows += rows_of(m)
    return rows


# -- the monitor's process ---------------------------------------------------------------------
def _emit(event: str, **body: Any) -> None:
    sys.stdout.write(MSG + json.dumps({"event": event, **body}) + "\n")
    sys.stdout.flush()


async def _stdin() -> dict[str, Any]:
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line:
        raise RuntimeError("the bench went away")
    return json.loads(line)


def _key_plan(rng: random.Random) -> list[tuple[str, str]]:
    """(kind, key) in the order pressed: 50 downs with 5 page-downs among them, one sort, then
    a filter opened, typed, kept (a few downs in the filtered view) and cleared."""
    plan = [("down", "down")] * 50 + [("pagedown", "pagedown")] * 5
    rng.shuffle(plan)
    plan.append(("sort s", "s"))
    plan.append(("filter: open /", "slash"))
    plan += [("filter: type a char", c) for c in FILTER_TEXT]
    # No key: from the last character typed until the table shows the filtered rows (above
    # tui.app.LIVE_FILTER_ROWS the filter waits for the typing to pause, FILTER_PAUSE_S).
    plan.append(("filter: rows shown after the last char", ""))
    plan.append(("filter: enter (keep)", "enter"))
    plan += [("down", "down")] * 5
    plan.append(("filter: esc (clear)", "escape"))
    return plan


def _effect(app: Any, kind: str, key: str) -> Any:
    """A predicate that holds once ``key``'s effect is in the app's state (taken before the press)."""
    table, model, prompt = app.jobs_table, app.model, app.prompt
    if kind == "filter: type a char":  # the character shows in the prompt
        want = prompt.value + key
        return lambda: prompt.value == want
    if kind.startswith("filter: rows shown"):
        want = FILTER_TEXT.strip()  # set up before the last character is typed
        applied: list[int] = []  # the model's version when the filter was first seen applied

        def shows() -> bool:
            if model.query.text != want:
                return False
            if not applied:
                applied.append(model.version)
            return table._drawn_version >= applied[0]  # the table has synced with it since

        return shows
    if key in ("down", "pagedown"):
        before = table.cursor
        return lambda: table.cursor != before
    if key == "s":
        before = model.sort
        return lambda: model.sort != before
    if key == "slash":
        return lambda: app.focused is prompt
    if key == "enter":
        return lambda: app.focused is not prompt
    if key == "escape":
        return lambda: not model.query
    raise ValueError(f"no effect known for {key!r}")


class Paints:
    """Stamps the end of every repaint of the main screen, and the first one that shows a key's
    effect (its predicate held when the paint began, so the paint drew it)."""

    def __init__(self, screen: Any):
        self.times: list[float] = []
        self.effect: Any = None
        self.shown_at: float | None = None
        # A second effect watched alongside (what the keys so far lead to, e.g. the filtered rows).
        self.also: Any = None
        self.also_at: float | None = None
        refresh = screen._compositor_refresh

        def stamped() -> None:
            shows = self.effect is not None and self.shown_at is None and self.effect()
            also = self.also is not None and self.also_at is None and self.also()
            refresh()
            now = time.perf_counter()
            self.times.append(now)
            if shows:
                self.shown_at = now
            if also:
                self.also_at = now

        screen._compositor_refresh = stamped  # the instance's own: Textual calls self._compositor_refresh()

    def expect(self, effect: Any) -> None:
        self.effect, self.shown_at = effect, None


@contextlib.asynccontextmanager
async def _started(app: Any, jobs: int, profile: bool) -> AsyncIterator[tuple[float, float, float, Paints, Any]]:
    """Runs the app until every row is in the table: (created at, ready at, first paint after ready,
    the paints, the pilot); the app runs until the block ends."""
    import cProfile
    import pstats

    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    async with app.run_test(size=SIZE) as pilot:
        paints = Paints(app.screen)
        while not (app.loaded and app.jobs_table.row_count == jobs):
            if app.error is not None:
                raise RuntimeError(f"monitor could not start: {app.error}")
            await asyncio.sleep(0.002)
        ready = time.perf_counter()
        while not paints.times or paints.times[-1] <= ready:
            await asyncio.sleep(0.001)
        if prof:
            prof.disable()
            stats = pstats.Stats(prof, stream=sys.stderr)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("tottime").print_stats(25)
        yield t0, ready, paints.times[-1] - ready, paints, pilot


async def _keys(app: Any, pilot: Any, paints: Paints) -> dict[str, dict[str, list[float]]]:
    """Each key of the plan pressed with the changes flowing: (press, painted) seconds by kind."""
    rng = random.Random(6)
    latency: dict[str, dict[str, list[float]]] = {}
    plan = _key_plan(rng)
    started = pressed = time.perf_counter()
    for i, (kind, key) in enumerate(plan):
        if not key:  # the effect of the key before, watched since its press (see `also`)
            deadline = time.perf_counter() + 2.0
            while paints.also_at is None and time.perf_counter() < deadline:
                await asyncio.sleep(0.0005)
            if paints.also_at is None:
                raise RuntimeError(f"no repaint showed {kind} within 2 s (filter {app.model.query.text!r})")
            got = latency.setdefault(kind, {"press": [], "painted": []})
            got["press"].append(pressed - started)
            got["painted"].append(paints.also_at - started)
            paints.also = None
            continue
        await asyncio.sleep(rng.uniform(0.03, 0.08))  # a fast typist, not a loop
        paints.expect(_effect(app, kind, key))
        if i + 1 < len(plan) and not plan[i + 1][1]:
            paints.also, paints.also_at = _effect(app, plan[i + 1][0], ""), None
        started = time.perf_counter()
        await pilot.press(key)
        pressed = time.perf_counter()
        deadline = pressed + 2.0
        while paints.shown_at is None and time.perf_counter() < deadline:
            await asyncio.sleep(0.0005)
        if paints.shown_at is None:
            raise RuntimeError(
                f"no repaint showed the effect of {key!r} ({kind}) within 2 s of the press "
                f"(focus {app.focused!r}, prompt {app.prompt.value!r}, filter {app.model.query.text!r}, "
                f"sort {app.model.sort}, cursor {app.jobs_table.cursor})"
            )
        got = latency.setdefault(kind, {"press": [], "painted": []})
        got["press"].append(pressed - started)
        got["painted"].append(paints.shown_at - started)
        paints.expect(None)
    return latency


async def _counts(app: Any, kv: dict[str, int], tick_s: float) -> dict[str, Any]:
    """The model's counts per state and the header line against the KV's (after the changes)."""
    started = time.perf_counter()

    def model_counts() -> dict[str, int]:
        return {k: v for k, v in app.model.counts.items() if v}

    while model_counts() != kv and time.perf_counter() - started < 10.0:
        await asyncio.sleep(0.005)
    converge = time.perf_counter() - started
    await asyncio.sleep(2.5 * tick_s)  # the header follows on the next tick
    counts = model_counts()
    header = str(app.query_one("#summary").render())
    want = [f"{sum(kv.values()):,} jobs"] + [f"{s} {kv[s]:,}" for s in STATES if s in kv]
    return {
        "counts_match": counts == kv,
        "count_diff": sum(abs(kv.get(s, 0) - counts.get(s, 0)) for s in set(kv) | set(counts)),
        "model_counts": counts,
        "header": header,
        "header_ok": all(part in header for part in want),
        "converge_s": converge,
    }


def _gc_summary(pauses: list[tuple[float, int]]) -> dict[str, float]:
    full = [d for d, gen in pauses if gen == 2]
    return {
        "total_s": sum(d for d, _ in pauses),
        "full": len(full),
        "full_max_s": max(full, default=0.0),
        "full_total_s": sum(full),
    }


async def app_role(url: str, jobs: int, profile: bool) -> None:
    import trainfleet.tui.app as app_mod
    from trainfleet.broker.settings import Settings

    stamps: dict[str, float] = {}
    load_specs = app_mod.load_specs

    async def timed_load_specs(broker: Broker) -> Any:
        stamps.setdefault("specs_start", time.perf_counter())
        try:
            return await load_specs(broker)
        finally:
            stamps.setdefault("specs_end", time.perf_counter())

    app_mod.load_specs = timed_load_specs  # this process only: to split the start-up

    class TimedMonitor(app_mod.MonitorApp):
        def _load(self, start: dict[str, JobRecord]) -> None:
            stamps.setdefault("load_start", time.perf_counter())
            super()._load(start)
            stamps.setdefault("load_end", time.perf_counter())

    pauses: list[tuple[float, int]] = []  # (seconds, generation) of every garbage collection
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            pauses.append((time.perf_counter() - gc_started[0], info["generation"]))

    gc.callbacks.append(on_gc)
    rss_before = _rss_mib("VmRSS")
    app = TimedMonitor(Settings(url=url))
    async with _started(app, jobs, profile) as (t0, ready, first_paint, paints, pilot):
        phases = {
            "connect": stamps["specs_start"] - t0,
            "specs": stamps["specs_end"] - stamps["specs_start"],
            "records": stamps["load_start"] - stamps["specs_end"],
            "bulk": stamps["load_end"] - stamps["load_start"],
            "rest": ready - stamps["load_end"],
        }
        _emit("loaded", startup_s=ready - t0, phases=phases, first_paint_s=first_paint)
        startup_gc = _gc_summary(pauses)
        await _stdin()  # go: the changes are flowing
        del pauses[:]
        latency = await _keys(app, pilot, paints)
        _emit("keys", latency=latency, cursor=app.jobs_table.cursor, startup_gc=startup_gc, keys_gc=_gc_summary(pauses))
        kv = {k: v for k, v in (await _stdin())["counts"].items() if v}
        counts = await _counts(app, kv, app_mod.TICK_S)
        await pilot.press("q")
    _emit("done", **counts, peak_rss_mib=_rss_mib(), rss_before_mib=rss_before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.monitor")
    parser.add_argument("role", choices=["run", "app"], help="run: the benchmark; app: the monitor's process")
    parser.add_argument("--jobs", type=int, nargs="+", default=[10_000])
    parser.add_argument("--url", help="app: the server")
    parser.add_argument("--rate", type=float, default=100.0, help="run: record changes a second")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the start-up (stderr)")
    args = parser.parse_args(argv)
    if args.role == "app":
        asyncio.run(app_role(args.url, args.jobs[0], args.profile))
        return 0
    from bench.report import format_table

    rows = asyncio.run(run(args.jobs, rate=args.rate, profile=args.profile))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
