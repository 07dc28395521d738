"""The benchmarks run end to end at a tiny size (their figures are not checked, only that they are produced)."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.pretraining.conftest import REPO_ROOT

TINY_OVERRIDES = [
    "--override",
    "hidden_size=32",
    "--override",
    "intermediate_size=64",
    "--override",
    "num_hidden_layers=2",
    "--override",
    "num_attention_heads=2",
]


@pytest.mark.slow
def test_qrpo_step_benchmark_runs_at_a_tiny_size():
    command = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "qrpo_step.py"),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--batch-size",
        "2",
        "--prompt-tokens",
        "16",
        "--completion-tokens",
        "16",
        *TINY_OVERRIDES,
        "--json",
        "-",
    ]
    completed = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    summary = json.loads(completed.stdout)

    assert set(summary["configs"]) == {"qrpo", "dpo", "dpo_precomputed"}
    assert summary["pairs"] == 2 * (1 + 2)
    assert summary["dataset_tokens"] > summary["pairs"] * 2 * 16
    for name, row in summary["configs"].items():
        assert len(row["rounds"]) == 1
        assert row["seconds_per_step"] > 0 and row["peak_memory_mib"] > 0, name
        assert row["completions_per_second"] == pytest.approx(4 / row["seconds_per_step"]), name
        assert math.isfinite(row["rounds"][0]["training_loss"]), name
    configs = summary["configs"]
    assert configs["dpo"]["speed_vs_dpo"] == configs["dpo"]["memory_vs_dpo"] == 1.0
    assert summary["speed_ratio"] == configs["qrpo"]["speed_vs_dpo"]
    # The two configurations that precompute time their reference pass; DPO's default has none before training.
    assert configs["qrpo"]["reference_pass_seconds"] > 0
    assert configs["dpo_precomputed"]["reference_pass_seconds"] > 0
    assert configs["dpo"]["reference_pass_seconds"] == 0


@pytest.mark.slow
def test_model_speed_benchmark_runs_at_a_tiny_size(tmp_path):
    results = tmp_path / "model_speed.json"
    command = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "model_speed.py"),
        *("--vocab-size", "4096", "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2"),
        *("--num-heads", "2", "--num-kv-heads", "1", "--seq-len", "64", "--steps", "2", "--rounds", "1"),
        *("--json", str(results)),
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    assert "apertus_hf / transformers: speed" in completed.stdout
    summary = json.loads(results.read_text())
    for name in ("apertus_hf", "transformers"):
        row = summary[name]
        assert row["tokens_per_second"] > 0 and row["peak_memory_mib"] > 0, name
        assert 0 < row["mfu_measured_peak"] < 1, name
        assert row["mfu_datasheet_peak"] is None  # no data sheet peak for a CPU
    ratio = summary["apertus_hf"]["tokens_per_second"] / summary["transformers"]["tokens_per_second"]
    assert summary["speed_ratio"] == pytest.approx(ratio)
