"""Live GPU telemetry for the worker entry: capability.GpuTelemetry on a fake NVML, the agent's
heartbeat reading it, and the WorkerRecord field staying readable both ways."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from trainfleet.agent import agent as agent_module
from trainfleet.agent.agent import Agent, AgentOptions
from trainfleet.agent.capability import GpuTelemetry, apply_overrides, with_free_vram
from trainfleet.broker.schema import SCHEMA_VERSION, Capability, GpuStat, WorkerRecord, decode, encode
from trainfleet.broker.settings import Settings

from .test_capability import GIB, FakeGpu, FakeNvml, FakeNvmlError, gpu_detect


class TelemetryNvml(FakeNvml):
    """FakeNvml plus utilisation and temperature, counting the calls that matter."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[FakeGpu], init_error: str | None = None) -> None:
        super().__init__(gpus, init_error)
        self.util: dict[str, int] = {}  # uuid -> % (absent: the driver does not report it)
        self.temp: dict[str, int] = {}
        self.init_calls = 0
        self.count_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        super().nvmlInit()

    def nvmlDeviceGetCount(self) -> int:
        self.count_calls += 1
        return super().nvmlDeviceGetCount()

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        if str(handle.uuid) not in self.util:
            raise FakeNvmlError("Not Supported")
        return SimpleNamespace(gpu=self.util[str(handle.uuid)], memory=0)

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        if str(handle.uuid) not in self.temp:
            raise FakeNvmlError("Not Supported")
        return self.temp[str(handle.uuid)]


def two_cards() -> TelemetryNvml:
    nvml = TelemetryNvml(
        [
            FakeGpu("NVIDIA H200", "GPU-aaaa", 141 * GIB, 100 * GIB),
            FakeGpu("NVIDIA H200", "GPU-bbbb", 141 * GIB, 140 * GIB),
        ]
    )
    nvml.util = {"GPU-aaaa": 87, "GPU-bbbb": 0}
    nvml.temp = {"GPU-aaaa": 71, "GPU-bbbb": 35}
    return nvml


def test_reads_every_gpu_and_opens_nvml_once(tmp_path: Path) -> None:
    nvml = two_cards()
    cap = gpu_detect(tmp_path, nvml)
    inits, counts = nvml.init_calls, nvml.count_calls  # detect's own
    telemetry = GpuTelemetry(env={}, nvml=nvml)
    stats, reason = telemetry.read(cap.gpus)
    assert reason == ""
    assert [(s.index, s.name, s.uuid) for s in stats] == [
        (0, "NVIDIA H200", "GPU-aaaa"),
        (1, "NVIDIA H200", "GPU-bbbb"),
    ]
    assert [(s.vram_used_gib, s.vram_free_gib, s.vram_total_gib) for s in stats] == [
        (41.0, 100.0, 141.0),
        (1.0, 140.0, 141.0),
    ]
    assert [(s.util_pct, s.temp_c, s.error) for s in stats] == [(87.0, 71.0, ""), (0.0, 35.0, "")]
    # Later heartbeats see the readings move, without opening NVML or enumerating again
    nvml.gpus[0].free = 10 * GIB
    nvml.util["GPU-aaaa"] = 12
    stats, _ = telemetry.read(cap.gpus)
    assert (stats[0].vram_used_gib, stats[0].vram_free_gib, stats[0].util_pct) == (131.0, 10.0, 12.0)
    telemetry.read(cap.gpus)
    assert (nvml.init_calls, nvml.count_calls) == (inits + 1, counts + 1)
    shutdowns = nvml.shutdowns
    telemetry.close()
    assert nvml.shutdowns == shutdowns + 1


def test_a_gpu_that_errors_is_reported_and_the_others_still_read(tmp_path: Path) -> None:
    nvml = two_cards()
    cap = gpu_detect(tmp_path, nvml)
    telemetry = GpuTelemetry(env={}, nvml=nvml)
    nvml.gpus[0].broken = True  # memory info now raises (fallen off the bus, no permission)
    del nvml.util["GPU-bbbb"], nvml.temp["GPU-bbbb"]  # and this one reports no utilisation
    stats, reason = telemetry.read(cap.gpus)
    assert reason == ""
    assert (stats[0].index, stats[0].name, stats[0].error) == (0, "NVIDIA H200", "Insufficient Permissions")
    assert stats[0].util_pct is None and stats[0].vram_total_gib == 141.0  # what the capability knew
    assert (stats[1].error, stats[1].vram_free_gib, stats[1].util_pct, stats[1].temp_c) == ("", 140.0, None, None)
    # A GPU that has gone from NVML's list (matched by UUID) says so
    nvml.gpus[0].broken = False
    telemetry.close()
    nvml.gpus.pop(0)
    stats, _ = telemetry.read(cap.gpus)
    assert stats[0].error == "NVML no longer sees this GPU" and stats[1].error == ""


def test_nvml_that_cannot_start_is_a_reason_and_is_not_retried(tmp_path: Path) -> None:
    nvml = two_cards()
    cap = gpu_detect(tmp_path, nvml)
    nvml.init_error = "Driver Not Loaded"
    telemetry = GpuTelemetry(env={}, nvml=nvml)
    before = nvml.init_calls
    assert telemetry.read(cap.gpus) == ((), "NVML init failed: Driver Not Loaded")
    assert telemetry.read(cap.gpus) == ((), "NVML init failed: Driver Not Loaded")
    assert nvml.init_calls == before + 1


