"""The long-context chain: the released 8B/70B plans, the chain's checks, init_from's RoPE overrides, and the tiny
chain end to end (extension, fresh optimizer per stage, skip and resume)."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from apertus_hf import ApertusConfig
from apertus_hf.evaluation.perplexity import Document, compute_perplexity
from apertus_hf.pretraining import PretrainConfig, pretrain, read_metrics
from apertus_hf.pretraining.build import _override_init_config
from apertus_hf.pretraining.long_context import (
    LongContextConfig,
    format_plan,
    plan_long_context,
    run_long_context,
)
from apertus_hf.pretraining.memory import GIB
from apertus_hf.recipe_args import read_recipe_args, recipe_config_from_dict
from tests.pretraining.conftest import REPO_ROOT, SHIPPED_TOKENIZER, TINY_MODEL

CONFIGS = REPO_ROOT / "recipes" / "configs"

# The released chains (swiss-ai/pretrain-code long_context/training_scripts/): steps per stage, the global batch in
# tokens, and the learning rate and warmup of every stage.
RELEASED = {
    "8b": {"steps": [9350, 6930, 7000, 3480], "batch_tokens": 8_388_608, "lr": 1.1e-5, "warmup": 150, "gpus": 128},
    "70b": {"steps": [4800, 3600, 3580, 1742], "batch_tokens": 16_777_216, "lr": 1e-6, "warmup": 75, "gpus": 256},
}
RELEASED_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 12_000_000.0,
}


def load_chain(path: Path, **changes) -> LongContextConfig:
    """The chain of the recipe file at `path`, read as recipes/long_context.py reads it, with top-level `changes`."""
    values, sources = read_recipe_args(["--config", str(path)], "")
    return recipe_config_from_dict(LongContextConfig, {**values, **changes}, sources)


def tiny_chain_options(**changes) -> dict:
    """A chain of two small stages on the shipped corpus (a fresh tiny model), as a recipe mapping."""
    stage = {"global_batch_rows": 2, "per_device_batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 1}
    return {
        "output_dir": "unused",
        "base": {
            "tokenizer": str(SHIPPED_TOKENIZER),
            "data": [{"path": str(REPO_ROOT / "data" / "corpus")}],
            "model_overrides": dict(TINY_MODEL),
            "decay_fraction": 0.0,
        },
        "stages": [
            {"name": "a", "seq_len": 64, "rope_theta": 1e6, "max_steps": 4, **stage},
            {"name": "b", "seq_len": 128, "rope_theta": 2e6, "max_steps": 4, **stage},
        ],
        **changes,
    }


@pytest.mark.parametrize("size", sorted(RELEASED))
def test_released_chain_plans_the_reference_stages(size):
    released = RELEASED[size]
    config = load_chain(CONFIGS / size / "long_context.yaml")
    plans = plan_long_context(config)

    assert [plan.stage.name for plan in plans] == ["8k", "16k", "32k", "64k"]
    assert [plan.config.seq_len for plan in plans] == [8192, 16384, 32768, 65536]
    assert [plan.config.max_steps for plan in plans] == released["steps"]
    assert [plan.stage.tokens_per_step for plan in plans] == [released["batch_tokens"]] * 4
    assert [plan.stage.tokens for plan in plans] == [steps * released["batch_tokens"] for steps in released["steps"]]
    assert [plan.config.model_overrides["rope_parameters"]["rope_theta"] for plan in plans] == [1e6, 2e6, 4e6, 12e6]
    assert {(plan.config.learning_rate, plan.config.warmup_steps, plan.config.decay_fraction) for plan in plans} == {
        (released["lr"], released["warmup"], 0.0)
    }
    # One row per GPU and micro-batch on the GPUs of the 64k stage, accumulating the shorter stages' extra rows.
    assert [plan.num_processes for plan in plans] == [released["gpus"]] * 4
    assert [
        (plan.config.per_device_batch_size, plan.config.run_plan(plan.num_processes).micro_batches_at(0))
        for plan in plans
    ] == [
        (1, 8),
        (1, 4),
        (1, 2),
        (1, 1),
    ]
    # Each stage starts from the model the previous one exported.
    assert plans[0].config.init_from == config.init_from
    for previous, plan in itertools.pairwise(plans):
        assert plan.config.init_from == str(Path(config.output_dir) / previous.stage.name / "model")
    final = plans[-1].config.model_overrides
    assert final["max_position_embeddings"] == 65536
    assert final["rope_parameters"] == RELEASED_ROPE
    for plan in plans:
        assert plan.config.gradient_checkpointing and plan.config.chunked_loss and plan.config.goldfish
        assert plan.config.optimizer == "ademamix" and plan.config.ademamix_warmup_steps == 100_000
    # The 64k stage runs without the document flags, as the reference's 64k script; the shorter ones with them.
    assert [(plan.config.document_masking, plan.config.reset_position_ids) for plan in plans] == [
        (True, True),
        (True, True),
        (True, True),
        (False, False),
    ]


@pytest.mark.parametrize("size", sorted(RELEASED))
def test_released_chain_recipe_states_the_computed_memory(size):
    """The recipe's comment quotes the per-GPU memory that apertus_hf.pretraining.memory computes for each stage."""
    text = (CONFIGS / size / "long_context.yaml").read_text()
    plans = plan_long_context(load_chain(CONFIGS / size / "long_context.yaml"))
    for plan in plans[:-1]:
        assert f"{plan.stage.name}: {plan.memory.total / GIB:.1f} GiB" in text
    assert f"the 64k stage needs {plans[-1].memory.total / GIB:.1f} GiB per GPU" in text
    assert f"{plans[-1].memory.checkpointed_inputs / GIB:.1f} GiB" in text


