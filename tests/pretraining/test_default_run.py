"""The README's first command, `make pretrain`, on the embedded default (shipped corpus, tokenizer, model size),
with fewer steps."""

import os
import subprocess

import pytest
from transformers import AutoModelForCausalLM

from apertus_hf.pretraining import read_metrics
from apertus_hf.training_facts import TrainingFacts
from tests.pretraining.conftest import REPO_ROOT


@pytest.mark.slow
def test_make_pretrain_runs_the_embedded_default(tmp_path):
    output_dir = tmp_path / "default"
    arguments = f"--output_dir {output_dir} --max_steps 12 --warmup_steps 2 --eval_steps 6 --checkpoint_steps 6"
    completed = subprocess.run(
        ["make", "--no-print-directory", "pretrain", f"ARGS={arguments}"],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    assert f"Done: 12 steps, {12 * 16 * 256:,} tokens, model in {output_dir / 'model'}." in completed.stdout

    records = read_metrics(output_dir / "metrics.jsonl")
    assert [record["step"] for record in records] == list(range(1, 13))
    assert records[-1]["train/loss"] < records[0]["train/loss"] - 0.5
    assert [record["step"] for record in records if "eval/loss" in record] == [6, 12]
    assert {"train/tokens_per_second", "train/lr", "train/grad_norm"} <= set(records[-1])
    assert "4 layers, hidden 256, vocabulary 8192" in (output_dir / "train.log").read_text()
    model = AutoModelForCausalLM.from_pretrained(output_dir / "model")
    assert model.config.vocab_size == 8192
    assert (output_dir / "model" / "tokenizer.json").is_file()
    # The recipe wrote the model card, from the facts the run recorded (tokens over all processes, rows of 256).
    facts = TrainingFacts.load(output_dir / "model")
    assert (facts.tokens_seen, facts.context_length, facts.steps) == (12 * 16 * 256, 256, 12)
    assert (output_dir / "model" / "README.md").read_text().startswith("---\n")
