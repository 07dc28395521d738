"""Pretraining documents from local files or Hub datasets, weighted into one mixture.

`load_documents` turns a list of `DataSource`s into one `datasets.Dataset` (or `IterableDataset` when streaming)
with a single `text` column, one document per row.

Local files, by extension:

* `.jsonl`, `.json` (one JSON object per line; `.jsonl.gz` / `.json.gz` too): the document is the record's
  `text_column` field.
* `.txt`: with `text_unit="file"` (the default) a whole file is one document; with `text_unit="paragraph"`
  documents are separated by one or more blank (whitespace-only) lines.
* `.parquet`: read by `datasets`' parquet builder; the document is the `text_column` column.

Bad records (a malformed JSON line, invalid UTF-8, a text value that is not a string, a record without the text
column) raise `BadRecordError` naming the file and line, unless `on_bad_record="skip"`: then they are skipped and
counted. Empty or whitespace-only documents are always skipped and counted. The counts are logged as a warning
with per-file figures and filled into the `LoadStats` passed as `stats=`.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import pyarrow.compute as pc

from ..runtime import resolve_source

logger = logging.getLogger(__name__)

TextUnit = Literal["file", "paragraph"]
OnBadRecord = Literal["error", "skip"]

_FORMAT_SUFFIXES = {
    "json": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
    "parquet": (".parquet",),
    "text": (".txt",),
}
_GLOB_CHARACTERS = re.compile(r"[*?\[]")
# A Hub dataset id: "name" or "namespace/name" of letters, digits, "-", "_", ".".

# Reasons a record is skipped, as counted in `LoadStats`.
EMPTY = "empty document"
INVALID_JSON = "invalid JSON"
NOT_AN_OBJECT = "not a JSON object"
INVALID_UTF8 = "invalid UTF-8"
MISSING_COLUMN = "missing text column"
NOT_A_STRING = "text is not a string"

# The rows our readers produce before skipped records are counted and dropped: `skip_reason` and `skip_file`
# are null for a kept document and name the reason and file of a skipped one (whose `text` is null).
_RAW_FEATURES = datasets.Features(
    {"text": datasets.Value("string"), "skip_reason": datasets.Value("string"), "skip_file": datasets.Value("string")}
)
_SKIP_HINT = "Fix the record, or pass on_bad_record='skip' to load_documents to skip and count bad records."


class BadRecordError(ValueError):
    """A record of a data file that cannot become a document; the message names the file and line."""


@dataclass
class DataSource:
    """One corpus of a pretraining mixture.

    Attributes:
        path: a local file, a folder (all supported files under it, recursively, in sorted order), a glob
            (`data/**/*.jsonl`), or a Hub dataset id such as "HuggingFaceFW/fineweb". For the pretraining loop it
            may also be a folder of pre-tokenized data (apertus_hf.data.pretokenized), which it reads by memory
            map instead of through `load_documents`.
        weight: relative sampling weight in a mixture (> 0); the weights are normalised over the sources.
        text_column: the field or column that holds the document text.
        split: the split to load, for Hub datasets.
        name: the Hub dataset config name (`load_dataset(path, name)`).
        format: "json", "parquet" or "text" for local files; inferred from the extensions when None. A folder
            or glob with a format set takes only the files with that format's extensions.
        data_files: passed to `load_dataset` for Hub datasets (e.g. "sample/10BT/*.parquet").
    """

    path: str
    weight: float = 1.0
    text_column: str = "text"
    split: str = "train"
    name: str | None = None
    format: Literal["json", "parquet", "text"] | None = None
    data_files: str | list[str] | dict[str, Any] | None = None


@dataclass
class LoadStats:
    """What `load_documents` left out: `skipped[file][reason]` is the number of records skipped.

    For a streaming dataset the counts grow while the dataset is iterated, and only in the process that iterates
    it (DataLoader workers count in their own copies and log their own warnings).
    """

    skipped: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, file: str, reason: str, count: int = 1) -> None:
        self.skipped.setdefault(file, Counter())[reason] += count

    @property
    def total_skipped(self) -> int:
        return sum(sum(reasons.values()) for reasons in self.skipped.values())

    def summary(self) -> str:
        """One line per file: `path: 3 invalid JSON, 1 empty document`."""
        return "\n".join(
            f"{file}: " + ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
            for file, reasons in sorted(self.skipped.items())
        )


def load_documents(
    sources: Sequence[DataSource],
    *,
    streaming: bool = False,
    seed: int = 0,
    on_bad_record: OnBadRecord = "error",
    text_unit: TextUnit = "file",
    stats: LoadStats | None = None,
    num_proc: int | None = None,
    stopping_strategy: Literal["first_exhausted", "all_exhausted"] = "all_exhausted",
) -> datasets.Dataset | datasets.IterableDataset:
    """The documents of `sources` as a dataset with one column, `text`.

    Args:
        sources: one or more corpora. A single source passes through in its own order; several are mixed by
            `datasets.interleave_datasets`, each next document drawn from source i with probability
            weight_i / sum(weights).
        streaming: return an `IterableDataset` that reads the files lazily and never holds a corpus in memory;
            otherwise a `Dataset` backed by Arrow files in the `datasets` cache.
        seed: seed of the mixture's sampling; the same seed gives the same order.
        on_bad_record: "error" raises `BadRecordError` at the first bad record (naming file and line); "skip"
            skips and counts bad records.
        text_unit: how `.txt` files split into documents: "file" (one document per file) or "paragraph"
            (documents separated by blank lines).
        stats: filled with the skipped-record counts (see `LoadStats`); they are also logged as a warning.
        num_proc: processes that read local json/txt files in parallel, one file at a time (non-streaming only).
        stopping_strategy: "all_exhausted" (default) repeats the smaller sources until every source has been
            seen completely, so the weights hold over the whole run and no document is left out;
            "first_exhausted" stops at the end of the first source that runs out.
    """
    if not sources:
        raise ValueError("load_documents needs at least one DataSource, got none.")
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}.")
    if text_unit not in ("file", "paragraph"):
        raise ValueError(f"text_unit must be 'file' or 'paragraph', got {text_unit!r}.")
    for source in sources:
        if isinstance(source.weight, bool) or not isinstance(source.weight, (int, float)):
            raise TypeError(f"DataSource {source.path!r}: weight must be a number, got {source.weight!r}.")
        if not math.isfinite(source.weight) or source.weight <= 0:
            raise ValueError(f"DataSource {source.path!r}: weight must be finite and > 0, got {source.weight}.")
    stats = stats if stats is not None else LoadStats()
    options = {"streaming": streaming, "on_bad_record": on_bad_record, "text_unit": text_unit, "num_proc": num_proc}
    per_source = [_load_source(source, stats=stats, **options) for source in sources]
    if len(per_source) == 1:
        return per_source[0]
    total = sum(source.weight for source in sources)
    return datasets.interleave_datasets(
        per_source,
        probabilities=[source.weight / total for source in sources],
        seed=seed,
        stopping_strategy=stopping_strategy,
    )


def _load_source(
    source: DataSource,
    *,
    streaming: bool,
    on_bad_record: OnBadRecord,
    text_unit: TextUnit,
    num_proc: int | None,
    stats: LoadStats,
) -> datasets.Dataset | datasets.IterableDataset:
    files = _local_files(source)
    if files is None:
        raw = [_load_hub(source, streaming=streaming, on_bad_record=on_bad_record)]
    else:
        raw = []
        line_files = [(f, fmt) for f, fmt in files if fmt != "parquet"]
        if line_files:
            raw.append(_load_line_files(source, line_files, streaming, on_bad_record, text_unit, num_proc))
        parquet_files = [f for f, fmt in files if fmt == "parquet"]
        if parquet_files:
            raw.append(_load_parquet(source, parquet_files, streaming=streaming, on_bad_record=on_bad_record))
    combined = raw[0] if len(raw) == 1 else datasets.concatenate_datasets(raw)
    if streaming:
        counter = _SkipCounter(stats)
        kept = combined.filter(counter, input_columns=["skip_reason", "skip_file"], batched=True)
        return kept.select_columns(["text"])
    return _drop_skipped(combined, source, stats)


def _drop_skipped(raw: datasets.Dataset, source: DataSource, stats: LoadStats) -> datasets.Dataset:
    """Count the skipped rows from the Arrow columns (so a cached dataset reports them too) and drop them."""
    table = raw.select_columns(["skip_reason", "skip_file"]).with_format("arrow")[:]
    skipped_rows = table.filter(pc.is_valid(table["skip_reason"]))
    source_stats = LoadStats()
    for file, reason in zip(
        skipped_rows["skip_file"].to_pylist(), skipped_rows["skip_reason"].to_pylist(), strict=True
    ):
        source_stats.add(file, reason)
    if source_stats.total_skipped == len(raw):
        raise ValueError(
            f"DataSource {source.path!r} has no documents ({len(raw)} records read, all skipped).\n"
            f"{source_stats.summary()}\nCheck the files and text_column={source.text_column!r}."
        )
    if not source_stats.total_skipped:
        return raw.select_columns(["text"])
    logger.warning("Skipped %d records of %r:\n%s", source_stats.total_skipped, source.path, source_stats.summary())
    for file, reasons in source_stats.skipped.items():
        for reason, count in reasons.items():
            stats.add(file, reason, count)
    kept = raw.filter(_is_kept, input_columns="skip_reason", batched=True)
    return kept.select_columns(["text"])


def _is_kept(skip_reasons: list[str | None]) -> list[bool]:
    return [reason is None for reason in skip_reasons]


class _SkipCounter:
    """Streaming filter that keeps documents and counts (and logs) the skipped rows as they stream past."""

    def __init__(self, stats: LoadStats) -> None:
        self.stats = stats

    def __call__(self, skip_reasons: list[str | None], skip_files: list[str | None]) -> list[bool]:
        batch_stats = LoadStats()
        for reason, file in zip(skip_reasons, skip_files, strict=True):
            if reason is not None:
                batch_stats.add(file, reason)
                self.stats.add(file, reason)
        if batch_stats.total_skipped:
            logger.warning(
                "Skipped %d records (%d so far):\n%s",
                batch_stats.total_skipped,
                self.stats.total_skipped,
                batch_stats.summary(),
            )
        return _is_kept(skip_reasons)


# ---------------------------------------------------------------------------------------------------------------
# Local files


def _local_files(source: DataSource) -> list[tuple[str, str]] | None:
    """(file, format) of every file of a local source in sorted order; None when `source.path` is not local."""
    path = os.path.expanduser(source.path)
    if source.format is not None and source.format not in _FORMAT_SUFFIXES:
        raise ValueError(
            f"DataSource {source.path!r}: format must be one of {sorted(_FORMAT_SUFFIXES)} or None, "
            f"got {source.format!r}."
        )
    if os.path.isfile(path):
        # A file named on its own is read in the declared format whatever its extension.
        fmt = source.format or _file_format(path, None)
        if fmt is None:
            raise ValueError(
                f"{path}: unsupported file type; supported: {_supported_suffixes(None)}. "
                "Rename the file or set DataSource(format='json' | 'parquet' | 'text')."
            )
        return [(path, fmt)]
    if os.path.isdir(path):
        candidates = glob.glob(os.path.join(glob.escape(path), "**", "*"), recursive=True)
        description = f"folder {path}"
    elif _GLOB_CHARACTERS.search(path):
        candidates = glob.glob(path, recursive=True)
        description = f"glob {path!r}"
    else:
        return None
    files = [(f, _file_format(f, source.format)) for f in sorted(candidates) if os.path.isfile(f)]
    files = [(f, fmt) for f, fmt in files if fmt is not None]
    if not files:
        raise FileNotFoundError(
            f"No data files in {description}: looked for {_supported_suffixes(source.format)}. "
            "Check the path, or set DataSource(format=...) to the files' format."
        )
    return files


def _file_format(path: str, declared: str | None) -> str | None:
    """The format of `path` from its extension (only `declared`'s extensions count when it is set)."""
    for fmt, suffixes in _FORMAT_SUFFIXES.items():
        if (declared is None or declared == fmt) and path.endswith(suffixes):
            return fmt
    return None


def _supported_suffixes(declared: str | None) -> str:
    formats = _FORMAT_SUFFIXES if declared is None else {declared: _FORMAT_SUFFIXES[declared]}
    return ", ".join(suffix for suffixes in formats.values() for suffix in suffixes)


def _load_line_files(
    source: DataSource,
    files: list[tuple[str, str]],
    streaming: bool,
    on_bad_record: OnBadRecord,
    text_unit: TextUnit,
    num_proc: int | None,
) -> datasets.Dataset | datasets.IterableDataset:
    # Our own reader rather than datasets' json/text builders: theirs report a broken line without its file and
    # line number, and cannot skip and count bad lines. `from_generator` caches by the hash of the generator and
    # its kwargs, not the file contents, so each file's size and mtime are part of the kwargs: an edited file
    # is read again. The file list is a list in gen_kwargs, so num_proc (and streaming shards) split it by file.
    empty = [f for f, _ in files if os.stat(f).st_size == 0]
    if len(empty) == len(files):
        # datasets would only say that the split "corresponds to no data", without naming a file.
        raise ValueError(
            f"DataSource {source.path!r}: {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty; add "
            "documents or point the source to files that hold some."
        )
    gen_kwargs = {
        "files": [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns, fmt) for f, fmt in files],
        "text_column": source.text_column,
        "on_bad_record": on_bad_record,
        "text_unit": text_unit,
    }
    if streaming:
        return datasets.IterableDataset.from_generator(_read_line_files, features=_RAW_FEATURES, gen_kwargs=gen_kwargs)
    try:
        return datasets.Dataset.from_generator(
            _read_line_files, features=_RAW_FEATURES, gen_kwargs=gen_kwargs, num_proc=num_proc
        )
    except datasets.exceptions.DatasetGenerationError as error:
        # datasets wraps whatever the generator raised; surface our message, which names the file and line.
        cause = error.__cause__
        while cause is not None and not isinstance(cause, BadRecordError):
            cause = cause.__cause__
        if cause is not None:
            raise BadRecordError(str(cause)) from error
        raise


