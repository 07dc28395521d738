import gzip
import json
import logging
import math
import os
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apertus_hf.data import BadRecordError, DataSource, LoadStats, load_documents


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_lines(path, lines: list[bytes]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def texts(dataset) -> list[str]:
    return [row["text"] for row in dataset]


# Reading local files


def test_folder_reads_every_supported_file_recursively_in_sorted_order(tmp_path):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "b.jsonl", [{"text": "b1"}, {"text": "b2", "id": 7}])
    write_jsonl(corpus / "a" / "z.jsonl", [{"text": "az"}])
    with gzip.open(corpus / "c.json.gz", "wt", encoding="utf-8") as file:
        file.write(json.dumps({"text": "gzipped"}) + "\n")
    (corpus / "d.txt").write_text("a whole\n\nfile\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), corpus / "e.parquet")
    (corpus / "notes.md").write_text("not data", encoding="utf-8")

    dataset = load_documents([DataSource(str(corpus))])

    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == ["text"]
    # json and txt files in sorted path order, then the parquet files.
    assert dataset["text"] == ["az", "b1", "b2", "gzipped", "a whole\n\nfile", "p1", "p2"]


def test_glob_selects_the_matching_files(tmp_path):
    write_jsonl(tmp_path / "x" / "en.jsonl", [{"text": "english"}])
    write_jsonl(tmp_path / "x" / "de.jsonl", [{"text": "deutsch"}])
    write_jsonl(tmp_path / "x" / "skip.json", [{"text": "not matched"}])
    dataset = load_documents([DataSource(str(tmp_path / "x" / "*.jsonl"))])
    assert dataset["text"] == ["deutsch", "english"]


def test_text_files_one_document_per_file_or_per_paragraph(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First paragraph,\nsecond line.\n\n  \n\nSecond paragraph.\n\n", encoding="utf-8")
    per_file = load_documents([DataSource(str(path))], text_unit="file")
    per_paragraph = load_documents([DataSource(str(path))], text_unit="paragraph")
    assert per_file["text"] == ["First paragraph,\nsecond line.\n\n  \n\nSecond paragraph."]
    assert per_paragraph["text"] == ["First paragraph,\nsecond line.", "Second paragraph."]


def test_declared_format_reads_a_file_whatever_its_extension(tmp_path):
    path = write_jsonl(tmp_path / "records.ndjson", [{"text": "one"}, {"text": "two"}])
    assert load_documents([DataSource(str(path), format="json")])["text"] == ["one", "two"]


def test_an_edited_file_is_read_again_not_taken_from_the_cache(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "before"}])
    assert load_documents([DataSource(str(path))])["text"] == ["before"]
    write_jsonl(path, [{"text": "after the edit"}, {"text": "and a new line"}])
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    assert load_documents([DataSource(str(path))])["text"] == ["after the edit", "and a new line"]


def test_streaming_yields_the_same_documents_as_a_dataset(tmp_path):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", [{"text": f"json document {i}"} for i in range(30)])
    (corpus / "b.txt").write_text("one\n\ntwo\n\nthree\n", encoding="utf-8")
    pq.write_table(pa.table({"text": [f"parquet {i}" for i in range(20)]}), corpus / "c.parquet")
    source = DataSource(str(corpus))

    streamed = load_documents([source], streaming=True, text_unit="paragraph")

    assert isinstance(streamed, datasets.IterableDataset)
    assert texts(streamed) == load_documents([source], text_unit="paragraph")["text"]
    assert len(texts(streamed)) == 53


# Mixtures


def two_sources(tmp_path, weights=(3.0, 1.0), size=2000):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(size)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(size)])
    return [DataSource(str(tmp_path / "a.jsonl"), weight=weights[0]), DataSource(str(tmp_path / "b.jsonl"), weights[1])]


@pytest.mark.parametrize("streaming", [False, True])
def test_mixture_draws_sources_in_proportion_to_their_weights(tmp_path, streaming):
    mixture = load_documents(two_sources(tmp_path, weights=(3.0, 1.0)), seed=1, streaming=streaming)
    first = texts(mixture.take(2000))
    share_a = sum(text.startswith("a") for text in first) / len(first)
    # 2000 draws with p = 0.75: the standard deviation is 0.0097.
    assert abs(share_a - 0.75) < 0.04


def test_mixture_keeps_every_document_and_each_source_in_order(tmp_path):
    mixture = load_documents(two_sources(tmp_path, size=300), seed=0)
    counts = Counter(mixture["text"])
    assert set(counts) == {f"a{i}" for i in range(300)} | {f"b{i}" for i in range(300)}
    order_of_a = [int(text[1:]) for text in mixture["text"] if text.startswith("a")]
    assert order_of_a[:300] == list(range(300))


