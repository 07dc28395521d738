"""Loss against tokens for any set of pretraining runs, from their metrics.jsonl: a line per group of runs (a variant's
seeds), with the band between the group's lowest and highest value.

matplotlib's object API (Figure + savefig) rather than pyplot: no global figure state, safe in a library and in tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from ..pretraining import read_metrics

METRICS = {"train/loss": "training loss", "eval/loss": "held-out loss"}


@dataclass
class RunCurves:
    """The cumulative tokens and values of each metric of METRICS that a run logged."""

    run_dir: Path
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def read_curves(run_dir: str | Path) -> RunCurves:
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; give the output_dir of a pretraining run.")
    records = read_metrics(metrics_file)
    curves = {}
    for metric in METRICS:
        logged = [(record["train/tokens"], record[metric]) for record in records if metric in record]
        if logged:
            tokens, values = zip(*logged, strict=True)
            curves[metric] = (np.asarray(tokens), np.asarray(values, dtype=float))
    return RunCurves(run_dir, curves)


def run_groups(paths: Sequence[str | Path]) -> dict[str, list[Path]]:
    """A folder with a metrics.jsonl is a run of its own; a folder whose subfolders hold runs (a variant's seed-N
    runs) is one group of them. Labels are the folders' names."""
    groups: dict[str, list[Path]] = {}
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            runs = [path]
        else:
            runs = (
                sorted(child for child in path.iterdir() if (child / "metrics.jsonl").is_file())
                if path.is_dir()
                else []
            )
        if not runs:
            raise ValueError(f"{path} is neither a run folder (no metrics.jsonl) nor a folder of runs.")
        label = path.name if path.name not in groups else str(path)
        groups[label] = runs
    return groups


def curve_band(curves: Sequence[RunCurves], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, mean, min, max) of `metric` over the runs, at the token counts every run logged it."""
    logged = [run.curves[metric] for run in curves if metric in run.curves]
    if len(logged) != len(curves) or not logged:
        raise ValueError(f"Not every run logged {metric}.")
    common = logged[0][0]
    for tokens, _ in logged[1:]:
        common = np.intersect1d(common, tokens)
    if common.size == 0:
        raise ValueError(f"The runs logged {metric} at no common token count; did they share a recipe?")
    values = np.stack([values[np.isin(tokens, common)] for tokens, values in logged])
    return common, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def plot_loss_curves(groups: Mapping[str, Sequence[Path]], output: str | Path, title: str | None = None) -> Path:
    """Training and held-out loss against tokens, a line per group and its min-max band, saved as a PNG."""
    curves = {label: [read_curves(run) for run in runs] for label, runs in groups.items()}
    metrics = [metric for metric in METRICS if any(metric in run.curves for runs in curves.values() for run in runs)]
    figure = Figure(figsize=(6 * len(metrics), 4.5), dpi=150, layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics, strict=True):
        for index, (label, runs) in enumerate(curves.items()):
            if not all(metric in run.curves for run in runs):
                continue
            tokens, mean, low, high = curve_band(runs, metric)
            color = f"C{index % 10}"
            axis.plot(tokens, mean, color=color, label=f"{label} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
            if len(runs) > 1:
                axis.fill_between(tokens, low, high, color=color, alpha=0.2, linewidth=0)
        axis.set_xlabel("tokens")
        axis.set_ylabel(METRICS[metric])
        axis.xaxis.set_major_formatter(EngFormatter())
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    return output
