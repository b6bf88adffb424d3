"""Capability gating: every job lands on a host that can run it; none waits on one that never will.

Agents here declare their capability (fake GPUs included) and run real trainers on one real
nats-server; the ticket routing, the agent's checks and explain/plan are the production code.
"""

from __future__ import annotations

import asyncio

from trainfleet.broker.jobs import get_job
from trainfleet.broker.schema import GpuInfo, JobStatus, WorkerRecord
from trainfleet.broker.workers import load_workers
from trainfleet.controller.explain import explain_job, plan_manifest
from trainfleet.controller.view import render_explain, render_plan

from .conftest import LINREG_MODEL, fake_capability, linreg_manifest, records, wait_for, wait_terminal

MEDIUM = 12_000


def gpu(index: int, total: float = 24.0, free: float = 22.0) -> GpuInfo:
    return GpuInfo(
        index=index,
        name="Fake A10",
        uuid=f"GPU-fake-{index}",
        vram_total_gib=total,
        vram_free_gib=free,
        compute_capability="8.6",
    )


def gpu_host(host_id: str, *gpus: GpuInfo, **kw) -> object:
    return fake_capability(
        host_id, gpus=gpus or (gpu(0),), cuda_reason="", driver_version="580.0", cuda_version="13.0", **kw
    )


async def wait_reason(broker, job_id: str, text: str, timeout_s: float = 30):
    async def has_reason():
        rec = (await records(broker))[job_id]
        return rec if text in (rec.reason or "") else None

    return await wait_for(has_reason, timeout_s, what=f"reason containing {text!r}")


async def test_require_cuda_runs_only_on_a_gpu_host_with_the_gpu_it_was_given(fleet, broker):
    manifest = linreg_manifest(2, job_extra="require_cuda = true\n")
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("laptop")
    fleet.start_agent("ws", gpu_host("ws"))
    recs = await wait_terminal(broker, [s.job_id for s in manifest.jobs])
    for rec in recs.values():
        assert rec.status == JobStatus.COMPLETED and rec.claimed_by == "ws" and rec.klass == "gpu.0"
        assert rec.device == "gpu:0 GPU-fake-0"


async def test_min_vram_is_checked_against_free_vram_and_the_reason_is_recorded(fleet, broker, settings):
    manifest = linreg_manifest(1, job_extra="require_cuda = true\nmin_vram_gib = 8\n")
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    # A 24 GiB card with only 4 GiB free: it pulls the gpu.8 class but must decline
    fleet.start_agent("busy", gpu_host("busy", gpu(0, total=24, free=4)))
    rec = await wait_reason(broker, job_id, "min_vram_gib 8")
    assert rec.status == JobStatus.PENDING and rec.klass == "gpu.8"
    job = await get_job(broker, job_id)
    matches = explain_job(job, await load_workers(broker), stale_after_s=30)
    assert [(m.host_id, m.eligible) for m in matches] == [("busy", False)]
    assert "free VRAM" in render_explain(job, matches)
    # A card with room takes it
    fleet.start_agent("roomy", gpu_host("roomy", gpu(0, total=24, free=20)))
    rec = (await wait_terminal(broker, [job_id]))[job_id]
    assert rec.status == JobStatus.COMPLETED and rec.claimed_by == "roomy"


async def test_ram_and_core_minimums_route_to_the_host_that_has_them(fleet, broker):
    manifest = linreg_manifest(1, prefix="ram", job_extra="min_ram_gib = 8\n")
    manifest2 = linreg_manifest(1, prefix="cores", job_extra="min_cores = 4\n")
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    await ctl.sync(manifest2)
    ram_job, core_job = manifest.jobs[0].job_id, manifest2.jobs[0].job_id
    fleet.start_agent("pi", fake_capability("pi", ram_available_gib=2.0, cores_usable=1.0))
    await wait_reason(broker, ram_job, "min_ram_gib 8")
    await wait_reason(broker, core_job, "min_cores 4")
    fleet.start_agent("big", fake_capability("big", ram_available_gib=64.0, cores_usable=16.0))
    recs = await wait_terminal(broker, [ram_job, core_job])
    assert {r.claimed_by for r in recs.values()} == {"big"}


