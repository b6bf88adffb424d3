"""A small, fast, real trainer: linear regression by mini-batch gradient descent (numpy only).

Data is generated deterministically from the seed (y = X·w + noise), so the
trainer needs no download and starts in a fraction of a second — the fleet's
fault, chaos and scale tests use it where the torch and scikit-learn trainers
would spend most of their time importing.

    python -m trainfleet.examples.linreg --mode gd --seed 1 --out DIR [--epochs 50] [--lr 0.05]
        [--n_samples 4000] [--n_features 16] [--batch_size 256]

Modes: ``gd`` (mini-batch gradient descent) and ``sgd`` (batch size 1 per step,
bounded by ``batch_size`` steps per epoch). Writes ``model.npz`` and
``metrics.json`` (headline ``r2``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from trainfleet.agent.progress import report
from trainfleet.examples._common import data_recipe


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="linreg", allow_abbrev=False)
    p.add_argument("--mode", choices=["gd", "sgd"], required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("TRAINFLEET_OUTPUT_DIR"))
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--n_samples", "--n-samples", type=int, default=4000)
    p.add_argument("--n_features", "--n-features", type=int, default=16)
    p.add_argument("--batch_size", "--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out is required (or TRAINFLEET_OUTPUT_DIR)")
    return args


def make_data(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    x = rng.normal(size=(n, d))
    y = x @ w_true + 0.1 * rng.normal(size=n)
    return x, y, w_true


def train(args: argparse.Namespace) -> dict[str, float]:
    # The data recipe ($TRAINFLEET_DATA): test_fraction (default 0.2) and max_samples.
    recipe = data_recipe(default_test_fraction=0.2)
    n = args.n_samples if recipe.max_samples is None else min(args.n_samples, recipe.max_samples)
    x, y, w_true = make_data(args.seed, n, args.n_features)
    split = max(1, min(len(x) - 1, round((1.0 - recipe.test_fraction) * len(x))))
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]
    rng = np.random.default_rng(args.seed + 1)
    w = np.zeros(args.n_features)
    batch = 1 if args.mode == "sgd" else args.batch_size
    steps = args.batch_size if args.mode == "sgd" else max(1, split // batch)
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(split)
        for step in range(steps):
            idx = order[(step * batch) % split : (step * batch) % split + batch]
            grad = 2 * x_train[idx].T @ (x_train[idx] @ w - y_train[idx]) / len(idx)
            w -= args.lr * grad
        loss = float(np.mean((x_train @ w - y_train) ** 2))
        report(step=epoch, total=args.epochs, loss=loss)
        if epoch == 1 or epoch == args.epochs or epoch % max(1, args.epochs // 5) == 0:
            print(f"epoch {epoch}/{args.epochs} loss {loss:.5f}", flush=True)
    mse = float(np.mean((x_test @ w - y_test) ** 2))
    r2 = 1.0 - mse / float(np.var(y_test))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    np.savez(Path(args.out) / "model.npz", w=w)
    return {
        "headline": "r2",
        "r2": r2,
        "mse": mse,
        "weight_error": float(np.linalg.norm(w - w_true)),
        "train_seconds": time.perf_counter() - started,
        "n_train": split,
        "n_test": len(x) - split,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    metrics = train(args)
    (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"r2 {metrics['r2']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
