"""`build_run(config) -> Run`: everything a pretraining run needs before its first step, in the order it is built.

Inputs are checked first (tokenizer, init_from, data paths), before the run folder is touched and before
tokenisation; then the accelerator, CPU threads, the run folder (resume, fresh start, archive), logging, data,
model, optimizer and schedule, the resume from the newest usable checkpoint, trackers and the FLOP accounting.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
)

from ..configuration_apertus import ApertusConfig
from ..data import DataSource, PackedBatchCollator, load_documents, tokenize_and_pack
from ..data.pretokenized import all_pretokenized, blend_pretokenized, last_documents_rows
from ..optim import AdEMAMix, WSDSchedule, build_parameter_groups
from ..runtime import (
    SourceNotFoundError,
    apply_speed_options,
    cpu_thread_count,
    init_cpu_process_group,
    resolve_attn_implementation,
    resolve_source,
)
from ..tokenization import load_tokenizer
from .checkpointing import TrainingProgress, load_latest_checkpoint
from .config import PretrainConfig, fresh_model_config
from .logs import CONSOLE, RunLogs
from .metrics import MetricsFile, StepRecords, peak_flops_per_device, training_flops_per_token
from .plan import RunPlan
from .run_folder import CHECKPOINTS_DIR_NAME, METRICS_FILE_NAME, plan_run_folder

logger = logging.getLogger("apertus_hf.pretraining")


@dataclass
class Run:
    """The parts of one pretraining run."""

    config: PretrainConfig
    output_dir: Path
    accelerator: Accelerator
    logs: RunLogs
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    """As prepared by accelerate (wrapped by DDP or DeepSpeed in a distributed run)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: RunPlan
    """Global batch, schedule position and data stage of every optimizer step."""
    train_rows: list[Any]
    """The packed rows of each data stage (one without stages); StageFeed reads them in their global order."""
    data_seeds: list[int]
    """The data seed of each data stage (the run's seed without stages): it orders that stage's rows."""
    collator: PackedBatchCollator
    """Makes micro-batches of training rows: Goldfish drops, document masking, position resets."""
    eval_loader: DataLoader | None
    progress: TrainingProgress
    """Optimizer steps, tokens and data position; saved with every checkpoint."""
    records: StepRecords
    """The per-step metrics, written to output_dir/metrics.jsonl and the trackers."""
    flops_per_token: float
    peak_flops: float | None

    def tokens_of_step(self, step: int) -> int:
        """Tokens of optimizer step `step` over all processes."""
        return self.plan.rows_at(step) * self.config.seq_len

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / CHECKPOINTS_DIR_NAME

    def close(self) -> None:
        """Stop writing this run's logs (the process may run another one)."""
        self.logs.close()


def data_sources(entries: list[dict[str, Any]], option: str) -> list[DataSource]:
    """The DataSources of a `data` or `eval_data` option, each local path checked to exist."""
    fields = {field.name for field in dataclasses.fields(DataSource)}
    sources = []
    for index, entry in enumerate(entries):
        unknown = set(entry) - fields
        if unknown:
            raise ValueError(
                f"{option} entry {entry!r} has unknown keys {sorted(unknown)}; valid keys: {sorted(fields)}."
            )
        resolve_source(
            str(entry["path"]),
            f"{option}[{index}].path",
            "Give a data file, a folder or glob of them, or a Hub dataset id.",
        )
        sources.append(DataSource(**entry))
    return sources


def _build_accelerator(config: PretrainConfig) -> tuple[Accelerator, RunPlan]:
    init_cpu_process_group()
    accelerator = Accelerator(
        log_with=config.report_to or None,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=config.output_dir),
        # The WSD schedule counts optimizer steps; by default accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
    )
    # The plan needs the number of processes: a global batch in rows becomes micro-batches per process.
    plan = config.run_plan(accelerator.num_processes)
    accumulation = plan.micro_batches_at(0)
    accelerator.gradient_accumulation_steps = accumulation
    deepspeed_plugin = accelerator.state.deepspeed_plugin
    if deepspeed_plugin is not None:
        # The recipe, not the engine's config file, owns clipping and the batch shape.
        ds_config = deepspeed_plugin.deepspeed_config
        ds_config["gradient_clipping"] = config.max_grad_norm
        ds_config["gradient_accumulation_steps"] = accumulation
        ds_config["train_micro_batch_size_per_gpu"] = config.per_device_batch_size
        ds_config["train_batch_size"] = plan.rows_at(0)
    return accelerator, plan


