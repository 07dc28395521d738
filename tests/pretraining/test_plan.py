"""The run plan: schedules counted in samples as Megatron-LM counts them, the batch ramp, and the Apertus-8B/70B
recipes' derived steps, tokens and stage boundaries."""

import math
import subprocess
import sys

import pytest
import torch

from apertus_hf.optim import WSDSchedule
from apertus_hf.pretraining import PretrainConfig
from apertus_hf.pretraining.plan import batch_segments_in_samples, steps_for_samples
from apertus_hf.recipe_args import parse_recipe_args
from tests.pretraining.conftest import REPO_ROOT

TRAIN_SAMPLES = 3_662_109_375
WARMUP_SAMPLES = 4_096_000
DECAY_SAMPLES = 403_905_806


def megatron_lr(consumed_samples: int, max_lr: float, min_lr: float) -> float:
    """Megatron-LM's OptimizerParamScheduler.get_lr in sample mode, WSD style with a "minus_sqrt" decay, written
    from megatron/core/optimizer_param_scheduler.py: linear warmup from 0 while num_steps <= warmup, coefficient 1
    until lr_decay_steps - wsd_decay_steps, then 1 - sqrt(progress), min_lr after lr_decay_steps."""
    if consumed_samples <= WARMUP_SAMPLES:
        return max_lr * consumed_samples / WARMUP_SAMPLES
    if consumed_samples > TRAIN_SAMPLES:
        return min_lr
    anneal_start = TRAIN_SAMPLES - DECAY_SAMPLES
    coefficient = 1.0
    if consumed_samples > anneal_start:
        coefficient = 1.0 - math.sqrt((consumed_samples - anneal_start) / DECAY_SAMPLES)
    return min_lr + coefficient * (max_lr - min_lr)


def load_recipe(size: str) -> PretrainConfig:
    return parse_recipe_args(PretrainConfig, ["--config", str(REPO_ROOT / f"recipes/configs/{size}/pretrain.yaml")])


@pytest.mark.parametrize(
    ("size", "processes", "steps", "doubling_step", "warmup_end", "peak"),
    [("8b", 256, 2_627_139, 1_678_000, 4_000, 1.1e-4), ("70b", 2048, 1_155_828, 523_518, 2_000, 1e-5)],
)
def test_the_apertus_recipes_give_the_released_run(size, processes, steps, doubling_step, warmup_end, peak):
    config = load_recipe(size)
    plan = config.run_plan(processes)
    first_batch, doubled = plan.segments[0].rows_per_step, plan.segments[1].rows_per_step
    # The step counts follow from the sample counts alone: floor of each segment's samples over its batch.
    assert steps == doubling_step + (TRAIN_SAMPLES - doubling_step * first_batch) // doubled
    assert (config.max_steps, plan.max_steps) == (steps, steps)
    assert (plan.segments[1].start_step, doubled) == (doubling_step, 2 * first_batch)
    assert (plan.micro_batches_at(0), plan.micro_batches_at(steps - 1)) == (1, 2)
    tokens = plan.samples_before(steps) * config.seq_len
    assert f"{tokens / 1e12:.3f}" == "15.000"
    assert plan.first_step_at(plan.warmup) == warmup_end
    cooldown = plan.cooldown_start
    assert plan.samples_before(cooldown - 1) < TRAIN_SAMPLES - DECAY_SAMPLES <= plan.samples_before(cooldown)
    # The cooldown: 1.654T tokens from ~13.35T (counted in steps, the 8B recipe would have cooled down for 2.34T).
    assert (plan.samples_before(steps) - plan.samples_before(cooldown)) * config.seq_len == pytest.approx(
        1.654e12, rel=1e-3
    )
    assert plan.samples_before(cooldown) * config.seq_len == pytest.approx(13.35e12, rel=1e-3)
    assert (config.learning_rate, config.min_lr_ratio, config.learning_rate * config.min_lr_ratio) == (
        peak,
        0.1,
        pytest.approx(peak / 10),
    )
    assert (config.seq_len, config.goldfish_k, config.goldfish_h, config.max_grad_norm) == (4096, 50, 50, 0.1)
    assert (config.adam_beta1, config.adam_beta2, config.ademamix_beta3, config.ademamix_alpha) == (
        0.9,
        0.999,
        0.9999,
        8.0,
    )
    assert (config.ademamix_warmup_steps, config.weight_decay, config.decay_shape) == (100_000, 0.1, "1-sqrt")
    assert (config.document_masking, config.reset_position_ids) == (True, True)
    # Pretraining ran at RoPE theta 500k with the release's Llama-3 scaling; the long-context chain raises theta.
    rope = config.model_overrides["rope_parameters"]
    assert (rope["rope_type"], rope["rope_theta"], rope["factor"]) == ("llama3", 500_000, 8)


def test_the_8b_recipe_switches_data_at_the_released_iterations():
    plan = load_recipe("8b").run_plan(256)
    assert [stage.start_step for stage in plan.stages] == [0, 1_678_000, 2_269_525, 2_429_920]
    assert len({stage.seed for stage in plan.stages}) == 4
    # Stage 5, the cooldown data, starts where the learning rate starts to cool down.
    assert plan.stages[-1].start_step == plan.cooldown_start
    assert plan.stage_at(1_677_999) == 0 and plan.stage_at(1_678_000) == 1 and plan.stage_at(2_627_138) == 3


def test_the_70b_recipe_switches_data_at_the_released_token_counts():
    config = load_recipe("70b")
    plan = config.run_plan(2048)
    boundaries = [0, 5e12, 9e12, 12e12, 13.5e12]
    assert len(plan.stages) == 5
    for stage, tokens in zip(plan.stages, boundaries, strict=True):
        start = stage.start_step
        # The first step at or after the boundary token.
        assert plan.samples_before(start) * config.seq_len >= tokens
        assert start == 0 or plan.samples_before(start - 1) * config.seq_len < tokens