async def test_allowed_and_denied_hosts(fleet, broker):
    pinned = linreg_manifest(1, prefix="pinned", job_extra='allowed_hosts = ["b"]\n')
    either = linreg_manifest(2, prefix="either", job_extra='allowed_hosts = ["b", "c"]\n')
    denied = linreg_manifest(2, prefix="denied", job_extra='denied_hosts = ["a", "c"]\n')
    ctl = await fleet.start_controller()
    for m in (pinned, either, denied):
        await ctl.sync(m)
    for host in ("a", "b", "c"):
        fleet.start_agent(host)
    ids = [s.job_id for m in (pinned, either, denied) for s in m.jobs]
    recs = await wait_terminal(broker, ids, timeout_s=90)
    assert recs[pinned.jobs[0].job_id].klass == "host.b" and recs[pinned.jobs[0].job_id].claimed_by == "b"
    assert all(recs[s.job_id].claimed_by in ("b", "c") for s in either.jobs)
    assert all(recs[s.job_id].claimed_by == "b" for s in denied.jobs)
    assert all(r.status == JobStatus.COMPLETED for r in recs.values())


async def test_manifest_host_policy_and_overrides_are_more_restrictive_than_detection(fleet, broker):
    hosts = '[hosts.pi]\ndeny_jobs = ["linreg"]\n[hosts.box]\nmax_ram_gib = 1.0\n'
    manifest = linreg_manifest(1, extra=hosts)
    heavy = linreg_manifest(1, prefix="heavy", extra=hosts, job_extra="min_ram_gib = 4\n")
    job_id, heavy_id = manifest.jobs[0].job_id, heavy.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(heavy)
    await ctl.sync(manifest)  # the controller's manifest now holds both host sections
    # The pi is denied the linreg model by policy; the box detects 12 GiB but the manifest caps it at 1
    pi = fleet.start_agent("pi")
    box = fleet.start_agent("box")
    await wait_reason(broker, heavy_id, "min_ram_gib 4")
    rec = (await wait_terminal(broker, [job_id]))[job_id]
    assert rec.claimed_by == "box"
    assert box.capability.ram_available_gib == 1.0 and pi.capability.ram_available_gib == 12.0
    heavy_job = await get_job(broker, heavy_id)
    assert heavy_job.record.status == JobStatus.PENDING
    matches = {m.host_id: m for m in explain_job(heavy_job, await load_workers(broker), stale_after_s=30)}
    assert any("deny_jobs" in r for r in matches["pi"].reasons)
    assert any("min_ram_gib" in r for r in matches["box"].reasons)


async def test_prefer_cuda_goes_to_gpu_first_and_to_cpu_after_the_grace_window(fleet, broker):
    grace = "[settings]\nprefer_cuda_grace_s = 5.0\n"
    gpu_first = linreg_manifest(1, prefix="gpufirst", extra=grace, job_extra="prefer_cuda = true\n")
    ctl = await fleet.start_controller()
    fleet.start_agent("ws", gpu_host("ws"))
    await wait_for(lambda: _workers(broker, 1), 20, what="the GPU host to register")
    await ctl.sync(gpu_first)
    rec = (await wait_terminal(broker, [gpu_first.jobs[0].job_id]))[gpu_first.jobs[0].job_id]
    assert rec.claimed_by == "ws" and rec.device.startswith("gpu:0") and rec.offered == ("gpu.0",)
    await fleet.stop_agent("ws")
    # No GPU host now: a CPU host gets it only once the grace window has passed
    later = linreg_manifest(1, prefix="later", extra=grace, job_extra="prefer_cuda = true\n")
    await ctl.sync(later)
    fleet.start_agent("laptop")
    job_id = later.jobs[0].job_id
    rec = (await wait_terminal(broker, [job_id]))[job_id]
    assert rec.claimed_by == "laptop" and rec.offered == ("gpu.0", "cpu") and rec.device == "cpu"
    assert rec.claimed_at - rec.queued_at >= 5.0  # not before the grace window


