"""Reward-model training (`apertus_hf.trainers.reward`, `recipes/reward.py`) on a tiny random Apertus, the shipped
preference set and its generator, and the trained folder as the reward model of the QRPO data pipeline."""

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from apertus_hf import ApertusForCausalLM
from apertus_hf.hub import build_model_card, check_model_card, count_parameters
from apertus_hf.preference import QRPOPrepareConfig, RewardModelScorer, prepare_qrpo_dataset
from apertus_hf.trainers.recipe import PostTrainingRecipeError
from apertus_hf.trainers.reward import (
    EVAL_FILE_NAME,
    RECIPE_FILE_NAME,
    REWARD_MODEL_CITATION,
    REWARD_RECIPE,
    RewardArguments,
    build_reward_trainer,
    run_reward,
)
from apertus_hf.training_facts import TrainingFacts
from tests.helpers import ZERO3_CPU_CONFIG
from tests.pretraining.conftest import REPO_ROOT
from tests.trainers.conftest import launch_recipe
from tests.trainers.tiny_policy import CHAT_ROWS, chat_tokenizer, save_policy, tiny_config, write_jsonl

PREFERENCES = REPO_ROOT / "data" / "preferences"
# The task of the shipped set that a tiny random model learns in a few steps: the chosen answer is the word in capital
# letters, the rejected one the word as it was or with only its first letter capitalised. (The others need knowledge
# of weekdays, sums or animals that a random 2-layer model does not have.)
LEARNABLE_TASK = "uppercase"


