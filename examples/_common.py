"""Shared plumbing for the example trainers: CLI entry, seeding, data split, outputs, errors.

Kept free of torch and scikit-learn imports so each trainer pays only for what it uses.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

OUTPUT_DIR_ENV = "TRAINFLEET_OUTPUT_DIR"
# The job's data recipe, JSON (the manifest's `data` / `split_recipe`); see data_recipe().
DATA_ENV = "TRAINFLEET_DATA"
METRICS_FILE = "metrics.json"
TEST_FRACTION = 0.25

ArrayT = TypeVar("ArrayT")


class TrainerError(Exception):
    """An expected failure: reported as one clear line on stderr, without a traceback."""


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its CLI name (underscores), parser, default and help text."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str


@dataclass(frozen=True)
class Split(Generic[ArrayT]):
    """A train/test split of one dataset: numpy arrays or torch tensors, as the trainer uses."""

    x_train: ArrayT
    y_train: ArrayT
    x_test: ArrayT
    y_test: ArrayT


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _convert(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _convert(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = _convert(float, text, "a number")
    if not (0.0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def parse_bool(text: str | bool) -> bool:
    """argparse type: true/false, yes/no, on/off, 1/0 (any case); str(True) works too."""
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _convert(kind: Callable[[str], Any], text: str, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def build_parser(prog: str, description: str, modes: Sequence[str], hypers: Sequence[Hyper]) -> argparse.ArgumentParser:
    """The shared CLI: ``--mode --seed --out`` plus one ``--<hyper>`` option per hyper.

    Each hyper is accepted as ``--batch_size`` and ``--batch-size``. Abbreviations are
    off so a typo is an error (exit 2) rather than a silent match.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--mode", required=True, choices=list(modes), help="what to train")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--out",
        default=os.environ.get(OUTPUT_DIR_ENV) or None,
        help=f"output directory, created if needed (default ${OUTPUT_DIR_ENV})",
    )
    group = parser.add_argument_group("hyperparameters")
    for hyper in hypers:
        _add_hyper(group, hyper)
    return parser


