"""Pre-tokenized pretraining data: a source tokenized once into memory-mapped token shards, read as packed rows.

`write_pretokenized` tokenizes the documents `load_documents` reads from one `DataSource` (a `datasets` map with
`num_proc` processes, one batched fast-tokenizer call per map batch) and writes them to a folder:

    pretokenized.json      the manifest (below)
    tokens-00000.bin ...   the token stream: every document as `<s> ids </s>`, back to back, in the order
                           load_documents reads them; little-endian uint32, cut into shards of `shard_tokens` tokens
    document_starts.bin    little-endian int64: the position in the stream of each document's `<s>`, ascending

The manifest holds the format and its version, the tokenizer (name, vocabulary size, the SHA-256 of its vocabulary
and its `<s>`/`</s>`/`<pad>` ids: training with another tokenizer is refused), the counts of documents and tokens,
the source it came from and how it was read, and every file with its size and SHA-256. The folder is written under a
temporary name beside it and renamed when complete, so a folder with a manifest is always whole; an existing folder
is replaced only when asked, and only if it is a pre-tokenized folder itself.

`PretokenizedRows` cuts the stream of one folder into rows of `seq_len` tokens, chosen at training time, with the row
schema of `tokenize_and_pack`: reading a row is a slice of a memory map and a few numpy operations. `BlendedRows`
mixes the rows of several folders by weight. A `DataSource` whose path is a pre-tokenized folder is read this way by
the pretraining loop (`blend_pretokenized`).

Mixing: the on-the-fly path mixes sources at document level (`load_documents` draws each next document from a
source at random by weight) and packs the mixture; pre-tokenized sources are packed each on its own and mixed at row
level, as Megatron's BlendedDataset does: each next row comes from the source that is furthest behind its weight
(see `BlendedRows`). Neither order depends on a seed; the training loop shuffles the rows with the data seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import yaml

from ..loss import IGNORE_INDEX
from ..tokenization import load_tokenizer
from .packing import tokenize_documents
from .sources import DataSource, LoadStats, OnBadRecord, TextUnit, load_documents

FORMAT_NAME = "apertus_hf-pretokenized"
FORMAT_VERSION = 1
MANIFEST_NAME = "pretokenized.json"
DOCUMENT_STARTS_NAME = "document_starts.bin"
TOKEN_DTYPE = np.dtype("<u4")
START_DTYPE = np.dtype("<i8")
DEFAULT_SHARD_TOKENS = 2**30
"""Tokens per shard file (4 GiB): few enough files that a 15T-token corpus maps about 15,000 of them."""
MAX_BLEND_PERIOD = 2**20
"""Rows in one period of a blend's pattern; weights that need more are rounded to shares of 2**20."""

_WRITE_BATCH_DOCUMENTS = 10_000
_HASH_CHUNK_BYTES = 64 * 2**20


