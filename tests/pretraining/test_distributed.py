"""Two processes through `accelerate launch` on the CPU: DDP, and DeepSpeed ZeRO-3 (gloo; FINDINGS.md)."""

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, AutoTokenizer

from apertus_hf.data import DataSource, PackedBatchCollator, load_documents, tokenize_and_pack
from apertus_hf.pretraining import PretrainConfig, complete_checkpoints, pretrain, read_metrics
from tests.helpers import ZERO3_CPU_CONFIG
from tests.pretraining.conftest import run_recipe, tiny_run, write_recipe

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def _launch(args: list[str], launcher: list[str], env: dict | None = None) -> str:
    process = run_recipe(args, launcher=launcher, **({"env": env} if env else {}))
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-4000:]
    return output


def _losses(output_dir: Path) -> dict[int, float]:
    return {record["step"]: record["train/loss"] for record in read_metrics(output_dir / "metrics.jsonl")}


def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(tmp_path, small_corpus, monkeypatch):
    options = {"max_steps": 6, "eval_documents": 4, "eval_steps": 0, "checkpoint_steps": 3}
    single = pretrain(PretrainConfig(**tiny_run(tmp_path / "single", small_corpus, per_device_batch_size=4, **options)))
    AcceleratorState._reset_state(True)

    ddp_dir = tmp_path / "ddp"
    recipe = write_recipe(tmp_path / "ddp.yaml", tiny_run(ddp_dir, small_corpus, per_device_batch_size=2, **options))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    _launch(
        ["--config", str(recipe)],
        [
            *ACCELERATE,
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
    )
    assert "on 2 process(es), distributed type MULTI_CPU" in (ddp_dir / "train.log").read_text()
    # The seedable sampler deals batches of 2 to the two ranks from the same permutation: the same 4 rows per step.
    ddp_losses, single_losses = _losses(ddp_dir), _losses(single.output_dir)
    assert sorted(ddp_losses) == list(range(1, 7))
    for step, loss in single_losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-5), step
    assert [f.name for f in complete_checkpoints(ddp_dir / "checkpoints")] == ["step_00000006", "step_00000003"]
    assert (ddp_dir / "model" / "model.safetensors").is_file()


def test_deepspeed_zero3_on_two_cpu_processes_trains_resumes_and_exports(tmp_path, small_corpus):
    pytest.importorskip("deepspeed")
    output_dir = tmp_path / "zero3"
    eval_file = tmp_path / "eval.jsonl"
    shutil.copy(small_corpus, eval_file)
    accelerate_config = tmp_path / "zero3.yaml"
    accelerate_config.write_text(ZERO3_CPU_CONFIG)
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
    )
    launcher = [*ACCELERATE, "--config_file", str(accelerate_config)]
    # Stop after 8 steps, then resume the same run from the ZeRO-3 checkpoint up to step 16.
    recipe = write_recipe(tmp_path / "zero3_recipe.yaml", options)
    _launch(["--config", str(recipe), "--stop_at_step", "8"], launcher)
    log = (output_dir / "train.log").read_text()
    assert "on 2 process(es), distributed type DEEPSPEED" in log
    checkpoint = complete_checkpoints(output_dir / "checkpoints")[0]
    # Each rank saved its own shard of the optimizer state.
    shards = sorted(path.name for path in checkpoint.rglob("*optim_states.pt"))
    assert len(shards) == 2, shards

    assert not (output_dir / "model").exists()
    # The chunked loss reads the LM-head weight without calling `lm_head`, so it gathers the ZeRO-3 shards itself and
    # its gradient must reach the partitioned weight: the same run with the full logits gives the same losses.
    plain_dir = tmp_path / "zero3_plain"
    plain_recipe = write_recipe(
        tmp_path / "zero3_plain.yaml", {**options, "output_dir": str(plain_dir), "chunked_loss": False}
    )
    _launch(["--config", str(plain_recipe), "--stop_at_step", "8"], launcher)
    chunked_losses, plain_losses = _losses(output_dir), _losses(plain_dir)
    assert sorted(chunked_losses) == list(range(1, 9))
    for step, loss in plain_losses.items():
        assert chunked_losses[step] == pytest.approx(loss, rel=1e-5), step

    _launch(["--config", str(recipe)], launcher)
    assert "Resumed from" in (output_dir / "train.log").read_text()
    losses = _losses(output_dir)
    assert sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1] - 0.2

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
