"""The capacity plan of a recipe (apertus_hf.pretraining.capacity, recipes/plan.py): the micro-batch that fits, the
advice when nothing does, the throughput at an MFU and the MFU that Apertus' reported throughput implies, the printed
table of the 8B recipe, and the published table of docs/scaling_plan.md. Nothing here builds a model."""

import runpy
import sys

import pytest

from apertus_hf import ApertusConfig
from apertus_hf.pretraining import PretrainConfig, training_flops_per_token
from apertus_hf.pretraining.capacity import (
    CapacityOptions,
    implied_mfu,
    markdown_rows,
    plan_capacity,
    plan_recipe,
    pretraining_workload,
    reported_mfu,
)
from apertus_hf.pretraining.long_context import LongContextConfig
from apertus_hf.pretraining.memory import GIB, estimate_training_memory
from apertus_hf.recipe_args import read_recipe_args, recipe_config_from_dict
from tests.pretraining.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "recipes" / "configs"


def load_recipe(size: str, name: str) -> PretrainConfig | LongContextConfig:
    values, sources = read_recipe_args(["--config", str(CONFIGS / size / f"{name}.yaml")], "")
    return recipe_config_from_dict(LongContextConfig if name == "long_context" else PretrainConfig, values, sources)


def plan_8b(gpus: int = 256, **options):
    return plan_capacity(pretraining_workload(load_recipe("8b", "pretrain"), gpus), gpus, CapacityOptions(**options))


def print_plan(monkeypatch, capsys, *arguments: str) -> str:
    monkeypatch.setattr(sys, "argv", ["recipes/plan.py", *arguments])
    runpy.run_path(str(REPO_ROOT / "recipes" / "plan.py"), run_name="__main__")
    return capsys.readouterr().out


EXPECTED_8B_TABLE = """\
apertus-8b: 8.05B parameters, 32 layers; ademamix (3 fp32 moments), activation checkpointing on, chunked loss.
256 GPUs of 80 GiB (72.0 GiB usable: 10% headroom); DeepSpeed ZeRO-3 (accelerate_configs/zero3.yaml), bf16 mixed \
precision.
Throughput at MFU 40% of 989.4 TFLOP/s per GPU.

                                      4k
seq_len                            4,096
global batch (rows)                1,024
rows per GPU per step                  4
per GPU, GiB, one row:
  weights                           0.06
  gradients                         0.06
  master_weights                    0.12
  optimizer_moments                 0.35
  gathered_layer                    2.00
  communication_buffers             1.02
  model states on the GPU           3.61
  activations, checkpointed         4.91
  activations, not checkpointed    29.12
  of which the loss phase           3.91
  optimizer_step                    0.35
  total, one row                    8.52
largest micro-batch in memory         34
micro-batch x accumulation         4 x 1
total at that micro-batch, GiB     11.99
GFLOPs per token                    51.5
tokens/s per GPU                   7,679
step time, s                        2.13
tokens of the run                15.000T
run time, days                      88.3
From step 1,678,000 the global batch is 2,048 rows: 8 per GPU per step, 4.27 s per step.
"""


def test_plan_prints_the_8b_recipe_table(monkeypatch, capsys):
    """The command of the issue prints every per-GPU term, the micro-batch that fits and the throughput."""
    output = print_plan(
        monkeypatch, capsys, "--config", str(CONFIGS / "8b" / "pretrain.yaml"), "--gpus", "256", "--gpu-memory", "80"
    )
    assert output == EXPECTED_8B_TABLE


def test_plan_help_lists_its_options_and_the_recipe_s(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_code:
        print_plan(monkeypatch, capsys, "--help")
    assert exit_code.value.code == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].endswith("recipes/plan.py [--config RECIPE.yaml] [--key value ...]")
    for option in ("--gpus (int | None, default None)", "--gpu_memory (float, default 80.0)", "--seq_len (int, "):
        assert f"\n  {option}" in printed


