"""Publishing: folder checks, the model card and its offline validation, and a round trip through a fake Hub that
stock transformers (without apertus_hf) downloads from."""

import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import accelerate
import huggingface_hub
import pytest
import safetensors.torch
import torch
import yaml
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from apertus_hf.evaluation.common import EvalResult
from apertus_hf.hub import (
    CARD_MARKER,
    ModelCardError,
    ModelFolderError,
    build_model_card,
    check_model_card,
    check_model_folder,
    data_languages,
    hub_dataset_ids,
    needs_resharding,
    publish,
)
from apertus_hf.pretraining import PretrainConfig, pretrain
from tests.hub_server import start_fake_hub
from tests.pretraining.conftest import REPO_ROOT, TINY_MODEL, tiny_run

CORPUS = REPO_ROOT / "data" / "corpus"
CORPUS_LANGUAGES = {"en", "fr", "it", "es", "de", "rm"}
TINY_SHARD = "1.2MB"  # the tiny model's 2.2 MB of weights (two 1 MB embedding matrices) become several shards


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A model folder exported by a 4-step pretraining run on the shipped corpus, with a perplexity result."""
    output_dir = tmp_path_factory.mktemp("run")
    options = tiny_run(output_dir, CORPUS, max_steps=4, warmup_steps=1, eval_steps=0, checkpoint_steps=0)
    options.update(eval_documents=0, logging_steps=2)
    accelerate.state.AcceleratorState._reset_state(True)
    model_dir = pretrain(PretrainConfig(**options)).model_dir
    accelerate.state.AcceleratorState._reset_state(True)
    EvalResult(
        evaluation="perplexity",
        model=str(model_dir),
        task_name="perplexity",
        task_type="text-generation",
        dataset_name="shipped corpus",
        dataset_type="local",
        metrics={"perplexity": 4321.5, "bits_per_byte": 3.25},
    ).write(model_dir / "eval_results" / "perplexity.json")
    return model_dir


@pytest.fixture
def model_copy(trained_model, tmp_path) -> Path:
    return Path(shutil.copytree(trained_model, tmp_path / "model"))


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    hub, server = start_fake_hub(tmp_path_factory.mktemp("hub"))
    yield hub
    server.shutdown()


@pytest.fixture(scope="module")
def published(trained_model, fake_hub, tmp_path_factory):
    """`trained_model` published as org/tiny (one weights file) and as org/tiny-sharded (first unsharded, then
    again in shards), each from its own copy of the folder, then downloaded by stock transformers in a fresh
    interpreter that never imports apertus_hf. Returns {repo_id: (folder, PublishResult)} and the load report."""
    folders = {
        repo_id: Path(shutil.copytree(trained_model, tmp_path_factory.mktemp("publish") / "model"))
        for repo_id in ("org/tiny", "org/tiny-sharded")
    }
    (folders["org/tiny"] / ".notes").write_text("hidden files stay local")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # tests run with HF_HUB_OFFLINE=1
        # huggingface_hub sends a few requests (agent detection) to the default endpoint whatever HfApi's is.
        patch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub.url)
        options = {"endpoint": fake_hub.url, "token": "test-token"}
        results = {"org/tiny": publish(folders["org/tiny"], "org/tiny", private=True, **options)}
        publish(folders["org/tiny-sharded"], "org/tiny-sharded", **options)
        results["org/tiny-sharded"] = publish(
            folders["org/tiny-sharded"], "org/tiny-sharded", max_shard_size=TINY_SHARD, **options
        )
    loaded = _load_in_stock_transformers(fake_hub.url, list(results), trained_model, tmp_path_factory.mktemp("home"))
    return {repo_id: (folders[repo_id], results[repo_id]) for repo_id in results}, loaded


_LOAD_SCRIPT = """
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