def stage_sources(config: PretrainConfig) -> list[list[DataSource]]:
    """The DataSources of each data stage (one stage, `data`, without `stages`), each local path checked."""
    if not config.stages:
        return [data_sources(config.data, "data")]
    return [data_sources(stage["data"], f"stages[{index}].data") for index, stage in enumerate(config.stages)]


def _build_datasets(
    config: PretrainConfig,
    sources_of_stages: list[list[DataSource]],
    seeds: list[int],
    eval_sources: list[DataSource],
    tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator,
):
    """Packed training rows of each stage and (possibly None) packed evaluation rows, held out of the first stage when
    there is no eval_data. Records skipped with on_bad_record="skip" are reported by `load_documents` itself (for a
    stream, as it is read). A stream is read only as training consumes it, so a later stage costs nothing up front.

    A stage (or eval_data) whose sources are pre-tokenized folders (recipes/tokenize_data.py) reads its rows from their
    memory-mapped shards, blended by weight row by row (apertus_hf.data.pretokenized). When the first stage is, the
    documents held out are the last eval_documents of its first source, left out of every stage that reads it."""
    options = [f"stages[{index}].data" for index in range(len(config.stages))] if config.stages else ["data"]
    pretokenized = [
        all_pretokenized(sources, option) for sources, option in zip(sources_of_stages, options, strict=True)
    ]
    eval_pretokenized = all_pretokenized(eval_sources, "eval_data")
    if config.streaming and (any(pretokenized) or eval_pretokenized):
        raise ValueError(
            "streaming: true streams raw documents, but the data names pre-tokenized folders, which are read by memory "
            "map without streaming. Set streaming: false."
        )
    # The main process tokenizes first and fills the `datasets` cache; the others then read it instead of racing.
    with accelerator.main_process_first():
        pack = {"num_proc": config.tokenization_processes}
        train_rows, eval_documents, eval_rows, held_out = [], None, None, None
        for index, (sources, seed) in enumerate(zip(sources_of_stages, seeds, strict=True)):
            if pretokenized[index]:
                if index == 0 and not eval_sources and config.eval_documents:
                    held_out = last_documents_rows(sources[0].path, tokenizer, config.seq_len, config.eval_documents)
                    eval_rows = held_out
                train_rows.append(blend_pretokenized(sources, tokenizer, config.seq_len, held_out=held_out))
                logger.info(
                    "%s: %d rows of %d tokens from pre-tokenized folders, blended by weight.",
                    options[index],
                    len(train_rows[-1]),
                    config.seq_len,
                )
                continue
            load = {"streaming": config.streaming, "seed": seed, "on_bad_record": config.on_bad_record}
            documents = load_documents(sources, **load)
            if index == 0 and eval_sources and not eval_pretokenized:
                eval_documents = load_documents(eval_sources, **load)
            elif index == 0 and not eval_sources and config.eval_documents:
                if config.streaming:
                    eval_documents = documents.take(config.eval_documents)
                    documents = documents.skip(config.eval_documents)
                else:
                    if config.eval_documents >= len(documents):
                        raise ValueError(
                            f"eval_documents={config.eval_documents} holds out the whole corpus ({len(documents)} "
                            "documents); lower it or give eval_data."
                        )
                    split = documents.train_test_split(test_size=config.eval_documents, seed=seed)
                    documents, eval_documents = split["train"], split["test"]
            if config.streaming:
                documents = documents.shuffle(seed=seed, buffer_size=10_000)
            train_rows.append(tokenize_and_pack(documents, tokenizer, config.seq_len, **pack))
        if eval_pretokenized:
            eval_rows = blend_pretokenized(eval_sources, tokenizer, config.seq_len)
        elif eval_sources and eval_documents is None:
            eval_documents = load_documents(eval_sources, seed=seeds[0], on_bad_record=config.on_bad_record)
        if eval_documents is not None:
            eval_rows = tokenize_and_pack(eval_documents, tokenizer, config.seq_len, **pack)
    return train_rows, eval_rows


def pretraining_model_config(
    preset: str,
    overrides: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    model_type: str = "apertus",
) -> PreTrainedConfig:
    """The config of a fresh model: `preset` plus `overrides`, with the vocabulary and special ids of `tokenizer`, and
    room for rows of `seq_len` positions (a raised max_position_embeddings is logged). An ApertusConfig, or for another
    `model_type` (an ablation baseline such as llama) that type's config with the preset's shapes."""
    asked = overrides.get("max_position_embeddings", ApertusConfig.from_preset(preset).max_position_embeddings)
    if seq_len > asked:
        logger.info(
            "max_position_embeddings raised from %d to seq_len=%d, the length of the rows the model trains on.",
            asked,
            seq_len,
            extra=CONSOLE,
        )
    values = {
        **overrides,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": max(asked, seq_len),
    }
    return fresh_model_config(model_type, preset, values)


