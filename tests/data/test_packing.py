import random

import datasets
import numpy as np
import pytest
import torch

import apertus_hf
from apertus_hf.data import IGNORE_INDEX, tokenize_and_pack
from tests.helpers import TINY_TOKENIZER_TEXTS, tiny_config

SEQ_LEN = 16


def random_documents(count: int, seed: int = 0) -> list[str]:
    """Documents of 1 to ~40 words from the tokenizer's sentences, and one ~6 rows long."""
    rng = random.Random(seed)
    words = " ".join(TINY_TOKENIZER_TEXTS).split()
    documents = [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(count)]
    documents[count // 2] = " ".join(words[:20] * 2)
    return documents


def as_array(dataset, column: str) -> np.ndarray:
    return np.array([np.asarray(row[column]) for row in dataset], dtype=np.int64)


@pytest.fixture
def packed(tokenizer):
    documents = random_documents(50)
    dataset = tokenize_and_pack(datasets.Dataset.from_dict({"text": documents}), tokenizer, SEQ_LEN, batch_size=8)
    return documents, dataset


def test_rows_have_exactly_seq_len_tokens_and_the_three_columns(packed):
    _, dataset = packed
    assert dataset.column_names == ["input_ids", "position_ids", "labels"]
    for column in dataset.column_names:
        assert {len(row) for row in dataset[column]} == {SEQ_LEN}


def test_unpacking_the_rows_gives_every_document_once_in_order(packed, tokenizer):
    documents, dataset = packed
    tokens = as_array(dataset, "input_ids").reshape(-1)
    tokens = tokens[tokens != tokenizer.pad_token_id]
    starts = np.flatnonzero(tokens == tokenizer.bos_token_id)
    unpacked = np.split(tokens, starts[1:])
    assert starts[0] == 0
    assert len(unpacked) == len(documents)
    for document, ids in zip(documents, unpacked, strict=True):
        expected = tokenizer(document, add_special_tokens=False)["input_ids"]
        assert ids.tolist() == [tokenizer.bos_token_id, *expected, tokenizer.eos_token_id]


def test_a_long_document_continues_over_several_rows(packed, tokenizer):
    documents, dataset = packed
    long_ids = tokenizer(documents[25], add_special_tokens=False)["input_ids"]
    assert len(long_ids) > 3 * SEQ_LEN
    rows = as_array(dataset, "input_ids")
    # Some row holds only tokens of the long document (no <s>, </s> or padding).
    inner_rows = [row for row in rows if not np.isin(row, [1, 2, 3]).any()]
    assert len(inner_rows) >= 2


def test_position_ids_restart_exactly_at_document_starts_row_starts_and_padding(packed, tokenizer):
    _, dataset = packed
    input_ids, position_ids = as_array(dataset, "input_ids"), as_array(dataset, "position_ids")
    for tokens, positions in zip(input_ids, position_ids, strict=True):
        pad = tokens == tokenizer.pad_token_id
        first_pad = np.arange(SEQ_LEN) == (np.argmax(pad) if pad.any() else -1)
        restarts = (tokens == tokenizer.bos_token_id) | first_pad
        restarts[0] = True
        assert np.array_equal(positions == 0, restarts)
        # Between restarts the positions count up by one.
        assert np.all(np.diff(positions)[~restarts[1:]] == 1)


def test_labels_are_the_tokens_except_at_document_starts_and_padding(packed, tokenizer):
    _, dataset = packed
    input_ids, labels = as_array(dataset, "input_ids"), as_array(dataset, "labels")
    ignored = (input_ids == tokenizer.bos_token_id) | (input_ids == tokenizer.pad_token_id)
    assert np.array_equal(labels == IGNORE_INDEX, ignored)
    assert np.array_equal(labels[~ignored], input_ids[~ignored])


def test_padding_is_only_the_end_of_each_map_batch(tokenizer):
    documents = random_documents(50)
    dataset = tokenize_and_pack(datasets.Dataset.from_dict({"text": documents}), tokenizer, SEQ_LEN, batch_size=8)
    expected_rows = 0
    for start in range(0, len(documents), 8):
        encoded = tokenizer(documents[start : start + 8], add_special_tokens=False)["input_ids"]
        expected_rows += -(-sum(len(ids) + 2 for ids in encoded) // SEQ_LEN)
    assert len(dataset) == expected_rows


def test_dataset_and_iterable_dataset_give_the_same_rows(tokenizer):
    documents = datasets.Dataset.from_dict({"text": random_documents(40, seed=1), "id": list(range(40))})
    packed = tokenize_and_pack(documents, tokenizer, SEQ_LEN, batch_size=7)
    streamed = tokenize_and_pack(documents.to_iterable_dataset(num_shards=1), tokenizer, SEQ_LEN, batch_size=7)
    assert isinstance(streamed, datasets.IterableDataset)
    for column in ("input_ids", "position_ids", "labels"):
        assert np.array_equal(as_array(streamed, column), as_array(packed, column))


def test_special_token_text_inside_a_document_stays_plain_text(tokenizer):
    dataset = tokenize_and_pack(datasets.Dataset.from_dict({"text": ["a </s> b <s> c <pad>"]}), tokenizer, 64)
    tokens = np.asarray(dataset[0]["input_ids"])
    assert tokens[0] == tokenizer.bos_token_id
    assert np.count_nonzero(tokens == tokenizer.bos_token_id) == 1
    assert np.count_nonzero(tokens == tokenizer.eos_token_id) == 1


def test_bad_arguments_are_rejected(tokenizer):
    documents = datasets.Dataset.from_dict({"body": ["x"]})
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        tokenize_and_pack(documents, tokenizer, 1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        tokenize_and_pack(documents, tokenizer, 8, batch_size=0)
    with pytest.raises(ValueError, match=r"no column 'text'; their columns are \['body'\]"):
        tokenize_and_pack(documents, tokenizer, 8)
    without_pad = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="no pad_token_id"):
        tokenize_and_pack(documents, without_pad, 8, text_column="body")


def test_a_packed_row_gives_each_document_its_own_logits_and_loss(tokenizer):
    """The model-side property: packing changes nothing for the model, documents do not see each other."""
    texts = ["The quick brown fox.", "Le chat dort sur la table, près de la fenêtre.", "Der Zug fährt ab."]
    row = tokenize_and_pack(datasets.Dataset.from_dict({"text": texts}), tokenizer, 64)[0]
    input_ids, position_ids, labels = (
        torch.as_tensor(row[column], dtype=torch.long)[None] for column in ("input_ids", "position_ids", "labels")
    )
    model = apertus_hf.ApertusForCausalLM(tiny_config(vocab_size=len(tokenizer))).eval()

    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False)
        start, losses, targets = 0, [], []
        for text in texts:
            ids = torch.tensor([[1, *tokenizer(text, add_special_tokens=False)["input_ids"], 2]])
            alone = model(input_ids=ids, labels=ids, use_cache=False)
            end = start + ids.shape[1]
            torch.testing.assert_close(packed.logits[:, start:end], alone.logits, atol=1e-5, rtol=1e-5)
            losses.append(alone.loss)
            targets.append(ids.shape[1] - 1)
            start = end

    assert start < 64  # the row ends in padding, whose labels leave the loss unchanged
    expected = sum(loss * count for loss, count in zip(losses, targets, strict=True)) / sum(targets)
    torch.testing.assert_close(packed.loss, expected)
