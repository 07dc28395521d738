"""Loading tables of rows (chat, preference and prompt datasets) from local files, a `save_to_disk` folder or the Hub.

The post-training recipes and the preference pipeline read their data through `load_dataset_splits`, so a path
means the same thing everywhere; pretraining corpora go through `apertus_hf.data.sources` instead (streaming,
mixing by weight, bad-record handling).
"""

from __future__ import annotations

from datasets import DatasetDict, load_dataset, load_from_disk

from ..runtime import resolve_source

LOCAL_TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class TableLoadError(ValueError):
    """A dataset that cannot be read as a table of rows, with the fix in the message."""


def load_dataset_splits(source: str, what: str = "dataset") -> DatasetDict:
    """Every split of `source`: a .jsonl/.json/.parquet/.csv file (one "train" split), a folder of such files (split
    names from the file names, as `datasets` does), a `save_to_disk` folder, or a Hub dataset id.

    `what` names the option in the error messages. Empty files are refused with their name: `datasets` would
    report only that a split "corresponds to no data".
    """
    resolved = resolve_source(source, what, "Give a data file, a folder of them, or a Hub dataset id.")
    if isinstance(resolved, str):
        return load_dataset(resolved)
    path = resolved
    if not path.exists():
        raise TableLoadError(
            f"{what}={source}: a glob is not a table here; give one file, a folder of files, or a `save_to_disk` folder."
        )
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if path.is_file():
        files = [path]
    else:
        files = sorted(file for file in path.iterdir() if file.suffix in LOCAL_TABLE_FORMATS)
        if not files:
            raise TableLoadError(
                f"{what}={source}: {path} holds no {'/'.join(LOCAL_TABLE_FORMATS)} files and is not a `save_to_disk` "
                "folder."
            )
    formats = {LOCAL_TABLE_FORMATS.get(file.suffix) for file in files}
    if None in formats or len(formats) != 1:
        raise TableLoadError(
            f"{what}={source}: data files {[file.name for file in files]} must share one format among "
            f"{sorted(LOCAL_TABLE_FORMATS)}."
        )
    empty = [str(file) for file in files if file.stat().st_size == 0]
    if empty:
        raise TableLoadError(f"{what}={source}: {', '.join(empty)} is empty; add rows or remove the file.")
    if path.is_dir():
        # datasets names the splits after the files (train.jsonl, test.jsonl, validation.jsonl, ...); a folder of
        # other names (a corpus split by language) is all "train".
        return load_dataset(formats.pop(), data_dir=str(path))
    return load_dataset(formats.pop(), data_files={"train": [str(path)]})