def _read_line_files(
    files: list[tuple[str, int, int, str]], text_column: str, on_bad_record: OnBadRecord, text_unit: TextUnit
) -> Iterator[dict[str, str | None]]:
    for path, _size, _mtime_ns, fmt in files:
        records = _json_records(path, text_column) if fmt == "json" else _text_records(path, text_unit)
        for text, reason, message in records:
            if reason is None and not text.strip():
                reason = EMPTY
            elif reason is not None and on_bad_record == "error":
                raise BadRecordError(f"{message}\n{_SKIP_HINT}")
            if reason is None:
                yield {"text": text, "skip_reason": None, "skip_file": None}
            else:
                yield {"text": None, "skip_reason": reason, "skip_file": path}


# Each record reader yields (text, None, None) for a document, (None, reason, message) for a bad record.
_Record = tuple[str | None, str | None, str | None]


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _json_records(path: str, text_column: str) -> Iterator[_Record]:
    with _open_binary(path) as lines:
        for line_number, raw_line in enumerate(lines, start=1):
            where = f"{path}, line {line_number}"
            try:
                line = raw_line.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError as error:
                yield None, INVALID_UTF8, f"{where}: invalid UTF-8 ({error.reason} at byte {error.start} of the line)."
                continue
            if not line.strip():
                continue
            if line_number == 1 and line.lstrip().startswith("[") and path.endswith((".json", ".json.gz")):
                raise BadRecordError(
                    f"{path} is a JSON array; JSON files must hold one object per line (JSON Lines). "
                    f"Convert it, e.g. `jq -c '.[]' {path} > {os.path.splitext(path)[0]}.jsonl`."
                )
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield None, INVALID_JSON, f"{where}: invalid JSON: {error.msg} (column {error.colno})."
                continue
            if not isinstance(record, dict):
                yield None, NOT_AN_OBJECT, f"{where}: expected a JSON object, got {type(record).__name__}."
                continue
            if text_column not in record:
                yield None, MISSING_COLUMN, _missing_column_message(where, text_column, record)
                continue
            text = record[text_column]
            if not isinstance(text, str):
                value = type(text).__name__ if text is not None else "null"
                yield None, NOT_A_STRING, f"{where}: {text_column!r} is {value}, not a string."
                continue
            yield text, None, None


