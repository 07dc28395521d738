"""Will a recipe fit, and how fast will it run? The per-GPU memory of a pretraining recipe on a number of GPUs, the
micro-batch that fits, and the step time and tokens/s per GPU at a stated MFU, without building anything.

Memory comes from apertus_hf.pretraining.memory (the model states under the chosen engine, the activations with and
without checkpointing, the chunked loss's buffers, the optimizer step). A micro-batch fits when its total stays under
the GPU's memory less a headroom (by default 10%) for what the formula leaves out: the CUDA context, NCCL's buffers,
the allocator's fragmentation and the parameters ZeRO-3 keeps gathered beyond its prefetch. The micro-batch a plan
picks is the largest that fits and divides the rows each GPU takes per step (global batch / GPUs), so that gradient
accumulation makes up the rest.

Throughput: tokens/s per GPU = MFU x peak FLOP/s / FLOPs per token, with the FLOPs per token of
apertus_hf.pretraining.metrics.training_flops_per_token (the model's matmuls and attention, forward and backward, as
PaLM counts them: no recomputation, no masking discount). The step time is the global batch's tokens over the GPUs'
tokens/s. Run backwards, a reported tokens/s per GPU gives the MFU it implies by the same count.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from transformers import AutoConfig

from ..configuration_apertus import ApertusConfig
from .config import PretrainConfig
from .long_context import LongContextConfig
from .memory import (
    ENGINES,
    GIB,
    OPTIMIZER_MOMENTS,
    STATE_TERMS,
    MemoryEstimate,
    estimate_training_memory,
    parameter_counts,
)
from .metrics import PEAK_BF16_FLOPS, training_flops_per_token
from .plan import format_tokens

Engine = Literal["zero3", "zero3_offload", "ddp"]

REPORTED_THROUGHPUT = {
    "apertus-70b": (723.0, 723.0),
    "apertus-8b": (6000.0, 7000.0),
}
"""Tokens/s per GPU the Apertus tech report (arXiv 2509.14233, §2.3) gives for pretraining at 4,096 tokens on GH200s:
723 for the 70B on 4,096 GPUs, about 6,000-7,000 for the 8B; (low, high)."""

REPORTED_SEQ_LEN = 4096
"""The row length of the reported throughput (the pretraining's)."""

CONTEXT_PARALLEL_DEGREES = (2, 4, 8, 16, 32, 64)
"""Ways to split a row over GPUs that a plan tries when one row does not fit."""


@dataclass
class CapacityOptions:
    """The hardware and the assumptions of a plan (recipes/plan.py's options besides the recipe's own)."""

    gpus: int | None = field(
        default=None,
        metadata={
            "help": (
                "GPUs (data-parallel processes) of the run. None: the long-context recipe's num_processes; a "
                "pretraining recipe needs it."
            )
        },
    )
    gpu_memory: float = field(
        default=80.0,
        metadata={
            "help": (
                "Memory of one GPU in GiB (2^30 bytes) as its data sheet names it: 80 for an H100 or A100 80GB, 96 for "
                "a GH200, 141 for an H200 (the headroom covers the little the driver keeps back)."
            )
        },
    )
    engine: Engine = field(
        default="zero3",
        metadata={"help": "The engine: " + "; ".join(f"{name}: {text}" for name, text in ENGINES.items()) + "."},
    )
    mfu: float = field(
        default=0.4,
        metadata={"help": "Model FLOPs utilization the throughput figures assume (a fraction of peak_tflops)."},
    )
    peak_tflops: float = field(
        default=PEAK_BF16_FLOPS["H100"] / 1e12,
        metadata={"help": "Dense bf16 peak of one GPU in TFLOP/s (H100/H200/GH200 SXM: 989.4; A100: 312)."},
    )
    headroom: float = field(
        default=0.1,
        metadata={
            "help": (
                "Fraction of gpu_memory left free for what the formula does not count (CUDA context, NCCL buffers, "
                "fragmentation, ZeRO-3 parameters kept gathered): a micro-batch fits in (1 - headroom) x gpu_memory."
            )
        },
    )
    gpus_per_node: int = field(
        default=4, metadata={"help": "GPUs per node, for the host memory per node that offloading needs."}
    )
    format: Literal["text", "markdown"] = field(
        default="text",
        metadata={"help": "text: every term per GPU; markdown: one compact row per sequence length (docs, README)."},
    )

    def __post_init__(self):
        if self.gpus is not None and self.gpus < 1:
            raise ValueError(f"gpus={self.gpus} must be >= 1.")
        for name in ("gpu_memory", "peak_tflops", "gpus_per_node"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu={self.mfu} must be a fraction in (0, 1], e.g. 0.4.")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"headroom={self.headroom} must be a fraction in [0, 1), e.g. 0.1.")


@dataclass(frozen=True)
class Workload:
    """What one stage of a recipe asks of the GPUs: the model, the rows, the batch and the tokens."""

    name: str
    model: ApertusConfig
    model_name: str
    seq_len: int
    global_batch_rows: int
    train_tokens: int
    per_device_batch_size: int
    optimizer: str
    gradient_checkpointing: bool
    chunked_loss: bool
    later_batches: tuple[tuple[int, int], ...] = ()
    """(step, global batch rows) of each batch-ramp change after the first step."""


def _has_model_folder(init_from: str | None) -> bool:
    return init_from is not None and (Path(init_from) / "config.json").is_file()


def pretraining_workload(config: PretrainConfig, gpus: int) -> Workload:
    """The workload of a pretraining recipe on `gpus` GPUs (the model's shape from its preset and overrides, or
    init_from's config when that is a folder here; the vocabulary of the preset, not of a tokenizer)."""
    # A global batch in rows does not depend on the processes; without one, the batch grows with them.
    plan = config.run_plan(1 if config.global_batch_size is not None else gpus)
    first, *later = plan.segments
    return Workload(
        name=f"{config.seq_len // 1024}k" if config.seq_len % 1024 == 0 else str(config.seq_len),
        model=AutoConfig.from_pretrained(config.init_from)
        if _has_model_folder(config.init_from)
        else ApertusConfig.from_preset(config.model_preset, **config.model_overrides),
        model_name=config.init_from if _has_model_folder(config.init_from) else config.model_preset,
        seq_len=config.seq_len,
        global_batch_rows=first.rows_per_step,
        train_tokens=plan.samples_before(plan.max_steps) * config.seq_len,
        per_device_batch_size=config.per_device_batch_size,
        optimizer=config.optimizer,
        gradient_checkpointing=config.gradient_checkpointing,
        chunked_loss=config.chunked_loss,
        later_batches=tuple((segment.start_step, segment.rows_per_step) for segment in later),
    )


def long_context_workloads(config: LongContextConfig) -> list[Workload]:
    """One workload per stage of a long-context chain."""
    model = config.starting_model_config()
    base = config.base
    return [
        Workload(
            name=stage.name,
            model=model,
            model_name=config.init_from
            if _has_model_folder(config.init_from)
            else base.get("model_preset", PretrainConfig.model_preset),
            seq_len=stage.seq_len,
            global_batch_rows=stage.global_batch_rows,
            train_tokens=stage.tokens,
            per_device_batch_size=stage.per_device_batch_size or config.per_device_batch_size,
            optimizer=base.get("optimizer", PretrainConfig.optimizer),
            gradient_checkpointing=base.get("gradient_checkpointing", PretrainConfig.gradient_checkpointing),
            chunked_loss=base.get("chunked_loss", PretrainConfig.chunked_loss),
        )
        for stage in config.context_stages
    ]


@dataclass(frozen=True)
class CapacityPlan:
    """A workload on some GPUs: its memory, the micro-batch that fits, its throughput at an MFU, and advice."""

    workload: Workload
    options: CapacityOptions
    gpus: int
    one_row: MemoryEstimate
    """One row per micro-batch, as the recipe checkpoints (or not)."""
    one_row_without_checkpointing: MemoryEstimate
    micro_batch: int | None
    """Rows per GPU and micro-batch: the largest that fits and divides the rows per GPU per step; None: none does."""
    at_micro_batch: MemoryEstimate | None
    max_rows_in_memory: int
    """The largest micro-batch the memory allows, divisor or not (0: not even one row)."""
    flops_per_token: float
    advice: tuple[str, ...]

    @property
    def usable_bytes(self) -> float:
        return self.options.gpu_memory * (1 - self.options.headroom) * GIB

    @property
    def rows_per_gpu_per_step(self) -> float:
        return self.workload.global_batch_rows / self.gpus

    @property
    def tokens_per_second_per_gpu(self) -> float:
        return self.options.mfu * self.options.peak_tflops * 1e12 / self.flops_per_token

    def step_seconds(self, global_batch_rows: int | None = None) -> float:
        rows = global_batch_rows or self.workload.global_batch_rows
        return rows * self.workload.seq_len / (self.gpus * self.tokens_per_second_per_gpu)

    @property
    def run_days(self) -> float:
        return self.workload.train_tokens / (self.gpus * self.tokens_per_second_per_gpu) / 86400


def implied_mfu(tokens_per_second_per_gpu: float, flops_per_token: float, peak_flops: float) -> float:
    """The MFU a measured or reported tokens/s per GPU implies."""
    return tokens_per_second_per_gpu * flops_per_token / peak_flops


def _estimate(workload: Workload, gpus: int, engine: str, rows: int, **changes) -> MemoryEstimate:
    options = {
        "seq_len": workload.seq_len,
        "rows_per_gpu": rows,
        "num_gpus": gpus,
        "optimizer": workload.optimizer,
        "engine": engine,
        "gradient_checkpointing": workload.gradient_checkpointing,
        "chunked_loss": workload.chunked_loss,
    }
    return estimate_training_memory(workload.model, **{**options, **changes})


def _largest_fitting(fits, start: int = 1) -> int:
    """The largest n >= start with fits(n), for a fits that holds up to some n and not beyond (0 if not at start)."""
    if not fits(start):
        return 0
    low, high = start, start * 2
    while fits(high):
        low, high = high, high * 2
        if high > 2**40:
            return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def plan_capacity(workload: Workload, gpus: int, options: CapacityOptions) -> CapacityPlan:
    """The plan of `workload` on `gpus` GPUs under `options` (see the module docstring)."""
    usable = options.gpu_memory * (1 - options.headroom) * GIB
    engine = options.engine

    def fits(rows: int) -> bool:
        return _estimate(workload, gpus, engine, rows).total <= usable

    max_rows = _largest_fitting(fits)
    micro_batch = None
    if workload.global_batch_rows % gpus == 0:
        rows_per_step = workload.global_batch_rows // gpus
        divisors = [rows for rows in range(1, min(rows_per_step, max_rows) + 1) if rows_per_step % rows == 0]
        micro_batch = divisors[-1] if divisors else None
    plan = CapacityPlan(
        workload=workload,
        options=options,
        gpus=gpus,
        one_row=_estimate(workload, gpus, engine, 1),
        one_row_without_checkpointing=_estimate(workload, gpus, engine, 1, gradient_checkpointing=False),
        micro_batch=micro_batch,
        at_micro_batch=_estimate(workload, gpus, engine, micro_batch) if micro_batch else None,
        max_rows_in_memory=max_rows,
        flops_per_token=training_flops_per_token(workload.model, workload.seq_len),
        advice=(),
    )
    return replace(plan, advice=tuple(_advice(plan)))


def _gib(value: float) -> str:
    return f"{value / GIB:,.1f} GiB"


def _advice(plan: CapacityPlan) -> list[str]:
    """What the plan should tell: a batch the GPUs cannot split, a recipe micro-batch that does not fit, and when
    nothing fits, what would."""
    workload, gpus, engine, usable = plan.workload, plan.gpus, plan.options.engine, plan.usable_bytes
    advice = []
    if workload.global_batch_rows % gpus:
        fewer = max(
            count
            for count in range(1, min(gpus, workload.global_batch_rows) + 1)
            if workload.global_batch_rows % count == 0
        )
        advice.append(
            f"The global batch of {workload.global_batch_rows:,} rows does not divide over {gpus:,} GPUs: every GPU "
            f"takes whole rows (data parallelism), so launch on a divisor of it (e.g. {fewer:,} GPUs)"
            + (", or split rows with tensor or context parallelism (not in this project)." if gpus > fewer else ".")
        )
    elif plan.micro_batch is not None and workload.per_device_batch_size > plan.micro_batch:
        advice.append(
            f"The recipe's per_device_batch_size={workload.per_device_batch_size} does not fit or does not divide "
            f"the {plan.rows_per_gpu_per_step:g} rows per GPU per step; use --per_device_batch_size {plan.micro_batch}."
        )
    if plan.max_rows_in_memory:
        return advice
    advice.append(
        f"Nothing fits: one row of {workload.seq_len:,} tokens needs {_gib(plan.one_row.total)} per GPU, more than "
        f"{_gib(usable)} ({plan.options.gpu_memory:g} GiB less {plan.options.headroom:.0%} headroom)."
    )

    def fits(candidate_gpus: int, candidate_engine: str, **changes) -> MemoryEstimate | None:
        estimate = _estimate(workload, candidate_gpus, candidate_engine, 1, **changes)
        return estimate if estimate.total <= usable else None

    if engine == "ddp":
        sharded = fits(gpus, "zero3")
        advice.append(
            f"- ZeRO-3 (--engine zero3) shards the model states: {_gib(sharded.total)} per GPU."
            if sharded
            else "- ZeRO-3 (--engine zero3) shards the model states but does not fit either."
        )
    else:
        unshardable = _estimate(workload, 2**40, engine, 1).total
        if unshardable > usable:
            advice.append(
                "- More GPUs do not help: what does not shard (activations, the gathered module, buffers) needs "
                f"{_gib(unshardable)} per GPU."
            )
        else:
            least = _largest_fitting(lambda count: _estimate(workload, count, engine, 1).total > usable, gpus) + 1
            beyond = least > workload.global_batch_rows
            advice.append(
                f"- More GPUs: from {least:,} GPUs, {_gib(_estimate(workload, least, engine, 1).total)} per GPU"
                + (f"; but a step has only {workload.global_batch_rows:,} rows." if beyond else ".")
            )
        if engine == "zero3":
            offloaded = fits(gpus, "zero3_offload")
            advice.append(
                f"- Offloading (--engine zero3_offload): {_gib(offloaded.total)} per GPU and "
                f"{_gib(offloaded.host_total)} of host memory per GPU "
                f"({_gib(offloaded.host_total * plan.options.gpus_per_node)} per node of {plan.options.gpus_per_node})."
                if offloaded
                else "- Offloading (--engine zero3_offload) moves the model states to the CPU, not enough."
            )
    if not workload.gradient_checkpointing:
        checkpointed = fits(gpus, engine, gradient_checkpointing=True)
        advice.append(
            f"- Activation checkpointing (--gradient_checkpointing true): {_gib(checkpointed.total)} per GPU."
            if checkpointed
            else "- Activation checkpointing (--gradient_checkpointing true) is not enough alone."
        )
    for degree in CONTEXT_PARALLEL_DEGREES:
        if workload.seq_len % degree == 0:
            split = fits(gpus, engine, seq_len=workload.seq_len // degree)
            if split:
                advice.append(
                    f"- Context parallelism, each row split over {degree} GPUs ({workload.seq_len // degree:,} tokens "
                    f"each): about {_gib(split.total)} per GPU, plus its key/value exchange. This project does not "
                    "have it (DeepSpeed-Ulysses or Accelerate's context parallelism are the routes)."
                )
                break
    return advice


def plan_recipe(config: PretrainConfig | LongContextConfig, options: CapacityOptions) -> list[CapacityPlan]:
    """The plan of every stage of a recipe (one for a pretraining recipe, one per stage of a long-context chain)."""
    if isinstance(config, LongContextConfig):
        gpus = options.gpus or config.num_processes
        if gpus is None:
            raise ValueError("The long-context recipe sets no num_processes; give the GPUs with --gpus N.")
        return [plan_capacity(workload, gpus, options) for workload in long_context_workloads(config)]
    if options.gpus is None:
        raise ValueError("Give the number of GPUs with --gpus N: a pretraining recipe does not set it.")
    return [plan_capacity(pretraining_workload(config, options.gpus), options.gpus, options)]


def _cell_gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def _micro_batch(plan: CapacityPlan) -> str:
    if plan.micro_batch is None:
        return "none fits"
    return f"{plan.micro_batch} x {plan.workload.global_batch_rows // (plan.gpus * plan.micro_batch)}"


def _checkpointed(plan: CapacityPlan) -> MemoryEstimate:
    if plan.workload.gradient_checkpointing:
        return plan.one_row
    return _estimate(plan.workload, plan.gpus, plan.options.engine, 1, gradient_checkpointing=True)


def _advice_lines(plans: list[CapacityPlan]) -> list[str]:
    """The advice of every plan, each first line led by its stage's name when there are several."""
    lines = []
    for plan in plans:
        for index, line in enumerate(plan.advice):
            lines.append(f"{plan.workload.name}: {line}" if len(plans) > 1 and index == 0 else line)
    return lines


def format_plans(plans: list[CapacityPlan]) -> str:
    """The plans as a table of per-GPU terms, one column per stage, then the batch ramp and the advice."""
    first = plans[0]
    options, workload = first.options, first.workload
    parameters, _ = parameter_counts(workload.model)
    offloaded = first.one_row.host_terms
    checkpointing = "on" if workload.gradient_checkpointing else "off"
    loss = "chunked" if workload.chunked_loss else "plain"
    lines = [
        f"{workload.model_name}: {parameters / 1e9:.2f}B parameters, {workload.model.num_hidden_layers} layers; "
        f"{workload.optimizer} ({OPTIMIZER_MOMENTS[workload.optimizer]} fp32 moments), activation checkpointing "
        f"{checkpointing}, {loss} loss.",
        f"{first.gpus:,} GPUs of {options.gpu_memory:g} GiB ({_gib(first.usable_bytes)} usable: "
        f"{options.headroom:.0%} headroom); {ENGINES[options.engine]}, bf16 mixed precision.",
        f"Throughput at MFU {options.mfu:.0%} of {options.peak_tflops:g} TFLOP/s per GPU.",
        "",
    ]

    def term(name: str) -> tuple[str, list[str]]:
        label = f"  {name} (host)" if name in offloaded else f"  {name}"
        return label, [_cell_gib(getattr(plan.one_row, name)) for plan in plans]

    rows: list[tuple[str, list[str]]] = [
        ("seq_len", [f"{plan.workload.seq_len:,}" for plan in plans]),
        ("global batch (rows)", [f"{plan.workload.global_batch_rows:,}" for plan in plans]),
        ("rows per GPU per step", [f"{plan.rows_per_gpu_per_step:.3g}" for plan in plans]),
        ("per GPU, GiB, one row:", ["" for _ in plans]),
        *(term(name) for name in (*STATE_TERMS, "gathered_layer", "communication_buffers")),
        ("  model states on the GPU", [_cell_gib(plan.one_row.model_states) for plan in plans]),
        ("  activations, checkpointed", [_cell_gib(_checkpointed(plan).activations) for plan in plans]),
        (
            "  activations, not checkpointed",
            [_cell_gib(plan.one_row_without_checkpointing.activations) for plan in plans],
        ),
        ("  of which the loss phase", [_cell_gib(plan.one_row.loss) for plan in plans]),
        term("optimizer_step"),
        ("  total, one row", [_cell_gib(plan.one_row.total) for plan in plans]),
    ]
    if offloaded:
        rows.append(("  host memory per GPU", [_cell_gib(plan.one_row.host_total) for plan in plans]))
    rows += [
        ("largest micro-batch in memory", [str(plan.max_rows_in_memory) for plan in plans]),
        ("micro-batch x accumulation", [_micro_batch(plan) for plan in plans]),
        (
            "total at that micro-batch, GiB",
            [_cell_gib(plan.at_micro_batch.total) if plan.at_micro_batch else "-" for plan in plans],
        ),
        ("GFLOPs per token", [f"{plan.flops_per_token / 1e9:.1f}" for plan in plans]),
        ("tokens/s per GPU", [f"{plan.tokens_per_second_per_gpu:,.0f}" for plan in plans]),
        ("step time, s", [f"{plan.step_seconds():.2f}" for plan in plans]),
        ("tokens of the run", [format_tokens(plan.workload.train_tokens) for plan in plans]),
        ("run time, days", [f"{plan.run_days:.1f}" for plan in plans]),
    ]
    label_width = max(len(label) for label, _ in rows)
    widths = [
        max(len(plan.workload.name), *(len(cells[index]) for _, cells in rows)) for index, plan in enumerate(plans)
    ]
    for label, cells in [("", [plan.workload.name for plan in plans]), *rows]:
        lines.append(
            (
                f"{label:<{label_width}}"
                + "".join(f"  {cell:>{width}}" for cell, width in zip(cells, widths, strict=True))
            ).rstrip()
        )
    for plan in plans:
        for step, rows_per_step in plan.workload.later_batches:
            lines.append(
                f"From step {step:,} the global batch is {rows_per_step:,} rows: {rows_per_step / plan.gpus:.3g} per "
                f"GPU per step, {plan.step_seconds(rows_per_step):.2f} s per step."
            )
    return "\n".join([*lines, *_advice_lines(plans)])


MARKDOWN_COLUMNS = (
    "model",
    "stage",
    "GPUs",
    "engine",
    "GiB/GPU, 1 row (model states)",
    "micro-batch x accumulation",
    "GiB/GPU at it",
    "tokens/s/GPU at MFU",
    "step, s",
    "Apertus reported tokens/s/GPU",
    "MFU it implies",
)


def markdown_rows(plans: list[CapacityPlan], header: bool = True) -> str:
    """The plans as compact Markdown table rows (with the header lines when `header`). Apertus' reported throughput
    and the MFU it implies (on the GH200s it ran on) fill the last columns of the released models at 4,096 tokens."""
    lines = ["| " + " | ".join(MARKDOWN_COLUMNS) + " |", "|" + "---|" * len(MARKDOWN_COLUMNS)] if header else []
    for plan in plans:
        reported, implied = "-", "-"
        if plan.workload.model_name in REPORTED_THROUGHPUT and plan.workload.seq_len == REPORTED_SEQ_LEN:
            low, high = REPORTED_THROUGHPUT[plan.workload.model_name]
            low_mfu, high_mfu = reported_mfu(plan.workload.model_name)
            reported = f"{low:,.0f}" if low == high else f"{low:,.0f}-{high:,.0f}"
            implied = f"{low_mfu:.1%}" if low == high else f"{low_mfu:.1%}-{high_mfu:.1%}"
        cells = [
            plan.workload.model_name,
            plan.workload.name,
            f"{plan.gpus:,}",
            plan.options.engine,
            f"{plan.one_row.total / GIB:.1f} ({plan.one_row.model_states / GIB:.1f})",
            _micro_batch(plan),
            f"{plan.at_micro_batch.total / GIB:.1f}" if plan.at_micro_batch else "-",
            f"{plan.tokens_per_second_per_gpu:,.0f} at {plan.options.mfu:.0%}",
            f"{plan.step_seconds():.2f}",
            reported,
            implied,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_recipe(config: PretrainConfig | LongContextConfig, options: CapacityOptions) -> str:
    """What recipes/plan.py prints: the table (text or Markdown) and the advice."""
    plans = plan_recipe(config, options)
    if options.format == "text":
        return format_plans(plans)
    advice = _advice_lines(plans)
    return "\n".join([markdown_rows(plans), *(["", *advice] if advice else [])])


def reported_mfu(preset: str, peak_flops: float = PEAK_BF16_FLOPS["GH200"]) -> tuple[float, float]:
    """(low, high) MFU that Apertus' reported tokens/s per GPU imply by training_flops_per_token at 4,096 tokens."""
    flops = training_flops_per_token(ApertusConfig.from_preset(preset), REPORTED_SEQ_LEN)
    low, high = REPORTED_THROUGHPUT[preset]
    return implied_mfu(low, flops, peak_flops), implied_mfu(high, flops, peak_flops)


__all__ = [
    "REPORTED_THROUGHPUT",
    "CapacityOptions",
    "CapacityPlan",
    "Workload",
    "describe_recipe",
    "format_plans",
    "implied_mfu",
    "long_context_workloads",
    "markdown_rows",
    "plan_capacity",
    "plan_recipe",
    "pretraining_workload",
    "reported_mfu",
]