def _add_hyper(group: Any, hyper: Hyper) -> None:
    flags = [f"--{hyper.name}"]
    if "_" in hyper.name:
        flags.append(f"--{hyper.name.replace('_', '-')}")
    extra: dict[str, Any] = {}
    if hyper.parse is parse_bool:
        # A bare ``--fail`` means true; ``--fail false`` is accepted as well.
        extra = {"nargs": "?", "const": True, "metavar": "BOOL"}
    group.add_argument(
        *flags,
        dest=hyper.name,
        type=hyper.parse,
        default=hyper.default,
        help=f"{hyper.help} (default {hyper.default})",
        **extra,
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a missing output directory is a usage error (exit 2)."""
    args = parser.parse_args(argv)
    if not args.out:
        parser.error(f"--out is required (or set {OUTPUT_DIR_ENV})")
    args.out = Path(args.out)
    return args


def cli_main(
    prog: str,
    description: str,
    modes: Sequence[str],
    hypers: Sequence[Hyper],
    train: Callable[[argparse.Namespace], object],
    argv: Sequence[str] | None,
) -> int:
    """A trainer's CLI entry: parse ``argv``, run ``train(args)``, return the exit status.

    A usage error exits 2 from argparse itself, before anything is trained.
    """
    args = parse_args(build_parser(prog, description, modes, hypers), argv)
    return run_main(prog, lambda: train(args))


@dataclass(frozen=True)
class Recipe:
    """What the example trainers take from a job's data recipe (``TRAINFLEET_DATA``).

    ``test_fraction``: the share of the data held out for evaluation (0 < f < 1);
    ``max_samples``: use at most this many examples, a seeded random subset (None: all).
    Other keys (``dataset`` and the like) describe the data and are not read here.
    """

    test_fraction: float
    max_samples: int | None = None


def data_recipe(default_test_fraction: float = TEST_FRACTION, environ: dict[str, str] | None = None) -> Recipe:
    """The job's data recipe from ``$TRAINFLEET_DATA`` (absent: the defaults); a recipe that
    is not a JSON object, or whose values are out of range, is a TrainerError."""
    text = (os.environ if environ is None else environ).get(DATA_ENV, "").strip()
    try:
        raw = json.loads(text) if text else {}
    except ValueError as exc:
        raise TrainerError(f"${DATA_ENV} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise TrainerError(f"${DATA_ENV} must be a JSON object, got {text[:60]!r}")
    fraction = raw.get("test_fraction", default_test_fraction)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 < fraction < 1.0:
        raise TrainerError(f"data recipe: test_fraction must be a number between 0 and 1, got {fraction!r}")
    limit = raw.get("max_samples")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 10):
        raise TrainerError(f"data recipe: max_samples must be an integer >= 10, got {limit!r}")
    return Recipe(float(fraction), limit)


def subsample(x: ArrayT, y: ArrayT, recipe: Recipe, seed: int) -> tuple[ArrayT, ArrayT]:
    """At most ``recipe.max_samples`` examples of (x, y): the same seeded subset every run."""
    n = len(x)  # type: ignore[arg-type]
    if recipe.max_samples is None or recipe.max_samples >= n:
        return x, y
    keep = np.sort(np.random.default_rng(seed).permutation(n)[: recipe.max_samples])
    return x[keep], y[keep]  # type: ignore[index]


def seed_everything(seed: int) -> None:
    """Seed Python's and numpy's global generators (torch is seeded by its trainer)."""
    random.seed(seed)
    np.random.seed(seed)


def prepare_out_dir(path: Path) -> Path:
    """Create the output directory; a path that cannot be a directory is a TrainerError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainerError(f"cannot create output directory {str(path)!r}: {exc}") from exc
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see a half-written file."""
    # A plain open() (not mkstemp) so the file gets the usual umask-derived permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_metrics(out_dir: Path, metrics: dict[str, Any], headline: str) -> Path:
    """Write ``metrics.json``: the flat metrics plus ``"headline"`` naming the primary key."""
    if headline not in metrics:
        raise ValueError(f"headline metric {headline!r} missing from {sorted(metrics)}")
    payload = {key: _plain(value) for key, value in metrics.items()}
    payload["headline"] = headline
    path = out_dir / METRICS_FILE
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
    return path


def run_metrics(final: dict[str, float], started: float, data: Split[Any], device: str, **extra: Any) -> dict[str, Any]:
    """The last evaluation plus what every run records: device, seconds since ``started``, split sizes."""
    return {
        **final,
        "device": device,
        "train_seconds": round(time.perf_counter() - started, 4),
        "n_train": len(data.x_train),
        "n_test": len(data.x_test),
        **extra,
    }


def save_outputs(
    prog: str, out_dir: Path, model_file: str, model_bytes: bytes, metrics: dict[str, Any], headline: str
) -> dict[str, Any]:
    """Write the model file, then ``metrics.json``, and log the closing line; returns ``metrics``."""
    atomic_write_bytes(out_dir / model_file, model_bytes)
    write_metrics(out_dir, metrics, headline)
    log(f"{prog}: done {headline}={metrics[headline]:.4f} in {metrics['train_seconds']:.2f}s -> {out_dir}")
    return metrics


def _plain(value: Any) -> Any:
    """numpy/torch scalars to Python numbers so json can encode them."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, np.integer):
        return int(value)
    return float(value)


def log(message: str) -> None:
    """A human-readable progress line; flushed because stdout is a pipe under the agent."""
    print(message, flush=True)


def log_step(prog: str, unit: str, step: int, total: int, result: dict[str, float]) -> None:
    """The progress line after one epoch/stage: ``prog: epoch 3/10 key=value ...``."""
    shown = " ".join(f"{key}={value:.4f}" for key, value in result.items())
    log(f"{prog}: {unit} {step}/{total} {shown}")


def run_main(prog: str, main: Callable[[], object]) -> int:
    """Run a trainer's main, turning failures into a message on stderr and an exit status.

    TrainerError prints just its message; anything unexpected also prints the traceback,
    since that is what someone debugging a failed fleet job will want from its stderr.
    """
    try:
        main()
    except TrainerError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a subprocess
        traceback.print_exc()
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
