"""TrainingFacts: what a run records for its model card, stored without this machine's paths."""

import json

import pytest

from apertus_hf.training_facts import TRAINING_FACTS_FILE_NAME, TrainingFacts, TrainingFactsError, portable_path


def test_portable_path_keeps_absolute_paths_out_and_paths_apart_from_hub_ids(tmp_path, monkeypatch):
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert portable_path(str(tmp_path / "data" / "corpus")) == "./data/corpus"
    assert portable_path(str(tmp_path)) == "."
    assert portable_path("/somewhere/else/model") == "<local>/model"
    assert portable_path("~/models/mine") == "<local>/mine"
    # A relative path that exists here must not read as the Hub id "data/corpus" once the facts travel.
    assert portable_path("data/corpus") == "./data/corpus"
    assert portable_path("./data/corpus") == "./data/corpus"
    assert portable_path("swiss-ai/Apertus-8B-2509") == "swiss-ai/Apertus-8B-2509"
    assert portable_path("apertus") == "apertus"


def test_facts_round_trip_without_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    facts = TrainingFacts(
        stage="sft",
        base_model=str(tmp_path / "outputs" / "pretrain" / "model"),
        datasets=[str(tmp_path / "corpus"), "HuggingFaceFW/fineweb"],
        context_length=256,
        steps=12,
        tokens_seen=3072,
        eval_results={"loss": 2.5},
        tags=["sft"],
    )
    path = facts.save(tmp_path / "model")
    assert str(tmp_path) not in path.read_text()
    loaded = TrainingFacts.load(tmp_path / "model")
    assert loaded == facts
    assert loaded.base_model == "./outputs/pretrain/model"
    assert loaded.datasets == ["./corpus", "HuggingFaceFW/fineweb"]
    assert TrainingFacts.load(tmp_path / "elsewhere") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"is not a valid training_facts\.json .*delete it"),
        (json.dumps({"stage": "sft", "steps": 1}), r"missing .*base_model"),
        (
            json.dumps({"stage": "sft", "base_model": None, "datasets": [], "context_length": 8, "steps": 1, "x": 1}),
            r"unknown keys \['x'\]",
        ),
    ],
)
def test_a_broken_facts_file_is_named_with_the_fix(tmp_path, content, message):
    (tmp_path / TRAINING_FACTS_FILE_NAME).write_text(content)
    with pytest.raises(TrainingFactsError, match=message):
        TrainingFacts.load(tmp_path)
