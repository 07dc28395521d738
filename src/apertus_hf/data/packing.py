"""Tokenize documents and pack them into fixed-length rows with per-document position ids."""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np

from ..loss import IGNORE_INDEX


def tokenize_and_pack(
    documents: datasets.Dataset | datasets.IterableDataset,
    tokenizer: Any,
    seq_len: int,
    *,
    batch_size: int = 1000,
    num_proc: int | None = None,
    text_column: str = "text",
) -> datasets.Dataset | datasets.IterableDataset:
    """Rows of exactly `seq_len` tokens: `<s> doc </s>` for every document, back to back.

    Each map batch of `batch_size` documents is tokenized in one call of the fast tokenizer (special tokens in the
    text, such as a literal "</s>", stay plain text), then every document becomes `<s>` + its ids + `</s>` and the
    documents are laid end to end and cut into rows of `seq_len`. A document longer than the rest of a row continues
    in the next row.

    Columns of every row (numpy int32 arrays of length `seq_len`; a `Dataset` comes in numpy format, and
    `.with_format(None)` gives Python lists):
        input_ids: the tokens.
        position_ids: 0, 1, 2, ... restarting at every document start and at the start of every row (a row's
            attention never sees the previous row); the model masks attention across documents from them.
        labels: the input ids, except `IGNORE_INDEX` (-100) at every `<s>` that starts a document (the target
            predicted from the `</s>` before it: the model shifts labels by one) and at padding.

    The tokens left at the end of a batch make a last, shorter row padded with `<pad>` to `seq_len`; the padding is
    its own segment (position ids 0, 1, ...) and has labels -100, so no document is dropped or split across
    batches. This costs less than one row of padding per `batch_size` documents.

    Args:
        documents: a dataset with a `text_column` of strings (see `load_documents`); other columns are dropped.
        tokenizer: a `transformers` fast tokenizer with `bos_token_id`, `eos_token_id` and `pad_token_id`.
        seq_len: tokens per row, >= 2.
        batch_size: documents per map batch (and per tokenizer call).
        num_proc: processes for the map (`Dataset` only; ignored by `IterableDataset`).
        text_column: the column with the documents.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (room for <s> and one token), got {seq_len!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    special_ids = {}
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is None:
            raise ValueError(
                f"The tokenizer has no {name}_token_id; set it (e.g. tokenizer.{name}_token = '<s>' / '</s>' / "
                "'<pad>') before packing."
            )
        special_ids[name] = token_id
    column_names = documents.column_names
    if column_names is not None and text_column not in column_names:
        raise ValueError(
            f"documents have no column {text_column!r}; their columns are {column_names}. Pass text_column=..."
        )
    sequence = datasets.Sequence(datasets.Value("int32"), length=seq_len)
    features = datasets.Features({"input_ids": sequence, "position_ids": sequence, "labels": sequence})
    map_kwargs = {} if isinstance(documents, datasets.IterableDataset) else {"num_proc": num_proc}
    packed = documents.map(
        _pack_batch,
        batched=True,
        batch_size=batch_size,
        input_columns=text_column,
        remove_columns=column_names,
        features=features,
        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, **{f"{k}_id": v for k, v in special_ids.items()}},
        **map_kwargs,
    )
    # Rows as numpy arrays, as an IterableDataset yields them: about 3x faster to read than Python lists.
    return packed if isinstance(packed, datasets.IterableDataset) else packed.with_format("numpy")


def tokenize_documents(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """The ids of each document, without special tokens; special tokens written in the text (a literal "</s>") stay
    plain text. The one tokenizer call of every pretraining data path (on the fly and pre-tokenized)."""
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False)
    return encoded["input_ids"]


def _pack_batch(
    texts: list[str], tokenizer: Any, seq_len: int, bos_id: int, eos_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    return pack_token_ids(tokenize_documents(texts, tokenizer), seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def pack_token_ids(
    documents: list[list[int]], seq_len: int, *, bos_id: int, eos_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Pack tokenized documents (without special tokens) into `(rows, seq_len)` int32 arrays; see `tokenize_and_pack`."""
    stream: list[int] = []
    for ids in documents:
        stream.append(bos_id)
        stream.extend(ids)
        stream.append(eos_id)
    if not stream:
        empty = np.zeros((0, seq_len), dtype=np.int32)
        return {"input_ids": empty, "position_ids": empty, "labels": empty}
    lengths = np.fromiter((len(ids) + 2 for ids in documents), dtype=np.int64, count=len(documents))
    doc_starts = np.cumsum(lengths) - lengths
    num_tokens = len(stream)
    num_rows = -(-num_tokens // seq_len)
    size = num_rows * seq_len

    input_ids = np.full(size, pad_id, dtype=np.int32)
    input_ids[:num_tokens] = stream
    index = np.arange(size)
    # Each position's segment starts at the later of its document's start and its row's start; the padding is
    # one more segment starting at num_tokens.
    segment_starts = np.full(size, num_tokens, dtype=np.int64)
    segment_starts[:num_tokens] = np.repeat(doc_starts, lengths)
    segment_starts = np.maximum(segment_starts, index - index % seq_len)
    position_ids = (index - segment_starts).astype(np.int32)
    labels = input_ids.copy()
    labels[doc_starts] = IGNORE_INDEX
    labels[num_tokens:] = IGNORE_INDEX
    shape = (num_rows, seq_len)
    return {
        "input_ids": input_ids.reshape(shape),
        "position_ids": position_ids.reshape(shape),
        "labels": labels.reshape(shape),
    }
