"""The example trainers, run as real subprocesses the way an agent runs them.

Each trainer run costs a few seconds (mostly importing torch / scikit-learn), so each
test makes its runs count: one run checks learning, files, progress and the CLI
spellings together.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainfleet.agent import progress

TORCH_MLP = "trainfleet.examples.torch_mlp"
SKLEARN_GBM = "trainfleet.examples.sklearn_gbm"
RUN_TIMEOUT_S = 120
# Keys whose values legitimately differ between two runs with the same seed.
UNSTABLE_METRICS = {"train_seconds"}


def run_trainer(
    module: str, *args: str, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args`` with a clean, single-threaded trainer environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**base, "OMP_NUM_THREADS": "1", **(env or {})},
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def run_with_progress(module: str, *args: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    """Run a trainer with a progress pipe, as the agent does; return the run and its reports."""
    read_fd, write_fd = os.pipe()
    try:
        done = run_trainer(module, *args, env={progress.PROGRESS_FD_ENV: str(write_fd)}, pass_fds=(write_fd,))
        os.close(write_fd)
        write_fd = -1
        # The trainer has exited, so its few lines all sit in the pipe's buffer.
        with os.fdopen(read_fd, "rb") as reader:
            read_fd = -1
            data = reader.read()
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
    return done, progress.read_progress_lines(data)


def read_metrics(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "metrics.json").read_text())


def assert_succeeded(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"


def assert_progress_counts_up(events: list[dict], steps: list[int], total: int, keys: set[str]) -> None:
    assert [e["step"] for e in events] == steps
    assert {e["total"] for e in events} == {total}
    for event in events:
        assert keys <= set(event["metrics"])
        assert all(isinstance(v, int | float) for v in event["metrics"].values())
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)


def stable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in UNSTABLE_METRICS}


# --- torch_mlp ----------------------------------------------------------------------


def test_torch_classify_learns_reports_each_epoch_and_repeats_with_the_same_seed(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from trainfleet.examples.torch_mlp import build_model

    # Given two runs with the same seed, one under a progress pipe, one with dashed flags
    common = ("--mode", "classify", "--seed", "3", "--epochs", "3", "--hidden", "32")
    first, events = run_with_progress(TORCH_MLP, *common, "--batch_size", "32", "--out", str(tmp_path / "a"))
    second = run_trainer(TORCH_MLP, *common, "--batch-size", "32", "--out", str(tmp_path / "b"))

    # Then both learn the digits and agree exactly
    assert_succeeded(first)
    assert_succeeded(second)
    metrics = read_metrics(tmp_path / "a")
    assert metrics["headline"] == "accuracy"
    assert metrics["accuracy"] > 0.85
    assert metrics["device"] in ("cpu", "cuda:0")
    assert metrics["n_train"] + metrics["n_test"] == 1797
    assert isinstance(metrics["train_seconds"], float)
    assert stable(read_metrics(tmp_path / "b")) == stable(metrics)
    # And each epoch was printed and reported, counting up to the total
    assert "epoch 3/3" in first.stdout
    assert_progress_counts_up(events, [1, 2, 3], 3, {"loss", "accuracy"})
    # And the saved state_dict loads into the same architecture without CUDA
    state = torch.load(tmp_path / "a" / "model.pt", map_location="cpu", weights_only=True)
    build_model("classify", 32, 8).load_state_dict(state)


def test_torch_autoencode_reconstructs_better_than_predicting_the_mean(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")

    done = run_trainer(
        TORCH_MLP,
        "--mode",
        "autoencode",
        "--seed",
        "1",
        "--epochs",
        "3",
        "--bottleneck",
        "8",
        "--out",
        str(tmp_path),
    )

    assert_succeeded(done)
    metrics = read_metrics(tmp_path)
    assert metrics["headline"] == "test_mse"
    # Standardised inputs: predicting the mean scores about 1.0.
    assert 0.0 < metrics["test_mse"] < 0.6
    assert (tmp_path / "model.pt").stat().st_size > 0


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--mode", "classify", "--epochs", "0"], id="epochs-below-1"),
        pytest.param(["--mode", "classify", "--lr", "-0.1"], id="negative-lr"),
        pytest.param(["--mode", "classify", "--max_iter", "5"], id="another-models-hyper"),
        pytest.param(["--epochs", "3"], id="no-mode"),
    ],
)
def test_torch_rejects_bad_arguments_with_usage_exit(tmp_path, capsys, args):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from trainfleet.examples import torch_mlp

    # In-process: the subprocess path of argparse's exit 2 is covered by the gbm test.
    with pytest.raises(SystemExit) as exited:
        torch_mlp.main([*args, "--out", str(tmp_path)])

    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


# --- sklearn_gbm --------------------------------------------------------------------


def test_gbm_classify_learns_reports_each_stage_and_is_deterministic(tmp_path):
    pytest.importorskip("sklearn")

    common = ("--mode", "classify", "--seed", "1", "--max-iter", "25")
    first, events = run_with_progress(SKLEARN_GBM, *common, "--out", str(tmp_path / "a"))
    second = run_trainer(SKLEARN_GBM, *common, "--out", str(tmp_path / "b"))

    assert_succeeded(first)
    assert_succeeded(second)
    metrics = read_metrics(tmp_path / "a")
    assert metrics["headline"] == "accuracy"
    assert metrics["accuracy"] > 0.85
    assert metrics["n_iter"] == 25
    assert stable(read_metrics(tmp_path / "b")) == stable(metrics)
    assert (tmp_path / "a" / "model.pkl").read_bytes() == (tmp_path / "b" / "model.pkl").read_bytes()
    # Warm-started stages of 10 iterations, the last one short
    assert_progress_counts_up(events, [10, 20, 25], 25, {"loss", "accuracy"})
    assert "iteration 25/25" in first.stdout


def test_gbm_regress_learns_and_writes_to_the_env_output_dir(tmp_path):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_diabetes

    # Given no --out: the agent's TRAINFLEET_OUTPUT_DIR is where the files go
    args = "--mode regress --seed 2 --max_iter 20 --learning_rate 0.1 --max_depth 3 --fail false"
    env = {"TRAINFLEET_OUTPUT_DIR": str(tmp_path / "out"), "TRAINFLEET_JOB_ID": "j1"}
    done = run_trainer(SKLEARN_GBM, *args.split(), env=env)

    assert_succeeded(done)
    metrics = read_metrics(tmp_path / "out")
    assert metrics["headline"] == "r2"
    assert metrics["r2"] > 0.2
    assert metrics["rmse"] > 0
    with open(tmp_path / "out" / "model.pkl", "rb") as handle:
        model = pickle.load(handle)  # noqa: S301 - our own artifact from this test
    x, _ = load_diabetes(return_X_y=True)
    assert np.isfinite(model.predict(x[:5])).all()


def test_gbm_fail_true_exits_nonzero_with_the_reason_on_stderr(tmp_path):
    pytest.importorskip("sklearn")

    done = run_trainer(SKLEARN_GBM, "--mode", "regress", "--fail", "true", "--out", str(tmp_path))

    assert done.returncode == 1
    assert "requested failure (fail=true)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_gbm_unknown_hyper_exits_2_with_usage(tmp_path):
    pytest.importorskip("sklearn")

    done = run_trainer(SKLEARN_GBM, "--mode", "classify", "--epochs", "3", "--out", str(tmp_path))

    assert done.returncode == 2
    assert "usage:" in done.stderr and "--epochs" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--mode", "cluster"], id="unknown-mode"),
        pytest.param(["--mode", "regress", "--learning_rate", "fast"], id="not-a-number"),
        pytest.param(["--mode", "regress", "--fail", "maybe"], id="not-a-bool"),
        pytest.param(["--mode", "regress", "--max_it", "5"], id="no-abbreviations"),
    ],
)
def test_gbm_rejects_bad_arguments_with_usage_exit(tmp_path, capsys, args):
    pytest.importorskip("sklearn")
    from trainfleet.examples import sklearn_gbm

    with pytest.raises(SystemExit) as exited:
        sklearn_gbm.main([*args, "--out", str(tmp_path)])

    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_missing_output_dir_is_a_usage_error(monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from trainfleet.examples import sklearn_gbm

    monkeypatch.delenv("TRAINFLEET_OUTPUT_DIR", raising=False)
    with pytest.raises(SystemExit) as exited:
        sklearn_gbm.main(["--mode", "regress"])

    assert exited.value.code == 2
    assert "TRAINFLEET_OUTPUT_DIR" in capsys.readouterr().err


# --- the progress protocol in-process -----------------------------------------------


@pytest.fixture
def fresh_progress(monkeypatch):
    """Each test sees progress read its environment anew."""
    monkeypatch.delenv(progress.PROGRESS_FD_ENV, raising=False)
    progress._reset()
    yield
    progress._reset()


@pytest.fixture
def progress_pipe(fresh_progress, monkeypatch):
    read_fd, write_fd = os.pipe()
    monkeypatch.setenv(progress.PROGRESS_FD_ENV, str(write_fd))
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass  # the test closed it already


def closed_fd() -> str:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.close(write_fd)
    return str(write_fd)


@pytest.mark.parametrize("value", [None, "", "not-a-number", "closed"])
def test_report_without_a_usable_fd_does_nothing(fresh_progress, monkeypatch, value):
    # Given no variable, an empty or garbled one, or an fd that is not open
    if value is not None:
        monkeypatch.setenv(progress.PROGRESS_FD_ENV, closed_fd() if value == "closed" else value)

    # When a trainer reports twice, nothing is raised
    progress.report(step=1, total=2, loss=0.5)
    progress.report(step=2, total=2, loss=0.25)


def test_report_writes_one_json_line_with_plain_numbers(progress_pipe):
    read_fd, _ = progress_pipe

    progress.report(step=np.int64(2), total=5, loss=np.float32(0.25), acc=0.9, tag="x", bad=float("nan"))
    progress.report(step=3, total=5)

    events = progress.read_progress_lines(os.read(read_fd, 65536))
    assert [e["step"] for e in events] == [2, 3]
    assert events[0]["metrics"] == {"loss": 0.25, "acc": 0.9, "tag": "x", "bad": "nan"}
    assert isinstance(events[0]["at"], float)


def test_report_after_the_reader_is_gone_is_silent(progress_pipe):
    read_fd, _ = progress_pipe
    os.close(read_fd)

    progress.report(step=1, total=2, loss=1.0)  # EPIPE is swallowed
    progress.report(step=2, total=2, loss=0.5)  # and later reports stay quiet


def test_read_progress_lines_skips_malformed_lines():
    data = (
        b'{"step": 1, "total": 4, "metrics": {"loss": 1.5}, "at": 10.0}\n'
        b"not json\n[1, 2]\n\xff\xfe\n"
        b'{"step": "two"}\n'
        b'{"step": 3.0, "metrics": "oops"}\n'
        b'{"step": 4, "total": 4, "metrics": {}, "at": 1'
    )

    events = progress.read_progress_lines(data)

    assert events[0] == {"step": 1, "total": 4, "metrics": {"loss": 1.5}, "at": 10.0}
    assert events[1]["step"] == 3 and events[1]["metrics"] == {} and events[1]["total"] is None
    assert len(events) == 2


# --- the data recipe (TRAINFLEET_DATA) ----------------------------------------------------


def test_every_example_trainer_splits_as_its_data_recipe_says(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("torch")
    recipe = {"TRAINFLEET_DATA": json.dumps({"dataset": "digits", "test_fraction": 0.5, "max_samples": 400})}
    runs = {
        "linreg": ("trainfleet.examples.linreg", "--mode gd --epochs 2 --n_samples 1000"),
        "gbm": (SKLEARN_GBM, "--mode classify --max_iter 10"),
        "mlp": (TORCH_MLP, "--mode classify --epochs 1"),
    }
    for name, (module, args) in runs.items():
        out = tmp_path / name
        done = run_trainer(module, *args.split(), "--seed", "1", "--out", str(out), env=recipe)
        assert_succeeded(done)
        metrics = read_metrics(out)
        assert (metrics["n_train"], metrics["n_test"]) == (200, 200), name
    # Without a recipe each keeps its own default split
    done = run_trainer("trainfleet.examples.linreg", "--mode", "gd", "--epochs", "1", "--out", str(tmp_path / "d"))
    assert_succeeded(done)
    assert (read_metrics(tmp_path / "d")["n_train"], read_metrics(tmp_path / "d")["n_test"]) == (3200, 800)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [("[1]", "must be a JSON object"), ("{", "is not JSON"), ('{"test_fraction": 1.5}', "test_fraction")],
)
def test_a_bad_data_recipe_fails_the_trainer_with_one_line(tmp_path, recipe, message):
    pytest.importorskip("sklearn")
    done = run_trainer(SKLEARN_GBM, "--mode", "classify", "--out", str(tmp_path), env={"TRAINFLEET_DATA": recipe})
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr


async def test_the_agent_hands_the_trainer_its_data_recipe(tmp_path):
    from trainfleet.agent.trainer import TrainerProcess
    from trainfleet.broker.schema import JobSpec

    script = "import os, sys; sys.stdout.write(os.environ['TRAINFLEET_DATA'])"
    data = {"split": "v2", "test_fraction": 0.2, "nested": {"b": 1, "a": [1, 2]}}
    spec = JobSpec(
        job_id="j" * 64, name="x", model="m", mode="a", hyper={}, data=data, seed=0, command=("{python}", "-c", script)
    )
    lines: list[bytes] = []

    async def on_output(stream: str, line: bytes) -> None:
        lines.append(line)

    proc = TrainerProcess(spec, tmp_path / "out", on_output=on_output)
    await proc.start()
    assert await proc.wait() == 0
    assert json.loads(b"".join(lines)) == data
    assert b"".join(lines).decode() == json.dumps(data, sort_keys=True, separators=(",", ":"))
