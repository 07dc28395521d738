"""The report of a study, from run folders with known figures: the table's statistics, pairing, the data check."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from apertus_hf.ablation import resolve_runs, write_report
from apertus_hf.ablation.report import Estimate, count_parameters, tokens_to_reach
from apertus_hf.ablation.study import AblationStudy
from apertus_hf.recipe_args import recipe_config_from_dict

from .conftest import two_variant_study

STEPS = 6


def fake_finished_run(run_dir, eval_loss, bits_per_byte, row_ids, tokens_per_second=1000.0):
    """A run folder as a finished run leaves it: metrics.jsonl to the last step, the model, its bits per byte."""
    run_dir.mkdir(parents=True)
    records = []
    for step in range(1, STEPS + 1):
        record = {"step": step, "train/loss": 9.0 - step, "train/tokens": step * 256, "data/row_ids": row_ids[step - 1]}
        if step % 2 == 0:
            record["train/tokens_per_second"] = tokens_per_second
        if step % 3 == 0:
            record["eval/loss"] = eval_loss + (STEPS - step) * 0.1
        records.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (run_dir / "model").mkdir()
    (run_dir / "model" / "config.json").write_text("{}")
    save_file({"embed": torch.zeros(10, 4), "head": torch.zeros(3, 4)}, run_dir / "model" / "model.safetensors")
    (run_dir / "bits_per_byte.json").write_text(json.dumps({"metrics": {"bits_per_byte": bits_per_byte}}))


def test_the_report_gives_means_standard_errors_and_differences_paired_by_seed(tmp_path, base_recipe):
    values = two_variant_study(base_recipe, tmp_path / "study", seeds=[1, 2, 3])
    study = recipe_config_from_dict(AblationStudy, values)
    assert {config.max_steps for config in resolve_runs(study).values()} == {STEPS}
    rows = [[step, step + 100] for step in range(STEPS)]
    other_rows = [[step, step + 200] for step in range(STEPS)]
    root = tmp_path / "study"
    fake_finished_run(root / "llama" / "seed-1", 3.0, 1.50, rows, 1000.0)
    fake_finished_run(root / "llama" / "seed-2", 3.2, 1.60, rows, 1200.0)
    fake_finished_run(root / "llama" / "seed-3", 3.4, 1.70, rows, 1100.0)
    fake_finished_run(root / "apertus" / "seed-1", 2.9, 1.45, rows, 800.0)
    fake_finished_run(root / "apertus" / "seed-2", 3.0, 1.50, other_rows, 900.0)  # read other rows than llama's
    (root / "apertus" / "seed-3").mkdir(parents=True)  # started, not finished

    table = write_report(study).read_text()
    results = json.loads((root / "results.json").read_text())
    llama, apertus = results["variants"]
    assert llama["variant"] == "llama" and llama["seeds"] == [1, 2, 3]
    assert llama["eval_loss"]["mean"] == pytest.approx(3.2)
    assert llama["eval_loss"]["stderr"] == pytest.approx(0.2 / math.sqrt(3))
    assert llama["eval_loss_difference"] is None
    # Paired on the seeds both finished (1 and 2): differences -0.1 and -0.2.
    assert apertus["eval_loss_difference"]["mean"] == pytest.approx(-0.15)
    assert apertus["eval_loss_difference"]["stderr"] == pytest.approx(0.05)
    assert apertus["eval_loss_difference"]["count"] == 2
    assert apertus["bits_per_byte_difference"]["mean"] == pytest.approx(-0.075)
    # Held-out loss 3.2 then 2.9 (at 768 and 1536 tokens) reaches seed 1's baseline 3.0 at 1280 tokens, 5/6 of the
    # budget; 3.3 then 3.0 reaches seed 2's 3.2 at 1024, 2/3.
    assert apertus["tokens_to_baseline_loss"]["mean"] == pytest.approx(0.75)
    assert apertus["tokens_to_baseline_loss"]["stderr"] == pytest.approx(1 / 12)
    assert apertus["seeds_reaching_baseline_loss"] == 2
    assert apertus["tokens_per_second"]["mean"] == pytest.approx(850.0)
    assert apertus["parameters"] == 52
    assert results["same_rows_across_variants"] is False
    assert results["unfinished"] == ["apertus/seed-3"]

    assert "| **llama** (baseline) | Llama-style | 3 | 3.2000 ± 0.1155 | — | 1.6000 ± 0.0577 |" in table
    assert "| apertus | the Apertus recipe | 2 | 2.9500 ± 0.0500 | -0.1500 ± 0.0500 |" in table
    assert "| -0.0750 ± 0.0250 | 75% ± 8% | 850 | 0.00M |" in table
    assert "**The variants did not all read the same rows**: seed 2: apertus" in table
    assert "Not finished yet, so not in the table: apertus/seed-3." in table
    assert (root / "loss_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_study_without_a_finished_run_has_no_report(tmp_path, base_recipe):
    study = recipe_config_from_dict(AblationStudy, two_variant_study(base_recipe, tmp_path / "study"))
    with pytest.raises(FileNotFoundError, match=r"has finished; run `recipes/ablate\.py` first"):
        write_report(study)


def test_estimates_and_parameter_counts(tmp_path):
    assert Estimate.of([]) is None
    single = Estimate.of([2.0])
    assert (single.mean, single.stderr, single.text()) == (2.0, None, "2.0000")
    assert Estimate.of([1.0, 3.0]).text(2, signed=True) == "+2.00 ± 1.00"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(5)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"c": torch.zeros(7)}, tmp_path / "model-00002-of-00002.safetensors")
    assert count_parameters(tmp_path) == 18
    assert count_parameters(tmp_path / "missing") is None


def test_tokens_to_reach_a_loss_interpolate_between_evaluations():
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert tokens_to_reach(curve, 3.5) == pytest.approx(250.0)
    assert tokens_to_reach(curve, 3.0) == pytest.approx(300.0)
    assert tokens_to_reach(curve, 6.0) == 100.0
    assert tokens_to_reach(curve, 2.9) is None
    # The first crossing counts, not a later one after the loss went up again.
    assert tokens_to_reach([(100, 5.0), (200, 3.0), (300, 4.5), (400, 3.5)], 4.0) == pytest.approx(150.0)
