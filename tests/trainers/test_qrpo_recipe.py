"""recipes/qrpo.py: the tiny recipe is the defaults, the Apertus recipes carry the values of the Apertus tech report
(arXiv 2509.14233, §4.3 'Preference Alignment'), the script runs under `accelerate launch`, and bad options fail
with clear errors."""

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from apertus_hf import ApertusConfig, ApertusForCausalLM
from apertus_hf.preference import QRPOPrepareConfig
from apertus_hf.recipe_args import parse_recipe_args
from apertus_hf.runtime import SourceNotFoundError
from apertus_hf.trainers import QRPODatasetError
from apertus_hf.trainers.qrpo import QRPO_CITATION
from apertus_hf.trainers.qrpo_recipe import QRPO_RECIPE, RECIPE_FILE_NAME, QRPOArguments, run_qrpo
from apertus_hf.training_facts import TrainingFacts
from tests.pretraining.conftest import SHIPPED_TOKENIZER, TINY_MODEL
from tests.trainers.conftest import launch_recipe

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def policy_and_data(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random policy with the shipped tokenizer, and a saved paired QRPO dataset of chat prompts."""
    folder = tmp_path_factory.mktemp("qrpo_recipe")
    torch.manual_seed(0)
    ApertusForCausalLM(ApertusConfig.from_preset("small", **TINY_MODEL, vocab_size=8192)).save_pretrained(
        folder / "policy"
    )
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(folder / "policy")
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Write a word with {index % 5 + 1} letters."}],
            "chosen": [{"role": "assistant", "content": "eerie"}],
            "rejected": [{"role": "assistant", "content": "abc"}],
            "chosen_reward": 0.6,
            "rejected_reward": 0.0,
            "ref_rewards": [0.0, 0.1, 0.2, 0.3],
        }
        for index in range(16)
    ]
    Dataset.from_list(rows).save_to_disk(str(folder / "data"))
    return folder / "policy", folder / "data"


def qrpo_configs(**values):
    return QRPO_RECIPE.configs({"disable_tqdm": True, **values})


def test_the_tiny_recipe_is_the_embedded_default():
    written = yaml.safe_load((REPO_ROOT / "recipes" / "configs" / "tiny" / "qrpo.yaml").read_text())
    assert QRPO_RECIPE.configs(written) == QRPO_RECIPE.configs()
    # Every option of ours and every TRL option the recipe sets is written out.
    assert set(written) == {field.name for field in dataclasses.fields(QRPOArguments)} | set(
        QRPO_RECIPE.config_defaults
    )
    assert all(field.metadata.get("help") for field in dataclasses.fields(QRPOArguments))


@pytest.mark.parametrize(("size", "learning_rate"), [("8b", 5e-7), ("70b", 1e-7)])
def test_the_apertus_recipes_carry_the_spec_values(size, learning_rate):
    recipe_file = REPO_ROOT / "recipes/configs" / size / "qrpo.yaml"
    # bf16 needs a GPU, or use_cpu to be valid on this machine.
    recipe, args = QRPO_RECIPE.parse(["--config", str(recipe_file), "--use_cpu=true"])
    assert (args.beta, args.transform, args.length_normalize, args.max_normalized_beta) == (5.0, "identity", True, 0.1)
    assert args.cap_unnormalized_beta  # swiss-ai/posttraining's loss
    assert args.learning_rate == learning_rate
    # The released runs (swiss-ai/posttraining): max_grad_norm 20, warmup_ratio 0.1, linear decay, no weight decay,
    # one epoch, global batch 512, max length 4096.
    assert (args.max_grad_norm, args.warmup_steps, args.lr_scheduler_type, args.weight_decay) == (20, 0.1, "linear", 0)
    assert (args.num_train_epochs, args.max_length) == (1, 4096)
    processes = int(re.search(r"--num_processes (\d+)", recipe_file.read_text()).group(1))  # the launch line
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * processes == 512
    assert recipe.ref_model_name_or_path is None  # the reference is the initial policy, log-probs precomputed
    assert args.bf16 and args.activation_checkpointing


@pytest.mark.parametrize("size", ["8b", "70b"])
def test_the_apertus_data_recipes_sample_30_reference_completions(size):
    prepare = parse_recipe_args(
        QRPOPrepareConfig, ["--config", str(REPO_ROOT / "recipes/configs" / size / "qrpo_prepare.yaml")]
    )
    assert (prepare.num_samples, prepare.temperature, prepare.top_p, prepare.max_new_tokens) == (30, 1, 1, 4096)
    assert (prepare.selection, prepare.rejected_quantile, prepare.max_prompts) == ("pairs", 0.2, None)
    assert prepare.reward_model == "Skywork/Skywork-Reward-V2-Llama-3.1-8B" and prepare.reward_function is None
    # The QRPO recipe of the same size trains on what it writes, with the policy that sampled it.
    recipe, _ = QRPO_RECIPE.parse(
        ["--config", str(REPO_ROOT / "recipes/configs" / size / "qrpo.yaml"), "--use_cpu=true"]
    )
    assert (recipe.dataset, recipe.model_name_or_path) == (prepare.output_dir, prepare.model_name_or_path)


def test_run_saves_a_plain_model_with_the_chat_generation_config(tmp_path, policy_and_data):
    policy, data = policy_and_data
    result = run_qrpo(
        *qrpo_configs(
            output_dir=str(tmp_path / "run"), model_name_or_path=str(policy), dataset=str(data), max_steps=3,
            per_device_train_batch_size=4, eval_fraction=0.25, logging_steps=1, learning_rate=1e-3,
        )
    )  # fmt: skip
    assert result.model_dir == tmp_path / "run"
    assert {"eval_loss", "eval_quantile_reward", "train_loss"} <= set(result.metrics)
    saved = yaml.safe_load((result.model_dir / RECIPE_FILE_NAME).read_text())
    assert saved["dataset"] == "<local>/data" and saved["max_steps"] == 3  # no absolute local paths
    assert QRPO_RECIPE.parse(["--config", str(result.model_dir / RECIPE_FILE_NAME)])[1].max_steps == 3
    facts = TrainingFacts.load(result.model_dir)
    assert (facts.stage, facts.steps, facts.context_length, facts.datasets) == ("qrpo", 3, 1024, ["<local>/data"])
    assert facts.eval_results == {"loss": result.metrics["eval_loss"]}
    assert facts.citations == [QRPO_CITATION] and facts.tags == ["qrpo"]
    assert (
        facts.hyperparameters["QRPO"] == "beta 5 divided by the completion length (capped at 0.1), transform identity"
    )
    generation = json.loads((result.model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 68, 72]
    assert json.loads((result.model_dir / "config.json").read_text())["eos_token_id"] == 68  # <|assistant_end|>
    assert "QRPO" in (result.model_dir / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert not torch.equal(model.lm_head.weight, AutoModelForCausalLM.from_pretrained(policy).lm_head.weight)


def test_lora_run_saves_the_adapter_and_a_merged_model(tmp_path, policy_and_data):
    policy, data = policy_and_data
    result = run_qrpo(
        *qrpo_configs(
            output_dir=str(tmp_path / "run"), model_name_or_path=str(policy), dataset=str(data), max_steps=2,
            per_device_train_batch_size=4, eval_fraction=0.0, use_lora=True, lora_r=4, learning_rate=1e-2,
        )
    )  # fmt: skip
    assert (tmp_path / "run" / "adapter_config.json").is_file()
    assert result.model_dir == tmp_path / "run" / "merged"
    # Both folders carry their facts and the recipe; only the adapter folder is an adapter.
    adapter_facts, merged_facts = TrainingFacts.load(tmp_path / "run"), TrainingFacts.load(result.model_dir)
    assert (adapter_facts.adapter, merged_facts.adapter) == (True, False)
    assert adapter_facts.tags == merged_facts.tags == ["qrpo", "lora"]
    assert merged_facts.hyperparameters["LoRA"] == "r 4, alpha 32, dropout 0, on all-linear"
    assert merged_facts.eval_results == {}  # no evaluation data
    assert (result.model_dir / RECIPE_FILE_NAME).read_text() == (tmp_path / "run" / RECIPE_FILE_NAME).read_text()
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert not torch.equal(
        merged.model.layers[0].self_attn.q_proj.weight,
        AutoModelForCausalLM.from_pretrained(policy).model.layers[0].self_attn.q_proj.weight,
    )


@pytest.mark.slow
def test_recipe_script_runs_under_accelerate_launch(tmp_path, policy_and_data):
    policy, data = policy_and_data
    arguments = [
        "--model_name_or_path", str(policy), "--dataset", str(data), "--output_dir", str(tmp_path / "run"),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_fraction", "0", "--disable_tqdm", "true",
    ]  # fmt: skip
    completed = launch_recipe("qrpo.py", arguments)
    assert f"Done: model in {tmp_path / 'run'}" in completed.stdout
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, policy_and_data):
    """DDP on 2 CPU processes with half the batch each: same reference log-probs, same updates, same model."""
    policy, data = policy_and_data
    arguments = [
        "--model_name_or_path", str(policy), "--dataset", str(data), "--max_steps", "3", "--eval_fraction", "0",
        "--learning_rate", "1e-2", "--warmup_steps", "0", "--disable_tqdm", "true",
    ]  # fmt: skip
    plain = ("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    cpu = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    for name, launcher, batch in (
        ("one", ("--num_processes", "1"), "4"),
        ("two", ("--multi_gpu", "--num_processes", "2"), "2"),
    ):
        output = ["--output_dir", str(tmp_path / name), "--per_device_train_batch_size", batch]
        launch_recipe("qrpo.py", [*arguments, *output], launcher=(*plain, *launcher), env=cpu)
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    assert not torch.equal(one["lm_head.weight"], AutoModelForCausalLM.from_pretrained(policy).lm_head.weight)
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=2e-5, rtol=1e-4)


def test_bad_options_and_data_are_named(tmp_path, policy_and_data):
    policy, data = policy_and_data
    with pytest.raises(ValueError, match="transform must be one of"):
        qrpo_configs(transform="squared")
    with pytest.raises(SourceNotFoundError, match=r"dataset=.*missing': no such file or folder"):
        run_qrpo(
            *qrpo_configs(model_name_or_path=str(policy), dataset=str(tmp_path / "missing"), output_dir=str(tmp_path))
        )
    with pytest.raises(SourceNotFoundError, match=r"model_name_or_path=.*no_model': no such file or folder"):
        run_qrpo(
            *qrpo_configs(model_name_or_path=str(tmp_path / "no_model"), dataset=str(data), output_dir=str(tmp_path))
        )
    unpaired = tmp_path / "unpaired.jsonl"
    unpaired.write_text(json.dumps({"prompt": "Hi", "completion": "there", "reward": 1.0}) + "\n")
    with pytest.raises(QRPODatasetError, match=r"misses the columns \['ref_rewards'\]"):
        run_qrpo(
            *qrpo_configs(
                model_name_or_path=str(policy), dataset=str(unpaired), output_dir=str(tmp_path / "r"), eval_fraction=0.0
            )
        )


def test_hub_model_id_publishes_the_model_with_our_card(tmp_path, policy_and_data, monkeypatch):
    """With hub_model_id, recipes/qrpo.py publishes the trained model, tokenizer, generation config, training facts
    and apertus_hf's card (not TRL's) to the Hub repo (a Hub-compatible server on 127.0.0.1); the trainer itself never
    pushes."""
    import huggingface_hub

    from apertus_hf.hub import CARD_MARKER
    from tests.hub_server import start_fake_hub

    policy, data = policy_and_data
    script = importlib.util.spec_from_file_location("qrpo_script", REPO_ROOT / "recipes" / "qrpo.py")
    qrpo_script = importlib.util.module_from_spec(script)
    script.loader.exec_module(qrpo_script)
    hub, server = start_fake_hub(tmp_path / "hub")
    try:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # tests run with HF_HUB_OFFLINE=1
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        qrpo_script.main([
            "--output_dir", str(tmp_path / "run"), "--model_name_or_path", str(policy), "--dataset", str(data),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_fraction", "0.25",
            "--hub_model_id", "org/qrpo-tiny", "--hub_token", "test-token", "--save_strategy", "no",
            "--license", "apache-2.0", "--disable_tqdm", "true",
        ])  # fmt: skip
        files = hub.repo_files("org/qrpo-tiny")
    finally:
        server.shutdown()
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= set(files)
    assert {"training_facts.json", RECIPE_FILE_NAME} <= set(files)
    card = files["README.md"].decode()
    assert CARD_MARKER in card and "QRPO" in card and "license: apache-2.0" in card
    assert str(tmp_path) not in files[RECIPE_FILE_NAME].decode() and b"test-token" not in files[RECIPE_FILE_NAME]
    assert json.loads(files["generation_config.json"])["eos_token_id"] == [2, 68, 72]