def test_the_table_adds_up():
    plan = plan_8b(gpu_memory=80)
    one_row = plan.one_row
    assert one_row.model_states == sum(
        getattr(one_row, name)
        for name in (
            "weights",
            "gradients",
            "master_weights",
            "optimizer_moments",
            "gathered_layer",
            "communication_buffers",
        )
    )
    assert one_row.total == one_row.model_states + max(one_row.activations, one_row.optimizer_step)
    # The micro-batch of 4 rows is the recipe's (Megatron's MBS 4): 4 x 4,096 tokens through the same formula.
    assert plan.at_micro_batch == estimate_training_memory(
        plan.workload.model, seq_len=4096, rows_per_gpu=4, num_gpus=256
    )


@pytest.mark.parametrize(
    ("gpu_memory", "max_rows", "micro_batch"),
    [(10, 1, 1), (12, 2, 2), (13, 3, 2), (13.5, 4, 4), (80, 34, 4)],
)
def test_micro_batch_is_the_largest_divisor_of_the_rows_per_step_that_fits(gpu_memory, max_rows, micro_batch):
    """256 GPUs take 4 of the 1,024 rows each per step: the micro-batch divides 4 and fits in 90% of the memory."""
    plan = plan_8b(gpu_memory=gpu_memory)
    assert (plan.max_rows_in_memory, plan.micro_batch) == (max_rows, micro_batch)
    usable = gpu_memory * 0.9 * GIB
    assert plan.at_micro_batch.total <= usable
    bigger = estimate_training_memory(plan.workload.model, seq_len=4096, rows_per_gpu=max_rows + 1, num_gpus=256)
    assert bigger.total > usable
    if micro_batch < 4:
        assert plan.advice == (
            "The recipe's per_device_batch_size=4 does not fit or does not divide the 4 rows per GPU per step; use "
            f"--per_device_batch_size {micro_batch}.",
        )


def test_a_global_batch_that_does_not_divide_over_the_gpus_is_refused_with_a_count_that_does():
    plan = plan_8b(gpus=300)
    assert plan.micro_batch is None
    assert plan.advice == (
        "The global batch of 1,024 rows does not divide over 300 GPUs: every GPU takes whole rows (data "
        "parallelism), so launch on a divisor of it (e.g. 256 GPUs), or split rows with tensor or context "
        "parallelism (not in this project).",
    )


def test_when_nothing_fits_more_gpus_or_offloading_would():
    """8B on 8 GPUs of 24 GiB: the sharded model states alone are too large; from 13 GPUs they shard enough."""
    plan = plan_8b(gpus=8, gpu_memory=24)
    assert plan.micro_batch is None and plan.max_rows_in_memory == 0
    assert plan.advice == (
        "Nothing fits: one row of 4,096 tokens needs 33.0 GiB per GPU, more than 21.6 GiB (24 GiB less 10% headroom).",
        "- More GPUs: from 13 GPUs, 21.5 GiB per GPU.",
        "- Offloading (--engine zero3_offload): 7.9 GiB per GPU and 30.0 GiB of host memory per GPU (119.8 GiB per "
        "node of 4).",
    )
    usable = 24 * 0.9 * GIB
    model = plan.workload.model
    assert estimate_training_memory(model, seq_len=4096, rows_per_gpu=1, num_gpus=12).total > usable
    assert estimate_training_memory(model, seq_len=4096, rows_per_gpu=1, num_gpus=13).total <= usable


def test_ddp_of_an_8b_model_points_to_zero3():
    plan = plan_8b(engine="ddp")
    assert plan.advice == (
        "Nothing fits: one row of 4,096 tokens needs 255.0 GiB per GPU, more than 72.0 GiB (80 GiB less 10% headroom).",
        "- ZeRO-3 (--engine zero3) shards the model states: 8.5 GiB per GPU.",
    )


