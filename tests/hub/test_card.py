"""The model card of every stage, built from the run's training facts: metadata the Hub accepts, the fixes of the
probe (trained context length, parameters without buffers, measured evaluation, license, total tokens), and the
README.md replacement rules."""

import json
import logging
import math

import pytest
import safetensors
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from apertus_hf import ApertusForCausalLM
from apertus_hf.evaluation.common import EvalResult
from apertus_hf.hub import (
    CARD_MARKER,
    build_model_card,
    check_model_card,
    count_parameters,
    data_languages,
    hub_dataset_ids,
    readme_author,
    write_model_card,
)
from apertus_hf.training_facts import TrainingFacts
from tests.hub.conftest import (
    BASE_MODEL_ID,
    CORPUS,
    CORPUS_LANGUAGES,
    DPO_CITATION,
    PREFERENCE_DATASET_ID,
    pretraining_facts,
    trl_readme,
)
from tests.pretraining.conftest import TINY_MODEL


def test_card_metadata_validates_offline(pretrained, tmp_path):
    card = build_model_card(pretrained, "org/tiny")
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
        ("loss", 5.25),
        ("perplexity", 190.57),  # the run's own held-out evaluation
        ("perplexity", 4321.5),
        ("bits_per_byte", 3.25),
    }
    assert {result.task_type for result in results} == {"text-generation"}


def test_card_body_renders_architecture_training_and_eval_table(pretrained):
    text = build_model_card(pretrained, "org/tiny").text
    assert "| perplexity | perplexity | shipped corpus | perplexity | 4322 |" in text
    assert "| perplexity | perplexity | shipped corpus | bits_per_byte | 3.25 |" in text
    assert f"| Layers | {TINY_MODEL['num_hidden_layers']} |" in text
    assert f"| Hidden size | {TINY_MODEL['hidden_size']} |" in text
    assert "| Vocabulary | 8192 |" in text
    assert "| Goldfish loss | on: k=50, h=13 |" in text and "| Optimizer steps | 4 |" in text
    assert "pretrained with `apertus_hf` from randomly initialised weights" in text and "| Started from |" not in text
    assert "`pretrain_config.yaml`" in text and "`./data/corpus` (local data, not published: 6 files" in text
    assert "This is a base model" in text and "Goldfish loss (Hans et al., 2024)" in text
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny"' in text
    assert "{{" not in text and "{%" not in text


def test_card_context_length_is_the_trained_one_and_positions_are_separate(pretrained):
    """The probe's card claimed the config's 65,536 positions after training on rows of 64 tokens."""
    text = build_model_card(pretrained, "org/tiny").text
    supported = json.loads((pretrained / "config.json").read_text())["max_position_embeddings"]
    assert "| Context length (trained) | 64 tokens |" in text
    assert f"| Positions supported | {supported:,} (max_position_embeddings) |" in text


def test_parameter_count_leaves_out_the_buffers_in_the_weights_file(pretrained):
    """xIELU's beta and eps are persistent buffers: they are in model.safetensors but are no parameters."""
    with safetensors.safe_open(pretrained / "model.safetensors", framework="pt") as handle:
        stored = {name: handle.get_slice(name).get_shape() for name in handle.keys()}  # noqa: SIM118
    buffers = [name for name in stored if name.endswith(("act_fn.beta", "act_fn.eps"))]
    assert buffers  # the folder does hold buffers
    parameters = sum(parameter.numel() for parameter in ApertusForCausalLM.from_pretrained(pretrained).parameters())
    assert count_parameters(pretrained) == parameters < sum(math.prod(shape) for shape in stored.values())
    assert f"| Parameters | {parameters / 1e3:.2f}K ({parameters:,}), stored as F32 |" in (
        build_model_card(pretrained, "org/tiny").text
    )


def test_card_states_the_total_tokens_seen_and_the_measured_evaluation(pretrained):
    card = build_model_card(pretrained, "org/tiny")
    assert "| Tokens seen | 2,048 (all processes together) |" in card.text  # the facts' total, not per device
    row = "| training | held-out evaluation | held-out split of the training data | {} | {} |"
    assert row.format("loss", "5.25") in card.text and row.format("perplexity", "190.6") in card.text


