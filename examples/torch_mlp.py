"""Example trainer: a small PyTorch MLP on scikit-learn's bundled 8x8 digits.

Usage::

    python -m trainfleet.examples.torch_mlp --mode classify --seed 1 --out DIR \\
        [--epochs 10] [--lr 0.01] [--hidden 64] [--batch_size 64] [--bottleneck 8]

Modes: ``classify`` (64 -> hidden -> 10, cross-entropy; headline ``accuracy``) and
``autoencode`` (64 -> hidden -> bottleneck -> hidden -> 64, MSE; headline ``test_mse``).
Writes ``model.pt`` (the state_dict, saved from CPU tensors) and ``metrics.json`` into
``--out``, and reports each epoch through :mod:`trainfleet.agent.progress`.
The data ships inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from trainfleet.agent import progress
from trainfleet.examples._common import (
    TEST_FRACTION,
    Hyper,
    Recipe,
    Split,
    TrainerError,
    cli_main,
    data_recipe,
    log,
    log_step,
    positive_float,
    positive_int,
    prepare_out_dir,
    run_metrics,
    save_outputs,
    seed_everything,
    subsample,
)

PROG = "torch_mlp"
DESCRIPTION = "Train a small PyTorch MLP on scikit-learn's bundled digits."
MODES = ("classify", "autoencode")
HEADLINES = {"classify": "accuracy", "autoencode": "test_mse"}
HYPERS = (
    Hyper("epochs", positive_int, 10, "passes over the training set"),
    Hyper("lr", positive_float, 0.01, "Adam learning rate"),
    Hyper("hidden", positive_int, 64, "width of the hidden layer(s)"),
    Hyper("batch_size", positive_int, 64, "minibatch size"),
    Hyper("bottleneck", positive_int, 8, "code size (autoencode only; ignored otherwise)"),
)

# Standardised digits on the training device.
Data = Split[torch.Tensor]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (argparse exits 2 by itself)."""
    return cli_main(PROG, DESCRIPTION, MODES, HYPERS, train, argv)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train one model as ``args`` asks, write its files, and return the metrics."""
    out_dir = prepare_out_dir(args.out)
    device = _setup_torch(args.seed)
    data = load_data(args.seed, device, data_recipe())
    model = build_model(args.mode, args.hidden, args.bottleneck).to(device)
    log(
        f"{PROG}: mode={args.mode} device={device} n_train={len(data.x_train)} "
        f"n_test={len(data.x_test)} params={sum(p.numel() for p in model.parameters())}"
    )
    started = time.perf_counter()
    final = fit(model, data, args)
    metrics = run_metrics(final, started, data, str(device), epochs=args.epochs)
    return save_outputs(PROG, out_dir, "model.pt", _model_bytes(model), metrics, HEADLINES[args.mode])


def _setup_torch(seed: int) -> torch.device:
    """Threads, seeds and determinism; returns the device to train on."""
    torch.set_num_threads(_omp_threads())
    seed_everything(seed)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    # cuBLAS needs a fixed workspace to be deterministic; must be set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.device("cuda:0")


def _omp_threads() -> int:
    """The agent sizes OMP_NUM_THREADS to the cores it grants; default to one thread."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def load_data(seed: int, device: torch.device, recipe: Recipe | None = None) -> Data:
    """Digits split by ``seed`` (stratified) as the job's data recipe says (test_fraction,
    max_samples), standardised with train-set statistics."""
    recipe = recipe or Recipe(TEST_FRACTION)
    x, y = subsample(*load_digits(return_X_y=True), recipe, seed)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=recipe.test_fraction, random_state=seed, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    # Border pixels are always 0 in digits; unit scale there avoids dividing by zero.
    std[std < 1e-8] = 1.0

    def as_x(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((a - mean) / std, dtype=torch.float32, device=device)

    def as_y(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.long, device=device)

    return Data(as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test))


def build_model(mode: str, hidden: int, bottleneck: int) -> nn.Module:
    """The classifier or autoencoder MLP for ``mode``."""
    if mode == "classify":
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, bottleneck),
        nn.Linear(bottleneck, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 64),
    )


def fit(model: nn.Module, data: Data, args: argparse.Namespace) -> dict[str, float]:
    """Adam over shuffled minibatches; evaluates and reports after every epoch."""
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    # A dedicated generator keeps the shuffle order a function of the seed alone.
    shuffle = torch.Generator().manual_seed(args.seed)
    result: dict[str, float] = {}
    for epoch in range(1, args.epochs + 1):
        train_loss = _train_epoch(model, optimiser, data, args, shuffle)
        result = {"train_loss": train_loss, **evaluate(model, data, args.mode)}
        log_step(PROG, "epoch", epoch, args.epochs, result)
        _check_finite(train_loss, epoch)
        progress.report(step=epoch, total=args.epochs, **_progress_metrics(result, args.mode))
    return result


def _train_epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    data: Data,
    args: argparse.Namespace,
    shuffle: torch.Generator,
) -> float:
    model.train()
    order = torch.randperm(len(data.x_train), generator=shuffle).to(data.x_train.device)
    total, seen = 0.0, 0
    for start in range(0, len(order), args.batch_size):
        batch = order[start : start + args.batch_size]
        loss = _loss(model, data.x_train[batch], data.y_train[batch], args.mode)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += float(loss.detach()) * len(batch)
        seen += len(batch)
    return total / seen


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "classify":
        return nn.functional.cross_entropy(model(x), y)
    return nn.functional.mse_loss(model(x), x)


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, mode: str) -> dict[str, float]:
    """Test-set metrics: accuracy and loss (classify) or test_mse (autoencode)."""
    model.eval()
    output = model(data.x_test)
    if mode == "classify":
        return {
            "accuracy": float((output.argmax(dim=1) == data.y_test).float().mean()),
            "loss": float(nn.functional.cross_entropy(output, data.y_test)),
        }
    return {"test_mse": float(nn.functional.mse_loss(output, data.x_test))}


def _progress_metrics(result: dict[str, float], mode: str) -> dict[str, float]:
    """``loss`` is the training loss in both modes, so the fleet can chart it uniformly."""
    if mode == "classify":
        return {"loss": result["train_loss"], "accuracy": result["accuracy"], "test_loss": result["loss"]}
    return {"loss": result["train_loss"], "test_mse": result["test_mse"]}


def _check_finite(loss: float, epoch: int) -> None:
    if not np.isfinite(loss):
        raise TrainerError(f"training diverged at epoch {epoch} (loss={loss}); try a smaller --lr")


def _model_bytes(model: nn.Module) -> bytes:
    """The saved state_dict, from CPU tensors so any host can load it without CUDA."""
    buffer = io.BytesIO()
    torch.save({key: value.detach().cpu() for key, value in model.state_dict().items()}, buffer)
    return buffer.getvalue()


if __name__ == "__main__":
    sys.exit(main())
