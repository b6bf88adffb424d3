"""On a real NVIDIA GPU (skipped where NVML sees none): detection, a CUDA job, a job too big to fit.

Run on a GPU host with `python -m pytest tests/test_gpu.py -s`; it prints what it saw, for
the record. Everything here is the production path: real NVML, real torch, real nats-server.
"""

from __future__ import annotations

import json

import pytest

from trainfleet.agent.capability import detect, render_text
from trainfleet.broker.jobs import get_job
from trainfleet.broker.schema import JobStatus
from trainfleet.broker.workers import load_workers
from trainfleet.controller.explain import explain_job
from trainfleet.controller.manifest import parse_manifest
from trainfleet.controller.view import render_explain

from .conftest import wait_for, wait_terminal

# NVML first (fast); the torch cross-check subprocess only where there is a GPU at all.
CAP = detect(probe_torch=False)
if CAP.has_cuda:
    CAP = detect(probe_torch=True)
pytestmark = pytest.mark.skipif(
    not CAP.has_cuda or not CAP.torch_cuda,
    reason=f"needs an NVIDIA GPU usable by torch ({CAP.cuda_reason or 'torch has no CUDA'})",
)

MLP = """
schema_version = 1
[models.mlp]
command = ["{python}", "-m", "trainfleet.examples.torch_mlp"]
modes = ["classify"]
requires = ["torch"]
[models.mlp.hyper.epochs]
type = "int"
default = 5
"""


def test_detection_sees_the_gpu():
    print("\n" + render_text(CAP))
    gpu = CAP.gpus[0]
    assert gpu.vram_total_gib > 1 and 0 < gpu.vram_free_gib <= gpu.vram_total_gib
    assert gpu.uuid.startswith("GPU-") and gpu.compute_capability and CAP.driver_version


async def test_a_require_cuda_job_trains_on_the_gpu_and_a_too_big_one_waits(fleet, broker):
    vram = CAP.vram_total_gib
    manifest = parse_manifest(
        MLP
        + f"""
[[jobs]]
name = "on-gpu"
model = "mlp"
mode = "classify"
require_cuda = true
[[jobs]]
name = "too-big"
model = "mlp"
mode = "classify"
seed = 1
require_cuda = true
min_vram_gib = {vram + 1:.0f}
""",
        file="gpu.toml",
    )
    on_gpu, too_big = (s.job_id for s in manifest.jobs)
    ctl = await fleet.start_controller()
    await ctl.sync(manifest)
    fleet.start_agent(CAP.host_id, CAP)
    rec = (await wait_terminal(broker, [on_gpu], timeout_s=300))[on_gpu]
    assert rec.status == JobStatus.COMPLETED, rec.last_error
    assert rec.device.startswith("gpu:0 GPU-") and rec.metrics["device"].startswith("cuda")
    print(f"\non-gpu: {rec.device} metrics={json.dumps(rec.metrics)}")
    # The big job's tier is above what this card can serve: nobody pulls it; explain says why
    big = await get_job(broker, too_big)
    assert big.record.status == JobStatus.PENDING
    workers = await wait_for(lambda: load_workers(broker), 30)
    matches = explain_job(big, workers, stale_after_s=60)
    text = render_explain(big, matches)
    print(text)
    assert not any(m.eligible for m in matches) and "free VRAM" in text