def read_rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (PREFERENCES / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def write_splits(folder: Path, **splits: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random causal LM with the chat tokenizer: the model the reward model starts from."""
    torch.manual_seed(0)
    return save_policy(tmp_path_factory.mktemp("base"), ApertusForCausalLM(tiny_config()))


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    """The shipped pairs of the learnable task: 250 for training, 38 held out."""
    return write_splits(
        tmp_path_factory.mktemp("pairs"),
        **{split: [row for row in read_rows(split) if row["task"] == LEARNABLE_TASK] for split in ("train", "test")},
    )


def reward_recipe(output_dir: Path, base_dir: Path, dataset: Path, **overrides):
    """(RewardArguments, RewardConfig) of a short run: no periodic evaluation, one at the end."""
    values = {
        "model_name_or_path": str(base_dir),
        "dataset": str(dataset),
        "output_dir": str(output_dir),
        "max_steps": 16,
        "learning_rate": 1e-2,
        "warmup_steps": 0.0,
        "per_device_train_batch_size": 16,
        "logging_steps": 4,
        "save_steps": 1000,
        "eval_strategy": "no",
        "eval_on_start": False,
        "disable_tqdm": True,
        **overrides,
    }
    return REWARD_RECIPE.configs(values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_dir, pairs_dir):
    """A full fine-tuning run on the learnable pairs."""
    output_dir = tmp_path_factory.mktemp("reward") / "run"
    return run_reward(*reward_recipe(output_dir, base_dir, pairs_dir))


def test_held_out_accuracy_rises_well_above_chance_and_is_reported(trained, pairs_dir):
    evaluation = trained.evaluation
    held_out = read_rows("test")
    assert evaluation.pairs == len([row for row in held_out if row["task"] == LEARNABLE_TASK]) == 38
    print(f"held-out pairwise accuracy {evaluation}, loss {evaluation.loss:.4f}")
    # Seen: 0.9474 ± 0.0362 (36 of 38 pairs), loss 0.2219 (0.6931 untrained). Above chance by more than 3 of its standard errors, and by more than 3 of those of a model that
    # guesses (sqrt(0.25 / n)), since the standard error of an accuracy near 1 is near 0.
    assert evaluation.accuracy - 0.5 > 3 * evaluation.standard_error
    assert evaluation.accuracy - 0.5 > 3 * (0.25 / evaluation.pairs) ** 0.5
    logged = trained.trainer.state.log_history[-1]
    assert logged["eval_loss"] == evaluation.loss and logged["eval_pairwise_accuracy"] == evaluation.accuracy
    assert logged["eval_pairwise_accuracy_stderr"] == evaluation.standard_error
    report = json.loads((trained.output_dir / EVAL_FILE_NAME).read_text())
    assert report == {**evaluation.as_dict(), "dataset": str(pairs_dir), "split": "test", "step": 16}

    facts = TrainingFacts.load(trained.model_dir)
    assert (facts.stage, facts.steps, facts.context_length) == ("reward", 16, 256)
    assert facts.citations == [REWARD_MODEL_CITATION]
    assert facts.eval_results == {
        "loss": evaluation.loss,
        "pairwise_accuracy": evaluation.accuracy,
        "pairwise_accuracy_stderr": evaluation.standard_error,
    }
    assert facts.hyperparameters["Loss"] == "Bradley-Terry, -log sigmoid(r(chosen) - r(rejected))"
    saved_recipe, _ = REWARD_RECIPE.parse(["--config", str(trained.model_dir / RECIPE_FILE_NAME)])
    assert isinstance(saved_recipe, RewardArguments)

    card = build_model_card(trained.model_dir, "org/tiny-reward")
    check_model_card(card)
    assert card.data.pipeline_tag == "text-classification" and "reward" in card.data.tags
    assert "text-generation" not in card.data.tags
    assert "is a reward model (one score for a prompt and its answer)" in card.text
    assert "| pairwise_accuracy |" in card.text and "AutoModelForSequenceClassification" in card.text
    model = AutoModelForSequenceClassification.from_pretrained(trained.model_dir)
    assert count_parameters(trained.model_dir) == sum(parameter.numel() for parameter in model.parameters())


def test_saved_folder_scores_as_it_was_trained(trained, pairs_dir):
    """The folder has what `RewardModelScorer` needs (one output, the pad id, the chat template), and the scorer
    renders each pair as RewardTrainer did: the same token ids, the same scores, the same held-out accuracy."""
    folder = trained.model_dir
    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config["architectures"] == ["ApertusForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] == tokenizer.pad_token_id == 3
    assert tokenizer.chat_template == chat_tokenizer().chat_template

    scorer = RewardModelScorer(str(folder), batch_size=7)
    rows = [row for row in read_rows("test") if row["task"] == LEARNABLE_TASK]
    tokenized = trained.trainer.eval_dataset
    model = trained.trainer.model.eval()
    chosen_scores = scorer([row["prompt"] for row in rows], [row["chosen"] for row in rows])
    rejected_scores = scorer([row["prompt"] for row in rows], [row["rejected"] for row in rows])
    for index, row in enumerate(rows):
        for side, scores in (("chosen", chosen_scores), ("rejected", rejected_scores)):
            ids = scorer.encode(row["prompt"], row[side])
            assert ids == tokenized[index][f"{side}_ids"]
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
            assert scores[index] == pytest.approx(alone, abs=1e-5)
    differences = torch.tensor(chosen_scores) - torch.tensor(rejected_scores)
    assert int((differences > 0).sum()) == trained.evaluation.correct
    bradley_terry = -torch.nn.functional.logsigmoid(differences).mean().item()
    assert trained.evaluation.loss == pytest.approx(bradley_terry, abs=1e-5)


def test_qrpo_data_pipeline_scores_with_the_trained_folder(trained, base_dir, tmp_path):
    config = QRPOPrepareConfig(
        dataset=str(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)),
        model_name_or_path=str(base_dir),
        num_samples=3,
        max_new_tokens=6,
        reward_model=str(trained.model_dir),
        reward_function=None,
        selection="all",
        output_dir=str(tmp_path / "data"),
    )
    prepare_qrpo_dataset(config)
    rows = Dataset.load_from_disk(str(tmp_path / "data"))
    assert len(rows) == 3 * len(CHAT_ROWS)
    direct = RewardModelScorer(str(trained.model_dir))(rows["prompt"], rows["completion"])
    assert rows["reward"] == pytest.approx(direct, abs=1e-5)
    assert len(set(rows["reward"])) > 1


def test_lora_trains_adapters_and_the_head_and_merges_into_a_plain_reward_model(base_dir, pairs_dir, tmp_path):
    result = run_reward(
        *reward_recipe(
            tmp_path,
            base_dir,
            pairs_dir,
            use_lora=True,
            lora_r=4,
            max_steps=4,
            merge_lora=True,
            eval_dataset_split=None,
        )
    )
    assert result.evaluation is None  # no evaluation data
    peft_model = result.trainer.model
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or ".score.modules_to_save." in name for name in trainable)
    assert any(".score.modules_to_save." in name for name in trainable)
    # The transformer stayed as it was; LoRA's B matrices, which start at zero, and the head moved.
    original = load_file(base_dir / "model.safetensors")
    frozen = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): tensor
        for name, tensor in peft_model.state_dict().items()
        if "lora_" not in name and "score" not in name
    }
    assert set(frozen) == {name for name in original if name != "lm_head.weight"}
    assert all(torch.equal(frozen[name], original[name]) for name in frozen)
    adapter = load_file(result.output_dir / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in adapter and all("lora_" in name or "score" in name for name in adapter)

    assert result.model_dir == result.output_dir / "merged"
    merged = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    assert merged.config.pad_token_id == 3 and (result.model_dir / "generation_config.json").is_file()
    base_with_adapter = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, pad_token_id=3), result.output_dir
    ).eval()
    input_ids = torch.tensor([[1, 65, 1500, 1700, 66, 67, 1800, 68, 3, 3], [1, 65, 1600, 66, 67, 1900, 68, 3, 3, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, base_with_adapter(input_ids).logits, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(result.model_dir).chat_template


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(base_dir, pairs_dir, tmp_path):
    recipe = reward_recipe(tmp_path, base_dir, pairs_dir, max_steps=4, save_steps=2, eval_dataset_split=None)
    run_reward(*recipe)
    uninterrupted = load_file(tmp_path / "model.safetensors")
    halfway = tmp_path / "checkpoint-2"
    halfway_saved_at = (halfway / "trainer_state.json").stat().st_mtime_ns
    # Back to the state of a run stopped right after its checkpoint at step 2.
    shutil.rmtree(tmp_path / "checkpoint-4")
    (tmp_path / "model.safetensors").unlink()

    result = run_reward(*recipe)
    assert (halfway / "trainer_state.json").stat().st_mtime_ns == halfway_saved_at  # steps 1-2 were not redone
    assert result.steps == 4
    resumed = load_file(tmp_path / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys() and "score.weight" in resumed
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)


def test_bad_input_gets_errors_that_name_the_problem_and_the_fix(base_dir, pairs_dir, tmp_path):
    def build(dataset: Path, **overrides):
        return build_reward_trainer(*reward_recipe(tmp_path, base_dir, dataset, eval_dataset_split=None, **overrides))

    sft_data = write_splits(tmp_path / "sft", train=CHAT_ROWS)
    with pytest.raises(PostTrainingRecipeError, match=r"columns \['messages'\].*`chosen` and `rejected`.*SFT data"):
        build(sft_data)
    unpaired_row = {"prompt": "Hi", "completion": " there", "reward": 0.5, "ref_rewards": [0.1, 0.5]}
    with pytest.raises(PostTrainingRecipeError, match=r"unpaired QRPO dataset.*--selection pairs"):
        build(write_splits(tmp_path / "unpaired", train=[unpaired_row]))
    mixed_row = {
        "prompt": "Say hi.",
        "chosen": [{"role": "assistant", "content": "Hi"}],
        "rejected": [{"role": "assistant", "content": "No"}],
    }
    with pytest.raises(PostTrainingRecipeError, match="mixes conversations and plain text"):
        build(write_splits(tmp_path / "mixed", train=[mixed_row]))
    with pytest.raises(PostTrainingRecipeError, match="longer than max_length=8 tokens; raise max_length"):
        build(pairs_dir, max_length=8)

    # A causal LM whose tokenizer has no pad token: the head could not find the last token of padded rows.
    no_pad = tmp_path / "no_pad"
    save_policy(no_pad, ApertusForCausalLM(tiny_config()))
    tokenizer_config = no_pad / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "pad_token": None}))
    with pytest.raises(ValueError, match=r"has no pad token; set tokenizer\.pad_token"):
        build_reward_trainer(*reward_recipe(tmp_path, no_pad, pairs_dir, eval_dataset_split=None))


def build_preferences_module():
    spec = importlib.util.spec_from_file_location("build_preferences", REPO_ROOT / "data" / "build_preferences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preference_set_is_regenerated_byte_for_byte_and_its_chosen_answers_are_right(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["build_preferences.py", "--output", str(tmp_path)])
    builder = build_preferences_module()
    builder.main()
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (PREFERENCES / f"{split}.jsonl").read_bytes(), split

    train, test = read_rows("train"), read_rows("test")
    assert (len(train), len(test)) == (2000, 300)
    assert not {json.dumps(row["prompt"]) for row in train} & {json.dumps(row["prompt"]) for row in test}
    assert {row["language"] for row in test} == {row["language"] for row in train} == set(builder.build_chat.LANGUAGES)
    assert {row["task"] for row in train} == set(builder.build_chat.TEMPLATES)
    chat = builder.build_chat
    for row in train + test:
        question, chosen, rejected = (
            row["prompt"][-1]["content"],
            row["chosen"][0]["content"],
            row["rejected"][0]["content"],
        )
        assert (
            row["prompt"][-1]["role"] == "user"
            and row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        )
        assert chosen != rejected
        yes, no = chat.YES_NO[row["language"]]
        if row["task"] == "add":
            a, b = (int(number) for number in question.rstrip(".?").split()[-3::2])
            assert chosen == f"{a} + {b} = {a + b}." and rejected.startswith(f"{a} + {b} = ")
        elif row["task"] == "uppercase":
            assert chosen == question.rsplit(" ", 1)[-1].upper() and rejected != chosen
        elif row["task"] in ("is_animal", "greater"):
            assert {chosen, rejected} == {yes, no}


def test_the_tiny_recipe_is_the_embedded_default():
    written = yaml.safe_load((REPO_ROOT / "recipes" / "configs" / "tiny" / "reward.yaml").read_text())
    assert REWARD_RECIPE.configs(written) == REWARD_RECIPE.configs()
    assert set(REWARD_RECIPE.config_defaults) <= set(written)
    assert all(field.metadata.get("help") for field in dataclasses.fields(RewardArguments))


@pytest.mark.parametrize(("size", "model"), [("8b", "outputs/apertus-8b-sft"), ("70b", "outputs/apertus-70b-sft")])
def test_the_cluster_recipes_train_all_weights_in_bf16_under_zero3(size, model):
    # bf16 needs a GPU, or use_cpu to be valid on this machine.
    recipe, args = REWARD_RECIPE.parse(
        ["--config", str(REPO_ROOT / "recipes/configs" / size / "reward.yaml"), "--use_cpu=true"]
    )
    assert recipe.model_name_or_path == model and not recipe.use_lora
    assert args.bf16 and args.activation_checkpointing and args.num_train_epochs == 1.0
    assert args.max_length == 4096 and args.center_rewards_coefficient == 0.01


@pytest.mark.slow
def test_recipe_under_deepspeed_zero3_on_two_processes_reports_the_accuracy_of_its_saved_folder(
    base_dir, pairs_dir, tmp_path
):
    """ZeRO-3 shards the weights over two processes; the held-out accuracy they measure together counts every pair
    once (38 pairs, not a multiple of the 2 x 8 of an evaluation step) and is the one the saved folder gives."""
    pytest.importorskip("deepspeed")
    accelerate_config = tmp_path / "zero3.yaml"
    accelerate_config.write_text(ZERO3_CPU_CONFIG)
    output_dir = tmp_path / "run"
    arguments = [
        "--model_name_or_path", str(base_dir), "--dataset", str(pairs_dir), "--output_dir", str(output_dir),
        "--max_steps", "8", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-2", "--warmup_steps", "0", "--eval_strategy", "no", "--eval_on_start", "false",
        "--save_steps", "1000", "--disable_tqdm", "true",
    ]  # fmt: skip
    completed = launch_recipe("reward.py", arguments, launcher=("--config_file", str(accelerate_config)))
    assert "Done: 8 steps, held-out pairwise accuracy" in completed.stdout
    report = json.loads((output_dir / EVAL_FILE_NAME).read_text())
    assert report["pairs"] == 38
    saved, original = load_file(output_dir / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert saved["score.weight"].shape == (1, tiny_config().hidden_size)
    assert not torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"]
    )
    rows = [row for row in read_rows("test") if row["task"] == LEARNABLE_TASK]
    scorer = RewardModelScorer(str(output_dir))
    chosen = scorer([row["prompt"] for row in rows], [row["chosen"] for row in rows])
    rejected = scorer([row["prompt"] for row in rows], [row["rejected"] for row in rows])
    assert report["correct"] == sum(c > r for c, r in zip(chosen, rejected, strict=True))
