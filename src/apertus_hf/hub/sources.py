"""What the card says about the training data: which sources are Hub datasets (for the `datasets` metadata), which
languages the local files hold (for `language` and the widget), and one line describing each source."""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .checks import human_size, is_hub_id

# Records of each local data file read to find the `language` field: corpora are usually split by language or
# mixed throughout, so the start of every file shows its languages without reading terabytes.
LANGUAGE_SAMPLE_RECORDS = 1000


def local_files(path: str) -> list[Path] | None:
    """The files of a local file, folder or glob, or None when `path` is not on this machine (e.g. a Hub id)."""
    expanded = Path(os.path.expanduser(path))
    if expanded.is_file():
        return [expanded]
    if expanded.is_dir():
        return sorted(file for file in expanded.rglob("*") if file.is_file())
    if any(character in path for character in "*?["):
        return (
            sorted(Path(file) for file in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(file))
            or None
        )
    return None


def is_hub_dataset(source: str) -> bool:
    """Whether `source` names a Hub dataset rather than files on this machine."""
    return local_files(source) is None and is_hub_id(source)


def hub_dataset_ids(sources: Iterable[str]) -> list[str]:
    """The sources that are Hub dataset ids (not files on this machine), in order, without repeats."""
    ids = []
    for source in sources:
        if is_hub_dataset(source) and source not in ids:
            ids.append(source)
    return ids


def data_languages(sources: Iterable[str]) -> list[str]:
    """Languages named by the `language` field of the records of local data sources, most frequent first.

    Reads the first `LANGUAGE_SAMPLE_RECORDS` records of every JSON-lines and parquet file; relative paths are
    resolved against the working directory, as in training. Sources without the field count for nothing.
    """
    counts: Counter[str] = Counter()
    for source in sources:
        for file in local_files(source) or []:
            counts.update(_file_languages(file))
    return [language for language, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def _file_languages(file: Path) -> Iterable[str]:
    name = file.name
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8", errors="replace") as handle:
            for _, line in zip(range(LANGUAGE_SAMPLE_RECORDS), handle, strict=False):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a bad record is the loader's business; here it only tells no language
                if isinstance(record, dict) and isinstance(record.get("language"), str):
                    yield record["language"]
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(file)
        if "language" in parquet.schema_arrow.names and parquet.num_row_groups:
            column = parquet.read_row_group(0, columns=["language"]).column("language")
            yield from (value for value in column.to_pylist()[:LANGUAGE_SAMPLE_RECORDS] if isinstance(value, str))


def describe_source(source: str) -> str:
    """One Markdown line on a training data source: a link for a Hub dataset, size and languages for local files."""
    if is_hub_dataset(source):
        return f"[{source}](https://huggingface.co/datasets/{source}) (Hub dataset)"
    files = local_files(source)
    if files is None:
        return f"`{source}` (local data, not published)"
    size = sum(file.stat().st_size for file in files)
    languages = data_languages([source])
    in_languages = f", languages {', '.join(languages)}" if languages else ""
    return f"`{source}` (local data, not published: {len(files)} files, {human_size(size)}{in_languages})"
