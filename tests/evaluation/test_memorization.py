"""The Goldfish memorization audit: the pretraining issue's toy memorization model shows a high training-passage
extraction rate without Goldfish and a low one with it, against none on held-out passages."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from apertus_hf.evaluation import load_metric
from apertus_hf.evaluation.memorization import build_passages, evaluate_memorization
from tests.pretraining.conftest import SHIPPED_TOKENIZER

REPO_ROOT = Path(__file__).resolve().parents[2]
# The passages are exactly 62 tokens.
PREFIX_TOKENS = 16
SUFFIX_TOKENS = 40


def test_matching_prefix_counts_tokens_before_the_first_mismatch():
    metric = load_metric("memorization_exact_match", keep_in_memory=True)
    expected = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]
    generated = [[1, 2, 3, 4], [1, 2, 9, 4], [9, 2, 3, 4], [1, 2, 3, -1]]
    assert metric.compute(predictions=generated, references=expected)["prefix_match_per_passage"] == [4, 2, 0, 3]
    with pytest.raises(ValueError, match="differ in shape"):
        metric.compute(predictions=[row[:3] for row in generated], references=expected)


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


@pytest.mark.slow
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
    # Goldfish against standard on the same four training passages, passage by passage: both the exact matches and
    # the matching-prefix lengths must fall by more than 3 standard errors of the per-passage difference. No effect
    # (the same per-passage results) gives 0 > 0, a failure. Four passages are 3 degrees of freedom, where 3 SE is a
    # one-sided p of about 0.03, so the margin matters: seen prefix lengths 40, 40, 40, 40 against 0, 2, 4, 15,
    # -34.75 tokens with an SE of 3.35 (10.4 SE); exact matches 4 against 0 (SE 0: a single Goldfish match fails).
    standard_lengths = standard["details"]["train"]["prefix_match_per_passage"]
    goldfish_lengths = goldfish["details"]["train"]["prefix_match_per_passage"]
    pairs = list(zip(standard_lengths, goldfish_lengths, strict=True))
    for name, drops in (
        ("prefix_match", [s - g for s, g in pairs]),
        ("exact_match", [int(s == SUFFIX_TOKENS) - int(g == SUFFIX_TOKENS) for s, g in pairs]),
    ):
        mean, standard_error = statistics.fmean(drops), statistics.stdev(drops) / len(drops) ** 0.5
        print(f"{name}: Goldfish lower by {mean:.2f}, standard error {standard_error:.2f}")
        assert mean > 3 * standard_error, (name, standard_lengths, goldfish_lengths)


def test_audit_names_a_missing_model_folder(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"model='.*no_model': no such file or folder"):
        evaluate_memorization(tmp_path / "no_model", [train], [train])
