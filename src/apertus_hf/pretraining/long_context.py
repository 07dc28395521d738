"""The long-context extension: a chain of pretraining runs at growing sequence lengths and RoPE thetas.

Apertus went from 4,096 to 65,536 tokens of context in four stages (8k, 16k, 32k, 64k; RoPE theta 1M, 2M, 4M, 12M
with the Llama-3 scaling kept; swiss-ai/pretrain-code `long_context/training_scripts/`). Each stage is a Megatron run
that loads the previous stage's weights with `--finetune --no-load-rng`: a fresh optimizer (the AdEMAMix alpha and
beta3 warmups restart) and a fresh schedule (a short warmup to a constant learning rate).

Here each stage is one `pretrain` run in its own folder, `<output_dir>/<stage name>/`, with `init_from` = the model
the previous stage exported (the first stage starts from the chain's `init_from`). `init_from` loads weights only, so
every stage builds a new optimizer and schedule, as `--finetune` does; the stage's RoPE parameters and
`max_position_embeddings` reach the loaded model through `model_overrides`. The chain is resumable: a stage whose
model is exported is skipped, an interrupted one resumes from its own checkpoints, so relaunching the same command
continues where it stopped. The last stage's exported model is the chain's result.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState, GradientState
from transformers import AutoConfig

from ..configuration_apertus import ApertusConfig
from ..recipe_args import recipe_config_from_dict
from ..training_facts import TRAINING_FACTS_FILE_NAME, TrainingFacts
from .config import PretrainConfig
from .memory import MemoryEstimate, estimate_training_memory
from .plan import format_tokens
from .run_folder import MODEL_DIR_NAME
from .trainer import pretrain

logger = logging.getLogger("apertus_hf.pretraining")

STAGE_OPTIONS = (
    "output_dir",
    "init_from",
    "seq_len",
    "max_steps",
    "warmup_steps",
    "learning_rate",
    "per_device_batch_size",
    "gradient_accumulation_steps",
    "global_batch_size",
    "batch_ramp",
    "train_samples",
    "warmup_samples",
    "decay_samples",
)
"""PretrainConfig options that the chain sets for each stage; `base` and a stage's `overrides` must not set them."""

_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ContextStage:
    """One stage of the chain: a pretraining run at one sequence length and RoPE theta."""

    name: str = field(metadata={"help": "Name of the stage and of its folder under the chain's output_dir, e.g. 8k."})
    seq_len: int = field(metadata={"help": "Tokens per packed row; also the model's max_position_embeddings."})
    rope_theta: float = field(metadata={"help": "RoPE base frequency of this stage (Apertus: 1M, 2M, 4M, 12M)."})
    max_steps: int = field(metadata={"help": "Optimizer steps of the stage."})
    global_batch_rows: int = field(
        metadata={
            "help": (
                "Rows of seq_len tokens per optimizer step over all processes; the gradient accumulation follows from "
                "it, per_device_batch_size and the number of processes. Apertus kept rows x seq_len constant."
            )
        }
    )
    learning_rate: float = field(metadata={"help": "Learning rate after the warmup (constant: decay_fraction 0)."})
    warmup_steps: int = field(metadata={"help": "Linear warmup steps from 0 to learning_rate."})
    data: list[dict[str, Any]] | None = field(
        default=None, metadata={"help": "Training sources of this stage (PretrainConfig.data); None: the base's."}
    )
    per_device_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per device and micro-batch; None: the chain's per_device_batch_size."}
    )
    overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Other PretrainConfig options for this stage only, on top of the base, e.g. eval_steps."},
    )

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_rows * self.seq_len

    @property
    def tokens(self) -> int:
        return self.tokens_per_step * self.max_steps


