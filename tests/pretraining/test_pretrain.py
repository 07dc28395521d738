"""The pretraining loop end to end on tiny runs: learning, export, resume, interruption, corrupt checkpoints."""

import dataclasses
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
from apertus_hf.training_facts import portable_path
from tests.pretraining.conftest import SHIPPED_TOKENIZER, run_recipe, tiny_run, write_recipe


def _losses(output_dir: Path) -> dict[int, float]:
    return {record["step"]: record["train/loss"] for record in read_metrics(output_dir / "metrics.jsonl")}


# The fields of a metrics.jsonl record that measure the machine's speed, not the training (tokens/s and the MFU
# computed from it): they differ between two runs of the same training, so comparisons of runs leave them out.
TIMING_FIELDS = ("train/tokens_per_second", "train/mfu")


def _without_timing(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMING_FIELDS} for record in records]


def _mark_records(metrics: Path, mark: str) -> None:
    """Add `mark: true` to every record of `metrics`. A resumed run keeps the records up to the step it resumed from
    and writes the later ones anew, so the marked records left afterwards tell that step."""
    records = read_metrics(metrics)
    metrics.write_text("".join(json.dumps({**record, mark: True}) + "\n" for record in records))


def _marked_steps(records: list[dict], mark: str) -> list[int]:
    """The steps of the records that carry `mark`, which is removed from every record."""
    return [record["step"] for record in records if record.pop(mark, False)]


@pytest.fixture
def few_documents(tmp_path, small_corpus) -> Path:
    """10 short documents of 6 languages: with eval_documents=4, the 6 left make an epoch of 4 steps of 4 rows of 64
    tokens, so a run of a few dozen steps crosses many epoch boundaries."""
    lines = small_corpus.read_text().splitlines()[::7][:10]
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"text": json.loads(line)["text"][:600]}) + "\n" for line in lines))
    return path


def _unigram_entropy(corpus: Path) -> float:
    """Entropy (nats/token) of the token distribution of `corpus` with <s>/</s> per document."""
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    counts = Counter()
    for line in corpus.read_text().splitlines():
        ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        counts.update([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id])
    total = sum(counts.values())
    return -sum(count / total * math.log(count / total) for count in counts.values())


