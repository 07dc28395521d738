"""The corpus and tokenizer shipped under data/ are what the default pretraining run trains on."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

DATA = Path(__file__).resolve().parents[2] / "data"
CORPUS_FILES = sorted((DATA / "corpus").glob("*.jsonl"))


def read_records(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return AutoTokenizer.from_pretrained(DATA / "tokenizer")


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda path: path.name)
def test_every_document_has_text_language_and_source(path):
    records = read_records(path)
    assert records, f"{path} is empty"
    for line_number, record in enumerate(records, start=1):
        where = f"{path.name}:{line_number}"
        assert isinstance(record["text"], str) and record["text"].strip(), where
        assert record["language"] == path.stem, where
        assert isinstance(record["source"], str) and record["source"], where
        assert "\r" not in record["text"], where


def test_corpus_is_multilingual_and_a_few_megabytes():
    assert len({path.stem for path in CORPUS_FILES}) >= 6
    total_bytes = sum(path.stat().st_size for path in CORPUS_FILES)
    assert 1_000_000 < total_bytes < 4_000_000


def test_shipped_tokenizer_has_the_small_vocab_and_apertus_special_ids(shipped_tokenizer):
    assert len(shipped_tokenizer) == 8192
    assert (shipped_tokenizer.bos_token, shipped_tokenizer.bos_token_id) == ("<s>", 1)
    assert (shipped_tokenizer.eos_token, shipped_tokenizer.eos_token_id) == ("</s>", 2)
    assert (shipped_tokenizer.pad_token, shipped_tokenizer.pad_token_id) == ("<pad>", 3)
    assert shipped_tokenizer.convert_tokens_to_ids(["<|system_start|>", "<|assistant_end|>"]) == [61, 68]


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda path: path.name)
def test_shipped_tokenizer_round_trips_every_language(shipped_tokenizer, path):
    records = read_records(path)
    for record in (records[0], records[len(records) // 2], records[-1]):
        ids = shipped_tokenizer(record["text"])["input_ids"]
        assert ids[0] == 1
        assert 0 not in ids
        assert shipped_tokenizer.decode(ids[1:]) == record["text"]
