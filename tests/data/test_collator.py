import datasets
import numpy as np
import pytest
import torch

from apertus_hf.data import IGNORE_INDEX, PackedBatchCollator, apply_goldfish, tokenize_and_pack


def random_rows(count: int, seq_len: int, vocab_size: int = 131_072) -> list[dict[str, list[int]]]:
    rows = []
    for _ in range(count):
        input_ids = torch.randint(4, vocab_size, (seq_len,))
        labels = input_ids.clone()
        labels[0] = IGNORE_INDEX
        rows.append({"input_ids": input_ids.tolist(), "position_ids": list(range(seq_len)), "labels": labels.tolist()})
    return rows


def test_batch_is_four_long_tensors_of_shape_rows_by_seq_len():
    batch = PackedBatchCollator()(random_rows(3, 20))
    assert sorted(batch) == ["input_ids", "labels", "position_ids", "seq_idx"]
    for tensor in batch.values():
        assert tensor.dtype == torch.long
        assert tensor.shape == (3, 20)


def test_goldfish_drops_equal_apply_goldfish_on_each_row():
    rows = random_rows(4, 64, vocab_size=50)
    batch = PackedBatchCollator(goldfish_k=3, goldfish_h=5)(rows)
    for row, labels in zip(rows, batch["labels"], strict=True):
        expected = apply_goldfish(
            torch.tensor(row["labels"]), 3, 5, IGNORE_INDEX, unmasked_labels=torch.tensor(row["input_ids"])
        )
        torch.testing.assert_close(labels, expected)
    assert (batch["labels"] == IGNORE_INDEX).sum() > 4  # something beyond the <s> positions was dropped
    torch.testing.assert_close(batch["input_ids"], torch.tensor([row["input_ids"] for row in rows]))


def test_disabled_goldfish_leaves_the_labels_unchanged():
    rows = random_rows(4, 64, vocab_size=50)
    batch = PackedBatchCollator(goldfish_k=None)(rows)
    torch.testing.assert_close(batch["labels"], torch.tensor([row["labels"] for row in rows]))


def test_goldfish_drops_about_one_in_k_targets():
    rows = random_rows(64, 512)
    labels = PackedBatchCollator(goldfish_k=4, goldfish_h=3)(rows)["labels"]
    # Targets with a full context of h=3 labels: positions 2.. of each row (position 0 is already ignored).
    rate = (labels[:, 2:] == IGNORE_INDEX).float().mean().item()
    # 64 * 510 targets at p = 1/4: the standard deviation is 0.0024.
    assert abs(rate - 0.25) < 0.01


def test_collates_packed_rows_from_dataset_and_iterable_dataset(tokenizer):
    documents = datasets.Dataset.from_dict({"text": ["Le chat dort.", "Der Zug fährt ab.", "The quick brown fox."]})
    packed = tokenize_and_pack(documents, tokenizer, 8)
    streamed = tokenize_and_pack(documents.to_iterable_dataset(), tokenizer, 8)
    collator = PackedBatchCollator(goldfish_k=2, goldfish_h=2)
    from_dataset, from_stream = collator(list(packed)), collator(list(streamed))
    for column in from_dataset:
        torch.testing.assert_close(from_dataset[column], from_stream[column])
    assert np.array_equal(from_dataset["input_ids"].numpy(), np.array(packed["input_ids"]))


def test_bad_settings_and_rows_are_rejected():
    with pytest.raises(ValueError, match=r"goldfish_k must be an int >= 1 \(or goldfish_k=None to disable\), got 0"):
        PackedBatchCollator(goldfish_k=0)
    with pytest.raises(ValueError, match="goldfish_h must be an int >= 1"):
        PackedBatchCollator(goldfish_h=-1)
    with pytest.raises(ValueError, match="empty list of rows"):
        PackedBatchCollator()([])
    rows = random_rows(2, 8)
    rows[1]["labels"] = rows[1]["labels"][:5]
    with pytest.raises(ValueError, match=r"'labels' lengths \[5, 8\]"):
        PackedBatchCollator()(rows)
    with pytest.raises(KeyError, match=r"Row 0 has no 'position_ids'"):
        PackedBatchCollator()([{"input_ids": [1, 2], "labels": [1, 2]}])