def test_mixture_is_deterministic_for_a_seed(tmp_path):
    sources = two_sources(tmp_path, size=200)
    first = load_documents(sources, seed=3)["text"]
    assert load_documents(sources, seed=3)["text"] == first
    assert load_documents(sources, seed=4)["text"] != first
    assert texts(load_documents(sources, seed=3, streaming=True)) == texts(
        load_documents(sources, seed=3, streaming=True)
    )


@pytest.mark.parametrize("weight", [0, -1.0, math.inf, math.nan])
def test_bad_weights_are_rejected(tmp_path, weight):
    sources = two_sources(tmp_path, size=2)
    sources[1].weight = weight
    with pytest.raises(ValueError, match=r"b\.jsonl.*weight must be finite and > 0"):
        load_documents(sources)


# Hub datasets


def test_hub_id_goes_to_load_dataset_and_its_text_column_becomes_text(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_dict({"content": ["from the hub", "  ", "second"], "url": ["u1", "u2", "u3"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    stats = LoadStats()
    source = DataSource("HuggingFaceFW/fineweb", name="sample-10BT", split="train[:3]", text_column="content")

    dataset = load_documents([source], stats=stats)

    assert calls == [
        ("HuggingFaceFW/fineweb", "sample-10BT", {"split": "train[:3]", "streaming": False, "data_files": None})
    ]
    assert dataset["text"] == ["from the hub", "second"]
    assert stats.total_skipped == 1


def test_hub_dataset_without_the_text_column_lists_its_columns(monkeypatch):
    dataset = datasets.Dataset.from_dict({"content": ["x"], "url": ["u"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: dataset)
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['content', 'url'\].*text_column="):
        load_documents([DataSource("someone/corpus")])


def test_a_path_that_exists_nowhere_is_a_clear_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"corpus.jsonl': no such file or folder.*not a local file.*Check the path"
    ):
        load_documents([DataSource(str(tmp_path / "missing" / "corpus.jsonl"))])
    with pytest.raises(FileNotFoundError, match=r"'outputs/corpus.jsonl': no such file or folder"):
        # One "/" reads like a Hub id, but its first component is a folder here: a missing local path.
        (tmp_path / "outputs").mkdir()
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(tmp_path)
            load_documents([DataSource("outputs/corpus.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"No data files in glob"):
        load_documents([DataSource(str(tmp_path / "*.jsonl"))])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No data files in folder .*empty: looked for \.jsonl"):
        load_documents([DataSource(str(tmp_path / "empty"))])


def test_empty_files_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"a\.jsonl is empty; add documents"):
        load_documents([DataSource(str(tmp_path / "a.jsonl"))])
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"a\.jsonl, .*b\.jsonl are empty"):
        load_documents([DataSource(str(tmp_path))])
    (tmp_path / "c.jsonl").write_text('{"text": "one document"}\n')
    assert load_documents([DataSource(str(tmp_path))])["text"] == ["one document"]


def test_a_plausible_hub_id_that_cannot_be_loaded_says_both_tries_failed(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(FileNotFoundError, match=r"no local file.*nobody/nothing.*doesn't exist on the Hub"):
        load_documents([DataSource("nobody/nothing")])


# Bad data


@pytest.mark.parametrize("streaming", [False, True])
def test_malformed_json_line_names_file_and_line(tmp_path, streaming):
    path = write_lines(tmp_path / "broken.jsonl", [b'{"text": "fine"}', b"", b'{"text": "unterminated}'])
    with pytest.raises(
        BadRecordError, match=r"(?s)broken\.jsonl, line 3: invalid JSON: Unterminated string.*on_bad_record='skip'"
    ):
        texts(load_documents([DataSource(str(path))], streaming=streaming))


@pytest.mark.parametrize("streaming", [False, True])
def test_skipped_bad_records_are_counted_per_file_and_logged(tmp_path, streaming, caplog):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "kept"}])
    bad = write_lines(
        tmp_path / "bad.jsonl",
        [
            b'{"text": "first"}',
            b"{oops",
            b'{"text": null}',
            b'{"text": 12}',
            b'{"text": ["a", "list"]}',
            b'{"body": "no text column"}',
            b'"a string, not an object"',
            b'{"text": "caf\xe9 in latin-1"}',
            b'{"text": "   "}',
            b'{"text": "last"}',
        ],
    )
    stats = LoadStats()
    with caplog.at_level(logging.WARNING, logger="apertus_hf.data.sources"):
        dataset = load_documents([DataSource(str(tmp_path))], on_bad_record="skip", stats=stats, streaming=streaming)
        documents = texts(dataset)

    assert documents == ["first", "last", "kept"]
    assert stats.skipped == {
        str(bad): Counter(
            {
                "invalid JSON": 1,
                "text is not a string": 3,
                "missing text column": 1,
                "not a JSON object": 1,
                "invalid UTF-8": 1,
                "empty document": 1,
            }
        )
    }
    assert str(good) not in stats.skipped
    assert stats.total_skipped == 8
    assert f"{bad}: 1 empty document, 1 invalid JSON, 1 invalid UTF-8" in caplog.text


def test_skip_counts_are_reported_again_when_the_dataset_comes_from_the_cache(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [b'{"text": "x"}', b"{bad"])
    first, second = LoadStats(), LoadStats()
    load_documents([DataSource(str(path))], on_bad_record="skip", stats=first)
    load_documents([DataSource(str(path))], on_bad_record="skip", stats=second)
    assert first.skipped == second.skipped == {str(path): Counter({"invalid JSON": 1})}


def test_missing_text_column_lists_the_columns_and_suggests_one(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "body": "the text", "lang": "en"}])
    with pytest.raises(BadRecordError) as error:
        load_documents([DataSource(str(path))])
    assert "a.jsonl, line 1: no column 'text'; the record has columns ['body', 'id', 'lang']" in str(error.value)
    assert "text_column='body'" in str(error.value)


def test_parquet_without_the_text_column_lists_its_columns(tmp_path):
    pq.write_table(pa.table({"content": ["x"], "n": [1]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a\.parquet: no column 'text'; its columns are \['content', 'n'\]"):
        load_documents([DataSource(str(tmp_path / "a.parquet"))])


def test_empty_documents_are_skipped_and_counted_even_in_error_mode(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"text": "real"}, {"text": " \n\t "}])
    stats = LoadStats()
    assert load_documents([DataSource(str(path))], stats=stats)["text"] == ["real"]
    assert stats.skipped == {str(path): Counter({"empty document": 2})}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"text": null}', r"line 2: 'text' is null, not a string"),
        (b'{"text": 3.5}', r"line 2: 'text' is float, not a string"),
        (b'{"text": ["a"]}', r"line 2: 'text' is list, not a string"),
        (b'{"text": "\xff\xfe"}', r"line 2: invalid UTF-8"),
    ],
)
def test_bad_text_values_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "a.jsonl", [b'{"text": "fine"}', line])
    with pytest.raises(BadRecordError, match=r"a\.jsonl, " + message):
        load_documents([DataSource(str(path))])


