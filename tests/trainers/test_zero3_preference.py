"""QRPO and DPO under DeepSpeed ZeRO-3 on two CPU processes train exactly as one process does.

Each recipe runs once through `accelerate launch --config_file accelerate_configs/zero3.yaml` on 2 processes (gloo)
with 4 rows per process, and once in this process without DeepSpeed with 8 rows, from the same tiny policy on the
same 16 pairs, with the recipes' defaults: all weights train, QRPO's reference is the initial policy (its log-probs
computed before training through a DeepSpeed inference engine that gathers the shards) and DPO's a second model
(TRL's ZeRO-3 engine). Every logged value of every step and the exported weights must agree to float round-off.

Tolerance: logged values within 1e-4 relative or 1e-4 absolute (float32 log-probs of ~40 nats carry ~2e-5 of
round-off, which the log-ratios inherit in absolute terms), weights within 1e-4 absolute, while training moves them
by more than 1e-2. Measured: weights 2.4e-5 (QRPO) and 1.1e-5 (DPO), as Adam divides each gradient by its running
scale and so magnifies the round-off of small ones; log-probs 1.9e-5 and 3.8e-6; the loss 2e-7 and 1.2e-7; the
gradient norm, summed shard by shard under ZeRO-3, 3.6e-5 relative.
"""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from apertus_hf import ApertusConfig, ApertusForCausalLM
from apertus_hf.trainers.dpo import DPO_RECIPE, run_dpo
from apertus_hf.trainers.qrpo import QRPOTrainer
from apertus_hf.trainers.qrpo_recipe import QRPO_RECIPE, run_qrpo
from apertus_hf.trainers.recipe import chat_tokenizer, load_policy_model, load_post_training_dataset, peft_config
from tests.pretraining.conftest import SHIPPED_TOKENIZER, TINY_MODEL
from tests.trainers.conftest import launch_recipe

ZERO3_ON_TWO_CPU_PROCESSES = (
    "--config_file", "accelerate_configs/zero3.yaml", "--num_processes", "2", "--mixed_precision", "no",
)  # fmt: skip
STEPS = 4
LOGGED_RTOL, LOGGED_ATOL = 1e-4, 1e-4
WEIGHTS_ATOL = 1e-4
# Wall-clock figures, not results of the run.
UNCOMPARED_KEYS = ("runtime", "per_second")


@pytest.fixture(scope="module")
def policy_and_pairs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random policy with the shipped tokenizer, and paired QRPO data (which DPO reads too): 16 training pairs,
    two global batches of 8, and 4 evaluation pairs."""
    folder = tmp_path_factory.mktemp("zero3_preference")
    torch.manual_seed(0)
    config = ApertusConfig.from_preset("small", **TINY_MODEL, vocab_size=8192)
    ApertusForCausalLM(config).save_pretrained(folder / "policy")
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(folder / "policy")
    words = ["eerie", "abc", "tree", "cat", "geese", "dog", "seven", "ox"]
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Write {index % 3 + 1} words with {index % 5 + 1} letters."}],
            "chosen": [{"role": "assistant", "content": f"{words[index % 8]} {words[(index + 3) % 8]}"}],
            "rejected": [{"role": "assistant", "content": words[(index + 1) % 8]}],
            "chosen_reward": 0.6 - 0.01 * index,
            "rejected_reward": 0.05 * (index % 3),
            "ref_rewards": [0.0, 0.1, 0.2, 0.3 + 0.01 * index],
        }
        for index in range(20)
    ]
    DatasetDict({"train": Dataset.from_list(rows[:16]), "test": Dataset.from_list(rows[16:])}).save_to_disk(
        folder / "pairs"
    )
    return folder / "policy", folder / "pairs"


def run_options(output_dir: Path, policy: Path, pairs: Path, processes: int, **extra) -> dict:
    """The options of a short run whose global batch is 8 rows, whatever the number of processes."""
    return {
        "model_name_or_path": str(policy),
        "dataset": str(pairs),
        "output_dir": str(output_dir),
        "max_steps": STEPS,
        "per_device_train_batch_size": 8 // processes,
        "logging_steps": 1,
        "save_steps": STEPS,
        "learning_rate": 1e-2,
        "warmup_steps": 0.0,
        "disable_tqdm": True,
        "resume": False,
        **extra,
    }


def command_line(options: dict) -> list[str]:
    return [
        item
        for key, value in options.items()
        for item in (f"--{key}", str(value).lower() if value in (True, False) else str(value))
    ]


def logged_steps(output_dir: Path) -> list[dict]:
    """The log of the run's steps (training and evaluation) as its last checkpoint holds it."""
    history = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry or "eval_loss" in entry]


