"""SFT (`apertus_hf.trainers.sft`, `recipes/sft.py`) on a tiny random Apertus and a slice of the shipped chat data."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from apertus_hf import ApertusConfig, ApertusForCausalLM
from apertus_hf.optim import AdEMAMix
from apertus_hf.runtime import SourceNotFoundError
from apertus_hf.tokenization.special_tokens import ASSISTANT_END_TOKEN_ID, EOS_TOKEN_ID, TOOLS_SUFFIX_TOKEN_ID
from apertus_hf.trainers.recipe import PostTrainingRecipeError
from apertus_hf.trainers.sft import RECIPE_FILE_NAME, SFT_RECIPE, SFTArguments, build_sft_trainer, run_sft
from apertus_hf.training_facts import TrainingFacts, portable_path
from tests.helpers import ZERO3_CPU_CONFIG, tiny_bpe_tokenizer
from tests.pretraining.conftest import REPO_ROOT, SHIPPED_TOKENIZER, TINY_MODEL
from tests.trainers.conftest import launch_recipe

CHAT = REPO_ROOT / "data" / "chat"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Apertus saved with the shipped tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    ApertusForCausalLM(ApertusConfig.from_preset("small", **TINY_MODEL, vocab_size=8192)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(folder)
    return folder


def write_rows(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_rows(split: str, count: int) -> list[dict]:
    return [json.loads(line) for line in (CHAT / f"{split}.jsonl").read_text().splitlines()[:count]]


@pytest.fixture(scope="module")
def chat_slice(tmp_path_factory) -> Path:
    """The first 64 train and 32 test conversations of data/chat, in the same layout."""
    folder = tmp_path_factory.mktemp("chat")
    write_rows(folder, "train", read_rows("train", 64))
    write_rows(folder, "test", read_rows("test", 32))
    return folder


def tiny_recipe(output_dir: Path, model: Path, dataset: Path, **overrides) -> tuple[SFTArguments, SFTConfig]:
    """(SFTArguments, SFTConfig) of a short run: evaluation at the start and the end only."""
    options = {
        "output_dir": str(output_dir),
        "model_name_or_path": str(model),
        "dataset": str(dataset),
        "max_steps": 24,
        "use_ademamix": False,
        "learning_rate": 1e-2,
        "warmup_steps": 0.0,
        "per_device_train_batch_size": 8,
        "logging_steps": 4,
        "save_steps": 1000,
        "eval_strategy": "no",
        "per_device_eval_batch_size": 32,
        "disable_tqdm": True,
        **overrides,
    }
    return SFT_RECIPE.configs(options)


def runs(mask: torch.Tensor) -> list[list[int]]:
    """The positions where `mask` is True, grouped into runs of consecutive positions."""
    groups: list[list[int]] = []
    for position in mask.nonzero().flatten().tolist():
        if groups and position == groups[-1][-1] + 1:
            groups[-1].append(position)
        else:
            groups.append([position])
    return groups


def test_labels_cover_exactly_the_assistant_answers_and_their_end_token(tiny_model_dir, chat_slice, tmp_path):
    trainer = build_sft_trainer(*tiny_recipe(tmp_path, tiny_model_dir, chat_slice))
    tokenizer = trainer.processing_class
    rows = [trainer.train_dataset[index] for index in range(8)]
    batch = trainer.data_collator([{key: row[key] for key in ("input_ids", "labels")} for row in rows])
    for row, input_ids, labels in zip(rows, batch["input_ids"], batch["labels"], strict=True):
        answers = [message["content"] for message in row["messages"] if message["role"] == "assistant"]
        trained = [tokenizer.decode(input_ids[run]) for run in runs(labels != -100)]
        assert trained == [answer + "<|assistant_end|>" for answer in answers]
        assert torch.equal(labels[labels != -100], input_ids[labels != -100])
    # Some rows have a system message, some several turns; the slice covers both.
    assert any(row["messages"][0]["role"] == "system" for row in rows)
    assert any(len(row["tasks"]) > 1 for row in rows)


@pytest.mark.slow
def test_short_run_lowers_the_eval_loss_and_saves_an_instruct_model(tiny_model_dir, chat_slice, tmp_path):
    recipe, args = tiny_recipe(tmp_path / "run", tiny_model_dir, chat_slice)
    result = run_sft(recipe, args)

    assert result.steps == 24
    assert result.final_eval_loss < result.initial_eval_loss - 2.0, (result.initial_eval_loss, result.final_eval_loss)
    assert result.model_dir == result.output_dir == tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert model.generation_config.eos_token_id == [EOS_TOKEN_ID, ASSISTANT_END_TOKEN_ID, TOOLS_SUFFIX_TOKEN_ID]
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tokenizer.decode(prompt["input_ids"]).endswith("<|user_start|>Hi<|user_end|><|assistant_start|>")
    # The saved recipe runs again: the same options, with the local paths made portable (no absolute paths).
    saved_file = result.model_dir / RECIPE_FILE_NAME
    assert str(tmp_path) not in saved_file.read_text() and "<local>/run" in saved_file.read_text()
    saved_recipe, saved_args = SFT_RECIPE.parse(["--config", str(saved_file)])
    assert saved_recipe == dataclasses.replace(recipe, model_name_or_path=portable_path(str(tiny_model_dir)),
                                               dataset=portable_path(str(chat_slice)))  # fmt: skip
    assert saved_args == dataclasses.replace(args, output_dir="<local>/run")

    facts = TrainingFacts.load(result.model_dir)
    assert (facts.stage, facts.steps, facts.context_length, facts.adapter) == ("sft", 24, 256, False)
    assert facts.base_model == portable_path(str(tiny_model_dir)) and facts.datasets == [portable_path(str(chat_slice))]
    assert facts.eval_results == {"loss": result.final_eval_loss, "perplexity": math.exp(result.final_eval_loss)}
    assert facts.recipe_file == RECIPE_FILE_NAME and facts.tags == ["sft"] and facts.license is None
    assert facts.hyperparameters["Learning rate"] == "0.01, linear schedule, no warmup"
    assert facts.hyperparameters["Batch"].endswith("= 8 rows per step")
    assert facts.tokens_seen is None  # include_num_input_tokens_seen is off


def test_lora_trains_only_the_adapter_and_merges_into_a_stock_model(tiny_model_dir, chat_slice, tmp_path):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_slice, use_lora=True, lora_r=4, merge_lora=True, max_steps=6)
    result = run_sft(*recipe)

    original = load_file(tiny_model_dir / "model.safetensors")
    trained = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): tensor
        for name, tensor in result.trainer.model.state_dict().items()
    }
    frozen = {name: tensor for name, tensor in trained.items() if "lora_" not in name}
    assert set(frozen) == set(original)
    assert all(torch.equal(frozen[name], original[name]) for name in original)
    # LoRA's B matrices start at zero: every one of them moved.
    assert all(tensor.abs().max() > 0 for name, tensor in trained.items() if "lora_B" in name)

    adapter = load_file(result.output_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert (result.output_dir / "generation_config.json").is_file()

    # Stock transformers' own Apertus class, not ours, loads the merged folder.
    assert result.model_dir == result.output_dir / "merged"
    merged = transformers.models.apertus.ApertusForCausalLM.from_pretrained(result.model_dir).eval()
    base_with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.output_dir
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    input_ids = torch.tensor([[1, 65, 1500, 1700, 66, 67]])
    with torch.no_grad():
        logits = merged(input_ids).logits
        torch.testing.assert_close(logits, base_with_adapter(input_ids).logits, rtol=1e-5, atol=1e-5)
        assert (logits - base(input_ids).logits).abs().max() > 1e-2
    assert merged.generation_config.eos_token_id == [EOS_TOKEN_ID, ASSISTANT_END_TOKEN_ID, TOOLS_SUFFIX_TOKEN_ID]
    assert AutoTokenizer.from_pretrained(result.model_dir).chat_template


def test_ademamix_is_the_optimizer_at_the_recipe_learning_rate(tiny_model_dir, chat_slice, tmp_path):
    recipe, args = tiny_recipe(tmp_path, tiny_model_dir, chat_slice, use_ademamix=True, max_steps=12)
    result = run_sft(recipe, args)

    optimizer = result.trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(optimizer, AdEMAMix)
    assert {group["initial_lr"] for group in optimizer.param_groups} == {args.learning_rate}
    assert {group["alpha"] for group in optimizer.param_groups} == {8.0}
    assert {group["betas"] for group in optimizer.param_groups} == {(0.9, 0.999, 0.999)}
    assert result.final_eval_loss < result.initial_eval_loss - 1.0


def test_packing_keeps_the_assistant_labels_and_trains(tiny_model_dir, chat_slice, tmp_path):
    unpacked = build_sft_trainer(*tiny_recipe(tmp_path / "unpacked", tiny_model_dir, chat_slice))
    recipe = tiny_recipe(tmp_path / "packed", tiny_model_dir, chat_slice, packing=True, max_steps=8)
    packed = build_sft_trainer(*recipe)

    def label_tokens(dataset) -> list[int]:
        return sorted(token for row in dataset for token in row["labels"] if token != -100)

    assert len(packed.train_dataset) < len(unpacked.train_dataset) / 2
    assert label_tokens(packed.train_dataset) == label_tokens(unpacked.train_dataset)
    batch = next(iter(packed.get_train_dataloader()))
    assert "attention_mask" not in batch  # documents are told apart by their restarting position ids
    assert (batch["position_ids"] == 0).sum() > batch["input_ids"].shape[0]

    result = run_sft(*recipe)
    assert result.final_eval_loss < result.initial_eval_loss - 1.0


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_model_dir, chat_slice, tmp_path):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_slice, max_steps=6, save_steps=3, eval_on_start=False)
    run_sft(*recipe)
    uninterrupted = load_file(tmp_path / "model.safetensors")
    halfway = tmp_path / "checkpoint-3"
    halfway_saved_at = (halfway / "trainer_state.json").stat().st_mtime_ns
    # Back to the state of a run stopped right after its checkpoint at step 3.
    shutil.rmtree(tmp_path / "checkpoint-6")
    (tmp_path / "model.safetensors").unlink()

    result = run_sft(*recipe)
    assert (halfway / "trainer_state.json").stat().st_mtime_ns == halfway_saved_at  # steps 1-3 were not redone
    assert result.steps == 6
    resumed = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)


def test_bad_input_gets_errors_that_name_the_problem(tiny_model_dir, chat_slice, tmp_path):
    wrong_columns = tmp_path / "wrong_columns"
    write_rows(wrong_columns, "train", [{"question": "2 + 2?", "answer": "4"}])
    with pytest.raises(PostTrainingRecipeError, match=r"columns \['answer', 'question'\].*`messages`"):
        build_sft_trainer(*tiny_recipe(tmp_path, tiny_model_dir, wrong_columns, eval_dataset_split=None))

    unknown_role = tmp_path / "unknown_role"
    rows = read_rows("train", 3)
    rows[2]["messages"][-2]["role"] = "narrator"
    write_rows(unknown_role, "train", rows)
    with pytest.raises(PostTrainingRecipeError, match=r"cannot render a conversation.*role narrator"):
        build_sft_trainer(*tiny_recipe(tmp_path, tiny_model_dir, unknown_role, eval_dataset_split=None))

    plain_text = tmp_path / "plain_text"
    write_rows(plain_text, "train", [{"text": "Grüezi"}])
    with pytest.raises(PostTrainingRecipeError, match="assistant_only_loss: false"):
        build_sft_trainer(*tiny_recipe(tmp_path, tiny_model_dir, plain_text, eval_dataset_split=None))

    other_tokenizer = tiny_bpe_tokenizer()
    other_tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    other_tokenizer.save_pretrained(tmp_path / "other_tokenizer")
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_slice, tokenizer_name_or_path=str(tmp_path / "other_tokenizer"))
    with pytest.raises(PostTrainingRecipeError, match="lacks; set chat_template: tokenizer"):
        build_sft_trainer(*recipe)

    with pytest.raises(SourceNotFoundError, match=r"no such file or folder.*make pretrain"):
        build_sft_trainer(*tiny_recipe(tmp_path, tmp_path / "no_model", chat_slice))


@pytest.mark.slow
def test_recipe_script_runs_under_accelerate_launch(tiny_model_dir, chat_slice, tmp_path):
    arguments = [
        "--model_name_or_path", str(tiny_model_dir), "--dataset", str(chat_slice), "--output_dir", str(tmp_path),
        "--max_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "2",
        "--eval_dataset_split", "null", "--disable_tqdm", "true",
    ]  # fmt: skip
    completed = launch_recipe("sft.py", arguments)
    assert "Done: 4 steps, train loss " in completed.stdout
    assert f"model in {tmp_path}." in completed.stdout
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / RECIPE_FILE_NAME).is_file()


@pytest.mark.slow
def test_deepspeed_zero3_on_two_cpu_processes_trains_and_saves_the_full_model(tiny_model_dir, chat_slice, tmp_path):
    pytest.importorskip("deepspeed")
    accelerate_config = tmp_path / "zero3.yaml"
    accelerate_config.write_text(ZERO3_CPU_CONFIG)
    output_dir = tmp_path / "run"
    arguments = [
        "--model_name_or_path", str(tiny_model_dir), "--dataset", str(chat_slice), "--output_dir", str(output_dir),
        "--max_steps", "6", "--save_steps", "6", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
        "--logging_steps", "2", "--eval_on_start", "false", "--disable_tqdm", "true",
    ]  # fmt: skip
    completed = launch_recipe("sft.py", arguments, launcher=("--config_file", str(accelerate_config)))
    assert "Done: 6 steps" in completed.stdout
    # Two ranks, each with its own shard of the optimizer state.
    assert len(list((output_dir / "checkpoint-6").rglob("*optim_states.pt"))) == 2
    # The saved model is gathered from the shards: every tensor whole, and trained.
    original, saved = load_file(tiny_model_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert {name: tensor.shape for name, tensor in saved.items()} == {
        name: tensor.shape for name, tensor in original.items()
    }
    assert not torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"]
    )


def test_the_tiny_recipe_is_the_embedded_default():
    written = yaml.safe_load((REPO_ROOT / "recipes" / "configs" / "tiny" / "sft.yaml").read_text())
    assert SFT_RECIPE.configs(written) == SFT_RECIPE.configs()
    assert set(SFT_RECIPE.config_defaults) <= set(written)
    assert all(field.metadata.get("help") for field in dataclasses.fields(SFTArguments))


@pytest.mark.parametrize(("size", "model", "learning_rate"), [("8b", "8B", 5e-6), ("70b", "70B", 2e-6)])
def test_the_apertus_recipes_carry_the_spec_values(size, model, learning_rate):
    # bf16 needs a GPU, or use_cpu to be valid on this machine.
    recipe, args = SFT_RECIPE.parse(
        ["--config", str(REPO_ROOT / "recipes/configs" / size / "sft.yaml"), "--use_cpu=true"]
    )
    assert recipe.model_name_or_path == f"swiss-ai/Apertus-{model}-2509"
    assert (args.learning_rate, args.lr_scheduler_type, args.warmup_steps) == (learning_rate, "linear", 0.03)
    assert (args.num_train_epochs, args.max_steps, args.max_length, args.packing) == (1.0, -1, 4096, False)
    assert (recipe.use_ademamix, recipe.ademamix_alpha, recipe.ademamix_beta3) == (True, 8.0, 0.999)
    assert args.bf16 and args.activation_checkpointing and args.assistant_only_loss
    assert args.per_device_eval_batch_size == args.per_device_train_batch_size