def test_dry_run_prints_the_plan_without_building_anything():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "recipes" / "long_context.py"),
            "--config",
            str(CONFIGS / "8b" / "long_context.yaml"),
            "--dry-run",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Long-context chain: 4 stage(s) from outputs/apertus-8b/model")
    row_64k = next(line for line in lines if line.startswith("64k "))
    assert row_64k.split() == [
        "64k",
        "65,536",
        "12,000,000",
        "3,480",
        "128",
        "x",
        "65,536",
        "=",
        "8,388,608",
        "29.19B",
        "1.1e-05",
        "150",
        "1",
        "x",
        "1",
        "x",
        "128",
        "35.8",
        "GiB",
    ]
    assert "Total: 26,760 steps, 224.48B tokens." in lines
    assert any("max_position_embeddings 65,536" in line and "'rope_theta': 12000000.0" in line for line in lines)
    assert not (REPO_ROOT / "outputs" / "apertus-8b-long-context").exists()


def test_tiny_chain_recipe_plans_its_stages():
    config = load_chain(CONFIGS / "tiny" / "long_context.yaml")
    plans = plan_long_context(config)
    assert [(plan.config.seq_len, plan.stage.rope_theta) for plan in plans] == [(128, 1e6), (256, 2e6), (512, 4e6)]
    assert {plan.stage.tokens_per_step for plan in plans} == {2048}
    assert {plan.config.run_plan(plan.num_processes).micro_batches_at(0) for plan in plans} == {1}
    assert "Total: 72 steps, 147,456 tokens." in format_plan(config, plans)


def test_stage_configs_follow_the_processes_of_the_launch():
    config = load_chain(CONFIGS / "8b" / "long_context.yaml")
    assert [stage.run_plan(64).micro_batches_at(0) for stage in config.stage_configs(64)] == [16, 8, 4, 2]
    with pytest.raises(ValueError, match=r"Stage 64k: global_batch_rows=128 is not a multiple of .* x 256 process"):
        config.stage_configs(256)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"base": {"seq_len": 4096}}, r"base sets \['seq_len'\], which the chain sets for each stage"),
        ({"base": {"init_from": "x"}}, r"base sets \['init_from'\]"),
        ({"stages": []}, "stages is empty"),
        ({"rope_parameters": {"rope_theta": 1.0}}, "rope_parameters must not set rope_theta"),
    ],
)
def test_chain_refuses_options_it_owns(change, message):
    with pytest.raises(ValueError, match=message):
        recipe_config_from_dict(LongContextConfig, tiny_chain_options(**change))


def test_chain_checks_each_stage():
    options = tiny_chain_options()
    options["stages"][1]["name"] = "a"
    with pytest.raises(ValueError, match="Stage name 'a' is used twice"):
        recipe_config_from_dict(LongContextConfig, options)
    options = tiny_chain_options()
    options["stages"][0]["overrides"] = {"max_steps": 3}
    with pytest.raises(ValueError, match=r"stage a's overrides sets \['max_steps'\]"):
        recipe_config_from_dict(LongContextConfig, options)
    options = tiny_chain_options()
    options["stages"][0]["seq_lenn"] = 64
    with pytest.raises(ValueError, match=r"Unknown option 'seq_lenn' in stages\[0\]\. Did you mean 'seq_len'"):
        recipe_config_from_dict(LongContextConfig, options)


