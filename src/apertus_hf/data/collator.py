"""Batches of packed rows, with the Goldfish drops applied to the labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .goldfish import apply_goldfish
from .packing import IGNORE_INDEX

PACKED_COLUMNS = ("input_ids", "position_ids", "labels")


@dataclass
class PackedBatchCollator:
    """Stacks rows of `tokenize_and_pack` into (B, seq_len) `torch.long` tensors and applies the Goldfish loss.

    The batch holds `input_ids`, `position_ids` and `labels`, and no `attention_mask`: the model masks attention
    between documents from the restarts of `position_ids`. The labels get the Goldfish drops of `apply_goldfish`
    row by row (each row is its own sequence of labels; -100 stays -100).

    Attributes:
        goldfish_k: Goldfish drop frequency (about 1/k of the targets are dropped); None disables Goldfish, and
            the labels are then those of the rows.
        goldfish_h: Goldfish context width.
    """

    goldfish_k: int | None = 50
    goldfish_h: int = 50

    def __post_init__(self) -> None:
        for name in ("goldfish_k", "goldfish_h"):
            value = getattr(self, name)
            if name == "goldfish_k" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1 (or goldfish_k=None to disable), got {value!r}.")

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PackedBatchCollator got an empty list of rows.")
        batch = {}
        for column in PACKED_COLUMNS:
            missing = [i for i, row in enumerate(rows) if column not in row]
            if missing:
                raise KeyError(
                    f"Row {missing[0]} has no {column!r} (it has {sorted(rows[missing[0]])}); "
                    "the collator takes the rows of tokenize_and_pack."
                )
            lengths = {len(row[column]) for row in rows}
            if len(lengths) != 1:
                raise ValueError(f"Rows of one batch must have one length, got {column!r} lengths {sorted(lengths)}.")
            batch[column] = torch.from_numpy(np.asarray([row[column] for row in rows], dtype=np.int64))
        if self.goldfish_k is not None:
            batch["labels"] = apply_goldfish(batch["labels"], self.goldfish_k, self.goldfish_h, IGNORE_INDEX)
        return batch
