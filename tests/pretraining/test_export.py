"""The exported model folder: the training facts the card is built from, a recipe without local paths, and the
recipe script that writes the card and publishes."""

import os
import runpy
import sys

import huggingface_hub
import pytest
import yaml
from accelerate.state import AcceleratorState

from apertus_hf.pretraining import RECIPE_FILE_NAME, PretrainConfig, pretrain, read_metrics
from apertus_hf.recipe_args import parse_recipe_args
from apertus_hf.training_facts import TrainingFacts, portable_path
from tests.hub_server import start_fake_hub
from tests.pretraining.conftest import REPO_ROOT, SHIPPED_TOKENIZER, tiny_run, write_recipe


def test_the_export_records_the_facts_of_the_run(tmp_path, small_corpus):
    options = tiny_run(
        tmp_path / "run", small_corpus, max_steps=4, warmup_steps=1, eval_steps=3, checkpoint_steps=2, license="mit"
    )
    result = pretrain(PretrainConfig(**options))
    facts = TrainingFacts.load(result.model_dir)
    last_eval = [record for record in read_metrics(result.output_dir / "metrics.jsonl") if "eval/loss" in record][-1]
    assert last_eval["step"] == 4
    assert facts.stage == "pretraining" and facts.base_model is None
    assert facts.datasets == ["<local>/small.jsonl"]  # the corpus lies outside the working directory
    assert (facts.context_length, facts.steps, facts.tokens_seen) == (64, 4, 4 * 4 * 64)
    assert facts.eval_results == {"loss": last_eval["eval/loss"], "perplexity": last_eval["eval/perplexity"]}
    assert facts.license == "mit" and facts.recipe_file == RECIPE_FILE_NAME
    assert facts.tags == ["goldfish-loss"]
    assert [citation.split("{")[1].split(",")[0] for citation in facts.citations] == [
        "hans2024goldfish",
        "pagliardini2024ademamix",
    ]
    assert facts.hyperparameters["Batch"] == "4 rows of 64 tokens per device × 1 accumulation × 1 process(es)"
    assert facts.hyperparameters["Goldfish loss"].startswith("on: k=50")
    assert list(facts.hyperparameters) == [
        "Initialisation",
        "Batch",
        "Optimizer",
        "Peak learning rate",
        "Schedule",
        "Gradient clipping",
        "Goldfish loss",
        "Seed",
    ]

    # Relaunching the finished run resumes at its last step and exports again: the facts stay those of the run.
    AcceleratorState._reset_state(True)
    pretrain(PretrainConfig(**options))
    assert TrainingFacts.load(result.model_dir) == facts


def test_the_recipe_in_the_model_folder_has_no_local_paths(tmp_path, small_corpus):
    options = tiny_run(
        tmp_path / "run",
        small_corpus,
        max_steps=2,
        warmup_steps=0,
        decay_fraction=0.5,
        eval_documents=0,
        eval_data=[{"path": str(small_corpus)}],
        checkpoint_steps=0,
        goldfish=False,
        optimizer="adamw",
    )
    config = PretrainConfig(**options)
    result = pretrain(config)
    text = (result.model_dir / RECIPE_FILE_NAME).read_text()
    assert str(tmp_path) not in text
    saved = parse_recipe_args(PretrainConfig, ["--config", str(result.model_dir / RECIPE_FILE_NAME)])
    assert saved.output_dir == "<local>/run"
    assert saved.tokenizer == portable_path(str(SHIPPED_TOKENIZER)) and not os.path.isabs(saved.tokenizer)
    assert saved.data == saved.eval_data == [{"path": "<local>/small.jsonl"}]
    # Every other option is the run's.
    portable = {"output_dir", "tokenizer", "data", "eval_data"}
    assert {key: value for key, value in vars(saved).items() if key not in portable} == {
        key: value for key, value in vars(config).items() if key not in portable
    }
    # The copy in the run folder itself keeps the real paths, to relaunch the run.
    assert yaml.safe_load((result.output_dir / RECIPE_FILE_NAME).read_text())["output_dir"] == str(tmp_path / "run")
    facts = TrainingFacts.load(result.model_dir)
    assert facts.tags == [] and facts.citations == [] and facts.license is None


def _run_recipe_in_process(monkeypatch, arguments: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["pretrain.py", *arguments])
    runpy.run_path(str(REPO_ROOT / "recipes" / "pretrain.py"), run_name="__main__")


def _recipe(tmp_path, corpus):
    options = tiny_run(tmp_path / "run", corpus, max_steps=2, warmup_steps=0, decay_fraction=0.5, checkpoint_steps=0)
    return write_recipe(tmp_path / "recipe.yaml", {**options, "eval_documents": 0})


def test_the_recipe_writes_the_card_and_publishes_to_hub_model_id(tmp_path, small_corpus, monkeypatch, capsys):
    hub, server = start_fake_hub(tmp_path / "hub")
    try:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # tests run with HF_HUB_OFFLINE=1
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "test-token")
        recipe = _recipe(tmp_path, small_corpus)
        _run_recipe_in_process(
            monkeypatch, ["--config", str(recipe), "--hub_model_id", "org/pushed", "--hub_private_repo", "true"]
        )
        uploaded = huggingface_hub.HfApi(endpoint=hub.url, token="test-token").list_repo_files("org/pushed")
    finally:
        server.shutdown()
    model_dir = tmp_path / "run" / "model"
    assert {"config.json", "model.safetensors", "README.md", RECIPE_FILE_NAME, "training_facts.json"} <= set(uploaded)
    assert hub.repos["org/pushed"].private
    assert (model_dir / "README.md").read_text().startswith("---\n")
    printed = capsys.readouterr().out
    assert f"Published {model_dir} to the Hub" in printed and f"model in {model_dir}." in printed


def test_without_hub_model_id_the_recipe_writes_the_card_only(tmp_path, small_corpus, monkeypatch):
    def publish(*args, **kwargs):
        raise AssertionError("published without hub_model_id")

    monkeypatch.setattr("apertus_hf.hub.upload.publish", publish)
    _run_recipe_in_process(monkeypatch, ["--config", str(_recipe(tmp_path, small_corpus))])
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert card.startswith("---\n") and "Generated by apertus_hf.hub" in card


def test_hub_private_repo_defaults_to_the_hubs_choice(tmp_path, small_corpus, monkeypatch):
    passed = {}
    monkeypatch.setattr("apertus_hf.hub.upload.publish", lambda *args, **options: passed.update(options) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # stops right after the call
        _run_recipe_in_process(monkeypatch, ["--config", str(_recipe(tmp_path, small_corpus)), "--hub_model_id", "o/m"])
    assert passed == {"private": None, "token": None}
