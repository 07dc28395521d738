"""The pretraining loop end to end on tiny runs: learning, export, resume, interruption, corrupt checkpoints."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import AutoTokenizer

from apertus_hf.pretraining import PretrainConfig, complete_checkpoints, pretrain, read_metrics
from apertus_hf.recipe_args import parse_recipe_args
from tests.pretraining.conftest import SHIPPED_TOKENIZER, run_recipe, tiny_run, write_recipe


def _losses(output_dir: Path) -> dict[int, float]:
    return {record["step"]: record["train/loss"] for record in read_metrics(output_dir / "metrics.jsonl")}


def _unigram_entropy(corpus: Path) -> float:
    """Entropy (nats/token) of the token distribution of `corpus` with <s>/</s> per document."""
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    counts = Counter()
    for line in corpus.read_text().splitlines():
        ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        counts.update([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id])
    total = sum(counts.values())
    return -sum(count / total * math.log(count / total) for count in counts.values())


def test_training_learns_and_exports_a_model_that_stock_transformers_loads(tmp_path, small_corpus):
    config = PretrainConfig(
        **tiny_run(
            tmp_path / "run",
            small_corpus,
            model_overrides={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2},
            max_steps=150,
            per_device_batch_size=8,
            warmup_steps=10,
            learning_rate=1e-2,
            eval_steps=75,
            checkpoint_steps=0,
        )
    )
    result = pretrain(config)

    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert [record["step"] for record in records] == list(range(1, 151))
    assert records[-1]["train/tokens"] == 150 * 8 * 64
    first_loss, last_loss = records[0]["train/loss"], records[-1]["train/loss"]
    # A fresh model predicts uniformly over the 8192 ids.
    assert abs(first_loss - math.log(8192)) < 0.1
    entropy = _unigram_entropy(small_corpus)
    # Seen: 9.01 -> 6.33 (train), 7.42 (held out) against a unigram entropy of 6.66.
    assert last_loss < entropy < first_loss - 2
    assert result.final_eval_loss < first_loss - 1.2
    assert "train/tokens_per_second" in records[3] and "eval/loss" in records[74]
    assert (result.output_dir / "train.log").read_text().count("eval loss") == 2

    model_dir = result.model_dir
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    # The recipe travels with the model and reproduces the run's options.
    saved = parse_recipe_args(PretrainConfig, ["--config", str(model_dir / "pretrain_config.yaml")])
    assert saved == config
    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    assert (generation_config["bos_token_id"], generation_config["eos_token_id"]) == (1, 2)
    # Stock transformers, without apertus_hf imported, loads the folder and generates.
    script = (
        "import sys, torch, transformers\n"
        "assert 'apertus_hf' not in sys.modules\n"
        f"tokenizer = transformers.AutoTokenizer.from_pretrained({str(model_dir)!r})\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(model_dir)!r})\n"
        "assert type(model) is transformers.ApertusForCausalLM, type(model)\n"
        "inputs = tokenizer('The king', return_tensors='pt')\n"
        "out = model.generate(**inputs, max_new_tokens=8, do_sample=False)\n"
        "assert out.shape[1] > inputs['input_ids'].shape[1]\n"
        "print(tokenizer.decode(out[0]))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.startswith("<s>The king")


def test_gradient_accumulation_gives_the_loss_and_update_of_one_large_batch(tmp_path, small_corpus):
    """4 rows in one micro-batch or 2 x 2 accumulated: the same mean over all kept targets, the same update."""
    common = {"max_steps": 3, "eval_documents": 0, "checkpoint_steps": 0, "goldfish": True}
    one_batch = pretrain(PretrainConfig(**tiny_run(tmp_path / "one", small_corpus, per_device_batch_size=4, **common)))
    AcceleratorState._reset_state(True)
    accumulated = pretrain(
        PretrainConfig(
            **tiny_run(
                tmp_path / "accumulated", small_corpus, per_device_batch_size=2, gradient_accumulation_steps=2, **common
            )
        )
    )
    losses_one, losses_accumulated = _losses(one_batch.output_dir), _losses(accumulated.output_dir)
    for step in (1, 2, 3):
        assert losses_accumulated[step] == pytest.approx(losses_one[step], rel=1e-5), step


def test_batch_ramp_changes_the_micro_batches_per_step(tmp_path, small_corpus):
    result = pretrain(
        PretrainConfig(
            **tiny_run(
                tmp_path / "ramp",
                small_corpus,
                max_steps=6,
                warmup_steps=1,
                eval_documents=0,
                checkpoint_steps=0,
                per_device_batch_size=2,
                batch_ramp=[[3, 2], [5, 4]],
            )
        )
    )
    tokens = [record["train/tokens"] for record in read_metrics(result.output_dir / "metrics.jsonl")]
    per_step = [after - before for before, after in zip([0, *tokens], tokens, strict=False)]
    assert per_step == [128, 128, 128, 256, 256, 512]
    assert result.tokens_seen == sum(per_step)


def _wait_for_step(process: subprocess.Popen, metrics: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(record["step"] >= step for record in read_metrics(metrics)):
            return
        assert process.poll() is None, f"the run ended early:\n{process.stdout.read()[-3000:]}"
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached")


def test_a_run_killed_after_a_checkpoint_resumes_with_exactly_the_losses_of_an_uninterrupted_run(
    tmp_path, small_corpus
):
    options = {"max_steps": 40, "checkpoint_steps": 5, "eval_steps": 20, "warmup_steps": 4}
    uninterrupted = tmp_path / "uninterrupted"
    completed = run_recipe(
        ["--config", str(write_recipe(tmp_path / "a.yaml", tiny_run(uninterrupted, small_corpus, **options)))]
    )
    assert completed.wait(timeout=300) == 0, completed.stdout.read()[-3000:]

    killed = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "b.yaml", tiny_run(killed, small_corpus, **options))
    process = run_recipe(["--config", str(recipe)])
    _wait_for_step(process, killed / "metrics.jsonl", 7)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    last_logged = max(_losses(killed))
    assert last_logged < 40, "the run finished before it was killed; the test needs a slower run"
    # The kill may land during the save that follows the last logged step; then the one before is the newest.
    newest_step = int(complete_checkpoints(killed / "checkpoints")[0].name.removeprefix("step_"))
    assert newest_step in {last_logged // 5 * 5, last_logged // 5 * 5 - 5} and newest_step >= 5

    resumed = run_recipe(["--config", str(recipe)])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "Resumed from" in (killed / "train.log").read_text()
    expected, actual = _losses(uninterrupted), _losses(killed)
    assert sorted(actual) == list(range(1, 41))
    assert actual == expected  # bit for bit, every step before and after the kill
    eval_expected = {
        r["step"]: r["eval/loss"] for r in read_metrics(uninterrupted / "metrics.jsonl") if "eval/loss" in r
    }
    eval_actual = {r["step"]: r["eval/loss"] for r in read_metrics(killed / "metrics.jsonl") if "eval/loss" in r}
    assert eval_actual == eval_expected


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tmp_path, small_corpus):
    output_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_run(output_dir, small_corpus, max_steps=200, checkpoint_steps=1000))
    process = run_recipe(["--config", str(recipe)])
    _wait_for_step(process, output_dir / "metrics.jsonl", 3)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    last_step = max(_losses(output_dir))
    assert last_step < 200
    assert f"Stopped at step {last_step}" in output
    assert [folder.name for folder in complete_checkpoints(output_dir / "checkpoints")] == [f"step_{last_step:08d}"]
    assert not (output_dir / "model").exists()


def test_resume_skips_incomplete_and_corrupt_checkpoints(tmp_path, small_corpus, caplog):
    options = tiny_run(
        tmp_path / "run", small_corpus, max_steps=6, checkpoint_steps=2, keep_checkpoints=3, eval_documents=0
    )
    pretrain(PretrainConfig(**options))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [folder.name for folder in complete_checkpoints(checkpoints)] == [
        "step_00000006",
        "step_00000004",
        "step_00000002",
    ]
    # step 6: truncated weights (a disk that filled up); step 4: same size, garbage bytes (bit rot);
    # step 8: a save that died before its manifest, under the final name; and a leftover temporary folder.
    weights = checkpoints / "step_00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    optimizer_state = checkpoints / "step_00000004" / "optimizer.bin"
    optimizer_state.write_bytes(b"\0" * optimizer_state.stat().st_size)
    shutil.copytree(checkpoints / "step_00000002", checkpoints / "step_00000008")
    (checkpoints / "step_00000008" / "checkpoint_manifest.json").unlink()
    shutil.copytree(checkpoints / "step_00000002", checkpoints / ".step_00000010.incomplete")

    AcceleratorState._reset_state(True)
    with caplog.at_level("WARNING"):
        result = pretrain(PretrainConfig(**{**options, "max_steps": 8}))
    messages = caplog.text
    assert "step_00000008: no manifest" in messages
    assert "step_00000006: model.safetensors has 1000 bytes" in messages
    assert "step_00000004 could not be loaded" in messages
    assert "Resumed from" in (tmp_path / "run" / "train.log").read_text()
    assert "step_00000002 at step 2" in (tmp_path / "run" / "train.log").read_text()
    assert result.steps == 8
    assert sorted(_losses(tmp_path / "run")) == list(range(1, 9))


def test_resuming_with_another_number_of_cpu_threads_warns_that_rounding_will_differ(tmp_path, small_corpus, caplog):
    options = tiny_run(tmp_path / "run", small_corpus, max_steps=4, checkpoint_steps=2, eval_documents=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        pretrain(PretrainConfig(**options, stop_at_step=2))
        assert "1 CPU thread(s) per process" in (tmp_path / "run" / "train.log").read_text()
        AcceleratorState._reset_state(True)
        torch.set_num_threads(2)
        with caplog.at_level("WARNING"):
            pretrain(PretrainConfig(**options, stop_at_step=3))
        assert "saved by a process with 1 CPU thread(s) and this one has 2" in caplog.text
        assert "OMP_NUM_THREADS=1" in caplog.text
        # The checkpoint of step 3 records the 2 threads that wrote it: resuming with 2 is silent.
        caplog.clear()
        AcceleratorState._reset_state(True)
        with caplog.at_level("WARNING"):
            result = pretrain(PretrainConfig(**options))
        assert "CPU threads" not in caplog.text
        assert result.steps == 4
    finally:
        torch.set_num_threads(threads)


def test_bad_options_fail_before_training(tmp_path, small_corpus):
    with pytest.raises(ValueError, match="unknown keys \\['colum'\\]"):
        pretrain(
            PretrainConfig(**tiny_run(tmp_path / "a", small_corpus, data=[{"path": str(small_corpus), "colum": "x"}]))
        )
    with pytest.raises(ValueError, match="eval_documents=100 holds out the whole corpus"):
        pretrain(PretrainConfig(**tiny_run(tmp_path / "b", small_corpus, eval_documents=100)))
    with pytest.raises(ValueError, match="exceed max_steps"):
        PretrainConfig(**tiny_run(tmp_path / "c", small_corpus, warmup_steps=12))
    with pytest.raises(ValueError, match="must give at least one cooldown step"):
        PretrainConfig(**tiny_run(tmp_path / "e", small_corpus, max_steps=2, warmup_steps=0))
    with pytest.raises(ValueError, match="batch_ramp"):
        PretrainConfig(**tiny_run(tmp_path / "d", small_corpus, batch_ramp=[[4, 2], [2, 4]]))


def test_a_streamed_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path, small_corpus):
    """Streaming reads the corpus lazily (datasets.IterableDataset); a resume finds its place in the stream again."""
    options = {"streaming": True, "max_steps": 8, "checkpoint_steps": 0, "eval_steps": 4, "warmup_steps": 2}
    uninterrupted = pretrain(PretrainConfig(**tiny_run(tmp_path / "uninterrupted", small_corpus, **options)))
    AcceleratorState._reset_state(True)
    stopped = pretrain(PretrainConfig(**tiny_run(tmp_path / "resumed", small_corpus, stop_at_step=5, **options)))
    assert stopped.interrupted and stopped.steps == 5
    AcceleratorState._reset_state(True)
    resumed = pretrain(PretrainConfig(**tiny_run(tmp_path / "resumed", small_corpus, **options)))
    assert not resumed.interrupted
    assert _losses(resumed.output_dir) == _losses(uninterrupted.output_dir)
    assert resumed.final_eval_loss == uninterrupted.final_eval_loss


def test_metrics_also_go_to_accelerate_trackers(tmp_path, small_corpus):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    options = tiny_run(
        tmp_path / "run", small_corpus, max_steps=4, eval_steps=2, checkpoint_steps=0, report_to=["tensorboard"]
    )
    result = pretrain(PretrainConfig(**options))
    (event_file,) = (result.output_dir / "apertus-pretraining").glob("events.out.tfevents.*")
    events = event_accumulator.EventAccumulator(str(event_file))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("train/loss")}
    assert logged == pytest.approx(_losses(result.output_dir), rel=1e-6)
    assert [event.step for event in events.Scalars("eval/loss")] == [2, 4]
