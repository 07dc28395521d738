"""Data stages and schedules counted in samples, end to end: a stage switch changes the data and its seed and starts
the stage's data from its first sample; runs stopped before, at and after a switch (or a batch change) resume to
exactly the records of an uninterrupted run."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from apertus_hf.pretraining import PretrainConfig, pretrain, read_metrics
from apertus_hf.pretraining.build import build_run
from apertus_hf.pretraining.step import StageFeed
from tests.pretraining.conftest import REPO_ROOT, tiny_run

TIMING_FIELDS = ("train/tokens_per_second", "train/mfu")
SWITCH_STEP = 6


@pytest.fixture(scope="module")
def second_corpus(tmp_path_factory) -> Path:
    """Documents of the shipped corpus that small_corpus does not hold (lines 12-23 of each language)."""
    records = []
    for path in sorted((REPO_ROOT / "data" / "corpus").glob("*.jsonl")):
        lines = path.read_text().splitlines()[12:24]
        records += [{"text": json.loads(line)["text"][:1500]} for line in lines]
    corpus = tmp_path_factory.mktemp("second") / "second.jsonl"
    corpus.write_text("".join(json.dumps(record) + "\n" for record in records))
    return corpus


def staged_run(output_dir: Path, first: Path, second: Path, **overrides) -> dict:
    options = tiny_run(output_dir, first, max_steps=12, eval_documents=0, checkpoint_steps=0, logging_steps=1)
    del options["data"]
    stages = [
        {"name": "first", "seed": 7, "data": [{"path": str(first)}]},
        {"name": "second", "seed": 11, "start_step": SWITCH_STEP, "data": [{"path": str(second)}]},
    ]
    return {**options, "stages": stages, **overrides}


def fed_batches(options: dict, steps: int) -> list[torch.Tensor]:
    """The input ids of the first `steps` optimizer steps of a run built from `options` (nothing trained)."""
    AcceleratorState._reset_state(True)
    run = build_run(PretrainConfig(**options))
    try:
        feed = StageFeed(run)
        return [torch.cat([batch["input_ids"] for batch in feed.batches_of_step(step)]) for step in range(steps)]
    finally:
        run.close()
        AcceleratorState._reset_state(True)


def without_timing(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMING_FIELDS} for record in records]


def test_a_stage_reads_its_own_data_from_its_first_sample_with_its_seed(tmp_path, small_corpus, second_corpus):
    staged = fed_batches(staged_run(tmp_path / "staged", small_corpus, second_corpus), 10)
    only_first = tiny_run(tmp_path / "first", small_corpus, eval_documents=0, seed=7)
    only_second = tiny_run(tmp_path / "second", second_corpus, eval_documents=0, seed=11)
    first_alone, second_alone = fed_batches(only_first, SWITCH_STEP), fed_batches(only_second, 4)
    for step in range(SWITCH_STEP):
        assert torch.equal(staged[step], first_alone[step])
    # After the switch: the second stage's data from its start, in the order its own seed gives.
    for step in range(4):
        assert torch.equal(staged[SWITCH_STEP + step], second_alone[step])
    other_seed = fed_batches({**only_second, "seed": 12, "output_dir": str(tmp_path / "other")}, 1)
    assert not torch.equal(other_seed[0], second_alone[0])


@pytest.fixture(scope="module")
def uninterrupted_staged(tmp_path_factory, small_corpus, second_corpus) -> list[dict]:
    AcceleratorState._reset_state(True)
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = pretrain(PretrainConfig(**staged_run(folder / "run", small_corpus, second_corpus)))
    AcceleratorState._reset_state(True)
    return read_metrics(result.output_dir / "metrics.jsonl")


@pytest.mark.parametrize("stop_at", [SWITCH_STEP - 1, SWITCH_STEP, SWITCH_STEP + 1])
def test_a_run_stopped_around_a_stage_switch_resumes_exactly(
    tmp_path, small_corpus, second_corpus, uninterrupted_staged, stop_at
):
    options = staged_run(tmp_path / "run", small_corpus, second_corpus)
    stopped = pretrain(PretrainConfig(**options, stop_at_step=stop_at))
    assert stopped.interrupted and stopped.steps == stop_at
    AcceleratorState._reset_state(True)
    resumed = pretrain(PretrainConfig(**options))
    assert resumed.steps == 12
    records = read_metrics(resumed.output_dir / "metrics.jsonl")
    assert without_timing(records) == without_timing(uninterrupted_staged)


def test_a_run_counted_in_samples_resumes_exactly_across_a_batch_change(tmp_path, small_corpus):
    # 4 rows per step, then 8 from sample 24 (step 6); 88 samples: 6 steps of 4 and 8 of 8.
    options = tiny_run(
        tmp_path / "run",
        small_corpus,
        eval_documents=0,
        checkpoint_steps=0,
        logging_steps=1,
        per_device_batch_size=4,
        global_batch_size=4,
        batch_ramp=[[24, 8]],
        train_samples=88,
        warmup_samples=16,
        decay_samples=40,
    )
    config = PretrainConfig(**options)
    assert config.max_steps == 6 + 8
    uninterrupted = pretrain(PretrainConfig(**{**options, "output_dir": str(tmp_path / "uninterrupted")}))
    expected = read_metrics(uninterrupted.output_dir / "metrics.jsonl")
    assert [record["train/tokens"] for record in expected][5:7] == [24 * 64, 32 * 64]
    # Learning rate of each step: WSD at the samples consumed before it (warmup 16 samples, cooldown from 48).
    samples_before = [4 * step if step <= 6 else 24 + 8 * (step - 6) for step in range(14)]
    peak = options["learning_rate"]
    for record, samples in zip(expected, samples_before, strict=True):
        if samples < 16:
            wanted = peak * samples / 16
        elif samples < 48:
            wanted = peak
        else:
            wanted = peak * (0.1 + 0.9 * (1 - ((samples - 48) / 40) ** 0.5))
        assert record["train/lr"] == pytest.approx(wanted, rel=1e-12)
    for stop_at in (5, 6, 7):
        AcceleratorState._reset_state(True)
        folder = tmp_path / f"stopped-{stop_at}"
        stopped = pretrain(PretrainConfig(**{**options, "output_dir": str(folder), "stop_at_step": stop_at}))
        assert stopped.steps == stop_at
        AcceleratorState._reset_state(True)
        pretrain(PretrainConfig(**{**options, "output_dir": str(folder)}))
        assert without_timing(read_metrics(folder / "metrics.jsonl")) == without_timing(expected)


def test_resuming_a_step_counted_run_with_a_sample_counted_recipe_is_refused(tmp_path, small_corpus):
    options = tiny_run(
        tmp_path / "run", small_corpus, eval_documents=0, checkpoint_steps=0, per_device_batch_size=4, max_steps=6
    )
    pretrain(PretrainConfig(**options, stop_at_step=2))
    AcceleratorState._reset_state(True)
    in_samples = {"global_batch_size": 4, "train_samples": 24, "warmup_samples": 4, "decay_samples": 8}
    with pytest.raises(ValueError, match="counted in steps, the recipe's in samples"):
        pretrain(PretrainConfig(**options, **in_samples))