@pytest.mark.slow
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
    # The recipe travels with the model and reproduces the run's options, its paths without this machine's folders.
    saved = parse_recipe_args(PretrainConfig, ["--config", str(model_dir / "pretrain_config.yaml")])
    portable = {
        "output_dir": portable_path(config.output_dir),
        "tokenizer": portable_path(config.tokenizer),
        "data": [{"path": portable_path(source["path"])} for source in config.data],
    }
    assert saved == dataclasses.replace(config, **portable)
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
    """4 rows in one micro-batch or 2 x 2 accumulated: the same mean over all kept targets, the same gradient (norm as
    logged, before clipping) and so the same update."""
    # AdEMAMix's update does not change when the gradient is scaled, and clipping at 0.1 would scale both runs' updates
    # to the same norm: the losses alone cannot show a wrongly scaled gradient, its logged norm does. Clipping far
    # above that norm keeps the update the raw gradient's.
    max_grad_norm = 1e3
    common = {
        "max_steps": 3,
        "eval_documents": 0,
        "checkpoint_steps": 0,
        "goldfish": True,
        "max_grad_norm": max_grad_norm,
    }
    one_batch = pretrain(PretrainConfig(**tiny_run(tmp_path / "one", small_corpus, per_device_batch_size=4, **common)))
    AcceleratorState._reset_state(True)
    accumulated = pretrain(
        PretrainConfig(
            **tiny_run(
                tmp_path / "accumulated", small_corpus, per_device_batch_size=2, gradient_accumulation_steps=2, **common
            )
        )
    )
    records_one = read_metrics(one_batch.output_dir / "metrics.jsonl")
    records_accumulated = read_metrics(accumulated.output_dir / "metrics.jsonl")
    assert [record["step"] for record in records_accumulated] == [record["step"] for record in records_one] == [1, 2, 3]
    for one, accumulated_record in zip(records_one, records_accumulated, strict=True):
        step = one["step"]
        assert accumulated_record["train/loss"] == pytest.approx(one["train/loss"], rel=1e-5), step
        assert 0 < one["train/grad_norm"] < max_grad_norm, step
        assert accumulated_record["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-5), step


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


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_with_exactly_the_records_of_an_uninterrupted_run(
    tmp_path, few_documents
):
    """Killed after its second checkpoint, which lies past the first epoch, and resumed: every record of metrics.jsonl
    (loss, learning rate, tokens, epoch, gradient norm, held-out loss; not the timing) is that of a run never killed,
    bit for bit, across the epoch boundaries after the resume; and the resume took the newest checkpoint."""
    options = {"max_steps": 40, "checkpoint_steps": 5, "eval_steps": 20, "warmup_steps": 4}
    uninterrupted = tmp_path / "uninterrupted"
    completed = run_recipe(
        ["--config", str(write_recipe(tmp_path / "a.yaml", tiny_run(uninterrupted, few_documents, **options)))]
    )
    assert completed.wait(timeout=300) == 0, completed.stdout.read()[-3000:]
    expected = _without_timing(read_metrics(uninterrupted / "metrics.jsonl"))
    epochs = [record["train/epoch"] for record in expected]
    # An epoch is a few steps (few_documents): the checkpoints of steps 5 and 10 lie past the first epoch boundary, and
    # the run crosses four more after step 10, so a resume that lost the epoch or the token count shows in the records.
    assert epochs[4] >= 1 and epochs[-1] >= epochs[9] + 4, epochs

    killed = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "b.yaml", tiny_run(killed, few_documents, **options))
    process = run_recipe(["--config", str(recipe)])
    # Past step 11 the checkpoints of steps 5 and 10 are complete; keep_checkpoints=2 keeps two from then on.
    _wait_for_step(process, killed / "metrics.jsonl", 12)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    last_logged = max(_losses(killed))
    assert last_logged < 40, "the run finished before it was killed; the test needs a slower run"
    # The kill may land during the save that follows the last logged step; then the one before is the newest.
    steps_saved = [int(folder.name.removeprefix("step_")) for folder in complete_checkpoints(killed / "checkpoints")]
    newest_step = steps_saved[0]
    assert newest_step in {last_logged // 5 * 5, last_logged // 5 * 5 - 5} and newest_step >= 10
    # Two or more (a kill inside the pruning that follows a save may leave a third): the resume must take the newest.
    assert steps_saved[:2] == [newest_step, newest_step - 5]
    _mark_records(killed / "metrics.jsonl", "before_kill")

    resumed = run_recipe(["--config", str(recipe)])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    actual = read_metrics(killed / "metrics.jsonl")
    # The resume kept the killed run's records up to the newest checkpoint and wrote every later one anew.
    assert _marked_steps(actual, "before_kill") == list(range(1, newest_step + 1))
    assert f"step_{newest_step:08d} at step {newest_step}" in (killed / "train.log").read_text()
    actual = _without_timing(actual)
    assert [record["step"] for record in actual] == list(range(1, 41))
    assert [record["step"] for record in actual if "eval/loss" in record] == [20, 40]
    for expected_record, actual_record in zip(expected, actual, strict=True):
        assert actual_record == expected_record  # bit for bit, every field of every step before and after the kill


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
    # step 8: a save that died before its manifest, under the final name (its files are those of step 6, which load);
    # step 6: a truncated file that loading would not notice (accelerate's load_state skips random states it cannot
    # read), so only the sizes in the manifest keep the run from resuming there; step 4: same size, garbage bytes
    # (bit rot), which fail to load; and a leftover temporary folder.
    shutil.copytree(checkpoints / "step_00000006", checkpoints / "step_00000008")
    (checkpoints / "step_00000008" / "checkpoint_manifest.json").unlink()
    random_states = checkpoints / "step_00000006" / "random_states_0.pkl"
    random_states.write_bytes(random_states.read_bytes()[:100])
    optimizer_state = checkpoints / "step_00000004" / "optimizer.bin"
    optimizer_state.write_bytes(b"\0" * optimizer_state.stat().st_size)
    shutil.copytree(checkpoints / "step_00000002", checkpoints / ".step_00000010.incomplete")
    metrics = tmp_path / "run" / "metrics.jsonl"
    _mark_records(metrics, "before_resume")

    AcceleratorState._reset_state(True)
    with caplog.at_level("WARNING"):
        result = pretrain(PretrainConfig(**{**options, "max_steps": 8}))
    assert result.steps == 8
    # Resumed from step 2, the one complete checkpoint that loads: the records up to it are the first run's, steps 3
    # to 8 were trained again.
    records = read_metrics(metrics)
    assert _marked_steps(records, "before_resume") == [1, 2]
    assert [record["step"] for record in records] == list(range(1, 9))
    messages = caplog.text
    assert "step_00000008: no manifest" in messages
    assert "step_00000006: random_states_0.pkl has 100 bytes" in messages
    assert "step_00000004 could not be loaded" in messages
    assert "step_00000002 at step 2" in (tmp_path / "run" / "train.log").read_text()


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
    with pytest.raises(ValueError, match="rounds to no cooldown step"):
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