def _missing_column_message(where: str, text_column: str, record: dict[str, Any]) -> str:
    text_like = [key for key, value in record.items() if isinstance(value, str)]
    suggestion = f"text_column={text_like[0]!r}" if text_like else "text_column=..."
    return (
        f"{where}: no column {text_column!r}; the record has columns {sorted(record)}. "
        f"Set DataSource(..., {suggestion}) to the column that holds the text."
    )


def _text_records(path: str, text_unit: TextUnit) -> Iterator[_Record]:
    """Documents of a text file; a document holding a line of invalid UTF-8 is one bad record."""
    lines: list[str] = []
    bad_line: str | None = None
    with open(path, "rb") as file:
        for line_number, raw_line in enumerate(file, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                bad_line = (
                    bad_line or f"{path}, line {line_number}: invalid UTF-8 ({error.reason} at byte {error.start})."
                )
                continue
            if text_unit == "paragraph" and not line.strip():
                if lines or bad_line:
                    yield _text_record(lines, bad_line)
                lines, bad_line = [], None
                continue
            lines.append(line)
    if lines or bad_line or text_unit == "file":
        yield _text_record(lines, bad_line)


def _text_record(lines: list[str], bad_line: str | None) -> _Record:
    if bad_line is not None:
        return None, INVALID_UTF8, bad_line
    return "".join(lines).rstrip("\r\n"), None, None


# ---------------------------------------------------------------------------------------------------------------
# Parquet and Hub datasets (read by datasets' own builders)


def _load_parquet(
    source: DataSource, files: list[str], *, streaming: bool, on_bad_record: OnBadRecord
) -> datasets.Dataset | datasets.IterableDataset:
    dataset = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
    where = files[0] if len(files) == 1 else f"{source.path} ({len(files)} parquet files)"
    return _normalize(dataset, source, where, on_bad_record)


def _load_hub(
    source: DataSource, *, streaming: bool, on_bad_record: OnBadRecord
) -> datasets.Dataset | datasets.IterableDataset:
    resolve_source(
        source.path,
        "DataSource path",
        f"It is not a local file, folder or glob (looked in {os.getcwd()}) nor a Hub dataset id (namespace/name). "
        "Check the path.",
    )
    try:
        dataset = datasets.load_dataset(
            source.path, source.name, split=source.split, streaming=streaming, data_files=source.data_files
        )
    except (FileNotFoundError, ConnectionError) as error:
        raise FileNotFoundError(
            f"DataSource path {source.path!r} is no local file, folder or glob (looked in {os.getcwd()}), and "
            f"loading it as a Hub dataset failed: {error}"
        ) from error
    return _normalize(dataset, source, f"{source.path} (split {source.split!r})", on_bad_record)


def _normalize(
    dataset: datasets.Dataset | datasets.IterableDataset, source: DataSource, where: str, on_bad_record: OnBadRecord
) -> datasets.Dataset | datasets.IterableDataset:
    """The raw-row schema of our readers (`_RAW_FEATURES`) for a dataset read by `datasets`."""
    columns = dataset.column_names
    if columns is not None and source.text_column not in columns:
        raise ValueError(
            f"{where}: no column {source.text_column!r}; its columns are {columns}. "
            "Set DataSource(..., text_column=...) to the column that holds the text."
        )
    return dataset.map(
        _normalize_batch,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        features=_RAW_FEATURES,
        fn_kwargs={"text_column": source.text_column, "where": where, "on_bad_record": on_bad_record},
    )


def _normalize_batch(
    batch: dict[str, list], indices: list[int], text_column: str, where: str, on_bad_record: OnBadRecord
) -> dict[str, list]:
    if text_column not in batch:
        raise ValueError(
            f"{where}: no column {text_column!r}; its columns are {sorted(batch)}. "
            "Set DataSource(..., text_column=...) to the column that holds the text."
        )
    out: dict[str, list] = {"text": [], "skip_reason": [], "skip_file": []}
    for text, index in zip(batch[text_column], indices, strict=True):
        reason = None
        if not isinstance(text, str):
            if on_bad_record == "error":
                value = type(text).__name__ if text is not None else "null"
                raise BadRecordError(f"{where}, row {index}: {text_column!r} is {value}, not a string.\n{_SKIP_HINT}")
            reason = NOT_A_STRING
        elif not text.strip():
            reason = EMPTY
        out["text"].append(text if reason is None else None)
        out["skip_reason"].append(reason)
        out["skip_file"].append(where if reason is not None else None)
    return out
