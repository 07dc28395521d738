"""Loss-vs-tokens plots from metrics.jsonl: the band's numbers, the grouping of runs, the PNG and the recipe."""

import json
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from apertus_hf.ablation.plots import curve_band, plot_loss_curves, read_curves, run_groups

from .conftest import REPO_ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, losses, eval_every=None):
    run_dir.mkdir(parents=True)
    records = []
    for step, loss in enumerate(losses, start=1):
        record = {"step": step, "train/loss": loss, "train/tokens": step * 100}
        if eval_every and step % eval_every == 0:
            record["eval/loss"] = loss + 0.5
        records.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run_dir


def test_the_band_is_the_mean_min_and_max_at_the_tokens_every_run_logged(tmp_path):
    first = read_curves(write_run(tmp_path / "a", [5.0, 4.0, 3.0, 2.0], eval_every=2))
    second = read_curves(write_run(tmp_path / "b", [6.0, 5.0, 2.0], eval_every=2))
    tokens, mean, low, high = curve_band([first, second], "train/loss")
    assert tokens.tolist() == [100, 200, 300]
    assert np.allclose(mean, [5.5, 4.5, 2.5]) and low.tolist() == [5.0, 4.0, 2.0] and high.tolist() == [6.0, 5.0, 3.0]
    tokens, mean, _, _ = curve_band([first, second], "eval/loss")
    assert tokens.tolist() == [200] and mean.tolist() == [5.0]
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl"):
        read_curves(tmp_path)


def test_runs_and_folders_of_runs_become_groups(tmp_path):
    single = write_run(tmp_path / "single", [3.0, 2.0])
    write_run(tmp_path / "variant" / "seed-1", [3.0, 2.0])
    write_run(tmp_path / "variant" / "seed-2", [3.5, 2.5])
    (tmp_path / "empty").mkdir()
    groups = run_groups([single, tmp_path / "variant"])
    assert groups == {"single": [single], "variant": [tmp_path / "variant" / "seed-1", tmp_path / "variant" / "seed-2"]}
    with pytest.raises(ValueError, match="neither a run folder"):
        run_groups([tmp_path / "empty"])


def test_the_plot_is_a_png_of_the_figure_size_with_or_without_evaluations(tmp_path):
    with_eval = {"a": [write_run(tmp_path / "a" / "seed-1", [5.0, 4.0, 3.0, 2.0], eval_every=2)]}
    output = plot_loss_curves(with_eval, tmp_path / "plots" / "with.png", title="test")
    assert output.read_bytes()[:8] == PNG_SIGNATURE
    assert imread(output).shape[:2] == (int(4.5 * 150), 2 * 6 * 150)
    without_eval = {"b": [write_run(tmp_path / "b", [5.0, 4.0])]}
    output = plot_loss_curves(without_eval, tmp_path / "without.png")
    assert imread(output).shape[:2] == (int(4.5 * 150), 6 * 150)


def test_the_recipe_plots_the_runs_it_is_given(tmp_path):
    write_run(tmp_path / "variant" / "seed-1", [3.0, 2.0], eval_every=1)
    write_run(tmp_path / "variant" / "seed-2", [3.5, 2.5], eval_every=1)
    output = tmp_path / "loss.png"
    command = [
        sys.executable,
        str(REPO_ROOT / "recipes" / "plot.py"),
        str(tmp_path / "variant"),
        "--output",
        str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(output) and output.read_bytes()[:8] == PNG_SIGNATURE
    missing = subprocess.run([*command[:2], str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode != 0 and "neither a run folder" in missing.stderr