@dataclass
class LongContextConfig:
    """A long-context chain: the options every stage shares and the list of stages, run in order."""

    output_dir: str = field(
        default="outputs/long-context-tiny",
        metadata={"help": "Folder of the chain; stage <name> runs in <output_dir>/<name>/ and exports to its model/."},
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": (
                "Model folder or Hub id the first stage starts from (the pretrained model); None: a fresh model of "
                "base's model_preset and model_overrides."
            )
        },
    )
    base: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": (
                "PretrainConfig options of every stage (tokenizer, data, goldfish, optimizer, document_masking, ...). "
                f"The chain sets {', '.join(STAGE_OPTIONS)} per stage. model_preset and model_overrides give the "
                "model's shape for the plan when init_from is not a folder on this machine."
            )
        },
    )
    rope_parameters: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": (
                "RoPE parameters every stage sets besides its rope_theta, e.g. the Llama-3 scaling of the release "
                "{rope_type: llama3, factor: 8.0, ...}; keys left out keep the starting model's values."
            )
        },
    )
    stages: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={
            "help": "The stages in order, each a mapping of ContextStage's fields (name, seq_len, rope_theta, ...)."
        },
    )
    num_processes: int | None = field(
        default=None,
        metadata={
            "help": (
                "GPUs (processes) the plan and its memory estimate assume; None: those of this launch. A launch always "
                "derives each stage's gradient accumulation from the processes it really has."
            )
        },
    )
    per_device_batch_size: int = field(
        default=1, metadata={"help": "Rows per device and micro-batch of every stage that does not set its own."}
    )
    context_stages: list[ContextStage] = field(init=False, repr=False)
    """`stages`, checked and typed."""

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages is empty; give at least one, e.g. [{name: 8k, seq_len: 8192, ...}].")
        self.context_stages = [
            recipe_config_from_dict(ContextStage, entry, f"stages[{index}]") for index, entry in enumerate(self.stages)
        ]
        names = [stage.name for stage in self.context_stages]
        for stage in self.context_stages:
            if not _STAGE_NAME.match(stage.name):
                raise ValueError(f"Stage name {stage.name!r} must be a folder name: letters, digits, '.', '_', '-'.")
            if names.count(stage.name) > 1:
                raise ValueError(f"Stage name {stage.name!r} is used twice; each stage needs a folder of its own.")
            for name in ("seq_len", "max_steps", "global_batch_rows"):
                if getattr(stage, name) < 1:
                    raise ValueError(f"Stage {stage.name}: {name}={getattr(stage, name)} must be >= 1.")
            if not stage.rope_theta > 0:
                raise ValueError(f"Stage {stage.name}: rope_theta={stage.rope_theta} must be positive.")
            _refuse_stage_options(stage.overrides, f"stage {stage.name}'s overrides")
        _refuse_stage_options(self.base, "base")
        if "rope_theta" in self.rope_parameters:
            raise ValueError("rope_parameters must not set rope_theta: each stage sets its own (stages[*].rope_theta).")
        if self.per_device_batch_size < 1:
            raise ValueError(f"per_device_batch_size={self.per_device_batch_size} must be >= 1.")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes={self.num_processes} must be >= 1 (or None: this launch's).")

    def stage_dir(self, stage: ContextStage) -> Path:
        return Path(self.output_dir) / stage.name

    def stage_model_dir(self, stage: ContextStage) -> Path:
        """Where `stage` exports its model."""
        return self.stage_dir(stage) / MODEL_DIR_NAME

    def starting_model_config(self) -> ApertusConfig:
        """The shape and RoPE of the model the first stage starts from: init_from's config when it is a folder on
        this machine, else the base's model_preset with its model_overrides (a plan made before pretraining ends)."""
        if self.init_from is not None and (Path(self.init_from) / "config.json").is_file():
            return AutoConfig.from_pretrained(self.init_from)
        preset = self.base.get("model_preset", PretrainConfig.model_preset)
        return ApertusConfig.from_preset(preset, **self.base.get("model_overrides", {}))

    def stage_configs(self, num_processes: int) -> list[PretrainConfig]:
        """The PretrainConfig of every stage when the chain runs on `num_processes` processes."""
        start_rope = dict(self.starting_model_config().rope_parameters)
        init_from = self.init_from
        configs = []
        for stage in self.context_stages:
            per_device = stage.per_device_batch_size or self.per_device_batch_size
            options = {
                **self.base,
                **({"data": stage.data} if stage.data is not None else {}),
                **stage.overrides,
                "output_dir": str(self.stage_dir(stage)),
                "init_from": init_from,
                "seq_len": stage.seq_len,
                "max_steps": stage.max_steps,
                "warmup_steps": stage.warmup_steps,
                "learning_rate": stage.learning_rate,
                "per_device_batch_size": per_device,
                "global_batch_size": stage.global_batch_rows,
                "model_overrides": {
                    **self.base.get("model_overrides", {}),
                    "rope_parameters": {**start_rope, **self.rope_parameters, "rope_theta": stage.rope_theta},
                    "max_position_embeddings": stage.seq_len,
                },
            }
            stage_config = recipe_config_from_dict(PretrainConfig, options, f"the chain's stage {stage.name}")
            try:
                # The run derives its micro-batches from global_batch_size the same way, on the processes it has.
                stage_config.run_plan(num_processes)
            except ValueError as error:
                raise ValueError(
                    f"Stage {stage.name}: global_batch_rows={stage.global_batch_rows} is not a multiple of "
                    f"per_device_batch_size={per_device} x {num_processes} process(es); launch on a number of "
                    "processes that divides it, or change per_device_batch_size."
                ) from error
            configs.append(stage_config)
            init_from = str(self.stage_model_dir(stage))
        return configs


def _refuse_stage_options(options: dict[str, Any], where: str) -> None:
    owned = sorted(set(options) & set(STAGE_OPTIONS))
    if owned:
        raise ValueError(
            f"{where} sets {owned}, which the chain sets for each stage: give seq_len, max_steps, warmup_steps, "
            "learning_rate, global_batch_rows and per_device_batch_size in the stages (in steps and rows, as the "
            "reference's long-context scripts count), init_from and output_dir at the chain's top level."
        )


def launched_processes() -> int:
    """Processes of this launch, as `accelerate launch` and torchrun announce them (WORLD_SIZE), read before any
    Accelerator exists (each stage's run sets up the process group)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class StagePlan:
    """What a stage will do on a number of processes, derived from the recipe without loading anything."""

    stage: ContextStage
    config: PretrainConfig
    num_processes: int
    memory: MemoryEstimate

    def row(self) -> list[str]:
        config = self.config
        return [
            self.stage.name,
            f"{self.stage.seq_len:,}",
            f"{self.stage.rope_theta:,.0f}",
            f"{config.max_steps:,}",
            f"{self.stage.global_batch_rows:,} x {self.stage.seq_len:,} = {self.stage.tokens_per_step:,}",
            format_tokens(self.stage.tokens),
            f"{config.learning_rate:g}",
            f"{config.warmup_steps:,}",
            f"{config.per_device_batch_size} x {config.run_plan(self.num_processes).micro_batches_at(0)} x "
            f"{self.num_processes}",
            f"{self.memory.total / 2**30:,.1f} GiB",
        ]


PLAN_COLUMNS = [
    "stage",
    "seq_len",
    "rope_theta",
    "steps",
    "global batch (rows x seq_len = tokens)",
    "tokens",
    "lr",
    "warmup",
    "rows/GPU x accum x GPUs",
    "memory/GPU",
]


def plan_long_context(config: LongContextConfig, num_processes: int | None = None) -> list[StagePlan]:
    """The plan of every stage on `num_processes` processes (default: the config's num_processes, else this
    launch's), with its per-GPU memory under ZeRO-3 (apertus_hf.pretraining.memory)."""
    processes = num_processes or config.num_processes or launched_processes()
    model_config = config.starting_model_config()
    plans = []
    for stage, stage_config in zip(config.context_stages, config.stage_configs(processes), strict=True):
        memory = estimate_training_memory(
            model_config,
            seq_len=stage.seq_len,
            rows_per_gpu=stage_config.per_device_batch_size,
            num_gpus=processes,
            optimizer=stage_config.optimizer,
            gradient_checkpointing=stage_config.gradient_checkpointing,
            chunked_loss=stage_config.chunked_loss,
        )
        plans.append(StagePlan(stage, stage_config, processes, memory))
    return plans


def format_plan(config: LongContextConfig, plans: list[StagePlan]) -> str:
    """The plan as the dry run prints it: a table of the stages, the totals, the final model's position limit and
    RoPE, and the per-GPU memory terms of the longest stage."""
    rows = [PLAN_COLUMNS, *(plan.row() for plan in plans)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(PLAN_COLUMNS))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    last = plans[-1]
    longest = max(plans, key=lambda plan: plan.memory.total)
    start = config.init_from or f"a fresh {config.base.get('model_preset', PretrainConfig.model_preset)} model"
    return "\n".join(
        [
            f"Long-context chain: {len(plans)} stage(s) from {start}, in {config.output_dir}/<stage>/, "
            f"on {last.num_processes} process(es).",
            *table,
            f"Total: {sum(plan.config.max_steps for plan in plans):,} steps, "
            f"{format_tokens(sum(plan.stage.tokens for plan in plans))} tokens.",
            f"Final model ({config.stage_model_dir(last.stage)}): max_position_embeddings "
            f"{last.config.model_overrides['max_position_embeddings']:,}, rope_parameters "
            f"{last.config.model_overrides['rope_parameters']}.",
            f"Per-GPU memory of stage {longest.stage.name} ({longest.stage.seq_len:,} tokens x "
            f"{longest.config.per_device_batch_size} row(s) per micro-batch, ZeRO-3 over {longest.num_processes} "
            "GPU(s); apertus_hf.pretraining.memory):",
            longest.memory.table(),
        ]
    )


@dataclass
class StageResult:
    """What one stage produced (or had produced, when this launch skipped it)."""

    name: str
    model_dir: Path | None
    """The stage's exported model; None when it was interrupted."""
    steps: int
    tokens_seen: int
    final_eval_loss: float | None
    """None for a skipped stage (its metrics.jsonl holds its evaluations)."""
    skipped: bool
    """The stage had already exported its model, so this launch did not run it."""


@dataclass
class LongContextResult:
    """What a run of the chain produced."""

    stages: list[StageResult]
    model_dir: Path | None
    """The last stage's exported model; None while the chain is unfinished."""
    interrupted: bool
    is_main_process: bool


def is_exported(model_dir: Path) -> bool:
    """Whether a stage finished: its export writes the training facts last."""
    return (model_dir / TRAINING_FACTS_FILE_NAME).is_file()


def _release_accelerate_state() -> bool:
    """Forget the finished stage's accelerate state, so that the next stage builds its Accelerator anew, as in a fresh
    process (accelerate has no public call for this; its own tests reset the same way). The process group is kept when
    the stage left it up. Returns whether this process can run another stage: a multi-process launch cannot once the
    stage's `Accelerator.end_training` has destroyed its process group, since a second gloo/NCCL group set up in the
    same processes hangs (seen with torchrun's agent store)."""
    keeps_process_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not keeps_process_group)
    GradientState._reset_state()
    return keeps_process_group or launched_processes() == 1


def run_long_context(config: LongContextConfig) -> LongContextResult:
    """Run the stages in order, each from the model the previous one exported; stages already exported are skipped,
    an interrupted one resumes. Stops after a stage that was interrupted (relaunch to continue)."""
    processes = launched_processes()
    results: list[StageResult] = []
    for stage, stage_config in zip(config.context_stages, config.stage_configs(processes), strict=True):
        model_dir = config.stage_model_dir(stage)
        if is_exported(model_dir):
            logger.info("Stage %s: already exported to %s, skipped.", stage.name, model_dir)
            facts = TrainingFacts.load(model_dir)
            results.append(StageResult(stage.name, model_dir, facts.steps, facts.tokens_seen, None, skipped=True))
            continue
        logger.info(
            "Stage %s: %d steps at seq_len %d, RoPE theta %g, from %s.",
            stage.name,
            stage.max_steps,
            stage.seq_len,
            stage.rope_theta,
            stage_config.init_from or "a fresh model",
        )
        result = pretrain(stage_config)
        can_continue = _release_accelerate_state()
        results.append(
            StageResult(
                stage.name, result.model_dir, result.steps, result.tokens_seen, result.final_eval_loss, skipped=False
            )
        )
        if result.interrupted:
            return LongContextResult(results, None, interrupted=True, is_main_process=_is_main_process())
        if not can_continue and stage is not config.context_stages[-1]:
            logger.warning(
                "Stage %s is done, and its run closed the process group, which %d processes cannot set up again: "
                "relaunch the same command to run the next stage.",
                stage.name,
                launched_processes(),
            )
            return LongContextResult(results, None, interrupted=True, is_main_process=_is_main_process())
    return LongContextResult(results, results[-1].model_dir, interrupted=False, is_main_process=_is_main_process())


__all__ = [
    "STAGE_OPTIONS",
    "ContextStage",
    "LongContextConfig",
    "LongContextResult",
    "StagePlan",
    "StageResult",
    "format_plan",
    "is_exported",
    "launched_processes",
    "plan_long_context",
    "run_long_context",
]