def test_fresh_first_stage_gets_the_preset_rope_with_the_stage_theta():
    config = recipe_config_from_dict(LongContextConfig, tiny_chain_options())
    first, second = config.stage_configs(1)
    small_rope = ApertusConfig.from_preset("small").rope_parameters
    assert first.init_from is None
    assert first.model_overrides == {
        **TINY_MODEL,
        "rope_parameters": {**small_rope, "rope_theta": 1e6},
        "max_position_embeddings": 64,
    }
    assert second.init_from == str(Path("unused") / "a" / "model")
    assert second.model_overrides["rope_parameters"] == {**small_rope, "rope_theta": 2e6}


def test_init_from_overrides_set_rope_and_positions_only():
    loaded = ApertusConfig.from_preset("small")
    _override_init_config(
        loaded,
        {"rope_parameters": {"rope_theta": 2e6}, "max_position_embeddings": 32768, "hidden_size": 256},
        "model-dir",
    )
    assert loaded.rope_parameters == {**ApertusConfig.from_preset("small").rope_parameters, "rope_theta": 2e6}
    assert loaded.max_position_embeddings == 32768
    with pytest.raises(ValueError, match=r"model_overrides sets hidden_size=512, but the model of init_from=model-dir"):
        _override_init_config(loaded, {"hidden_size": 512}, "model-dir")
    with pytest.raises(ValueError, match="model_overrides sets no_such_field=1"):
        _override_init_config(loaded, {"no_such_field": 1}, "model-dir")
    with pytest.raises(ValueError, match=r"model_overrides .* on the model of init_from=model-dir: .*bogus"):
        _override_init_config(loaded, {"rope_parameters": {"rope_type": "bogus"}}, "model-dir")


# The tiny chain end to end: a tiny model pretrained at 64 tokens, extended by recipes/configs/tiny/long_context.yaml
# to 128 -> 256 -> 512. Documents 20 and 21 of four languages are held out (all longer than 512 tokens).
HELD_OUT = range(20, 22)
TRAIN_DOCUMENTS = 20
LANGUAGES = ("en", "es", "fr", "it")


def _split_corpus(folder: Path) -> tuple[Path, list[str]]:
    train, held_out = [], []
    for language in LANGUAGES:
        lines = (REPO_ROOT / "data" / "corpus" / f"{language}.jsonl").read_text().splitlines()
        texts = [json.loads(line)["text"] for line in lines]
        train += texts[:TRAIN_DOCUMENTS]
        held_out += [texts[index] for index in HELD_OUT]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in train))
    return path, held_out


