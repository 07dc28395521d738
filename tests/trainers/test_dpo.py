"""The DPO baseline on pairs from the QRPO data pipeline: it learns the preference, with and without LoRA."""

import itertools
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, GenerationConfig

from apertus_hf.preference import UNPAIRED_COLUMNS, QRPOPrepareConfig, prepare_qrpo_dataset
from apertus_hf.trainers.dpo import DPO_CITATION, DPO_RECIPE, RECIPE_FILE_NAME, run_dpo
from apertus_hf.trainers.recipe import PostTrainingRecipeError
from apertus_hf.training_facts import TrainingFacts
from tests.trainers.tiny_policy import CHAT_ROWS, save_policy, stopping_policy, write_jsonl

# CHAT_ROWS and 30 sums with a sentence for an answer: long enough that the random policy's samples are rarely all
# equally far from it (answer_similarity), so most prompts give a pair (32 of 36 here), enough pairs for the
# standard error of the per-pair margin. (CHAT_ROWS alone give 4 pairs, too few to tell an effect from noise: there
# the full run measured +0.027 with a standard error of 0.015, 1.9 SE, and LoRA 1.0 SE, one pair in four negative.)
PREFERENCE_ROWS = CHAT_ROWS + [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {a + 3}?"},
            {
                "role": "assistant",
                "content": f"The sum of {a} and {a + 3} is {2 * a + 3}, since adding three and {a} twice gives it.",
            },
        ]
    }
    for a in range(30)
]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return save_policy(tmp_path_factory.mktemp("policy"), stopping_policy(stop_probability=0.1))


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, policy_dir) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    config = QRPOPrepareConfig(
        dataset=str(write_jsonl(folder / "chat.jsonl", PREFERENCE_ROWS)),
        model_name_or_path=str(policy_dir),
        max_new_tokens=12,
        batch_size=128,  # 384 samples in 3 generate calls
        output_dir=str(folder / "pairs"),
    )
    return prepare_qrpo_dataset(config).output_dir


def dpo_recipe(tmp_path: Path, policy_dir: Path, dataset: Path, **overrides):
    """(DPOArguments, DPOConfig) of a short run."""
    values = dict(
        model_name_or_path=str(policy_dir),
        dataset=str(dataset),
        output_dir=str(tmp_path / "dpo"),
        max_steps=6,
        logging_steps=1,
        learning_rate=1e-3,
        warmup_steps=0.0,
        per_device_train_batch_size=64,  # every pair in every step: the margin is measured on the same batch
        save_steps=100,
        use_cpu=True,
        disable_tqdm=True,
    )
    return DPO_RECIPE.configs({**values, **overrides})


def logged_margins(result) -> list[float]:
    return [entry["rewards/margins"] for entry in result.trainer.state.log_history if "rewards/margins" in entry]


def completion_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].log_softmax(-1)
    return logps.gather(-1, ids[0, len(prompt_ids) :, None]).sum().item()


def assert_pairs_learned(result, policy_dir: Path) -> None:
    """The implied-reward margin beta * (chosen log-ratio - rejected log-ratio) of every training pair, the trained
    model against the reference policy, computed here (TRL logs only its batch mean): its mean over the pairs must
    exceed 3 standard errors. No effect (an untrained policy) gives 0 > 0, a failure; a model that learned the
    preference backwards, a negative mean."""
    trained = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    margins = []
    for row in result.trainer.train_dataset:
        log_ratios = [
            completion_logp(trained, row["prompt_ids"], row[column])
            - completion_logp(reference, row["prompt_ids"], row[column])
            for column in ("chosen_ids", "rejected_ids")
        ]
        margins.append(result.trainer.args.beta * (log_ratios[0] - log_ratios[1]))
    mean = statistics.fmean(margins)
    standard_error = statistics.stdev(margins) / len(margins) ** 0.5
    print(f"{len(margins)} pairs: margin {mean:+.4f}, standard error {standard_error:.4f}")
    assert mean > 3 * standard_error, (mean, standard_error, margins)


@pytest.mark.slow
def test_dpo_widens_the_chosen_over_rejected_margin_and_saves_an_instruct_model(tmp_path, policy_dir, pairs_dir):
    result = run_dpo(*dpo_recipe(tmp_path, policy_dir, pairs_dir))
    margins = logged_margins(result)
    # beta * (chosen log-ratio - rejected log-ratio): 0 while the policy is the reference, then growing.
    assert margins[0] == pytest.approx(0.0, abs=1e-6)
    assert all(later > earlier for earlier, later in itertools.pairwise(margins[1:]))
    # Seen: 32 pairs, +0.039, standard error 0.0026, 15 SE.
    assert_pairs_learned(result, policy_dir)

    assert result.model_dir == result.output_dir
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    initial = AutoModelForCausalLM.from_pretrained(policy_dir)
    assert not torch.equal(model.lm_head.weight, initial.lm_head.weight)
    assert GenerationConfig.from_pretrained(result.model_dir).eos_token_id == [2, 68, 72]
    assert (result.output_dir / RECIPE_FILE_NAME).is_file()
    facts = TrainingFacts.load(result.model_dir)
    assert (facts.stage, facts.steps, facts.context_length, facts.citations) == ("dpo", 6, 256, [DPO_CITATION])
    assert "Rafailov" in DPO_CITATION
    assert facts.hyperparameters["DPO"] == "beta 0.1, loss sigmoid; reference: the starting model"


@pytest.mark.slow
def test_dpo_with_lora_trains_an_adapter(tmp_path, policy_dir, pairs_dir):
    result = run_dpo(
        *dpo_recipe(tmp_path, policy_dir, pairs_dir, use_lora=True, lora_r=4, learning_rate=1e-2, merge_lora=True)
    )
    margins = logged_margins(result)
    assert margins[0] == pytest.approx(0.0, abs=1e-6)
    # Seen: 32 pairs, +0.071, standard error 0.0099, 7.1 SE.
    assert_pairs_learned(result, policy_dir)
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert not (result.output_dir / "model.safetensors").exists()
    # The merged model is a plain folder, with the adapter's effect in its weights.
    assert result.model_dir == result.output_dir / "merged"
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir)
    initial = AutoModelForCausalLM.from_pretrained(policy_dir)
    assert not torch.equal(
        merged.model.layers[0].self_attn.q_proj.weight, initial.model.layers[0].self_attn.q_proj.weight
    )


def test_dpo_refuses_unpaired_data_and_says_how_to_get_pairs(tmp_path, policy_dir):
    row = dict(zip(UNPAIRED_COLUMNS, ("Hi", " there", 0.5, [0.1, 0.5, 0.9]), strict=True))
    Dataset.from_list([row] * 4).save_to_disk(str(tmp_path / "unpaired"))
    with pytest.raises(PostTrainingRecipeError, match=r"unpaired QRPO dataset.*--selection pairs"):
        run_dpo(*dpo_recipe(tmp_path, policy_dir, tmp_path / "unpaired"))


def test_tiny_recipe_writes_out_the_defaults():
    path = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "tiny" / "dpo.yaml"
    assert DPO_RECIPE.configs(yaml.safe_load(path.read_text())) == DPO_RECIPE.configs()


def test_beta_must_be_positive(tmp_path, policy_dir):
    with pytest.raises(PostTrainingRecipeError, match=r"beta must be > 0, got 0\.0"):
        run_dpo(*dpo_recipe(tmp_path, policy_dir, tmp_path, beta=0.0))