async def test_higher_priority_starts_first_when_agents_are_scarce(fleet, broker):
    low = linreg_manifest(5, prefix="low", epochs=200)
    ctl = await fleet.start_controller()
    await ctl.sync(low)
    high = linreg_manifest(2, prefix="high", epochs=200, job_extra="priority = 10\n")
    await ctl.sync(high)  # published after the low ones: behind them in the queue...
    await ctl.reconcile()  # ...until the controller reorders the class
    fleet.start_agent("only")
    ids = [s.job_id for m in (low, high) for s in m.jobs]
    recs = await wait_terminal(broker, ids, timeout_s=90)
    order = sorted(recs.values(), key=lambda r: r.started_at)
    assert [r.priority for r in order[:2]] == [10, 10], [r.job_id[:12] for r in order]


async def test_a_multi_gpu_host_runs_one_job_per_gpu_plus_cpu_jobs(fleet, broker):
    gpu_jobs = linreg_manifest(2, prefix="g", epochs=MEDIUM, job_extra="require_cuda = true\n")
    cpu_jobs = linreg_manifest(1, prefix="c", epochs=MEDIUM)
    ctl = await fleet.start_controller()
    await ctl.sync(gpu_jobs)
    await ctl.sync(cpu_jobs)
    agent = fleet.start_agent("dual", gpu_host("dual", gpu(0), gpu(1)), cpu_slots=1)

    async def three_running():
        recs = [r for r in (await records(broker)).values() if r.status == JobStatus.RUNNING]
        return recs if len(recs) == 3 else None

    running = await wait_for(three_running, 60, what="3 jobs running at once on one host")
    assert sorted(r.device for r in running) == ["cpu", "gpu:0 GPU-fake-0", "gpu:1 GPU-fake-1"]
    assert len(agent.running) == 3
    await wait_terminal(broker, [s.job_id for m in (gpu_jobs, cpu_jobs) for s in m.jobs])


async def test_an_ineligible_agent_naks_with_a_delay_never_in_a_hot_loop(fleet, broker, settings):
    manifest = linreg_manifest(1, job_extra="min_ram_gib = 1000\n")
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("small1")
    fleet.start_agent("small2")
    await wait_reason(broker, manifest.jobs[0].job_id, "min_ram_gib 1000")
    before = await broker.js.consumer_info(broker.names.jobs_stream, broker.names.consumer("cpu"))
    window_s = 4.0
    await asyncio.sleep(window_s)
    after = await broker.js.consumer_info(broker.names.jobs_stream, broker.names.consumer("cpu"))
    deliveries = after.delivered.consumer_seq - before.delivered.consumer_seq
    # Each NAK delays redelivery by nak_delay_s: at most one delivery per delay (+1 in flight)
    most = window_s / settings.nak_delay_s + 1
    assert 0 < deliveries <= most, f"{deliveries} deliveries in {window_s}s"


async def test_plan_warns_about_jobs_no_registered_host_can_ever_run(fleet, broker):
    fleet.start_agent("laptop")
    fleet.start_agent("ws", gpu_host("ws", gpu(0, total=24, free=1)))
    await wait_for(lambda: _workers(broker, 2), 20, what="2 workers registered")
    manifest = linreg_manifest(1, prefix="ok")
    huge = linreg_manifest(1, prefix="huge", job_extra="require_cuda = true\nmin_vram_gib = 80\n")
    busy = linreg_manifest(1, prefix="busynow", job_extra="require_cuda = true\nmin_vram_gib = 16\n")
    workers = await load_workers(broker)
    plans = {p.name: p for m in (manifest, huge, busy) for p in plan_manifest(m, workers)}
    assert sorted(plans["ok-0"].hosts) == ["laptop", "ws"]
    assert plans["huge-0"].hosts == [] and not plans["huge-0"].runnable
    assert plans["busynow-0"].hosts == ["ws"]  # 1 GiB free now, but 24 GiB when the card is idle
    text = render_plan(list(plans.values()))
    assert "warning: 1 job(s) no registered host can ever run: huge-0" in text