def _loss_at(model_dir: Path, documents: list[str], length: int) -> float:
    """Mean NLL per token of `documents` in windows of `length` tokens (apertus_hf.evaluation.perplexity)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    totals, _ = compute_perplexity(model, tokenizer, [Document(text, "held-out") for text in documents], length, length)
    return totals.nll / totals.tokens


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory):
    """The start model, then the tiny chain launched three times: interrupted at step 12 of its last stage, relaunched
    (finishing it), relaunched again (nothing left to do)."""
    folder = tmp_path_factory.mktemp("long_context")
    train, held_out = _split_corpus(folder)
    AcceleratorState._reset_state(True)
    start = pretrain(
        PretrainConfig(
            output_dir=str(folder / "start"),
            tokenizer=str(SHIPPED_TOKENIZER),
            data=[{"path": str(train)}],
            eval_documents=0,
            model_overrides=dict(TINY_MODEL),
            seq_len=64,
            per_device_batch_size=16,
            max_steps=30,
            warmup_steps=3,
            learning_rate=1e-2,
            logging_steps=10,
            eval_steps=0,
            checkpoint_steps=0,
            progress_bar=False,
        )
    )
    AcceleratorState._reset_state(True)
    values = yaml.safe_load((CONFIGS / "tiny" / "long_context.yaml").read_text())
    values["output_dir"] = str(folder / "chain")
    values["init_from"] = str(start.model_dir)
    values["base"].update(data=[{"path": str(train)}], eval_documents=4, progress_bar=False)
    interrupted_values = json.loads(json.dumps(values))
    interrupted_values["stages"][-1]["overrides"] = {"stop_at_step": 12}
    launches = [
        run_long_context(recipe_config_from_dict(LongContextConfig, launch_values))
        for launch_values in (interrupted_values, values, values)
    ]
    AcceleratorState._reset_state(True)
    return {"start": start.model_dir, "held_out": held_out, "launches": launches, "chain": folder / "chain"}


@pytest.mark.slow
def test_tiny_chain_lowers_the_loss_at_the_longest_length(tiny_chain):
    final = tiny_chain["launches"][1].model_dir
    before = _loss_at(tiny_chain["start"], tiny_chain["held_out"], 512)
    after = _loss_at(final, tiny_chain["held_out"], 512)
    print(f"held-out loss at 512 tokens: {before:.4f} before the extension, {after:.4f} after")
    assert after < before - 0.05


@pytest.mark.slow
def test_tiny_chain_exports_the_last_stage_length_and_rope(tiny_chain):
    start = AutoConfig.from_pretrained(tiny_chain["start"])
    final = AutoConfig.from_pretrained(tiny_chain["launches"][1].model_dir)
    assert final.max_position_embeddings == 512
    assert final.rope_parameters == {**start.rope_parameters, "rope_theta": 4e6}
    for name, theta in (("128", 1e6), ("256", 2e6)):
        stage = AutoConfig.from_pretrained(tiny_chain["chain"] / name / "model")
        assert (stage.max_position_embeddings, stage.rope_parameters) == (
            int(name),
            {**start.rope_parameters, "rope_theta": theta},
        )


@pytest.mark.slow
def test_tiny_chain_starts_each_stage_with_a_fresh_optimizer(tiny_chain):
    """Every stage's last checkpoint holds an optimizer that has taken that stage's 24 steps, not the chain's 48 or 72:
    AdEMAMix's step count (and with it its alpha and beta3 warmups) restarts at each stage."""
    for name in ("128", "256", "512"):
        checkpoint = tiny_chain["chain"] / name / "checkpoints" / "step_00000024"
        state = torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"]
        assert state and {parameter_state["step"] for parameter_state in state.values()} == {24}


@pytest.mark.slow
def test_tiny_chain_resumes_the_interrupted_stage_and_skips_finished_ones(tiny_chain):
    interrupted, resumed, again = tiny_chain["launches"]
    assert interrupted.interrupted and interrupted.model_dir is None
    assert [(stage.name, stage.skipped, stage.steps) for stage in interrupted.stages] == [
        ("128", False, 24),
        ("256", False, 24),
        ("512", False, 12),
    ]
    assert [(stage.name, stage.skipped) for stage in resumed.stages] == [("128", True), ("256", True), ("512", False)]
    last = tiny_chain["chain"] / "512"
    assert "Resumed from" in (last / "train.log").read_text()
    assert [record["step"] for record in read_metrics(last / "metrics.jsonl") if "train/loss" in record] == list(
        range(1, 25)
    )
    assert not again.interrupted and all(stage.skipped for stage in again.stages)
    assert again.model_dir == resumed.model_dir == last / "model"
    assert [stage.tokens_seen for stage in again.stages] == [24 * 2048] * 3


@pytest.mark.slow
def test_chain_on_two_processes_runs_every_stage(tmp_path, monkeypatch):
    """DDP on two CPU processes (the shipped ddp.yaml): the chain goes through both stages, in one launch when a stage's
    run leaves the process group up, else one launch per stage (relaunching continues with the next)."""
    chain_dir = tmp_path / "chain"
    options = tiny_chain_options(output_dir=str(chain_dir))
    options["base"].update(eval_documents=4, progress_bar=False, checkpoint_steps=2)
    for stage in options["stages"]:
        stage["per_device_batch_size"] = 1  # 2 rows per step = 1 row on each of the 2 processes
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(json.dumps(options))
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "accelerate_configs" / "ddp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        str(REPO_ROOT / "recipes" / "long_context.py"),
        "--config",
        str(recipe),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    outputs = []
    for _ in range(2):
        launch = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
        outputs.append(launch.stdout)
        if "Done: the long-context model is" in launch.stdout:
            break
    assert f"Done: the long-context model is {chain_dir / 'b' / 'model'}." in outputs[-1]
    for name in ("a", "b"):
        assert (
            "Pretraining on 2 process(es), distributed type MULTI_CPU" in (chain_dir / name / "train.log").read_text()
        )
    final = AutoConfig.from_pretrained(chain_dir / "b" / "model")
    assert (final.max_position_embeddings, final.rope_parameters["rope_theta"]) == (128, 2e6)
