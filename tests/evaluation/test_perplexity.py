"""Perplexity and bits per byte: the metrics are what they claim to be, on a tiny random model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from apertus_hf import ApertusForCausalLM
from apertus_hf.evaluation.perplexity import (
    Document,
    LossTotals,
    compute_perplexity,
    document_token_ids,
    evaluate_perplexity,
    read_documents,
    sliding_windows,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTS = {
    "en": ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question."],
    "fr": ["Au commencement, Dieu créa les cieux et la terre.", "Être ou ne pas être, là est la question."],
}


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return ApertusForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _documents() -> list[Document]:
    return [Document(text, language) for language, texts in TEXTS.items() for text in texts]


@torch.no_grad()
def _direct_nll(model, ids: list[int]) -> tuple[float, int]:
    """Summed NLL and target count of `ids` as one sequence, by the model's own loss."""
    input_ids = torch.tensor([ids])
    return model(input_ids=input_ids, labels=input_ids).loss.item() * (len(ids) - 1), len(ids) - 1


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def test_perplexity_is_exp_of_mean_token_loss(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    documents = _documents()
    direct = [_direct_nll(model, document_token_ids(document.text, tokenizer)) for document in documents]
    nll, tokens = sum(n for n, _ in direct), sum(t for _, t in direct)
    overall, _ = compute_perplexity(model, tokenizer, documents, max_length=64, batch_size=3)  # batches are padded
    assert (
        overall.tokens
        == tokens
        == sum(len(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in documents)
    )
    metrics = overall.metrics()
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_document_starts_with_bos_and_splits_special_token_strings(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    ids = document_token_ids("hello </s> world", tokenizer)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id not in ids


def test_document_shorter_than_window_equals_direct_computation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = TEXTS["en"][0]
    nll, tokens = _direct_nll(model, document_token_ids(text, tokenizer))
    overall, _ = compute_perplexity(model, tokenizer, [Document(text, "en")], max_length=64, stride=8)
    assert overall.tokens == tokens
    assert overall.nll == pytest.approx(nll, rel=1e-5)


def test_stride_equal_to_max_length_scores_independent_chunks(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = " ".join(text for texts in TEXTS.values() for text in texts)
    ids = document_token_ids(text, tokenizer)
    max_length = 16
    assert len(ids) > 3 * max_length
    chunks = [ids[start : start + max_length] for start in range(0, len(ids), max_length)]
    direct = [_direct_nll(model, chunk) for chunk in chunks if len(chunk) > 1]
    overall, _ = compute_perplexity(model, tokenizer, [Document(text, "all")], max_length, max_length, batch_size=2)
    assert overall.tokens == sum(t for _, t in direct)
    assert overall.nll == pytest.approx(sum(n for n, _ in direct), rel=1e-5)


@pytest.mark.parametrize(("length", "max_length", "stride"), [(50, 16, 8), (50, 16, 15), (50, 16, 1), (17, 16, 4)])
def test_overlapping_windows_score_every_token_once_with_enough_context(length, max_length, stride):
    windows = sliding_windows(list(range(length)), max_length, stride)
    targets = []
    for window in windows:
        assert len(window.input_ids) <= max_length
        first_target = window.input_ids[-window.scored]
        context = first_target - window.input_ids[0]
        assert context >= (max_length - stride if window.input_ids[0] > 0 else 1)
        targets.extend(window.input_ids[-window.scored :])
    assert targets == list(range(1, length))


def test_bits_per_byte_is_total_nll_in_bits_over_utf8_bytes(model_and_tokenizer):
    totals = LossTotals(nll=120.0, tokens=40, bytes=100, documents=2)
    assert totals.metrics()["bits_per_byte"] == pytest.approx(120.0 / math.log(2) / 100)
    assert totals.metrics()["loss"] == pytest.approx(3.0)
    model, tokenizer = model_and_tokenizer
    overall, _ = compute_perplexity(model, tokenizer, _documents(), max_length=64)
    assert overall.bytes == sum(len(document.text.encode("utf-8")) for document in _documents())
    assert overall.bytes > sum(len(document.text) for document in _documents())  # "é", "ê" are two bytes


def test_groups_split_the_documents(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    overall, groups = compute_perplexity(model, tokenizer, _documents(), max_length=64)
    assert sorted(groups) == ["en", "fr"]
    for language, group in groups.items():
        alone, _ = compute_perplexity(model, tokenizer, [Document(t, language) for t in TEXTS[language]], 64)
        assert (group.tokens, group.bytes, group.documents) == (alone.tokens, alone.bytes, 2)
        assert group.nll == pytest.approx(alone.nll, rel=1e-5)
    assert overall.tokens == sum(group.tokens for group in groups.values())
    assert overall.nll == pytest.approx(sum(group.nll for group in groups.values()), rel=1e-6)


def test_read_documents_groups_by_field_or_file(tmp_path):
    first = _write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "language": "en", "source": "x"}])
    second = _write_jsonl(tmp_path / "b.jsonl", [{"text": "deux", "language": "fr", "source": "x"}])
    assert [d.group for d in read_documents([first, second], "language")] == ["en", "fr"]
    assert [d.group for d in read_documents([first, second], "source")] == ["x", "x"]
    assert [(d.text, d.group) for d in read_documents([first, second], "file")] == [
        ("one", "a.jsonl"),
        ("deux", "b.jsonl"),
    ]


def test_script_writes_the_result_json(tiny_model_dir, tmp_path):
    data = _write_jsonl(
        tmp_path / "data.jsonl",
        [{"text": text, "language": language, "source": "test"} for language, texts in TEXTS.items() for text in texts],
    )
    output = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(REPO_ROOT / "eval" / "perplexity.py"), "--model", str(tiny_model_dir)]
    command += ["--data", str(data), "--group_by", "language", "--max_length", "8", "--stride", "4"]
    command += ["--output", str(output), "--device", "cpu"]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(output.read_text())
    assert result["evaluation"] == "perplexity" and result["task_type"] == "text-generation"
    assert set(result["metrics"]) == {"perplexity", "loss", "bits_per_byte"}
    assert math.exp(result["metrics"]["loss"]) == pytest.approx(result["metrics"]["perplexity"])
    assert sorted(result["details"]["groups"]) == ["en", "fr"]
    assert result["settings"]["max_length"] == 8 and result["settings"]["stride"] == 4
    assert "bits_per_byte" in completed.stdout


def test_missing_data_file_is_named(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl does not exist"):
        evaluate_perplexity(tiny_model_dir, [tmp_path / "missing.jsonl"])


def test_missing_model_folder_is_named(tmp_path):
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": "hello"}])
    with pytest.raises(FileNotFoundError, match=r"model='.*no_model': no such file or folder"):
        evaluate_perplexity(tmp_path / "no_model", [data])


@pytest.mark.parametrize("group_by", ["language", "file"])
def test_missing_text_column_names_file_and_line(tmp_path, group_by):
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": "ok", "language": "en"}, {"body": "x", "language": "en"}])
    with pytest.raises(ValueError, match=r"data.jsonl, line 2: .*'text'"):
        read_documents([data], group_by)


def test_missing_group_field_suggests_group_by_file(tmp_path):
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": "ok"}])
    with pytest.raises(ValueError, match=r"line 1: the record has no 'language' field .*--group_by file"):
        read_documents([data], "language")