@pytest.mark.parametrize("size", ["8b", "70b"])
def test_the_learning_rate_is_megatrons_at_every_consumed_sample(size):
    config = load_recipe(size)
    plan = config.run_plan(1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    schedule = WSDSchedule(
        optimizer,
        warmup_steps=plan.warmup,
        total_steps=plan.total,
        decay_steps=plan.decay,
        min_lr_ratio=config.min_lr_ratio,
        step_position=plan.schedule_position,
    )
    doubling, cooldown = plan.segments[1].start_step, plan.cooldown_start
    probes = [0, 1, 1_999, 2_000, 3_999, 4_000, 4_001, doubling - 1, doubling, doubling + 1, cooldown - 1, cooldown]
    probes += [cooldown + 1, (cooldown + plan.max_steps) // 2, plan.max_steps - 1]
    for step in sorted(set(probes)):
        schedule.last_epoch = step
        expected = megatron_lr(plan.samples_before(step), config.learning_rate, config.learning_rate / 10)
        assert schedule.get_lr()[0] == pytest.approx(expected, rel=1e-12, abs=1e-20), step


def test_sample_counts_place_the_batch_change_at_the_first_step_past_it():
    segments = batch_segments_in_samples([[1000, 20]], global_batch_size=8)
    # 1000 / 8 = 125 steps exactly; 1001 needs a 126th step of the old batch.
    assert (segments[1].start_step, segments[1].start_sample) == (125, 1000)
    late = batch_segments_in_samples([[1001, 20]], global_batch_size=8)
    assert (late[1].start_step, late[1].start_sample) == (126, 1008)
    assert steps_for_samples(segments, 1000 + 20 * 7 + 19) == 125 + 7


def test_counted_in_steps_the_plan_follows_the_accumulation_ramp():
    config = PretrainConfig(max_steps=20, warmup_steps=2, per_device_batch_size=4, batch_ramp=[[10, 3]])
    plan = config.run_plan(processes=2)
    assert [plan.rows_at(step) for step in (0, 9, 10, 19)] == [8, 8, 24, 24]
    assert [plan.micro_batches_at(step) for step in (9, 10)] == [1, 3]
    assert plan.samples_before(12) == 10 * 8 + 2 * 24
    assert plan.schedule_position(12) == 12


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_samples": 1000}, "needs global_batch_size, warmup_samples, decay_samples"),
        ({"warmup_samples": 10}, "needs train_samples"),
        (
            {"train_samples": 1000, "global_batch_size": 16, "warmup_samples": 600, "decay_samples": 500},
            "exceed train_samples",
        ),
        (
            {
                "train_samples": 1000,
                "global_batch_size": 16,
                "warmup_samples": 10,
                "decay_samples": 100,
                "batch_ramp": [[2000, 32]],
            },
            "inside the run",
        ),
        ({"global_batch_size": 20, "per_device_batch_size": 8}, "multiple of per_device_batch_size"),
        ({"decay_fraction": 1.5}, r"must be in \[0, 1\]"),
        ({"stages": [{"data": [{"path": "a"}]}], "data": [{"path": "b"}]}, "Both data and stages"),
        ({"stages": [{"data": [{"path": "a"}]}, {"data": [{"path": "b"}]}]}, "exactly one of"),
        (
            {"stages": [{"data": [{"path": "a"}]}, {"start_step": 50, "data": [{"path": "b"}]}], "max_steps": 40},
            "at or after the run's end",
        ),
        (
            {
                "stages": [
                    {"data": [{"path": "a"}]},
                    {"start_step": 20, "data": [{"path": "b"}]},
                    {"start_step": 10, "data": [{"path": "c"}]},
                ]
            },
            "in the order they run",
        ),
        ({"stages": [{"data": [{"path": "a"}], "seeds": 3}]}, "unknown keys"),
        ({"stages": [{"start_step": 0}]}, "needs `data`"),
    ],
)
def test_an_invalid_plan_is_refused_with_its_fix(options, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**options)


def test_a_global_batch_that_processes_cannot_split_is_refused():
    config = PretrainConfig(global_batch_size=48, per_device_batch_size=16)
    assert config.run_plan(processes=3).micro_batches_at(0) == 1
    with pytest.raises(ValueError, match="no multiple of per_device_batch_size=16 x 2 process"):
        config.run_plan(processes=2)


def test_a_constant_learning_rate_after_the_warmup():
    config = PretrainConfig(max_steps=10, warmup_steps=2, decay_fraction=0.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    plan = config.run_plan(1)
    schedule = WSDSchedule(optimizer, plan.warmup, plan.total, decay_steps=plan.decay)
    rates = []
    for _ in range(12):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates == [0.0, 0.5] + [1.0] * 10


@pytest.mark.parametrize(("size", "processes", "steps"), [("8b", 256, "2,627,139"), ("70b", 2048, "1,155,828")])
def test_dry_run_prints_the_plan_and_builds_nothing(size, processes, steps):
    recipe = REPO_ROOT / f"recipes/configs/{size}/pretrain.yaml"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes/pretrain.py"), "--config", str(recipe), "--dry-run", str(processes)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=True,
    )
    assert result.stdout.startswith(f"{steps} optimizer steps")
    assert "Data stages:" in result.stdout and "1.654T tokens" in result.stdout
    assert "micro-batches of" in result.stdout and f"on each of {processes} processes" in result.stdout
    assert not (REPO_ROOT / f"outputs/apertus-{size}").exists()