def _init_config(init_from: str) -> PreTrainedConfig:
    """The config of the model at `init_from`, read before anything else so that a wrong name fails at once."""
    source = resolve_source(init_from, "init_from", "Give a model folder (e.g. <output_dir>/model) or a Hub id.")
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as error:
        raise SourceNotFoundError(
            f"init_from={init_from!r} is no model folder here, and no Hub model that could be loaded ({error})."
        ) from error


INIT_FROM_OVERRIDES = ("rope_parameters", "max_position_embeddings")
"""The model_overrides that may change a model loaded with init_from: they set how positions are encoded, not the
shape of the weights (the long-context stages raise both)."""


def _override_init_config(init_config: PreTrainedConfig, overrides: dict[str, Any], init_from: str) -> None:
    """Apply `overrides` (model_overrides) to the config of the model at `init_from`: rope_parameters are merged key
    by key into the loaded model's, max_position_embeddings is replaced; any other key must keep the loaded value,
    since the weights have that architecture."""
    for key, value in overrides.items():
        if key == "rope_parameters":
            init_config.rope_parameters = {**(init_config.rope_parameters or {}), **value}
        elif key == "max_position_embeddings":
            init_config.max_position_embeddings = value
        elif not hasattr(init_config, key) or getattr(init_config, key) != value:
            raise ValueError(
                f"model_overrides sets {key}={value!r}, but the model of init_from={init_from} has "
                f"{key}={getattr(init_config, key, None)!r}: its weights cannot change architecture. With init_from, "
                f"model_overrides may only set {', '.join(INIT_FROM_OVERRIDES)}."
            )
    try:
        init_config.validate()
    except (KeyError, ValueError) as error:
        raise ValueError(f"model_overrides {overrides!r} on the model of init_from={init_from}: {error}") from error


def _build_model(
    config: PretrainConfig,
    init_config: PreTrainedConfig | None,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
) -> torch.nn.Module:
    attn_implementation = resolve_attn_implementation(config.attn_implementation, device)
    if init_config is not None:
        positions = getattr(init_config, "max_position_embeddings", None)
        if positions is not None and config.seq_len > positions:
            # The exported config must not claim fewer positions than the model was trained on.
            logger.warning(
                "seq_len=%d is longer than the max_position_embeddings=%d of init_from=%s: raised to %d in the "
                "model's config (RoPE's frequencies are unchanged; for long-context scaling set model_overrides "
                "{rope_parameters: {rope_theta: ...}, max_position_embeddings: ...}).",
                config.seq_len,
                positions,
                config.init_from,
                config.seq_len,
            )
            init_config.max_position_embeddings = config.seq_len
        model = AutoModelForCausalLM.from_pretrained(
            config.init_from, config=init_config, dtype=torch.float32, attn_implementation=attn_implementation
        )
    else:
        model_config = pretraining_model_config(
            config.model_preset, config.model_overrides, tokenizer, config.seq_len, config.model_type
        )
        model_config._attn_implementation = attn_implementation
        # from_config (not the class itself) so that DeepSpeed ZeRO-3 can build the model already sharded.
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size} embeddings; "
            "use the tokenizer the model was trained with."
        )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # A stock baseline (model_type other than apertus) has none of our speed options; with apertus, a loaded model of
    # another architecture is refused there by name.
    if config.model_type == "apertus":
        apply_speed_options(model, config.xielu_implementation, config.compile_layers)
    return model


def _build_optimizer(config: PretrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = build_parameter_groups(model, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon
        )
    warmup = config.ademamix_warmup_steps if config.ademamix_warmup_steps is not None else config.max_steps
    return AdEMAMix(
        groups,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2, config.ademamix_beta3),
        alpha=config.ademamix_alpha,
        eps=config.adam_epsilon,
        alpha_warmup_steps=warmup,
        beta3_warmup_steps=warmup,
    )


