"""load_dataset_splits: the tables of post-training and preference data, from files, folders or save_to_disk."""

import json

import pytest
from datasets import Dataset

from apertus_hf.data.tables import TableLoadError, load_dataset_splits
from apertus_hf.runtime import SourceNotFoundError


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_file_is_the_train_split_and_a_folder_names_splits_after_its_files(tmp_path):
    _write_rows(tmp_path / "rows.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert load_dataset_splits(str(tmp_path / "rows.jsonl"))["train"]["prompt"] == ["a", "b"]
    folder = tmp_path / "chat"
    folder.mkdir()
    _write_rows(folder / "train.jsonl", [{"prompt": "a"}])
    _write_rows(folder / "test.jsonl", [{"prompt": "b"}])
    splits = load_dataset_splits(str(folder))
    assert sorted(splits) == ["test", "train"] and splits["test"]["prompt"] == ["b"]
    Dataset.from_list([{"prompt": "c"}]).save_to_disk(str(tmp_path / "saved"))
    assert load_dataset_splits(str(tmp_path / "saved"))["train"]["prompt"] == ["c"]


def test_bad_tables_are_named_with_the_option_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceNotFoundError, match=r"^dataset='missing\.jsonl': no such file or folder"):
        load_dataset_splits("missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TableLoadError, match=r"dataset=empty\.jsonl: .*empty\.jsonl is empty; add rows"):
        load_dataset_splits("empty.jsonl")
    _write_rows(tmp_path / "rows.jsonl", [{"prompt": "a"}])
    with pytest.raises(TableLoadError, match=r"dataset=\*\.jsonl: a glob is not a table here"):
        load_dataset_splits("*.jsonl")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_rows(mixed / "a.jsonl", [{"prompt": "a"}])
    Dataset.from_list([{"prompt": "b"}]).to_parquet(str(mixed / "b.parquet"))
    with pytest.raises(TableLoadError, match=r"must share one format"):
        load_dataset_splits(str(mixed))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(TableLoadError, match=r"holds no \.jsonl/\.json/\.parquet/\.csv files"):
        load_dataset_splits("nothing")