def test_the_70b_64k_stage_needs_context_parallelism(monkeypatch, capsys):
    """The last long-context stage of the 70B: the checkpointed inputs alone are 80 GiB, so neither more GPUs nor
    offloading fit it on 80 GiB; splitting each row over 2 GPUs would."""
    output = print_plan(
        monkeypatch, capsys, "--config", str(CONFIGS / "70b" / "long_context.yaml"), "--format", "markdown"
    )
    assert output.splitlines()[-4:] == [
        "64k: Nothing fits: one row of 65,536 tokens needs 120.7 GiB per GPU, more than 72.0 GiB (80 GiB less 10% "
        "headroom).",
        "- More GPUs do not help: what does not shard (activations, the gathered module, buffers) needs 115.5 GiB "
        "per GPU.",
        "- Offloading (--engine zero3_offload) moves the model states to the CPU, not enough.",
        "- Context parallelism, each row split over 2 GPUs (32,768 tokens each): about 65.4 GiB per GPU, plus its "
        "key/value exchange. This project does not have it (DeepSpeed-Ulysses or Accelerate's context parallelism "
        "are the routes).",
    ]
    # The stages up to 32k fit: 8k takes 4 rows per micro-batch, accumulated twice for its 8 rows per GPU per step.
    plans = plan_recipe(load_recipe("70b", "long_context"), CapacityOptions())
    assert [plan.micro_batch for plan in plans] == [4, 2, 1, None]


def test_throughput_at_an_mfu_and_the_mfu_a_throughput_implies():
    plan = plan_8b(mfu=0.5, peak_tflops=1000)
    flops = training_flops_per_token(plan.workload.model, 4096)
    assert plan.flops_per_token == flops
    assert plan.tokens_per_second_per_gpu == pytest.approx(0.5 * 1e15 / flops)
    # 1,024 rows of 4,096 tokens over 256 GPUs.
    assert plan.step_seconds() == pytest.approx(1024 * 4096 / (256 * plan.tokens_per_second_per_gpu))
    assert implied_mfu(plan.tokens_per_second_per_gpu, flops, 1e15) == pytest.approx(0.5)


def test_apertus_reported_throughput_implies_about_a_third_of_the_gh200_peak():
    """723 tokens/s/GPU for the 70B and 6,000-7,000 for the 8B (tech report §2.3), at 4,096 tokens on GH200s
    (989.4 TFLOP/s dense bf16)."""
    flops = [
        training_flops_per_token(ApertusConfig.from_preset(preset), 4096) for preset in ("apertus-8b", "apertus-70b")
    ]
    assert [round(value / 1e9, 1) for value in flops] == [51.5, 449.4]
    seventy, _ = reported_mfu("apertus-70b")
    eight_low, eight_high = reported_mfu("apertus-8b")
    assert (round(seventy, 3), round(eight_low, 3), round(eight_high, 3)) == (0.328, 0.313, 0.365)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gpus": 0}, "gpus=0 must be >= 1"),
        ({"mfu": 1.5}, r"mfu=1.5 must be a fraction in \(0, 1\]"),
        ({"headroom": 1.0}, r"headroom=1.0 must be a fraction in \[0, 1\)"),
        ({"gpu_memory": 0}, "gpu_memory=0 must be positive"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        CapacityOptions(**options)


def test_a_pretraining_recipe_needs_the_gpu_count():
    with pytest.raises(ValueError, match="Give the number of GPUs with --gpus N"):
        plan_recipe(load_recipe("8b", "pretrain"), CapacityOptions())


# The four cases of docs/scaling_plan.md: the pretraining recipes at 4k on the GPUs their comments name, and the last
# long-context stage (64k) on the recipes' num_processes; 80 GiB GPUs, ZeRO-3, MFU 40%.
PUBLISHED = [
    ("8b", "pretrain", 256),
    ("8b", "long_context", None),
    ("70b", "pretrain", 2048),
    ("70b", "long_context", None),
]


def test_the_published_scaling_table_is_what_the_plan_computes():
    text = (REPO_ROOT / "docs" / "scaling_plan.md").read_text()
    rows = []
    for size, name, gpus in PUBLISHED:
        plans = plan_recipe(load_recipe(size, name), CapacityOptions(gpus=gpus, gpu_memory=80))
        rows.append(markdown_rows(plans[-1:], header=False))
    table = "\n".join([*markdown_rows([], header=True).splitlines(), *rows])
    assert table in text