def test_unexpected_nvml_failure_never_escapes(tmp_path: Path) -> None:
    nvml = two_cards()
    cap = gpu_detect(tmp_path, nvml)

    def boom(_handle: object) -> object:
        raise ZeroDivisionError("wrapper bug")

    nvml.nvmlDeviceGetMemoryInfo = boom  # type: ignore[method-assign]
    assert GpuTelemetry(env={}, nvml=nvml).read(cap.gpus) == ((), "gpu telemetry failed: wrapper bug")


def test_no_gpus_never_touches_nvml() -> None:
    nvml = TelemetryNvml([], init_error="must not be called")
    assert GpuTelemetry(env={}, nvml=nvml).read(()) == ((), "")
    assert nvml.init_calls == 0


def test_with_free_vram_keeps_an_override(tmp_path: Path) -> None:
    nvml = two_cards()
    cap = apply_overrides(gpu_detect(tmp_path, nvml), max_vram_gib=24)
    nvml.gpus[0].free = 10 * GIB
    stats, _ = GpuTelemetry(env={}, nvml=nvml).read(cap.gpus)
    fresh = with_free_vram(cap, stats)
    assert [g.vram_free_gib for g in fresh.gpus] == [10.0, 24.0]
    errored = (msgspec.structs.replace(stats[0], error="lost", vram_free_gib=0.0), stats[1])
    assert with_free_vram(cap, errored).gpus[0].vram_free_gib == 24.0  # no reading: unchanged


# --------------------------------------------------------------------------- the agent's heartbeat


def gpu_agent(tmp_path: Path, nvml: TelemetryNvml) -> Agent:
    agent = Agent(Settings(), AgentOptions(handle_signals=False), capability=gpu_detect(tmp_path, nvml))
    agent.telemetry = GpuTelemetry(env={}, nvml=nvml)
    return agent


async def test_heartbeat_puts_telemetry_in_the_worker_entry(tmp_path: Path) -> None:
    nvml = two_cards()
    agent = gpu_agent(tmp_path, nvml)
    nvml.gpus[1].free = 20 * GIB
    await agent._read_gpus()
    record = agent.worker_record()
    assert [s.util_pct for s in record.gpu_stats] == [87.0, 0.0] and record.gpu_stats_reason == ""
    assert record.capability.gpus[1].vram_free_gib == 20.0  # free VRAM for explain/plan follows


async def test_a_hanging_nvml_costs_the_readings_not_the_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "GPU_TELEMETRY_TIMEOUT_S", 0.2)
    nvml = two_cards()
    agent = gpu_agent(tmp_path, nvml)
    release = threading.Event()
    calls = []

    def stuck(_handle: object) -> object:
        calls.append(1)
        release.wait(10)
        raise FakeNvmlError("GPU is lost")

    nvml.nvmlDeviceGetMemoryInfo = stuck  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        await agent._read_gpus()
        await agent._read_gpus()  # a second heartbeat does not pile another read on the stuck one
        assert time.monotonic() - started < 2.0
        assert agent.worker_record().gpu_stats == ()
        assert agent.gpu_stats_reason == "NVML did not answer within 0.2 s"
        assert len(calls) == 1
    finally:
        release.set()
    await asyncio.sleep(0.1)


async def test_cpu_only_agent_has_no_stats_and_never_opens_nvml() -> None:
    nvml = TelemetryNvml([], init_error="must not be called")
    cap = Capability(host_id="cpu-box", cuda_reason="no CUDA: NVML init failed: Driver Not Loaded")
    agent = Agent(Settings(), AgentOptions(handle_signals=False), capability=cap)
    agent.telemetry = GpuTelemetry(env={}, nvml=nvml)
    await agent._read_gpus()
    record = agent.worker_record()
    assert (record.gpu_stats, record.gpu_stats_reason) == ((), "")
    assert nvml.init_calls == 0


# --------------------------------------------------------------------------- the record, old and new


class OldWorkerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """WorkerRecord as it was before gpu_stats (what an older reader decodes with)."""

    host_id: str
    capability: Capability
    classes: tuple[str, ...]
    current_jobs: tuple[str, ...] = ()
    state: str = "idle"
    started_at: float = 0.0
    last_seen: float = 0.0
    pid: int = 0
    schema_version: int = SCHEMA_VERSION


def test_worker_record_with_and_without_gpu_stats_decodes_both_ways() -> None:
    stat = GpuStat(index=0, name="NVIDIA H200", vram_used_gib=41.0, vram_free_gib=100.0, util_pct=87.0)
    new = WorkerRecord(host_id="gpu-box", capability=Capability(host_id="gpu-box"), classes=("cpu",), gpu_stats=(stat,))
    # An older reader ignores the new fields
    old_view = decode(encode(new), OldWorkerRecord)
    assert old_view.host_id == "gpu-box" and old_view.classes == ("cpu",)
    # An entry written by an older agent reads as no telemetry
    written_by_old = encode(OldWorkerRecord(host_id="old-box", capability=Capability(host_id="old-box"), classes=()))
    assert b"gpu_stats" not in written_by_old
    read = decode(written_by_old, WorkerRecord)
    assert (read.host_id, read.gpu_stats, read.gpu_stats_reason) == ("old-box", (), "")
    # And the new one round-trips
    assert decode(encode(new), WorkerRecord) == new