def is_pretokenized(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `write_pretokenized` (it holds a pretokenized.json)."""
    return os.path.isfile(os.path.join(os.path.expanduser(str(path)), MANIFEST_NAME))


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What must match between the tokenizer a folder was written with and the one that trains on it: the vocabulary
    (size and the SHA-256 of its token -> id pairs in id order) and the ids of `<s>`, `</s>` and `<pad>`."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    digest = hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode()).hexdigest()
    return {
        "vocab_size": len(tokenizer),
        "vocab_sha256": digest,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_pretokenized(
    source: DataSource,
    tokenizer: Any,
    output_dir: str | os.PathLike,
    *,
    tokenizer_name: str | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    on_bad_record: OnBadRecord = "error",
    text_unit: TextUnit = "file",
    overwrite: bool = False,
) -> PretokenizedFolder:
    """Tokenize the documents of `source` into the pre-tokenized folder `output_dir` (see the module docstring).

    Args:
        source: the documents, read by `load_documents` (its `weight` is not used here).
        tokenizer: a `transformers` fast tokenizer with `bos_token_id`, `eos_token_id` and `pad_token_id`; the
            documents are tokenized as `tokenize_and_pack` does (no special tokens added, special tokens in the
            text kept as plain text).
        output_dir: the folder to write; its parent is created if needed.
        tokenizer_name: the name recorded in the manifest (default: the tokenizer's `name_or_path`).
        num_proc: processes that read the files and tokenize (`datasets` num_proc); the folder written is the same
            for any number.
        batch_size: documents per map batch and tokenizer call.
        shard_tokens: tokens per shard file.
        on_bad_record, text_unit: as for `load_documents`.
        overwrite: replace `output_dir` when it is a pre-tokenized folder already; without it an existing
            `output_dir` is an error.

    Returns:
        The folder written, opened.
    """
    for name, value in (("batch_size", batch_size), ("shard_tokens", shard_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    special_ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    missing = [name for name, token_id in special_ids.items() if token_id is None]
    if missing:
        raise ValueError(
            f"The tokenizer has no {', '.join(f'{name}_token_id' for name in missing)}; set them (e.g. "
            "tokenizer.bos_token = '<s>', eos_token = '</s>', pad_token = '<pad>') before tokenizing."
        )
    if is_pretokenized(source.path):
        raise ValueError(f"{source.path} is a pre-tokenized folder already; give the raw documents it came from.")
    output = Path(output_dir)
    _check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.incomplete-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        stats = LoadStats()
        documents = load_documents(
            [source], on_bad_record=on_bad_record, text_unit=text_unit, num_proc=num_proc, stats=stats
        )
        cache = staging / "cache"
        cache.mkdir()
        tokenized = documents.map(
            _tokenize_documents,
            batched=True,
            batch_size=batch_size,
            num_proc=num_proc,
            input_columns="text",
            remove_columns=documents.column_names,
            features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint32"))}),
            fn_kwargs={"tokenizer": tokenizer, "bos_id": special_ids["bos"], "eos_id": special_ids["eos"]},
            # The map's Arrow files go into the folder being written (and are removed before it is complete), not
            # into the `datasets` cache, where they would stay as a second copy of every token.
            cache_file_name=str(cache / "tokenized.arrow"),
            desc=f"Tokenizing {source.path}",
        )
        files = _write_stream(tokenized, staging, shard_tokens)
        del tokenized
        shutil.rmtree(cache)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "source": {key: value for key, value in dataclasses.asdict(source).items() if key != "weight"},
            "read_with": {"on_bad_record": on_bad_record, "text_unit": text_unit},
            "skipped_records": stats.total_skipped,
            "tokenizer": {
                "name": tokenizer_name or getattr(tokenizer, "name_or_path", ""),
                **tokenizer_fingerprint(tokenizer),
            },
            **files,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PretokenizedFolder(output, tokenizer)


def _check_output_dir(output: Path, overwrite: bool) -> None:
    if not output.exists():
        return
    if not overwrite:
        raise FileExistsError(
            f"{output} exists already. Pass overwrite=True (tokenize_data.py --overwrite true) to replace it, or "
            "choose another output folder."
        )
    if not output.is_dir() or (any(output.iterdir()) and not is_pretokenized(output)):
        raise FileExistsError(
            f"{output} exists and is no pre-tokenized folder (it has no {MANIFEST_NAME}), so it is not replaced even "
            "with overwrite. Choose another output folder."
        )


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename the complete `staging` folder to `output`; an old `output` is renamed away first and removed last."""
    retired = None
    if output.exists():
        retired = output.parent / f".{output.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(output, retired)
    os.rename(staging, output)
    if retired is not None:
        shutil.rmtree(retired)


def _tokenize_documents(texts: list[str], tokenizer: Any, bos_id: int, eos_id: int) -> dict[str, list[list[int]]]:
    return {"input_ids": [[bos_id, *ids, eos_id] for ids in tokenize_documents(texts, tokenizer)]}


class _HashedFile:
    """A binary file written in pieces, with its size and SHA-256."""

    def __init__(self, path: Path):
        self.path, self.handle, self.hash, self.size = path, path.open("wb"), hashlib.sha256(), 0

    def write(self, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        self.handle.write(data)
        self.hash.update(data)
        self.size += len(data)

    def close(self) -> dict[str, Any]:
        self.handle.close()
        return {"file": self.path.name, "bytes": self.size, "sha256": self.hash.hexdigest()}


def _write_stream(tokenized: datasets.Dataset, folder: Path, shard_tokens: int) -> dict[str, Any]:
    """Write the token stream of `tokenized` (a column `input_ids` of documents with their <s> and </s>) as shards
    and the document starts; the manifest's entries for them."""
    shards: list[dict[str, Any]] = []
    shard: _HashedFile | None = None
    starts = _HashedFile(folder / DOCUMENT_STARTS_NAME)
    tokens = documents = 0
    for table in tokenized.with_format("arrow").iter(batch_size=_WRITE_BATCH_DOCUMENTS):
        column = table.column("input_ids").combine_chunks()
        offsets = column.offsets.to_numpy().astype(np.int64)
        starts.write((tokens + offsets[:-1] - offsets[0]).astype(START_DTYPE))
        values = column.flatten().to_numpy(zero_copy_only=False).astype(TOKEN_DTYPE, copy=False)
        documents += len(column)
        while len(values):
            if shard is None or shard.size == shard_tokens * TOKEN_DTYPE.itemsize:
                if shard is not None:
                    shards.append({**shard.close(), "tokens": shard_tokens})
                shard = _HashedFile(folder / f"tokens-{len(shards):05d}.bin")
            room = shard_tokens - shard.size // TOKEN_DTYPE.itemsize
            shard.write(values[:room])
            tokens += min(room, len(values))
            values = values[room:]
    if shard is not None:
        shards.append({**shard.close(), "tokens": shard.size // TOKEN_DTYPE.itemsize})
    return {
        "documents": documents,
        "tokens": tokens,
        "token_dtype": TOKEN_DTYPE.str,
        "shard_tokens": shard_tokens,
        "shards": shards,
        "document_starts": {**starts.close(), "dtype": START_DTYPE.str},
    }


# ---------------------------------------------------------------------------------------------------------------
# Reading


class PretokenizedFolder:
    """A folder written by `write_pretokenized`, opened: its manifest and files checked, its token stream and
    document starts memory-mapped (each shard on first use).

    Opening checks the format version, that every file is there with the size the manifest gives, and that the
    stream starts with `<s>` and ends with `</s>`; `verify()` also compares every file's SHA-256 (it reads them all).

    Args:
        path: the folder.
        tokenizer: the tokenizer that will train on the tokens; one with another vocabulary or other special ids is
            refused. None skips that check.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any = None):
        self.path = Path(os.path.expanduser(str(path)))
        self.manifest = _read_manifest(self.path)
        if tokenizer is not None:
            check_tokenizer(self, tokenizer)
        for entry in [*self.manifest["shards"], self.manifest["document_starts"]]:
            _check_size(self.path, entry)
        self.num_tokens: int = self.manifest["tokens"]
        self.num_documents: int = self.manifest["documents"]
        self.shard_tokens: int = self.manifest["shard_tokens"]
        self.pad_token_id: int = self.manifest["tokenizer"]["pad_token_id"]
        self._shards: list[np.ndarray | None] = [None] * len(self.manifest["shards"])
        self.document_starts = self._map(self.manifest["document_starts"], START_DTYPE)
        self._check_ends()

    def tokens(self, begin: int, end: int) -> np.ndarray:
        """The tokens at stream positions [begin, end), 0 <= begin <= end <= num_tokens (a view when they lie in one
        shard)."""
        first, last = begin // self.shard_tokens, max(begin, end - 1) // self.shard_tokens
        if first == last:
            offset = first * self.shard_tokens
            return self._shard(first)[begin - offset : end - offset]
        pieces = []
        for index in range(first, last + 1):
            offset = index * self.shard_tokens
            pieces.append(self._shard(index)[max(begin - offset, 0) : min(end - offset, self.shard_tokens)])
        return np.concatenate(pieces)

    def verify(self) -> None:
        """Compare the SHA-256 of every file with the manifest's (reads the whole folder); raise on a difference."""
        for entry in [*self.manifest["shards"], self.manifest["document_starts"]]:
            digest = hashlib.sha256()
            with (self.path / entry["file"]).open("rb") as handle:
                while chunk := handle.read(_HASH_CHUNK_BYTES):
                    digest.update(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise ValueError(
                    f"{self.path / entry['file']} does not hold what was written (its SHA-256 differs from the one in "
                    f"{MANIFEST_NAME}): the file is corrupt. Tokenize the source again."
                )

    def _shard(self, index: int) -> np.ndarray:
        shard = self._shards[index]
        if shard is None:
            shard = self._shards[index] = self._map(self.manifest["shards"][index], TOKEN_DTYPE)
        return shard

    def _map(self, entry: Mapping[str, Any], dtype: np.dtype) -> np.ndarray:
        # A plain ndarray view of the memory map: slicing an np.memmap runs Python code on every slice.
        return np.asarray(np.memmap(self.path / entry["file"], dtype=dtype, mode="r"))

    def _check_ends(self) -> None:
        starts = self.document_starts
        tokenizer = self.manifest["tokenizer"]
        problems = []
        if len(starts) != self.num_documents:
            problems.append(f"{len(starts)} document starts for {self.num_documents} documents")
        elif starts[0] != 0 or starts[-1] >= self.num_tokens:
            problems.append(f"document starts from {starts[0]} to {starts[-1]} in a stream of {self.num_tokens} tokens")
        if (
            self.tokens(0, 1)[0] != tokenizer["bos_token_id"]
            or self.tokens(self.num_tokens - 1, self.num_tokens)[0] != tokenizer["eos_token_id"]
        ):
            problems.append("the token stream does not start with <s> and end with </s>")
        if problems:
            raise ValueError(f"{self.path} is corrupt: {'; '.join(problems)}. Tokenize the source again.")

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn get the folder by pickling: they map the files again rather than
        # receiving a copy of every token.
        state = dict(self.__dict__)
        state["_shards"] = [None] * len(self._shards)
        state["document_starts"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.document_starts = self._map(self.manifest["document_starts"], START_DTYPE)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{path} is no pre-tokenized folder: it has no {MANIFEST_NAME}. Write one with "
            "`python recipes/tokenize_data.py --source <documents> --output_dir <folder>`."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{manifest_path} is no valid JSON ({error}); tokenize the source again.") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{manifest_path} is not the manifest of an apertus_hf pre-tokenized folder.")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has pre-tokenized format version {manifest.get('version')!r}; this apertus_hf reads version "
            f"{FORMAT_VERSION}. Tokenize the source again with this version."
        )
    if manifest.get("token_dtype") != TOKEN_DTYPE.str or manifest["document_starts"].get("dtype") != START_DTYPE.str:
        raise ValueError(f"{manifest_path}: unexpected dtypes; tokenize the source again.")
    return manifest


def _check_size(folder: Path, entry: Mapping[str, Any]) -> None:
    path = folder / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {folder / MANIFEST_NAME} lists it. The folder is incomplete; tokenize the source "
            "again."
        )
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ValueError(
            f"{path} has {size:,} bytes, {folder / MANIFEST_NAME} says {entry['bytes']:,}: the file is truncated or "
            "corrupt. Tokenize the source again."
        )


def check_tokenizer(folder: PretokenizedFolder, tokenizer: Any, fingerprint: Mapping[str, Any] | None = None) -> None:
    """Raise a ValueError when `tokenizer` is not the one `folder` was written with (vocabulary or special ids).
    `fingerprint`: `tokenizer_fingerprint(tokenizer)` when the caller has it already."""
    written = folder.manifest["tokenizer"]
    current = fingerprint or tokenizer_fingerprint(tokenizer)
    differences = [key for key, value in current.items() if written.get(key) != value]
    if differences:
        source = folder.manifest["source"]["path"]
        raise ValueError(
            f"{folder.path} was tokenized with the tokenizer {written.get('name')!r} (vocabulary "
            f"{written.get('vocab_size')}, vocabulary hash {str(written.get('vocab_sha256'))[:12]}, <s>/</s>/<pad> "
            f"{written.get('bos_token_id')}/{written.get('eos_token_id')}/{written.get('pad_token_id')}), but this run "
            f"uses {getattr(tokenizer, 'name_or_path', '') or 'another'!r} (vocabulary {current['vocab_size']}, "
            f"vocabulary hash {current['vocab_sha256'][:12]}, <s>/</s>/<pad> {current['bos_token_id']}/"
            f"{current['eos_token_id']}/{current['pad_token_id']}); they differ in {', '.join(differences)}. Train "
            f"with the tokenizer the folder was written with, or tokenize {source} again with this one "
            "(recipes/tokenize_data.py --tokenizer ...)."
        )


class PretokenizedRows:
    """Rows of `seq_len` tokens cut from the token stream of a pre-tokenized folder, with the row schema of
    `tokenize_and_pack`: numpy int32 `input_ids`, `position_ids` (0, 1, ... restarting at each document start and at
    each row start) and `labels` (the input ids, -100 at each document's `<s>` and at padding).

    Row i is the stream's tokens [i * seq_len, (i + 1) * seq_len); the last row is padded with `<pad>` to seq_len (the
    padding is a segment of its own with labels -100, as tokenize_and_pack's). A document longer than the rest of a
    row continues in the next one. With `documents`, only those documents (a range of their indices) are cut into
    rows, from the first one's `<s>`. The rows equal those `tokenize_and_pack` makes of the same documents in one map
    batch; with several batches it pads the end of each batch, and the rows then differ from the first padding on.

    Args:
        folder: the opened folder.
        seq_len: tokens per row, >= 2.
        documents: the documents to read (a range with step 1); None reads them all.
    """

    def __init__(self, folder: PretokenizedFolder, seq_len: int, documents: range | None = None):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2 (room for <s> and one token), got {seq_len!r}.")
        documents = range(folder.num_documents) if documents is None else documents
        if documents.step != 1 or not 0 <= documents.start < documents.stop <= folder.num_documents:
            raise ValueError(
                f"documents must be a non-empty range of step 1 within the {folder.num_documents} documents of "
                f"{folder.path}, got {documents}."
            )
        self.folder, self.seq_len, self.documents = folder, seq_len, documents
        self._begin = int(folder.document_starts[documents.start])
        self._end = (
            int(folder.document_starts[documents.stop]) if documents.stop < folder.num_documents else folder.num_tokens
        )
        self.num_tokens = self._end - self._begin
        self._num_rows = -(-self.num_tokens // seq_len)
        self._positions = np.arange(seq_len, dtype=np.int32)

    def __len__(self) -> int:
        return self._num_rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        num_rows, seq_len, folder = self._num_rows, self.seq_len, self.folder
        if not -num_rows <= index < num_rows:
            raise IndexError(f"row {index} of {num_rows}")
        begin = self._begin + (index % num_rows) * seq_len
        end = min(begin + seq_len, self._end)
        length = end - begin
        input_ids = np.empty(seq_len, dtype=np.int32)
        input_ids[:length] = folder.tokens(begin, end)
        # The documents that start in this row, as offsets in it.
        first, last = folder.document_starts.searchsorted((begin, end))
        starts = folder.document_starts[first:last] - begin
        # Each token's segment starts at the latest document start (or padding start, or row start) at or before it.
        segment_starts = np.zeros(seq_len, dtype=np.int32)
        segment_starts[starts] = starts
        if length < seq_len:
            input_ids[length:] = folder.pad_token_id
            segment_starts[length] = length
        np.maximum.accumulate(segment_starts, out=segment_starts)
        labels = input_ids.copy()
        labels[starts] = IGNORE_INDEX
        labels[length:] = IGNORE_INDEX
        return {"input_ids": input_ids, "position_ids": self._positions - segment_starts, "labels": labels}


class BlendedRows:
    """The rows of several datasets mixed by weight, row by row, as Megatron's BlendedDataset mixes them.

    Megatron picks for each next sample the dataset furthest below its share (largest weight * samples so far -
    its samples so far). Here dataset d's k-th row is due at time (k + 1/2) / weight_d and rows come in the order they
    are due (ties to the earlier dataset): each next row comes from the dataset whose rows so far are furthest below
    its share relative to its weight. After any n rows of a blend of D datasets, each has its share of n to within
    (1 + D) / 2 rows (and within a row or two of what Megatron's rule gives it; tests/data/test_pretokenized.py
    compares them), and row i is found in constant time from a pattern that repeats every sum(integer weights) rows,
    with no index of every row (Megatron builds and caches one, 10 bytes a row).

    The weights are made integers: exactly when they are fractions with small denominators (2, 1, 0.5, 0.35), else
    rounded to shares of 2**20. The blend ends when every dataset has given all its rows at least once; a dataset that
    runs out earlier starts again from its first row (as `load_documents`' "all_exhausted" does).

    Args:
        parts: map-style datasets (`__len__`, `__getitem__`), each with at least one row.
        weights: one positive weight per dataset.
    """

    def __init__(self, parts: Sequence[Any], weights: Sequence[float]):
        if not parts or len(parts) != len(weights):
            raise ValueError(f"BlendedRows needs one weight per dataset, got {len(parts)} and {len(weights)}.")
        for weight in weights:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
                raise ValueError(f"Weights must be finite numbers > 0, got {list(weights)}.")
        if any(len(part) < 1 for part in parts):
            raise ValueError("Every dataset of a blend needs at least one row.")
        self.parts = list(parts)
        self.units = _integer_weights(weights)
        period = sum(self.units)
        # One period of the pattern: dataset d's j-th row of the period is due at (j + 1/2) / units[d] (exact as a
        # float: the times are fractions with denominators < 2**22, so equal ones round equally, distinct ones apart).
        sources = np.repeat(np.arange(len(self.units)), self.units)
        ranks = np.concatenate([np.arange(units) for units in self.units])
        due = (ranks + 0.5) / np.repeat(self.units, self.units)
        order = np.lexsort((sources, due))
        position_in_period = np.empty(period, dtype=np.int64)
        position_in_period[order] = np.arange(period)
        self._period_source = sources[order].tolist()
        self._period_rank = ranks[order].tolist()
        # The blend ends with the last first-time row of the dataset that needs the longest to give all its rows.
        first_row_of = np.concatenate([[0], np.cumsum(self.units)[:-1]])
        ends = []
        for index, part in enumerate(self.parts):
            periods, rank = divmod(len(part) - 1, self.units[index])
            ends.append(periods * period + int(position_in_period[first_row_of[index] + rank]) + 1)
        self._length = max(ends)

    def __len__(self) -> int:
        return self._length

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset, row of that dataset) of row `index` of the blend."""
        if not 0 <= index < self._length:
            raise IndexError(f"row {index} of {self._length}")
        periods, position = divmod(index, len(self._period_source))
        source = self._period_source[position]
        row = periods * self.units[source] + self._period_rank[position]
        return source, row % len(self.parts[source])

    def __getitem__(self, index: int) -> Any:
        source, row = self.locate(index)
        return self.parts[source][row]


def _integer_weights(weights: Sequence[float]) -> list[int]:
    """Integers in the proportions of `weights`: exact for fractions of denominator <= 1000 while they sum to at most
    MAX_BLEND_PERIOD, else the weights rounded to shares of MAX_BLEND_PERIOD (at least 1 each)."""
    fractions = [Fraction(weight).limit_denominator(1000) for weight in weights]
    if all(math.isclose(fraction, weight, rel_tol=1e-12) for fraction, weight in zip(fractions, weights, strict=True)):
        scale = math.lcm(*(fraction.denominator for fraction in fractions))
        units = [int(fraction * scale) for fraction in fractions]
        divisor = math.gcd(*units)
        units = [unit // divisor for unit in units]
        if sum(units) <= MAX_BLEND_PERIOD:
            return units
    total = sum(weights)
    return [max(1, round(weight / total * MAX_BLEND_PERIOD)) for weight in weights]


# ---------------------------------------------------------------------------------------------------------------
# The pretraining loop's data


def all_pretokenized(sources: Sequence[DataSource], option: str) -> bool:
    """Whether the sources of the option `option` (e.g. "data", "stages[1].data") are pre-tokenized folders; False
    when none is. Raises when they mix both kinds: one stage is packed one way."""
    pretokenized = [source.path for source in sources if is_pretokenized(source.path)]
    raw = [source.path for source in sources if not is_pretokenized(source.path)]
    if pretokenized and raw:
        raise ValueError(
            f"{option} mixes pre-tokenized folders ({', '.join(pretokenized)}) with raw sources ({', '.join(raw)}); "
            "a stage reads one kind. Tokenize the raw ones too (python recipes/tokenize_data.py --source "
            f"{raw[0]} --output_dir <folder> --tokenizer <the run's tokenizer>) and give their folders, or give the "
            "raw sources of all."
        )
    return bool(pretokenized)


def blend_pretokenized(
    sources: Sequence[DataSource],
    tokenizer: Any,
    seq_len: int,
    *,
    held_out: PretokenizedRows | None = None,
) -> BlendedRows:
    """The rows of pre-tokenized `sources` blended by their weights (`BlendedRows` of `PretokenizedRows`).

    `held_out`: rows held out for evaluation (`last_documents_rows`); a source that is their folder is read without
    their documents. The fields of a DataSource other than path and weight were those of the raw source, used when
    the folder was written.
    """
    fingerprint = tokenizer_fingerprint(tokenizer)
    rows = []
    for source in sources:
        folder = PretokenizedFolder(source.path)
        check_tokenizer(folder, tokenizer, fingerprint)
        documents = None
        if held_out is not None and os.path.realpath(folder.path) == os.path.realpath(held_out.folder.path):
            documents = range(held_out.documents.start)
        rows.append(PretokenizedRows(folder, seq_len, documents))
    return BlendedRows(rows, [source.weight for source in sources])


def last_documents_rows(path: str, tokenizer: Any, seq_len: int, documents: int) -> PretokenizedRows:
    """The rows of the last `documents` documents of the pre-tokenized folder `path`, held out for evaluation (pass
    them as `blend_pretokenized(held_out=...)` to leave them out of training)."""
    folder = PretokenizedFolder(path, tokenizer)
    if documents >= folder.num_documents:
        raise ValueError(
            f"eval_documents={documents} holds out the whole of {path} ({folder.num_documents} documents); lower it "
            "or give eval_data."
        )
    return PretokenizedRows(folder, seq_len, range(folder.num_documents - documents, folder.num_documents))


# ---------------------------------------------------------------------------------------------------------------
# recipes/tokenize_data.py


@dataclass
class TokenizeDataConfig:
    """Options of recipes/tokenize_data.py."""

    output_dir: str = field(
        default="",
        metadata={
            "help": (
                "Where the pre-tokenized data goes: with `source`, the folder itself; with a pretraining recipe "
                "(--config), one folder per source, <output_dir>/<name>."
            )
        },
    )
    source: str | None = field(
        default=None,
        metadata={"help": "One source to tokenize: a file, folder, glob or Hub dataset id (as a DataSource path)."},
    )
    text_column: str = field(default="text", metadata={"help": "The column or field of `source` with the text."})
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": (
                "Tokenizer folder, Hub id or 'apertus': the one the training run uses. None: the recipe's with "
                "--config, else data/tokenizer."
            )
        },
    )
    num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes that read and tokenize (datasets num_proc); None: the main process only."},
    )
    batch_size: int = field(default=1000, metadata={"help": "Documents per tokenizer call (map batch)."})
    shard_tokens: int = field(default=DEFAULT_SHARD_TOKENS, metadata={"help": "Tokens per shard file (4 bytes each)."})
    on_bad_record: Literal["error", "skip"] | None = field(
        default=None,
        metadata={
            "help": (
                "A malformed record: `error` stops with its file and line, `skip` skips and counts it. None: the "
                "recipe's with --config, else error."
            )
        },
    )
    text_unit: Literal["file", "paragraph"] = field(
        default="file", metadata={"help": ".txt files: one document per file, or per blank-line separated paragraph."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace output folders that hold pre-tokenized data already (never other folders)."},
    )


@dataclass
class TokenizedSource:
    """One source written by `tokenize_data`: the DataSource, its folder, and the time it took."""

    source: DataSource
    folder: PretokenizedFolder
    seconds: float


@dataclass
class TokenizeDataResult:
    """What `tokenize_data` wrote, and the `data:` / `stages:` / `eval_data:` block that trains on it."""

    written: list[TokenizedSource]
    seconds: float
    data_block: str

    @property
    def documents(self) -> int:
        return sum(item.folder.num_documents for item in self.written)

    @property
    def tokens(self) -> int:
        return sum(item.folder.num_tokens for item in self.written)


def tokenize_data(config: TokenizeDataConfig, recipe: Mapping[str, Any] | None = None) -> TokenizeDataResult:
    """Tokenize `config.source` into `config.output_dir`, or every source of a pretraining recipe's options `recipe`
    (its `data`, each of its `stages`' data and its `eval_data`, plus its `tokenizer`, `on_bad_record` and
    `streaming`) into `<output_dir>/<name>`, each distinct source once.

    The result's `data_block` is the YAML that replaces the recipe's data options (with `streaming: false`, which
    pre-tokenized data needs, when the recipe streams).
    """
    if not config.output_dir:
        raise ValueError("Give --output_dir: the folder the pre-tokenized data goes to.")
    if (config.source is None) == (recipe is None):
        raise ValueError(
            "Give one of --source PATH (one source) or --config <pretraining recipe> (every source it names)."
        )
    recipe = dict(recipe or {})
    tokenizer_name = config.tokenizer or recipe.get("tokenizer") or "data/tokenizer"
    tokenizer = load_tokenizer(tokenizer_name, "tokenizer")
    options = {
        "tokenizer_name": tokenizer_name,
        "num_proc": config.num_proc,
        "batch_size": config.batch_size,
        "shard_tokens": config.shard_tokens,
        "on_bad_record": config.on_bad_record or recipe.get("on_bad_record") or "error",
        "text_unit": config.text_unit,
        "overwrite": config.overwrite,
    }
    start = time.perf_counter()
    if config.source is not None:
        source = DataSource(config.source, text_column=config.text_column)
        written = [_write_timed(source, tokenizer, Path(config.output_dir), options)]
        block = yaml.safe_dump({"data": [{"path": config.output_dir}]}, sort_keys=False)
        return TokenizeDataResult(written, time.perf_counter() - start, block)

    stages = recipe.get("stages") or []
    groups = {"data": recipe.get("data") or []} if not stages else {}
    groups |= {f"stages[{index}].data": stage.get("data") or [] for index, stage in enumerate(stages)}
    groups["eval_data"] = recipe.get("eval_data") or []
    sources = {option: _data_sources(entries, option) for option, entries in groups.items()}
    if not any(sources.values()):
        raise ValueError("The recipe names no data sources (data, stages or eval_data).")
    folders = _folder_names([source for group in sources.values() for source in group])
    written, folder_of = [], {}
    for key, (source, name) in folders.items():
        written.append(_write_timed(source, tokenizer, Path(config.output_dir) / name, options))
        folder_of[key] = os.path.join(config.output_dir, name)

    def entries(option: str) -> list[dict[str, Any]]:
        return [
            {"path": folder_of[_source_key(source)], **({"weight": source.weight} if source.weight != 1.0 else {})}
            for source in sources[option]
        ]

    block: dict[str, Any] = {}
    if stages:
        block["stages"] = [{**stage, "data": entries(f"stages[{i}].data")} for i, stage in enumerate(stages)]
    else:
        block["data"] = entries("data")
    if sources["eval_data"]:
        block["eval_data"] = entries("eval_data")
    if recipe.get("streaming"):
        block["streaming"] = False
    return TokenizeDataResult(written, time.perf_counter() - start, yaml.safe_dump(block, sort_keys=False))


def _write_timed(source: DataSource, tokenizer: Any, output: Path, options: Mapping[str, Any]) -> TokenizedSource:
    start = time.perf_counter()
    folder = write_pretokenized(source, tokenizer, output, **options)
    return TokenizedSource(source, folder, time.perf_counter() - start)


def _data_sources(entries: Sequence[Mapping[str, Any]], option: str) -> list[DataSource]:
    fields = {field.name for field in dataclasses.fields(DataSource)}
    sources = []
    for entry in entries:
        unknown = set(entry) - fields
        if unknown or "path" not in entry:
            raise ValueError(f"{option} entry {dict(entry)!r} needs a `path` and only the keys {sorted(fields)}.")
        sources.append(DataSource(**entry))
    return sources


def _source_key(source: DataSource) -> tuple:
    """What makes a source's documents: every DataSource field but its weight."""
    return tuple(
        (name, json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value)
        for name, value in dataclasses.asdict(source).items()
        if name != "weight"
    )


def _folder_names(sources: Sequence[DataSource]) -> dict[tuple, tuple[DataSource, str]]:
    """(first such source, folder name) for each distinct source, in order of first appearance: the file or folder
    name without its extensions (the folder before any glob), with the Hub config and a split other than train."""
    names: dict[tuple, tuple[DataSource, str]] = {}
    for source in sources:
        key = _source_key(source)
        if key in names:
            continue
        path = source.path.rstrip("/")
        glob_at = re.search(r"[*?\[]", path)
        if glob_at:
            path = os.path.dirname(path[: glob_at.start()]) or "data"
        base = re.sub(r"(\.(jsonl|json|txt|parquet))?(\.gz)?$", "", os.path.basename(path))
        parts = [base, source.name, None if source.split == "train" else source.split]
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(part for part in parts if part)).strip(".-") or "source"
        unique, number = name, 2
        while unique in {taken for _, taken in names.values()}:
            unique, number = f"{name}-{number}", number + 1
        names[key] = (source, unique)
    return names
