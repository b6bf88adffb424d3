"""Example trainer: scikit-learn histogram gradient boosting on bundled datasets.

Usage::

    python -m trainfleet.examples.sklearn_gbm --mode regress --seed 1 --out DIR \\
        [--max_iter 50] [--learning_rate 0.1] [--max_depth 3] [--fail false]

Modes: ``classify`` (HistGradientBoostingClassifier on the 8x8 digits; headline
``accuracy``) and ``regress`` (HistGradientBoostingRegressor on diabetes; headline
``r2``, also ``rmse``). Boosting grows in warm-started stages of 10 iterations so each
progress report is a real point on the learning curve. Writes ``model.pkl`` (the pickled
estimator) and ``metrics.json`` into ``--out``. ``--fail true`` raises right after the
data is loaded, so fleet tests can exercise a failing job.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sklearn.datasets import load_diabetes, load_digits
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import accuracy_score, log_loss, mean_squared_error, r2_score
from sklearn.model_selection import train_test_split

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
    parse_bool,
    positive_float,
    positive_int,
    prepare_out_dir,
    run_metrics,
    save_outputs,
    seed_everything,
    subsample,
)

PROG = "sklearn_gbm"
DESCRIPTION = "Train scikit-learn histogram gradient boosting on a bundled dataset."
MODES = ("classify", "regress")
HEADLINES = {"classify": "accuracy", "regress": "r2"}
HYPERS = (
    Hyper("max_iter", positive_int, 50, "boosting iterations"),
    Hyper("learning_rate", positive_float, 0.1, "shrinkage per iteration"),
    Hyper("max_depth", positive_int, 3, "maximum depth of each tree"),
    Hyper("fail", parse_bool, False, "raise after loading the data (for testing failure paths)"),
)
STAGE_ITERS = 10

# Digits or diabetes, as numpy arrays.
Data = Split[np.ndarray]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (argparse exits 2 by itself)."""
    return cli_main(PROG, DESCRIPTION, MODES, HYPERS, train, argv)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train one model as ``args`` asks, write its files, and return the metrics."""
    out_dir = prepare_out_dir(args.out)
    seed_everything(args.seed)
    data = load_data(args.mode, args.seed, data_recipe())
    log(f"{PROG}: mode={args.mode} n_train={len(data.x_train)} n_test={len(data.x_test)} max_iter={args.max_iter}")
    if args.fail:
        raise TrainerError("requested failure (fail=true)")
    model = build_model(args)
    started = time.perf_counter()
    final = fit(model, data, args)
    metrics = run_metrics(final, started, data, "cpu", n_iter=int(model.n_iter_))
    model_bytes = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    return save_outputs(PROG, out_dir, "model.pkl", model_bytes, metrics, HEADLINES[args.mode])


def load_data(mode: str, seed: int, recipe: Recipe | None = None) -> Data:
    """Digits (stratified) for classify, diabetes for regress; split by ``seed``, as the
    job's data recipe says (test_fraction, max_samples)."""
    recipe = recipe or Recipe(TEST_FRACTION)
    if mode == "classify":
        x, y = load_digits(return_X_y=True)
    else:
        x, y = load_diabetes(return_X_y=True)
    x, y = subsample(x, y, recipe, seed)
    stratify = y if mode == "classify" else None
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=recipe.test_fraction, random_state=seed, stratify=stratify
    )
    return Data(x_train, y_train, x_test, y_test)


def build_model(args: argparse.Namespace) -> Any:
    """The estimator for ``args.mode``, warm-started so it can grow stage by stage."""
    kind = HistGradientBoostingClassifier if args.mode == "classify" else HistGradientBoostingRegressor
    # No early stopping: the iteration count is the hyper the operator asked for, and
    # the held-out split it would carve off would make stages differ from one long fit.
    return kind(
        max_iter=args.max_iter,
        learning_rate=args.learning_rate,
        max_depth=args.max_depth,
        early_stopping=False,
        warm_start=True,
        random_state=args.seed,
    )


def stages(max_iter: int) -> Iterator[int]:
    """Cumulative iteration counts: 10, 20, ..., max_iter (the last stage may be short)."""
    yield from range(STAGE_ITERS, max_iter, STAGE_ITERS)
    yield max_iter


def fit(model: Any, data: Data, args: argparse.Namespace) -> dict[str, float]:
    """Grow the ensemble stage by stage, evaluating and reporting after each."""
    result: dict[str, float] = {}
    for done in stages(args.max_iter):
        # warm_start keeps the trees already built and adds up to the new max_iter,
        # which gives exactly the model one fit with max_iter=done would.
        model.set_params(max_iter=done)
        model.fit(data.x_train, data.y_train)
        result = evaluate(model, data, args.mode)
        log_step(PROG, "iteration", done, args.max_iter, result)
        progress.report(step=done, total=args.max_iter, **_progress_metrics(result, args.mode))
    return result


def evaluate(model: Any, data: Data, mode: str) -> dict[str, float]:
    """Test-set metrics: accuracy and log_loss (classify) or r2, rmse and mse (regress)."""
    if mode == "classify":
        proba = model.predict_proba(data.x_test)
        predicted = model.classes_[proba.argmax(axis=1)]
        return {
            "accuracy": float(accuracy_score(data.y_test, predicted)),
            "log_loss": float(log_loss(data.y_test, proba, labels=model.classes_)),
        }
    predicted = model.predict(data.x_test)
    mse = float(mean_squared_error(data.y_test, predicted))
    return {"r2": float(r2_score(data.y_test, predicted)), "rmse": mse**0.5, "mse": mse}


def _progress_metrics(result: dict[str, float], mode: str) -> dict[str, float]:
    """``loss`` is the test loss in both modes, so the fleet can chart it uniformly."""
    if mode == "classify":
        return {"loss": result["log_loss"], "accuracy": result["accuracy"]}
    return {"loss": result["mse"], "r2": result["r2"], "rmse": result["rmse"]}


if __name__ == "__main__":
    sys.exit(main())