def test_invalid_utf8_in_a_text_file_names_the_line_or_skips_its_document(tmp_path):
    path = write_lines(
        tmp_path / "a.txt", [b"good paragraph", b"", b"bad \xc3\x28 byte", b"same paragraph", b"", b"ok"]
    )
    with pytest.raises(BadRecordError, match=r"a\.txt, line 3: invalid UTF-8"):
        load_documents([DataSource(str(path))], text_unit="paragraph")
    stats = LoadStats()
    dataset = load_documents([DataSource(str(path))], text_unit="paragraph", on_bad_record="skip", stats=stats)
    assert dataset["text"] == ["good paragraph", "ok"]
    assert stats.skipped == {str(path): Counter({"invalid UTF-8": 1})}


def test_null_text_in_parquet_names_the_file_and_row(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "c", ""]}), tmp_path / "a.parquet")
    with pytest.raises(BadRecordError, match=r"a\.parquet, row 1: 'text' is null, not a string"):
        load_documents([DataSource(str(tmp_path / "a.parquet"))])
    stats = LoadStats()
    dataset = load_documents([DataSource(str(tmp_path / "a.parquet"))], on_bad_record="skip", stats=stats)
    assert dataset["text"] == ["a", "c"]
    assert stats.total_skipped == 2


def test_a_source_left_without_documents_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "x"}, {"body": "y"}])
    with pytest.raises(
        ValueError,
        match=r"(?s)has no documents \(2 records read, all skipped\).*2 missing text column.*text_column='text'",
    ):
        load_documents([DataSource(str(path))], on_bad_record="skip")


def test_a_json_array_file_is_refused_with_a_conversion_hint(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    with pytest.raises(BadRecordError, match=r"array\.json is a JSON array.*jq -c"):
        load_documents([DataSource(str(path))])


def test_bad_options_are_rejected(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="on_bad_record must be 'error' or 'skip'"):
        load_documents([DataSource(str(path))], on_bad_record="ignore")
    with pytest.raises(ValueError, match="text_unit must be 'file' or 'paragraph'"):
        load_documents([DataSource(str(path))], text_unit="line")
    with pytest.raises(ValueError, match="format must be one of"):
        load_documents([DataSource(str(path), format="csv")])
    with pytest.raises(ValueError, match="at least one DataSource"):
        load_documents([])
