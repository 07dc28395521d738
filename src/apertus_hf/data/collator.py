"""Batches of packed rows: the Goldfish drops applied to the labels, and the documents and positions the model sees."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.masking_utils import find_packed_sequence_indices

from .goldfish import apply_goldfish
from .packing import IGNORE_INDEX

PACKED_COLUMNS = ("input_ids", "position_ids", "labels")


@dataclass
class PackedBatchCollator:
    """Stacks rows of `tokenize_and_pack` into (B, seq_len) `torch.long` tensors and applies the Goldfish loss.

    The batch holds `input_ids`, `labels`, `position_ids` and `seq_idx`, and no `attention_mask`. `seq_idx` is the
    document of every token within its row (0, 1, ...; `transformers`' packed-batch argument), which the model
    keeps attention inside on every attention backend; with `document_masking=False` it is 0 everywhere and each
    row is attended causally as a whole. `position_ids` restart at every document as packed, or with
    `reset_position_ids=False` run 0 .. seq_len-1 along each row. The documents come from the restarts of the
    packed rows' position ids, so the two switches are independent. The labels get the Goldfish drops of
    `apply_goldfish` row by row (each row is its own sequence of labels; -100 stays -100).

    Attributes:
        goldfish_k: Goldfish drop frequency (about 1/k of the targets are dropped); None disables Goldfish, and
            the labels are then those of the rows.
        goldfish_h: Goldfish context width.
        document_masking: Attention stays inside each document (Megatron's `--reset-attention-mask`).
        reset_position_ids: Position ids restart at each document (Megatron's `--reset-position-ids`).
    """

    goldfish_k: int | None = 50
    goldfish_h: int = 50
    document_masking: bool = True
    reset_position_ids: bool = True

    def __post_init__(self) -> None:
        for name in ("goldfish_k", "goldfish_h"):
            value = getattr(self, name)
            if name == "goldfish_k" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1 (or goldfish_k=None to disable), got {value!r}.")
        for name in ("document_masking", "reset_position_ids"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")

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
        batch["seq_idx"] = self._seq_idx(batch["position_ids"])
        if not self.reset_position_ids:
            batch["position_ids"] = (
                torch.arange(batch["position_ids"].shape[1]).expand_as(batch["position_ids"]).clone()
            )
        if self.goldfish_k is not None:
            # The input ids are the labels before masking: hashing them (the <s> of a document start included)
            # makes the drops those of Megatron, which hashes the raw labels and masks afterwards.
            batch["labels"] = apply_goldfish(
                batch["labels"], self.goldfish_k, self.goldfish_h, IGNORE_INDEX, unmasked_labels=batch["input_ids"]
            )
        return batch

    def _seq_idx(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The `seq_idx` of packed rows from their `position_ids`, which restart at every document (and row start)."""
        if not self.document_masking:
            return torch.zeros_like(position_ids)
        documents = find_packed_sequence_indices(position_ids)
        return torch.zeros_like(position_ids) if documents is None else documents
