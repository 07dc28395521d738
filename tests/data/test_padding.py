"""pad_token_rows: the one helper that batches token rows of unequal length."""

import pytest
import torch

from apertus_hf.data.padding import pad_token_rows


def test_right_padding_keeps_every_row_at_position_zero():
    input_ids, attention_mask = pad_token_rows([[5, 6, 7], [8], []], pad_value=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert input_ids.dtype == attention_mask.dtype == torch.long


def test_left_padding_ends_every_row_in_the_last_column():
    input_ids, attention_mask = pad_token_rows([(5, 6, 7), (8,)], pad_value=-1, padding_side="left")
    assert input_ids.tolist() == [[5, 6, 7], [-1, -1, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_no_rows_is_an_error():
    with pytest.raises(ValueError, match="at least one row"):
        pad_token_rows([], pad_value=0)