def _check_resumed_schedule(scheduler: WSDSchedule, config: PretrainConfig, plan: RunPlan) -> None:
    """A checkpoint restores the schedule it was saved with. Counted in another unit (steps vs samples) it cannot
    continue; with other lengths it continues as saved (e.g. a run extended by raising max_steps keeps its cooldown),
    and the user is told."""
    if scheduler.position_unit != plan.unit:
        raise ValueError(
            f"The checkpoint's learning-rate schedule is counted in {scheduler.position_unit}, the recipe's in "
            f"{plan.unit}. Resume with the schedule options the run was started with, or train on with the new "
            "schedule in a new output_dir with init_from=<this run's exported model>."
        )
    saved = (scheduler.warmup_steps, scheduler.decay_steps, scheduler.total_steps)
    saved += (scheduler.decay_shape, scheduler.min_lr_ratio)
    wanted = (plan.warmup, plan.decay, plan.total, config.decay_shape, config.min_lr_ratio)
    if saved != wanted:
        logger.warning(
            "The checkpoint's learning-rate schedule (warmup, cooldown, total in %s, shape, min ratio) = %s differs "
            "from the recipe's %s; the checkpoint's is kept, so that the resumed run continues the saved one. Start a "
            "new output_dir with init_from=<exported model> to train on with another schedule.",
            plan.unit,
            saved,
            wanted,
            extra=CONSOLE,
        )


def _check_resumed_data_position(progress: TrainingProgress, plan: RunPlan) -> None:
    """Say when the rows the checkpoint consumed in its data stage are not what this recipe's plan consumes by that
    step: the global batch changed (most often: a resume on another number of processes without global_batch_size).
    The run continues from the checkpoint's position, so no row is repeated or skipped."""
    stage_start = plan.stages[progress.stage].start_step if plan.stages else 0
    planned = plan.samples_before(progress.step) - plan.samples_before(stage_start)
    if progress.stage == plan.stage_at(progress.step) and planned != progress.samples_in_stage:
        logger.warning(
            "The checkpoint consumed %d rows of data stage %d in its first %d steps; this recipe's global batch would "
            "have consumed %d: the global batch (per_device_batch_size x micro-batches x processes) differs from the "
            "run that saved it. Training continues at the checkpoint's row, with this recipe's global batch. To keep "
            "the batch when the number of processes changes, set global_batch_size.",
            progress.samples_in_stage,
            progress.stage,
            progress.step - stage_start,
            planned,
            extra=CONSOLE,
        )


def _warn_about_changed_cpu_threads(saved: int, device: torch.device) -> None:
    """On CPU, say when the resumed process has another number of threads than the one that saved (`saved`, 0 when
    the checkpoint did not record it): its losses then match an uninterrupted run only to rounding."""
    current = torch.get_num_threads()
    if device.type == "cpu" and saved and saved != current:
        logger.warning(
            "The checkpoint was saved by a process with %d CPU thread(s) and this one has %d: matmuls split across "
            "threads round differently, so the losses from here on will match an uninterrupted run only to rounding. "
            "Resume with OMP_NUM_THREADS=%d (accelerate launch --num_cpu_threads_per_process %d) to continue it bit "
            "for bit.",
            saved,
            current,
            saved,
            saved,
        )