async def _workers(broker, n: int) -> list[WorkerRecord] | None:
    workers = await load_workers(broker)
    return workers if len(workers) >= n else None


async def test_explain_names_the_failing_constraint_for_each_worker(fleet, broker):
    manifest = linreg_manifest(1, job_extra='require_cuda = true\ndenied_hosts = ["ws2"]\n')
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("laptop")
    fleet.start_agent("ws2", gpu_host("ws2"))
    await wait_for(lambda: _workers(broker, 2), 20)
    job = await get_job(broker, manifest.jobs[0].job_id)
    matches = {m.host_id: m for m in explain_job(job, await load_workers(broker), stale_after_s=30)}
    assert any("require_cuda" in r for r in matches["laptop"].reasons)
    assert any("does not pull class gpu.0" in r for r in matches["laptop"].reasons)
    assert matches["ws2"].reasons == ("denied_hosts includes ws2",)
    assert "no live worker can run this job now" in render_explain(job, list(matches.values()))


async def test_explain_and_plan_from_the_command_line(fleet, broker, settings, tmp_path):
    from .test_cli import arun_cli

    manifest = linreg_manifest(1, job_extra="min_ram_gib = 500\n")
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("laptop")
    await wait_reason(broker, manifest.jobs[0].job_id, "min_ram_gib 500")
    code, out, _ = await arun_cli("explain", "lr-0", url=settings.url)
    assert code == 1 and "laptop" in out and "min_ram_gib 500" in out and "no live worker" in out
    code, out, _ = await arun_cli("explain", "lr-0", "--json", url=settings.url)
    data = __import__("json").loads(out)
    assert data["workers"][0]["host_id"] == "laptop" and data["workers"][0]["eligible"] is False
    # plan: the same job can never run on the registered hosts; --check turns that into exit 1
    path = tmp_path / "m.toml"
    path.write_text(
        "schema_version = 1\n"
        + LINREG_MODEL
        + '[[jobs]]\nname = "big"\nmodel = "linreg"\nmode = "gd"\nmin_ram_gib = 500\n'
        + '[[jobs]]\nname = "small"\nmodel = "linreg"\nmode = "gd"\nseed = 1\n'
    )
    code, out, _ = await arun_cli("plan", str(path), url=settings.url)
    assert code == 0 and "warning: 1 job(s) no registered host can ever run: big" in out
    code, _, _ = await arun_cli("plan", str(path), "--check", url=settings.url)
    assert code == 1


async def test_host_policy_matches_models_and_job_names_by_their_own_keys_and_explain_names_the_rule(fleet, broker):
    # allow_jobs = ["gbm"] admits the model gbm, never a linreg job that happens to be NAMED gbm-0
    hosts = '[hosts.pi]\nallow_jobs = ["gbm"]\n[hosts.box]\ndeny_job_names = ["gbm-*"]\n'
    manifest = linreg_manifest(1, prefix="gbm", extra=hosts)
    job_id = manifest.jobs[0].job_id
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent("pi")
    fleet.start_agent("box")
    fleet.start_agent("spare")
    rec = (await wait_terminal(broker, [job_id]))[job_id]
    assert rec.status == JobStatus.COMPLETED and rec.claimed_by == "spare"
    job = await get_job(broker, job_id)
    matches = {m.host_id: m for m in explain_job(job, await load_workers(broker), stale_after_s=30)}
    assert matches["pi"].reasons == ("host policy of pi: allow_jobs [\"gbm\"] does not match model 'linreg'",)
    assert matches["box"].reasons == ("host policy of box: deny_job_names pattern 'gbm-*' matches job 'gbm-0'",)
    assert matches["spare"].eligible
    text = render_explain(job, list(matches.values()))
    assert "allow_jobs" in text and "deny_job_names" in text
