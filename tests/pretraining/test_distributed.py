"""Two processes through `accelerate launch` on the CPU with the shipped accelerate configs: DDP, DeepSpeed ZeRO-3 and
ZeRO-3 with offload (gloo; FINDINGS.md); and every shipped config as `accelerate launch` reads it, FSDP2's included,
which cannot run on the CPU."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, AutoTokenizer

from apertus_hf.data import DataSource, PackedBatchCollator, load_documents, tokenize_and_pack
from apertus_hf.pretraining import (
    PretrainConfig,
    complete_checkpoints,
    pretrain,
    pretraining_model_config,
    read_metrics,
)
from apertus_hf.tokenization import load_tokenizer
from apertus_hf.training_facts import TrainingFacts
from tests.pretraining.conftest import REPO_ROOT, SHIPPED_TOKENIZER, TINY_MODEL, run_recipe, tiny_run, write_recipe

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
CONFIGS = REPO_ROOT / "accelerate_configs"
# What a CPU user adds to a shipped multi-GPU config (README): two processes, float32 instead of bf16 autocast.
CPU_OVERRIDES = ["--num_processes", "2", "--mixed_precision", "no"]


def _launch(args: list[str], launcher: list[str], env: dict | None = None) -> str:
    process = run_recipe(args, launcher=launcher, **({"env": env} if env else {}))
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-4000:]
    return output


def assert_same_rows_and_losses(records: list[dict], expected: list[dict], steps: range, rel: float = 1e-5) -> None:
    """`records` read exactly the rows of `expected` at every step of `steps`, with the same loss and gradient norm up
    to the rounding of another number of processes (`rel`)."""
    records = {record["step"]: record for record in records}
    expected = {record["step"]: record for record in expected}
    for step in steps:
        assert records[step]["data/row_ids"] == expected[step]["data/row_ids"], step
        assert records[step]["train/loss"] == pytest.approx(expected[step]["train/loss"], rel=rel), step
        assert records[step]["train/grad_norm"] == pytest.approx(expected[step]["train/grad_norm"], rel=rel), step


@pytest.mark.slow
def test_ddp_equals_one_process_and_resumes_on_another_number_of_processes(tmp_path, small_corpus, monkeypatch):
    """One process and DDP over two read the same rows per step (the global row order) with the same loss; a run
    stopped on 2 processes and resumed on 1, or stopped on 1 and resumed on 2, reads exactly the rows of the
    uninterrupted run, neither repeating nor skipping one, with its losses."""
    # global_batch_size: 4 rows per step whatever the processes (2 micro-batches of 2 rows on one, 1 on each of two).
    options = {
        "max_steps": 6,
        "eval_documents": 4,
        "eval_steps": 0,
        "checkpoint_steps": 3,
        "record_row_ids": True,
        "per_device_batch_size": 2,
        "global_batch_size": 4,
    }
    single = pretrain(PretrainConfig(**tiny_run(tmp_path / "single", small_corpus, **options)))
    AcceleratorState._reset_state(True)
    expected = read_metrics(single.output_dir / "metrics.jsonl")

    # The shipped ddp.yaml as it is (no ACCELERATE_USE_CPU): on a machine without GPUs, runtime.init_cpu_process_group
    # makes it DDP over gloo instead of two processes that each train alone.
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    ddp_launcher = [*ACCELERATE, "--config_file", str(CONFIGS / "ddp.yaml"), *CPU_OVERRIDES]

    # 2 processes for 3 steps, then 1 process to the end.
    two_then_one = tmp_path / "two_then_one"
    recipe = write_recipe(tmp_path / "two_then_one.yaml", tiny_run(two_then_one, small_corpus, **options))
    _launch(["--config", str(recipe), "--stop_at_step", "3"], ddp_launcher)
    assert (
        "on 2 process(es), distributed type MULTI_CPU, mixed precision no" in (two_then_one / "train.log").read_text()
    )
    assert_same_rows_and_losses(read_metrics(two_then_one / "metrics.jsonl"), expected, range(1, 4))
    resumed = pretrain(PretrainConfig(**tiny_run(two_then_one, small_corpus, **options)))
    AcceleratorState._reset_state(True)
    assert_same_rows_and_losses(read_metrics(two_then_one / "metrics.jsonl"), expected, range(1, 7))
    assert "(data stage 0, 12 of its rows consumed)" in (two_then_one / "train.log").read_text()
    assert resumed.steps == 6 and (two_then_one / "model" / "model.safetensors").is_file()

    # 1 process for 3 steps, then 2 processes to the end.
    one_then_two = tmp_path / "one_then_two"
    pretrain(PretrainConfig(**tiny_run(one_then_two, small_corpus, stop_at_step=3, **options)))
    AcceleratorState._reset_state(True)
    recipe = write_recipe(tmp_path / "one_then_two.yaml", tiny_run(one_then_two, small_corpus, **options))
    _launch(["--config", str(recipe)], ddp_launcher)
    assert_same_rows_and_losses(read_metrics(one_then_two / "metrics.jsonl"), expected, range(1, 7))
    assert [f.name for f in complete_checkpoints(one_then_two / "checkpoints")] == ["step_00000006", "step_00000003"]
    # The facts count the tokens of both processes: 6 steps of 4 rows of 64 tokens, as the single process did.
    facts = TrainingFacts.load(one_then_two / "model")
    assert facts.tokens_seen == TrainingFacts.load(single.model_dir).tokens_seen == 6 * 4 * 64
    assert facts.hyperparameters["Batch"] == "2 rows of 64 tokens per device × 1 accumulation × 2 process(es)"


def _deepspeed_config(checkpoint: Path) -> dict:
    """The DeepSpeed config the engine ran with, as DeepSpeed recorded it in `checkpoint`."""
    states = next(checkpoint.rglob("*model_states.pt"))
    return torch.load(states, map_location="cpu", weights_only=False)["ds_config"]


@pytest.mark.slow
def test_deepspeed_zero3_on_two_cpu_processes_trains_resumes_and_exports(tmp_path, small_corpus):
    """The shipped zero3.yaml and zero3_offload.yaml, with the CPU overrides."""
    pytest.importorskip("deepspeed")
    output_dir = tmp_path / "zero3"
    eval_file = tmp_path / "eval.jsonl"
    shutil.copy(small_corpus, eval_file)
    options = tiny_run(
        output_dir,
        small_corpus,
        eval_data=[{"path": str(eval_file)}],
        max_steps=16,
        warmup_steps=2,
        learning_rate=1e-2,
        checkpoint_steps=8,
        eval_steps=0,
        max_eval_batches=4,
        per_device_batch_size=2,
        global_batch_size=4,
        record_row_ids=True,
    )
    launcher = [*ACCELERATE, "--config_file", str(CONFIGS / "zero3.yaml"), *CPU_OVERRIDES]
    # Stop after 8 steps, then resume the same run from the ZeRO-3 checkpoint up to step 16.
    recipe = write_recipe(tmp_path / "zero3_recipe.yaml", options)
    _launch(["--config", str(recipe), "--stop_at_step", "8"], launcher)
    log = (output_dir / "train.log").read_text()
    assert "on 2 process(es), distributed type DEEPSPEED" in log
    checkpoint = complete_checkpoints(output_dir / "checkpoints")[0]
    # Each rank saved its own shard of the optimizer state.
    shards = sorted(path.name for path in checkpoint.rglob("*optim_states.pt"))
    assert len(shards) == 2, shards
    zero3 = _deepspeed_config(checkpoint)
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert not zero3["bf16"]["enabled"]
    # The recipe, not the config file, sets clipping and the batch shape (2 rows x 2 processes).
    assert (zero3["gradient_clipping"], zero3["train_batch_size"]) == (0.1, 4)

    assert not (output_dir / "model").exists()
    # The chunked loss reads the LM-head weight without calling `lm_head`, so it gathers the ZeRO-3 shards itself and
    # its gradient must reach the partitioned weight: the same run with the full logits gives the same losses and
    # gradient norms. That run also takes the shipped zero3_offload.yaml (optimizer state and parameters in CPU
    # memory, DeepSpeed's offload code on its CPU accelerator), which must not change them either.
    plain_dir = tmp_path / "zero3_plain"
    plain_recipe = write_recipe(
        tmp_path / "zero3_plain.yaml", {**options, "output_dir": str(plain_dir), "chunked_loss": False}
    )
    offload_launcher = [*ACCELERATE, "--config_file", str(CONFIGS / "zero3_offload.yaml"), *CPU_OVERRIDES]
    _launch(["--config", str(plain_recipe), "--stop_at_step", "8"], offload_launcher)
    offload = _deepspeed_config(complete_checkpoints(plain_dir / "checkpoints")[0])
    assert offload["zero_optimization"]["stage"] == 3
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert not offload["bf16"]["enabled"]
    assert (offload["gradient_clipping"], offload["train_batch_size"]) == (0.1, 4)
    chunked_records = read_metrics(output_dir / "metrics.jsonl")
    plain_records = read_metrics(plain_dir / "metrics.jsonl")
    assert [record["step"] for record in chunked_records] == [record["step"] for record in plain_records]
    assert [record["step"] for record in chunked_records] == list(range(1, 9))
    for plain, chunked in zip(plain_records, chunked_records, strict=True):
        step = plain["step"]
        assert chunked["train/loss"] == pytest.approx(plain["train/loss"], rel=1e-5), step
        # The norm sums the rounding differences of two ways of computing the loss's gradient: 5e-5 apart at step 7.
        assert chunked["train/grad_norm"] == pytest.approx(plain["train/grad_norm"], rel=1e-3), step

    # A copy of the run resumes on one process: the ZeRO-3 shards of two processes are resharded onto one.
    on_one_dir = tmp_path / "zero3_on_one"
    shutil.copytree(output_dir, on_one_dir)
    on_one_recipe = write_recipe(tmp_path / "zero3_on_one.yaml", {**options, "output_dir": str(on_one_dir)})
    one_process = [*ACCELERATE, "--config_file", str(CONFIGS / "zero3.yaml"), "--num_processes", "1"]
    _launch(["--config", str(on_one_recipe)], [*one_process, "--mixed_precision", "no"])
    assert "saved by 2 processes and is resharded onto 1" in (on_one_dir / "train.log").read_text()

    # The records of the first 8 steps are marked: the resume keeps those up to its checkpoint (step 8).
    metrics = output_dir / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({**record, "before_resume": True}) + "\n" for record in chunked_records))
    _launch(["--config", str(recipe)], launcher)
    records = read_metrics(metrics)
    assert [record["step"] for record in records if record.pop("before_resume", False)] == list(range(1, 9))
    losses = {record["step"]: record["train/loss"] for record in records}
    assert sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1] - 0.2
    # Resumed on one process, the run reads the rows the two-process run read and follows its losses: the moments of
    # AdEMAMix came through the reshard (an optimizer reset would change the first resumed step's update). At this
    # learning rate (1e-2) the rounding of one process against two grows to 1.2e-5 in the gradient norm by step 13.
    assert_same_rows_and_losses(read_metrics(on_one_dir / "metrics.jsonl"), records, range(9, 17), rel=1e-4)

    # The export is consolidated: a plain folder with full-size weights that stock transformers loads, whose loss on
    # the held-out rows is the one the run measured.
    final_eval = read_metrics(output_dir / "metrics.jsonl")[-1]["eval/loss"]
    model = AutoModelForCausalLM.from_pretrained(output_dir / "model").eval()
    assert model.model.embed_tokens.weight.shape == (8192, 32)
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "model")
    rows = tokenize_and_pack(load_documents([DataSource(str(eval_file))]), tokenizer, 64)
    batch = PackedBatchCollator(goldfish_k=None)([rows[i] for i in range(16)])
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss.item()
    assert math.isclose(loss, final_eval, rel_tol=0.02), (loss, final_eval)


# What the README promises of each shipped accelerate config, as accelerate's own loader reads it.
PROMISED_CONFIGS = {
    "cpu.yaml": {"distributed_type": "NO", "use_cpu": True, "num_processes": 1, "mixed_precision": "no"},
    "single_gpu.yaml": {"distributed_type": "NO", "use_cpu": False, "num_processes": 1, "mixed_precision": "bf16"},
    "ddp.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 1, "mixed_precision": "bf16"},
    "zero3.yaml": {"distributed_type": "DEEPSPEED", "mixed_precision": "bf16"},
    "zero3_offload.yaml": {"distributed_type": "DEEPSPEED", "mixed_precision": "bf16"},
    "fsdp2.yaml": {"distributed_type": "FSDP", "mixed_precision": "bf16"},
}


def test_every_shipped_accelerate_config_loads_with_accelerate_and_has_the_promised_engine():
    from accelerate.commands.config.config_args import load_config_from_file

    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == sorted(PROMISED_CONFIGS)
    readme = (REPO_ROOT / "README.md").read_text()
    for name, promised in PROMISED_CONFIGS.items():
        assert f"| `{name}` |" in readme, name
        loaded = load_config_from_file(str(CONFIGS / name)).to_dict()
        assert {key: loaded[key] for key in promised} == promised, name
    zero3 = load_config_from_file(str(CONFIGS / "zero3.yaml")).deepspeed_config
    assert (zero3["zero_stage"], zero3["zero3_init_flag"], zero3["zero3_save_16bit_model"]) == (3, True, True)
    offload_file = load_config_from_file(str(CONFIGS / "zero3_offload.yaml")).deepspeed_config["deepspeed_config_file"]
    offload = json.loads((REPO_ROOT / offload_file).read_text())["zero_optimization"]
    assert (offload["stage"], offload["stage3_gather_16bit_weights_on_model_save"]) == (3, True)


def test_the_fsdp2_config_shards_every_decoder_layer_untested_on_cpu(monkeypatch):
    """accelerate's FSDP does not run on a CPU (FINDINGS.md), so fsdp2.yaml is untested there; this checks what
    `accelerate launch --config_file accelerate_configs/fsdp2.yaml` hands each process, and the plugin accelerate
    builds from it: FSDP2, one shard group per decoder layer of the model the recipe builds, resharded after the
    forward, bf16, and a full state dict on save (so the export is a plain transformers folder)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    arguments = launch_command_parser().parse_args(
        ["--config_file", str(CONFIGS / "fsdp2.yaml"), str(REPO_ROOT / "recipes" / "pretrain.py")]
    )
    arguments, _, _ = _validate_launch_command(arguments)
    environment = prepare_multi_gpu_env(arguments)
    assert environment["ACCELERATE_USE_FSDP"] == "true"
    assert environment["FSDP_VERSION"] == "2"  # FSDP1 would also fail to build its plugin without a GPU
    assert environment["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in environment.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert not plugin.activation_checkpointing and not plugin.cpu_ram_efficient_loading
    assert plugin.transformer_cls_names_to_wrap == ["ApertusDecoderLayer"]

    tokenizer = load_tokenizer(str(SHIPPED_TOKENIZER))
    model = AutoModelForCausalLM.from_config(pretraining_model_config("small", TINY_MODEL, tokenizer, 64))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == [f"model.layers.{index}" for index in range(model.config.num_hidden_layers)]