local = transformers.ApertusForCausalLM.from_pretrained(sys.argv[1]).state_dict()
report = {}
for repo_id in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(repo_id).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo_id)
    inputs = tokenizer("Las Alps èn muntognas che", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    state_dict = model.state_dict()
    report[repo_id] = {
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "same_weights": set(local) == set(state_dict) and all(torch.equal(local[k], state_dict[k]) for k in local),
        "new_tokens": generated.shape[1] - inputs["input_ids"].shape[1],
        "bos_first": generated[0, 0].item() == tokenizer.bos_token_id,
    }
report["apertus_hf_imported"] = "apertus_hf" in sys.modules
print(json.dumps(report))
"""


def _load_in_stock_transformers(endpoint: str, repo_ids: list[str], local: Path, hf_home: Path) -> dict:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home)}
    env.pop("PYTHONPATH", None)
    process = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(local), *repo_ids],
        env=env,
        capture_output=True,
        text=True,
        cwd=hf_home,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_published_model_loads_in_stock_transformers_without_apertus_hf(published, fake_hub):
    repos, loaded = published
    assert loaded["apertus_hf_imported"] is False
    report = loaded["org/tiny"]
    assert report["class"] == "transformers.models.apertus.modeling_apertus.ApertusForCausalLM"
    assert report["same_weights"] and report["bos_first"] and report["new_tokens"] == 6
    assert repos["org/tiny"][1].commit_url.startswith(f"{fake_hub.url}/org/tiny/commit/")
    assert fake_hub.repos["org/tiny"].private


def test_published_repo_holds_the_folder_and_the_card(published, fake_hub):
    repos, _ = published
    folder, result = repos["org/tiny"]
    uploaded = fake_hub.repo_files("org/tiny")
    local = {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    assert ".notes" not in uploaded and local.pop(".notes")
    assert uploaded == local  # config, weights, tokenizer, recipe, eval results and README.md, byte for byte
    assert "eval_results/perplexity.json" in uploaded and "pretrain_config.yaml" in uploaded
    assert uploaded["README.md"].decode() == str(result.card)
    assert ("POST", "/api/validate-yaml") in fake_hub.requests  # upload_folder had the card's metadata checked
    assert CARD_MARKER in (folder / "README.md").read_text()  # the folder matches the repo


def test_sharded_upload_replaces_the_single_file_and_loads(published, fake_hub):
    repos, loaded = published
    uploaded = fake_hub.repo_files("org/tiny-sharded")
    shards = sorted(name for name in uploaded if name.endswith(".safetensors"))
    assert repos["org/tiny-sharded"][1].resharded
    shard_bytes = [sum(tensor.nbytes for tensor in safetensors.torch.load(uploaded[name]).values()) for name in shards]
    assert len(shards) > 1 and max(shard_bytes) <= 1_200_000
    assert "model.safetensors" not in uploaded  # the first upload's single file was deleted
    index = json.loads(uploaded["model.safetensors.index.json"])
    assert sorted(set(index["weight_map"].values())) == shards
    report = loaded["org/tiny-sharded"]
    assert report["same_weights"] and report["new_tokens"] == 6


def test_card_metadata_validates_offline(trained_model, tmp_path):
    card = build_model_card(trained_model, "org/tiny")
    check_model_card(card)  # raises on any problem
    card.save(tmp_path / "README.md")
    metadata = metadata_load(tmp_path / "README.md")
    assert metadata == ModelCard(str(card), ignore_metadata_errors=False).data.to_dict() == card.data.to_dict()
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert metadata["license"] == "apache-2.0"
    assert set(metadata["language"]) == CORPUS_LANGUAGES  # from the corpus records' `language` field
    assert {"apertus", "goldfish-loss", "multilingual"} <= set(metadata["tags"])
    assert len(metadata["widget"]) == 6 and all(example["text"] for example in metadata["widget"])
    assert "base_model" not in metadata and "datasets" not in metadata  # trained from scratch on local files
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert eval_results_to_model_index(name, results) == metadata["model-index"]
    assert {(result.metric_type, result.metric_value) for result in results} == {
        ("perplexity", 4321.5),
        ("bits_per_byte", 3.25),
    }
    assert {result.task_type for result in results} == {"text-generation"}


def test_card_body_renders_architecture_recipe_and_eval_table(trained_model):
    text = build_model_card(trained_model, "org/tiny").text
    assert "| perplexity | perplexity | shipped corpus | perplexity | 4322 |" in text
    assert "| perplexity | perplexity | shipped corpus | bits_per_byte | 3.25 |" in text
    assert f"| Layers | {TINY_MODEL['num_hidden_layers']} |" in text
    assert f"| Hidden size | {TINY_MODEL['hidden_size']} |" in text
    assert "| Vocabulary | 8192 |" in text
    tokens = 4 * 64 * 4  # steps x seq_len x per-device batch, counted during the run
    assert f"| Tokens | {tokens:,} (counted during training) |" in text
    assert "| Goldfish loss | on: k=50" in text and "| Optimizer steps | 4 |" in text
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny"' in text
    assert "{{" not in text and "{%" not in text


def test_evaluations_on_the_same_dataset_type_stay_apart_in_model_index(model_copy):
    EvalResult(
        evaluation="memorization",
        model=str(model_copy),
        task_name="memorization",
        task_type="text-generation",
        dataset_name="training passages",
        dataset_type="local",  # as perplexity's
        metrics={"exact_match_rate": 0.0, "unseen_rate": float("nan")},
    ).write(model_copy / "eval_results" / "memorization.json")
    card = build_model_card(model_copy, "org/tiny")
    check_model_card(card)
    entries = {entry["dataset"]["name"]: entry for entry in card.data.to_dict()["model-index"][0]["results"]}
    assert set(entries) == {"shipped corpus", "training passages"}
    assert entries["training passages"]["task"]["name"] == "memorization"
    assert [metric["type"] for metric in entries["training passages"]["metrics"]] == ["exact_match_rate"]
    assert "| memorization | memorization | training passages | unseen_rate | nan |" in card.text


def test_card_languages_and_base_model_from_options_without_a_recipe(model_copy):
    (model_copy / "pretrain_config.yaml").unlink()
    shutil.rmtree(model_copy / "eval_results")
    card = build_model_card(model_copy, "org/tiny-de", language=["de"], base_model="swiss-ai/Apertus-8B-2509")
    check_model_card(card)
    metadata = card.data.to_dict()
    assert metadata["language"] == ["de"] and metadata["base_model"] == "swiss-ai/Apertus-8B-2509"
    assert metadata["widget"] == [{"text": "Die Alpen sind ein Gebirge, das", "example_title": "German"}]
    assert "model-index" not in metadata and "model_name" not in metadata
    assert not {"multilingual", "goldfish-loss"} & set(metadata["tags"])  # one language; Goldfish not recorded
    assert "no `pretrain_config.yaml`" in card.text and "No evaluation results" in card.text


def test_card_lists_hub_datasets_and_init_from_of_the_recipe(model_copy):
    recipe_path = model_copy / "pretrain_config.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe.update(
        init_from="swiss-ai/Apertus-8B-2509", data=[{"path": str(CORPUS)}, {"path": "HuggingFaceFW/fineweb-2"}]
    )
    recipe_path.write_text(json.dumps(recipe))
    metadata = build_model_card(model_copy, "org/tiny").data.to_dict()
    assert metadata["base_model"] == "swiss-ai/Apertus-8B-2509"
    assert metadata["datasets"] == ["HuggingFaceFW/fineweb-2"]


def test_check_model_card_lists_every_problem():
    card = ModelCard(
        "---\nlicense: Apache 2.0\nlanguage: [english]\nwidget:\n- title: no text\nmodel-index:\n- name: m\n"
        "  results:\n  - task: {type: text-generation}\n    dataset: {type: local, name: corpus}\n"
        "    metrics: [{type: perplexity, value: .nan}]\n---\nbody\n"
    )
    with pytest.raises(ModelCardError) as error:
        check_model_card(card)
    message = str(error.value)
    for problem in ("license='Apache 2.0'", "'english' is not an ISO 639", "needs a `text`", "not a finite number"):
        assert problem in message


def test_check_model_folder_reports_sizes(trained_model):
    report = check_model_folder(trained_model)
    assert report.files["model.safetensors"] == (trained_model / "model.safetensors").stat().st_size
    assert report.weight_files == ["model.safetensors"] and report.config["model_type"] == "apertus"
    assert "model.safetensors" in report.summary() and "total" in report.summary()
    assert needs_resharding(report, TINY_SHARD) and not needs_resharding(report)


def test_check_model_folder_lists_every_problem_with_its_fix(model_copy):
    state_dict = {name: torch.zeros(1) for name in ("model.embed_tokens.weight",)}
    torch.save(state_dict, model_copy / "pytorch_model.bin")
    (model_copy / "model.safetensors").unlink()
    (model_copy / "tokenizer.json").unlink()
    (model_copy / "generation_config.json").unlink()
    with pytest.raises(ModelFolderError) as error:
        check_model_folder(model_copy)
    message = str(error.value)
    assert "pickled weights ['pytorch_model.bin']" in message and ".save_pretrained(" in message
    assert "no *.safetensors weights" in message
    assert "no tokenizer" in message and "AutoTokenizer.from_pretrained(<tokenizer>).save_pretrained(" in message
    assert "no generation_config.json" in message


def test_check_model_folder_rejects_configs_stock_transformers_cannot_load(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config.update(auto_map={"AutoModelForCausalLM": "modeling.Custom"}, architectures=["CustomForCausalLM"])
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"auto_map \(remote code\)") as error:
        check_model_folder(model_copy)
    assert "architectures=['CustomForCausalLM'] must name transformers classes" in str(error.value)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_dry_run_makes_no_request_and_leaves_the_folder_unchanged(model_copy):
    before = sorted(path.relative_to(model_copy).as_posix() for path in model_copy.rglob("*") if path.is_file())
    result = publish(model_copy, "org/tiny", dry_run=True, endpoint=f"http://127.0.0.1:{_closed_port()}")
    assert result.commit is None and result.card_generated
    assert list(result.files) == sorted([*before, "README.md"])
    assert sorted(path.relative_to(model_copy).as_posix() for path in model_copy.rglob("*") if path.is_file()) == before


def test_publish_cli_dry_run_prints_files_and_card(model_copy, monkeypatch, capsys):
    arguments = ["--model", str(model_copy), "--repo-id", "org/tiny", "--dry-run", "--max-shard-size", TINY_SHARD]
    monkeypatch.setattr(sys, "argv", ["publish.py", *arguments, "--endpoint", f"http://127.0.0.1:{_closed_port()}"])
    runpy.run_path(str(REPO_ROOT / "recipes" / "publish.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and f"would be re-saved in shards of at most {TINY_SHARD}" in printed
    assert "model-index:" in printed and "| Evaluation | Task |" in printed
    assert "Dry run: nothing was uploaded." in printed


def test_hand_written_readme_is_published_unchanged(model_copy):
    own_card = "---\nlicense: mit\nlanguage: [rm]\n---\n\n# My own card\n"
    (model_copy / "README.md").write_text(own_card)
    result = publish(model_copy, "org/tiny", dry_run=True)
    assert not result.card_generated
    assert result.card.data.license == "mit" and result.card.text == "\n# My own card\n"
    assert result.files["README.md"] == len(own_card.encode())
    assert (model_copy / "README.md").read_text() == own_card


def test_publish_refuses_repo_ids_without_namespace(model_copy):
    with pytest.raises(ValueError, match="use ORG/NAME"):
        publish(model_copy, "tiny", dry_run=True)


def test_data_languages_and_hub_ids_of_recipe_sources():
    sources = [{"path": str(CORPUS / "[dr]*.jsonl")}, {"path": "HuggingFaceFW/fineweb-2"}]
    assert data_languages(sources) == ["de", "rm"]  # 23 German documents, 7 Romansh
    assert hub_dataset_ids(sources) == ["HuggingFaceFW/fineweb-2"]


def test_publish_offline_fails_before_touching_the_folder(model_copy):
    assert huggingface_hub.constants.is_offline_mode()  # tests run with HF_HUB_OFFLINE=1
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1 is set"):
        publish(model_copy, "org/tiny", endpoint=f"http://127.0.0.1:{_closed_port()}")
    assert not (model_copy / "README.md").exists()


def test_pretraining_with_push_to_hub_publishes_the_exported_model(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_TOKEN", "test-token")
    options = tiny_run(tmp_path / "run", CORPUS, max_steps=5, warmup_steps=1, eval_steps=0, checkpoint_steps=0)
    options.update(eval_documents=0, push_to_hub="org/pushed", hub_private=True)
    accelerate.state.AcceleratorState._reset_state(True)
    result = pretrain(PretrainConfig(**options))
    accelerate.state.AcceleratorState._reset_state(True)
    uploaded = huggingface_hub.HfApi(endpoint=fake_hub.url, token="test-token").list_repo_files("org/pushed")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "pretrain_config.yaml"} <= set(uploaded)
    assert (result.model_dir / "README.md").read_text().startswith("---\n")
