"""Padding token rows into one batch: the single helper of every loop that batches rows of unequal length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.nn.utils.rnn import pad_sequence


def pad_token_rows(
    rows: Sequence[Sequence[int]], pad_value: int, padding_side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` as one (len(rows), longest) long tensor filled with `pad_value`, and its attention mask (1 on tokens).

    Right padding for scoring and training (positions count from 0 in every row); left padding for generation, so
    that every row's next token is written at the same column.
    """
    if not rows:
        raise ValueError("pad_token_rows needs at least one row.")
    tensors = [torch.tensor(list(row), dtype=torch.long) for row in rows]
    masks = [torch.ones(len(row), dtype=torch.long) for row in rows]
    input_ids = pad_sequence(tensors, batch_first=True, padding_value=pad_value, padding_side=padding_side)
    attention_mask = pad_sequence(masks, batch_first=True, padding_value=0, padding_side=padding_side)
    return input_ids, attention_mask
