"""The pretraining loop on a GPU: bf16 autocast from the accelerate config, MFU reported, the export loads."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from apertus_hf.pretraining import read_metrics
from tests.pretraining.conftest import REPO_ROOT, run_recipe, tiny_run, write_recipe

pytestmark = pytest.mark.cuda


def test_bf16_pretraining_on_one_gpu(tmp_path, small_corpus):
    output_dir = tmp_path / "gpu"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_run(output_dir, small_corpus, max_steps=20, learning_rate=1e-2))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    process = run_recipe(
        ["--config", str(recipe)], launcher=[*launcher, str(REPO_ROOT / "accelerate_configs" / "single_gpu.yaml")]
    )
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-4000:]
    assert "mixed precision bf16" in (output_dir / "train.log").read_text()
    records = read_metrics(output_dir / "metrics.jsonl")
    assert records[-1]["train/loss"] < records[0]["train/loss"] - 0.5
    assert 0 < records[-1]["train/mfu"] < 1  # H100/H200/A100 are in the peak-FLOPs table
    model = AutoModelForCausalLM.from_pretrained(output_dir / "model", dtype=torch.bfloat16).cuda()
    assert model.dtype == torch.bfloat16