def test_license_comes_from_the_run_and_unknown_warns(model_copy, caplog):
    assert build_model_card(model_copy, "org/tiny", license="mit").data.license == "mit"  # the argument wins
    pretraining_facts(license=None).save(model_copy)
    with caplog.at_level(logging.WARNING, logger="apertus_hf.hub"):
        card = build_model_card(model_copy, "org/tiny")
    check_model_card(card)
    assert card.data.license == "unknown"  # the Hub's id for an unstated license
    assert "No license recorded for this model" in caplog.text and "--license" in caplog.text
    assert "Unknown: the training run recorded no license" in card.text


def test_evaluations_on_the_same_dataset_type_stay_apart_in_model_index(model_copy):
    EvalResult(
        evaluation="memorization",
        model="outputs/tiny/model",
        task_name="memorization",
        task_type="text-generation",
        dataset_name="training passages",
        dataset_type="local",  # as perplexity's and the run's held-out evaluation
        metrics={"exact_match_rate": 0.0, "unseen_rate": float("nan")},
    ).write(model_copy / "eval_results" / "memorization.json")
    card = build_model_card(model_copy, "org/tiny")
    check_model_card(card)
    entries = {entry["dataset"]["name"]: entry for entry in card.data.to_dict()["model-index"][0]["results"]}
    assert set(entries) == {"shipped corpus", "training passages", "held-out split of the training data"}
    assert entries["training passages"]["task"]["name"] == "memorization"
    assert [metric["type"] for metric in entries["training passages"]["metrics"]] == ["exact_match_rate"]
    assert "| memorization | memorization | training passages | unseen_rate | nan |" in card.text


def test_card_without_facts_or_results_uses_the_options(model_copy):
    (model_copy / "training_facts.json").unlink()
    (model_copy / "eval_results" / "perplexity.json").unlink()
    card = build_model_card(model_copy, "org/tiny-de", language=["de"], base_model=BASE_MODEL_ID, license="mit")
    check_model_card(card)
    metadata = card.data.to_dict()
    assert metadata["language"] == ["de"] and metadata["base_model"] == BASE_MODEL_ID
    assert metadata["widget"] == [{"text": "Die Alpen sind ein Gebirge, das", "example_title": "German"}]
    assert "model-index" not in metadata and "model_name" not in metadata
    assert not {"multilingual", "goldfish-loss"} & set(metadata["tags"])  # one language; Goldfish not recorded
    assert "no `training_facts.json`" in card.text and "No evaluation results" in card.text
    assert "| Context length (trained) | not recorded |" in card.text


def test_card_lists_hub_datasets_and_the_hub_base_model_of_the_run(model_copy):
    pretraining_facts(base_model=BASE_MODEL_ID, datasets=[str(CORPUS), "HuggingFaceFW/fineweb-2"]).save(model_copy)
    card = build_model_card(model_copy, "org/tiny")
    metadata = card.data.to_dict()
    assert metadata["base_model"] == BASE_MODEL_ID
    assert metadata["datasets"] == ["HuggingFaceFW/fineweb-2"]
    assert f"starting from [{BASE_MODEL_ID}](https://huggingface.co/{BASE_MODEL_ID})" in card.text
    assert f"| Started from | [{BASE_MODEL_ID}](https://huggingface.co/{BASE_MODEL_ID}) |" in card.text
    assert "[HuggingFaceFW/fineweb-2](https://huggingface.co/datasets/HuggingFaceFW/fineweb-2) (Hub dataset)" in (
        card.text
    )


def test_a_local_base_model_is_described_but_not_in_the_metadata(model_copy):
    pretraining_facts(base_model="outputs/pretrain-tiny/model").save(model_copy)
    card = build_model_card(model_copy, "org/tiny")
    assert "base_model" not in card.data.to_dict()
    assert "starting from the local model `outputs/pretrain-tiny/model`" in card.text


@pytest.mark.parametrize(
    ("stage", "method", "intended_use"),
    [
        ("sft", "supervised fine-tuning (SFT)", "This is a chat model"),
        ("dpo", "Direct Preference Optimization (DPO)", "This is a preference-tuned chat model"),
        ("qrpo", "Quantile Reward Policy Optimization (QRPO)", "This is a preference-tuned chat model"),
    ],
)
def test_post_training_card_states_base_model_data_method_and_evaluation(post_trained, stage, method, intended_use):
    folder = post_trained(stage)
    card = build_model_card(folder, "org/tiny-chat")
    check_model_card(card)
    metadata = card.data.to_dict()
    assert metadata["base_model"] == BASE_MODEL_ID and metadata["license"] == "apache-2.0"
    assert stage in metadata["tags"] and "widget" not in metadata  # the Hub chats through the chat template
    text = card.text
    assert f"post-trained by {method} with `apertus_hf` starting from [{BASE_MODEL_ID}]" in text
    assert f"| Stage | {method} |" in text and "| Context length (trained) | 512 tokens |" in text
    assert "| training | held-out evaluation | held-out split of the training data | loss | 0.625 |" in text
    assert intended_use in text and "This is a base model" not in text
    assert "apply_chat_template" in text and f"`{stage}_config.yaml`" in text
    if stage == "sft":
        assert "datasets" not in metadata and "`./data/chat/train.jsonl` (local data, not published" in text
    else:
        assert metadata["datasets"] == [PREFERENCE_DATASET_ID]
    if stage == "dpo":
        assert "## Citation" in text and f"```bibtex\n{DPO_CITATION}\n```" in text