def _flat_config(config: PretrainConfig) -> dict[str, Any]:
    """The config as tracker hyperparameters, which must be scalars."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
        for key, value in dataclasses.asdict(config).items()
    }


def build_run(config: PretrainConfig) -> Run:
    """Check the inputs, settle the run folder, and build (or resume) the run; its logs go to the console and
    output_dir/train.log until `run.close()`."""
    tokenizer = load_tokenizer(config.tokenizer, "tokenizer")
    init_config = None
    if config.init_from:
        init_config = _init_config(config.init_from)
        _override_init_config(init_config, config.model_overrides, config.init_from)
    sources_of_stages, eval_sources = stage_sources(config), data_sources(config.eval_data, "eval_data")

    accelerator, plan = _build_accelerator(config)
    logs = RunLogs(accelerator.is_main_process, accelerator.process_index, accelerator.num_processes)
    try:
        return _build_run(config, accelerator, plan, logs, tokenizer, init_config, sources_of_stages, eval_sources)
    except BaseException:
        logs.close()
        raise


def _build_run(
    config: PretrainConfig,
    accelerator: Accelerator,
    plan: RunPlan,
    logs: RunLogs,
    tokenizer: PreTrainedTokenizerBase,
    init_config: PreTrainedConfig | None,
    sources_of_stages: list[list[DataSource]],
    eval_sources: list[DataSource],
) -> Run:
    threads, threads_reason = cpu_thread_count(config.cpu_threads, accelerator.device, accelerator.num_processes)
    torch.set_num_threads(threads)
    folder = plan_run_folder(config)
    accelerator.wait_for_everyone()  # every process has read the folder before the main one changes it
    output_dir = folder.output_dir
    if accelerator.is_main_process:
        folder.apply()
        logs.write_to(output_dir.absolute() / "train.log")
        for note in folder.notes():
            logger.warning(note)
        config.save(output_dir)
    accelerator.wait_for_everyone()
    logger.info(
        "Pretraining on %d process(es), distributed type %s, mixed precision %s, %d CPU thread(s) per process: %s.",
        accelerator.num_processes,
        accelerator.distributed_type.value,
        accelerator.mixed_precision,
        threads,
        threads_reason,
        extra=CONSOLE,
    )
    set_seed(config.seed)

    seeds = [stage.seed for stage in plan.stages] or [config.seed]
    train_rows, eval_rows = _build_datasets(config, sources_of_stages, seeds, eval_sources, tokenizer, accelerator)
    goldfish_k = config.goldfish_k if config.goldfish else None
    collator = PackedBatchCollator(
        goldfish_k=goldfish_k,
        goldfish_h=config.goldfish_h,
        document_masking=config.document_masking,
        reset_position_ids=config.reset_position_ids,
    )
    eval_loader = None
    if eval_rows is not None:
        eval_loader = DataLoader(
            eval_rows,
            batch_size=config.per_device_batch_size,
            collate_fn=PackedBatchCollator(
                goldfish_k=None,
                document_masking=config.document_masking,
                reset_position_ids=config.reset_position_ids,
            ),
        )

    model = _build_model(config, init_config, tokenizer, accelerator.device)
    optimizer = _build_optimizer(config, model)
    scheduler = WSDSchedule(
        optimizer,
        warmup_steps=plan.warmup,
        total_steps=plan.total,
        decay_steps=plan.decay,
        min_lr_ratio=config.min_lr_ratio,
        decay_shape=config.decay_shape,
        step_position=plan.schedule_position,
        position_unit=plan.unit,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)

    metrics = MetricsFile(output_dir / METRICS_FILE_NAME, enabled=accelerator.is_main_process)
    if folder.resume:
        resumed_from = load_latest_checkpoint(accelerator, output_dir / CHECKPOINTS_DIR_NAME)
        logger.info(
            "Resumed from %s at step %d (data stage %d, %d of its rows consumed).",
            resumed_from,
            progress.step,
            progress.stage,
            progress.samples_in_stage,
            extra=CONSOLE,
        )
        metrics.truncate_after(progress.step)
        _check_resumed_data_position(progress, plan)
        _check_resumed_schedule(scheduler.scheduler, config, plan)
        _warn_about_changed_cpu_threads(progress.cpu_threads, accelerator.device)
    progress.cpu_threads = torch.get_num_threads()  # what the next checkpoints record
    if config.report_to:
        # TensorBoard writes to output_dir/apertus-pretraining/; W&B and others show the run under its folder name.
        accelerator.init_trackers(
            "apertus-pretraining", config=_flat_config(config), init_kwargs={"wandb": {"name": output_dir.name}}
        )

    unwrapped_config = accelerator.unwrap_model(model).config
    flops_per_token = training_flops_per_token(unwrapped_config, config.seq_len)
    peak_flops = config.peak_flops_per_device or peak_flops_per_device(accelerator.device)
    # Under ZeRO-3 a parameter holds only its shard; `ds_numel` is its full size.
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in accelerator.unwrap_model(model).parameters())
    logger.info(
        "Model: %s parameters, %d layers, hidden %d, vocabulary %d; %.3g GFLOPs per token (forward + backward).",
        f"{parameters:,}",
        unwrapped_config.num_hidden_layers,
        unwrapped_config.hidden_size,
        unwrapped_config.vocab_size,
        flops_per_token / 1e9,
    )
    logger.info(
        "Attention %s, chunked loss %s, xIELU %s, compiled layers %s; MFU against %s.",
        unwrapped_config._attn_implementation,
        config.chunked_loss,
        config.xielu_implementation,
        config.compile_layers,
        f"{peak_flops / 1e12:,.1f} TFLOP/s per device" if peak_flops else "no known peak (set peak_flops_per_device)",
    )
    return Run(
        config=config,
        output_dir=output_dir,
        accelerator=accelerator,
        logs=logs,
        tokenizer=tokenizer,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        plan=plan,
        train_rows=train_rows,
        data_seeds=seeds,
        collator=collator,
        eval_loader=eval_loader,
        progress=progress,
        records=StepRecords(accelerator, metrics, bool(config.report_to), flops_per_token, peak_flops),
        flops_per_token=flops_per_token,
        peak_flops=peak_flops,
    )
