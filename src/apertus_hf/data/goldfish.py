"""Goldfish loss: the deterministic token-drop mask of the Apertus pretraining recipe.

Goldfish loss (Hans et al. 2024, "Be like a Goldfish, Don't Memorize! Mitigating Memorization in Generative LLMs",
arXiv:2406.10209) leaves a pseudo-random ~1/k of the targets out of the next-token loss. The choice of a target
depends only on the h tokens that end at it, so a passage that occurs many times in the corpus always loses the
same tokens, and the model never sees the complete passage as training signal.

Apertus uses the paper's "hash-table" variant, which is defined here as follows:

* The hash table is `GOLDFISH_TABLE_SIZE` = 1,000,003 (a prime) uniform floats in [0, 1), drawn in float32 on the
  CPU by `torch.rand(GOLDFISH_TABLE_SIZE, generator=torch.Generator().manual_seed(GOLDFISH_TABLE_SEED))` with
  `GOLDFISH_TABLE_SEED` = 2971215073. Drawing it on the CPU makes it the same on every machine; it is then copied
  to the device of the labels.
* For a target at position t >= h - 1 of a sequence of labels, the key is the product of the h label ids
  labels[t-h+1 .. t] (before masking, see below), computed in int64 with two's-complement wrap-around, then reduced to [0, 1,000,003) by a
  non-negative (floor) modulo. The product is reduced once at the end, not after every factor: the two differ
  once the product overflows int64, and the former is the definition.
* The target is dropped when table[key] < 1/k, the comparison being made in float32 (the dtype of the table).
  The first h - 1 targets of a sequence have no full context and are never dropped.

The wrapped product keeps only the low 64 bits, so a context whose ids hold 64 or more factors of two in total has
product 0 and key 0, which the table keeps (table[0] is about 0.23). With h = 50 this is true of about a tenth of
the contexts of uniformly random ids, which is why such ids lose about 0.83/k rather than 1/k of their targets.

The ids hashed are the label ids before any target was masked (`unmasked_labels`), as in swiss-ai/Megatron-LM
(`apply_goldfish` in `megatron/core/datasets/gpt_dataset.py`): its dataset hashes the raw label row, in which the
`<s>` that starts a document is an ordinary label and padding is 0, and only afterwards removes masked targets
(the `<s>` after `</s>` with `--eod-mask-loss`, padding) through its loss mask. Hashing -100 at those positions
instead would change the keys of the h - 1 targets after every document start, and about 2/k of their decisions.
Without `unmasked_labels` the labels are hashed as given, -100 included. Padding only ever ends a row, so the ids
hashed there decide nothing but the padding's own targets; whether they are 0 or the pad id, the kept targets get
Megatron's decisions. A target that is itself ignored is never reported as dropped: it carries no loss anyway,
and reporting it would inflate the drop count.
"""

from __future__ import annotations

import functools

import torch

GOLDFISH_TABLE_SIZE = 1_000_003
GOLDFISH_TABLE_SEED = 2971215073

# The ids are converted to int64 (the wrap-around is that of int64); these dtypes convert without loss.
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@functools.cache
def _hash_table(device: torch.device) -> torch.Tensor:
    """The Goldfish hash table (see the module docstring) on `device`, built once per process and device."""
    if device.type != "cpu":
        return _hash_table(torch.device("cpu")).to(device)
    generator = torch.Generator().manual_seed(GOLDFISH_TABLE_SEED)
    return torch.rand(GOLDFISH_TABLE_SIZE, generator=generator, dtype=torch.float32)


def _check_arguments(labels: torch.Tensor, unmasked_labels: torch.Tensor | None, k: int, h: int) -> None:
    for name, ids in (("labels", labels), ("unmasked_labels", unmasked_labels)):
        if ids is None and name == "unmasked_labels":
            continue
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}.")
        if ids.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}; pass them as torch.long.")
        if ids.dim() == 0:
            raise ValueError(f"{name} must have shape (T,) or (B, T), got a 0-dimensional tensor.")
    if unmasked_labels is not None and (unmasked_labels.shape, unmasked_labels.device) != (labels.shape, labels.device):
        raise ValueError(
            f"unmasked_labels must have the shape and device of labels, got {tuple(unmasked_labels.shape)} on "
            f"{unmasked_labels.device} for labels {tuple(labels.shape)} on {labels.device}; pass the label ids of "
            "the same rows before masking (for packed rows: their input_ids)."
        )
    for name, value in (("k", k), ("h", h)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")


def _context_keys(labels: torch.Tensor, h: int) -> torch.Tensor:
    """Table index of every full context: shape (..., T - h + 1), entry i for the target at position i + h - 1."""
    windows = labels.to(torch.int64).unfold(-1, h, 1)
    # torch.prod over int64 wraps around like C int64 arithmetic; wrapped multiplication is associative and
    # commutative, so the order in which the kernel multiplies the h factors does not change the result.
    # torch.remainder is a floor modulo: non-negative for the positive table size, also for negative products.
    return torch.remainder(torch.prod(windows, dim=-1), GOLDFISH_TABLE_SIZE)


def goldfish_drop_mask(
    labels: torch.Tensor,
    k: int = 50,
    h: int = 50,
    *,
    ignore_index: int = -100,
    unmasked_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which targets the Goldfish loss leaves out of the loss (True = dropped).

    Args:
        labels: integer token ids of shape (T,) or (B, T) (any number of leading dims works), `ignore_index` at
            targets without loss; the mask is computed along the last dim, each row on its own.
        k: drop frequency, about 1/k of the targets are dropped (somewhat fewer for a large h, see the module
            docstring). k=1 drops every target with a full context.
        h: context width, the number of ids (ending at and including the target) that decide whether it is
            dropped. The first h - 1 targets of each row, and every target of a row shorter than h, are kept.
        ignore_index: label value of targets that are already ignored; they are never reported as dropped.
        unmasked_labels: the label ids before masking, of the shape of `labels`: the ids that are hashed, as
            Megatron hashes them (see the module docstring). For packed rows these are the `input_ids` (the labels
            are the unshifted input ids). None hashes `labels` as given, `ignore_index` included.

    Returns:
        A bool tensor of the shape and device of `labels`. The decisions depend only on the label ids, so they are
        the same in every process and on every machine. See the module docstring for the exact definition.
    """
    _check_arguments(labels, unmasked_labels, k, h)
    hashed_ids = labels if unmasked_labels is None else unmasked_labels
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    if labels.shape[-1] < h:
        return mask
    mask[..., h - 1 :] = _hash_table(labels.device)[_context_keys(hashed_ids, h)] < 1 / k
    return mask & (labels != ignore_index)


def apply_goldfish(
    labels: torch.Tensor,
    k: int = 50,
    h: int = 50,
    ignore_index: int = -100,
    *,
    unmasked_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """A copy of `labels` with the targets that `goldfish_drop_mask` drops set to `ignore_index`.

    A cross-entropy that skips `ignore_index` then averages over the kept targets only, which is the Goldfish loss.
    Pass `unmasked_labels` (for packed rows: their `input_ids`) to hash the ids Megatron hashes.
    """
    mask = goldfish_drop_mask(labels, k, h, ignore_index=ignore_index, unmasked_labels=unmasked_labels)
    return labels.masked_fill(mask, ignore_index)