def assert_same_run(single: Path, sharded: Path, policy: Path) -> None:
    """The ZeRO-3 run `sharded` logged and saved what the one-process run `single` did, to float round-off."""
    single_log, sharded_log = logged_steps(single), logged_steps(sharded)
    assert [sorted(entry) for entry in sharded_log] == [sorted(entry) for entry in single_log]
    assert len([entry for entry in single_log if "loss" in entry]) == STEPS
    worst: dict[str, float] = {}
    for expected, actual in zip(single_log, sharded_log, strict=True):
        for key, value in expected.items():
            if not key.endswith(UNCOMPARED_KEYS):
                assert actual[key] == pytest.approx(value, rel=LOGGED_RTOL, abs=LOGGED_ATOL), (expected["step"], key)
                worst[key] = max(worst.get(key, 0.0), abs(actual[key] - value))
    # ZeRO-3 really sharded the run: each of the two ranks saved its own part of the optimizer state.
    assert len(list((sharded / f"checkpoint-{STEPS}").rglob("*optim_states.pt"))) == 2

    initial = load_file(policy / "model.safetensors")
    single_model = AutoModelForCausalLM.from_pretrained(single).state_dict()
    sharded_model = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert sharded_model.keys() == single_model.keys()
    difference = max((sharded_model[name] - single_model[name]).abs().max().item() for name in single_model)
    moved = max((single_model[name] - initial[name]).abs().max().item() for name in initial)
    print(f"weights differ by {difference:.2e} (moved {moved:.2e}); logged values by {worst}")
    assert difference < WEIGHTS_ATOL < moved / 100


@pytest.mark.slow
def test_qrpo_under_zero3_on_two_processes_equals_one_process(policy_and_pairs, tmp_path):
    policy, pairs = policy_and_pairs
    # Evaluation at both epochs: the reference pass covers the evaluation pairs too, with the same engine.
    evaluation = {"eval_dataset_split": "test", "eval_strategy": "epoch"}
    sharded = launch_recipe(
        "qrpo.py",
        command_line(run_options(tmp_path / "sharded", policy, pairs, 2, per_device_eval_batch_size=2, **evaluation)),
        launcher=ZERO3_ON_TWO_CPU_PROCESSES,
    )
    assert f"Done: model in {tmp_path / 'sharded'}" in sharded.stdout
    run_qrpo(
        *QRPO_RECIPE.configs(
            run_options(tmp_path / "single", policy, pairs, 1, per_device_eval_batch_size=4, **evaluation)
        )
    )

    # The reference log-probs are the initial policy's, gathered from its shards: the first log-ratio is 0.
    assert logged_steps(tmp_path / "sharded")[0]["log_ratio"] == 0.0
    assert_same_run(tmp_path / "single", tmp_path / "sharded", policy)


@pytest.mark.slow
def test_dpo_under_zero3_on_two_processes_equals_one_process(policy_and_pairs, tmp_path):
    policy, pairs = policy_and_pairs
    sharded = launch_recipe(
        "dpo.py", command_line(run_options(tmp_path / "sharded", policy, pairs, 2)), launcher=ZERO3_ON_TWO_CPU_PROCESSES
    )
    assert f"Done: {STEPS} steps" in sharded.stdout
    run_dpo(*DPO_RECIPE.configs(run_options(tmp_path / "single", policy, pairs, 1)))

    # The reference model is a second ZeRO-3 engine on the initial weights: the first reward margin is 0.
    assert logged_steps(tmp_path / "sharded")[0]["rewards/margins"] == 0.0
    assert_same_run(tmp_path / "single", tmp_path / "sharded", policy)


def test_qrpo_lora_adapters_start_the_same_whatever_the_random_state(policy_and_pairs, tmp_path):
    """The adapters depend on `seed` alone, not on what the process drew before: a run under ZeRO-3 (whose model
    loading draws differently) starts from the adapters of a one-process run, and a rerun from those of the first."""
    policy, pairs = policy_and_pairs
    recipe, args = QRPO_RECIPE.configs(
        run_options(tmp_path, policy, pairs, 1, use_lora=True, lora_r=4, eval_strategy="no")
    )
    adapters = []
    for random_state in (0, 1):
        torch.manual_seed(random_state)
        trainer = QRPOTrainer(
            load_policy_model(recipe),
            args=args,
            train_dataset=load_post_training_dataset(recipe, args.seed)[0],
            processing_class=chat_tokenizer(recipe),
            peft_config=peft_config(recipe),
        )
        adapters.append(
            {name: value.detach().clone() for name, value in trainer.model.named_parameters() if "lora_A" in name}
        )
    assert adapters[0] and adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])
