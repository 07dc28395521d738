"""The checks before publishing: a folder stock transformers (or PEFT) loads, without absolute paths of this
machine, and card metadata the Hub accepts."""

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard

from apertus_hf.hub import (
    ModelCardError,
    ModelFolderError,
    check_model_card,
    check_model_folder,
    local_paths,
    needs_resharding,
)
from tests.hub.conftest import TINY_SHARD


def test_check_model_folder_reports_sizes(pretrained):
    report = check_model_folder(pretrained)
    assert report.files["model.safetensors"] == (pretrained / "model.safetensors").stat().st_size
    assert report.weight_files == ["model.safetensors"] and report.config["model_type"] == "apertus"
    assert "model.safetensors" in report.summary() and "total" in report.summary()
    assert needs_resharding(report, TINY_SHARD) and not needs_resharding(report)
    assert not report.adapter


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


def test_check_model_folder_flags_absolute_paths_of_this_machine_with_the_fix(model_copy, tmp_path):
    """The probe's case: the resolved recipe held the run's absolute output_dir; an eval result its model path."""
    recipe = {"output_dir": str(tmp_path / "run"), "data": [{"path": "data/corpus"}], "seq_len": 64}
    (model_copy / "pretrain_config.yaml").write_text(json.dumps(recipe))
    result_path = model_copy / "eval_results" / "perplexity.json"
    result_path.write_text(result_path.read_text().replace('"outputs/tiny/model"', json.dumps(str(model_copy))))
    with pytest.raises(ModelFolderError) as error:
        check_model_folder(model_copy)
    message = str(error.value)
    assert f"pretrain_config.yaml names absolute paths of this machine ({tmp_path / 'run'})" in message
    assert f"eval_results/perplexity.json names absolute paths of this machine ({model_copy})" in message
    assert "replace each with a Hub id or a path relative to the run" in message
    assert "config.json names" not in message  # the model's own files hold no paths


def test_local_paths_are_this_machines_folders_not_urls_or_system_paths(tmp_path):
    text = (
        f"output_dir: {tmp_path}/run\nsee https://huggingface.co/swiss-ai/Apertus-8B-2509 and <local>/corpus\n"
        "python lives in /usr/lib/python3 and data in data/corpus; /nowhere-on-this-machine/x/y\n"
    )
    assert local_paths(text) == [f"{tmp_path}/run"]


def test_adapter_folder_is_checked_with_peft(adapter, tmp_path):
    report = check_model_folder(adapter)
    assert report.adapter and report.weight_files == ["adapter_model.safetensors"]
    assert report.config["base_model_name_or_path"] == "swiss-ai/Apertus-8B-2509"
    local_base = shutil.copytree(adapter, tmp_path / "adapter")
    config_path = local_base / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "base")}))
    (tmp_path / "base").mkdir()
    with pytest.raises(ModelFolderError, match=r"adapter_config.json names absolute paths of this machine"):
        check_model_folder(local_base)


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
