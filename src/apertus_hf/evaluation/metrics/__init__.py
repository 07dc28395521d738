"""Our metrics as Hugging Face `evaluate` modules, shipped inside the package.

Each folder here holds one module script (`<name>/<name>.py`) that `evaluate.load(<folder>)` loads offline: a local
path never reaches the Hub, unlike a bare name such as "accuracy". `load_metric(name)` finds the folder, so neither
users nor the evaluation functions (which compute every metric through these modules) need a path. The scripts import
nothing of apertus_hf: `evaluate` copies a script into its own module cache and imports it from there.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import evaluate

METRIC_NAMES = ("bits_per_byte", "memorization_exact_match", "multiple_choice_accuracy")


def metric_path(name: str) -> Path:
    """The folder of the shipped metric `name`, to pass to `evaluate.load`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"No shipped metric named {name!r}; the shipped metrics are {', '.join(METRIC_NAMES)}.")
    return Path(str(files(__name__) / name))


def load_metric(name: str, **load_kwargs: Any) -> evaluate.EvaluationModule:
    """The shipped metric `name` as an `evaluate` module: `evaluate.load(metric_path(name), **load_kwargs)`."""
    return evaluate.load(str(metric_path(name)), **load_kwargs)