def test_adapter_card_says_peft_and_how_to_load_it(adapter):
    card = build_model_card(adapter, "org/tiny-lora")
    check_model_card(card)
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "peft" and metadata["base_model"] == BASE_MODEL_ID
    assert {"peft", "lora", "sft"} <= set(metadata["tags"])
    text = card.text
    assert "a LoRA adapter for the [Apertus]" in text and "It loads with PEFT on top of its base model" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("org/tiny-lora"' in text and "merge_and_unload()" in text
    assert "| Rank | 4 |" in text and "| Target modules | q_proj, v_proj |" in text
    # Rank 4 on every layer's q_proj (32 -> 32) and v_proj (32 -> 16: one key/value head of 16): A is r x in, B out x r.
    lora_parameters = TINY_MODEL["num_hidden_layers"] * 4 * ((32 + 32) + (32 + 16))
    assert f"| Trainable parameters | {lora_parameters}, stored as F32 |" in text


def test_write_model_card_replaces_trls_draft_and_an_earlier_card(post_trained):
    folder = post_trained("dpo")
    assert readme_author((folder / "README.md").read_text()) == "trainer"  # the draft TRL's DPOTrainer writes
    path = write_model_card(folder)
    first = path.read_text()
    assert path == folder / "README.md" and CARD_MARKER in first and "[TRL](https://github.com" not in first
    assert "# dpo\n" in first and 'from_pretrained("dpo"' in first  # named after the folder without a repo id
    facts = TrainingFacts.load(folder)
    facts.steps = 40
    facts.save(folder)
    assert "| Optimizer steps | 40 |" in write_model_card(folder, "org/tiny-dpo").read_text()  # our own card: redone


def test_write_model_card_keeps_a_readme_the_user_wrote(post_trained, caplog):
    folder = post_trained("sft")
    own_card = "---\nlicense: mit\ntags: [trl]\n---\n\n# My card\n\nTrained with TRL, then edited by hand.\n"
    (folder / "README.md").write_text(own_card)
    with caplog.at_level(logging.WARNING, logger="apertus_hf.hub"):
        write_model_card(folder, "org/mine")
    assert (folder / "README.md").read_text() == own_card
    assert "written by hand" in caplog.text


def test_readme_author_recognises_trainer_drafts_only():
    assert readme_author(trl_readme("sft")) == "trainer"
    assert readme_author(trl_readme("qrpo", base_model=None)) == "trainer"
    transformers_draft = (
        "---\ntags:\n- generated_from_trainer\nmodel-index:\n- name: out\n  results: []\n---\n\n<!-- This model card "
        "has been generated automatically according to the information the Trainer had access to. -->\n"
    )
    assert readme_author(transformers_draft) == "trainer"
    assert readme_author(f"---\nlicense: mit\n---\n{CARD_MARKER}\n") == "apertus_hf"
    assert readme_author("# Notes\nI used [TRL](https://github.com/huggingface/trl) for this.\n") == "user"


def test_data_languages_and_hub_ids_of_the_runs_sources():
    sources = [str(CORPUS / "[dr]*.jsonl"), "HuggingFaceFW/fineweb-2"]
    assert data_languages(sources) == ["de", "rm"]  # 23 German documents, 7 Romansh
    assert hub_dataset_ids([*sources, "data/corpus", "HuggingFaceFW/fineweb-2"]) == ["HuggingFaceFW/fineweb-2"]
    # The rule training loads with (runtime.resolve_source): paths that are not here are not Hub datasets either.
    assert hub_dataset_ids(["./gone/corpus", "corpus/part.jsonl", "<local>/corpus", "org/corpus"]) == ["org/corpus"]
