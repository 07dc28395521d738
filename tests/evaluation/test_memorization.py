"""The Goldfish memorization audit: the pretraining issue's toy memorization model shows a high training-passage
extraction rate without Goldfish and a low one with it, against none on held-out passages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from apertus_hf.evaluation.memorization import build_passages, evaluate_memorization, matching_prefix_lengths
from tests.pretraining.conftest import SHIPPED_TOKENIZER

REPO_ROOT = Path(__file__).resolve().parents[2]
# The passages are exactly 62 tokens.
PREFIX_TOKENS = 16
SUFFIX_TOKENS = 40


def test_matching_prefix_counts_tokens_before_the_first_mismatch():
    expected = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    generated = torch.tensor([[1, 2, 3, 4], [1, 2, 9, 4], [9, 2, 3, 4], [1, 2, 3, -1]])
    assert matching_prefix_lengths(generated, expected).tolist() == [4, 2, 0, 3]
    with pytest.raises(ValueError, match="differ in shape"):
        matching_prefix_lengths(generated[:, :3], expected)


def test_passages_are_bos_and_prefix_then_suffix_and_short_documents_are_counted():
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    long_text = "word " * 40
    passages = build_passages(["too short", long_text, long_text], tokenizer, 5, 7, max_passages=1)
    ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert passages.prompts.tolist() == [[tokenizer.bos_token_id, *ids[:5]]]
    assert passages.continuations.tolist() == [ids[5:12]]
    assert passages.too_short == 1
    with pytest.raises(ValueError, match="none of the 1 documents has 12 tokens"):
        build_passages(["too short"], tokenizer, 5, 7)


def _audit(model_dir: Path, train: Path, heldout: Path, output: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(REPO_ROOT / "eval" / "memorization.py"), "--model", str(model_dir)]
    command += ["--train", str(train), "--heldout", str(heldout), "--output", str(output), "--device", "cpu"]
    command += ["--prefix_tokens", str(PREFIX_TOKENS), "--suffix_tokens", str(SUFFIX_TOKENS), "--batch_size", "2"]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "exact_match_train" in completed.stdout
    return json.loads(output.read_text())


def test_audit_shows_memorization_without_goldfish_and_little_with_it(
    tmp_path, toy_memorization_models, memorization_passages, heldout_memorization_passages
):
    models = toy_memorization_models
    train, _ = memorization_passages
    heldout, _ = heldout_memorization_passages
    standard = _audit(models["standard"], train, heldout, tmp_path / "standard.json")
    goldfish = _audit(models["goldfish"], train, heldout, tmp_path / "goldfish.json")
    for result in (standard, goldfish):
        assert result["evaluation"] == "memorization"
        assert result["details"]["train"]["passages"] == result["details"]["heldout"]["passages"] == 4
    assert standard["metrics"]["exact_match_train"] == 1.0
    assert standard["metrics"]["prefix_match_train"] == SUFFIX_TOKENS
    assert standard["metrics"]["exact_match_heldout"] == 0.0
    assert standard["metrics"]["exact_match_difference"] == 1.0
    assert goldfish["metrics"]["exact_match_train"] <= 0.25
    assert goldfish["metrics"]["prefix_match_train"] < SUFFIX_TOKENS / 2


def test_audit_names_a_missing_model_folder(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"Model folder .*no_model does not exist"):
        evaluate_memorization(tmp_path / "no_model", [train], [train])
