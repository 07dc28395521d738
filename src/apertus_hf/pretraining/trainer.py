"""The Apertus pretraining loop on Accelerate.

One loop for one CPU process, DDP, DeepSpeed ZeRO-3 and FSDP2: the `accelerate launch --config_file ...` choice
changes the engine, never this code. It reads top to bottom: build (data, model, optimizer, schedule), resume, loop
{micro-batches, forward, backward, clip, step, log, evaluate, checkpoint}, export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

from ..configuration_apertus import ApertusConfig
from ..data import DataSource, LoadStats, PackedBatchCollator, load_documents, tokenize_and_pack
from ..optim import AdEMAMix, WSDSchedule, build_parameter_groups
from ..runtime import apply_speed_options, resolve_attn_implementation
from ..tokenization import load_tokenizer
from .checkpointing import TrainingProgress, load_latest_checkpoint, save_checkpoint
from .config import PretrainConfig
from .metrics import MetricsFile, peak_flops_per_device, training_flops_per_token

logger = logging.getLogger("apertus_hf.pretraining")


@dataclass
class PretrainResult:
    """What a finished (or interrupted) run produced."""

    output_dir: Path
    model_dir: Path | None
    steps: int
    tokens_seen: int
    final_loss: float | None
    final_eval_loss: float | None
    interrupted: bool
    is_main_process: bool


class _StopRequest:
    """Turns SIGTERM/SIGINT into a request to save and stop at the next optimizer step.

    A second signal restores the default handler, so an impatient Ctrl-C twice still kills the job.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> _StopRequest:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        logger.warning("Received %s: saving a checkpoint after this step, then stopping.", signal.Signals(signum).name)
        self.requested = True
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _build_accelerator(config: PretrainConfig) -> Accelerator:
    handlers = []
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available() and launched_processes > 1:
        # Multi-process runs on CPU (DDP or DeepSpeed) communicate through gloo; DeepSpeed would otherwise pick a
        # backend that this torch build lacks and each rank would believe it runs alone.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_at(0),
        log_with=config.report_to or None,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=config.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        kwargs_handlers=handlers,
        # The WSD schedule counts optimizer steps; by default accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
    )
    if launched_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        # E.g. a multi-GPU config on a machine without GPUs: each process would train alone into the same run folder.
        raise RuntimeError(
            f"{launched_processes} processes were launched, but accelerate set up no distributed training "
            "(distributed type NO): they would train unsynchronised into one run folder. Without GPUs, launch DDP "
            "with ACCELERATE_USE_CPU=1 (or a DeepSpeed config); see the README's Pretraining section."
        )
    deepspeed_plugin = accelerator.state.deepspeed_plugin
    if deepspeed_plugin is not None:
        # The recipe, not the engine's config file, owns clipping and the batch shape.
        ds_config = deepspeed_plugin.deepspeed_config
        ds_config["gradient_clipping"] = config.max_grad_norm
        ds_config["gradient_accumulation_steps"] = config.gradient_accumulation_at(0)
        ds_config["train_micro_batch_size_per_gpu"] = config.per_device_batch_size
        ds_config["train_batch_size"] = (
            config.per_device_batch_size * config.gradient_accumulation_at(0) * accelerator.num_processes
        )
    return accelerator


def _setup_logging(config: PretrainConfig, accelerator: Accelerator) -> None:
    """INFO on the main process, warnings only elsewhere; the main process also writes output_dir/train.log."""
    package_logger = logging.getLogger("apertus_hf")
    package_logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    if not accelerator.is_main_process:
        return
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    log_path = os.path.abspath(Path(config.output_dir, "train.log"))
    if not any(getattr(handler, "baseFilename", None) == log_path for handler in package_logger.handlers):
        file_handler = logging.FileHandler(log_path)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(file_handler)


def _sources(entries: list[dict[str, Any]], option: str) -> list[DataSource]:
    fields = {field.name for field in dataclasses.fields(DataSource)}
    sources = []
    for entry in entries:
        unknown = set(entry) - fields
        if unknown:
            raise ValueError(
                f"{option} entry {entry!r} has unknown keys {sorted(unknown)}; valid keys: {sorted(fields)}."
            )
        sources.append(DataSource(**entry))
    return sources


def _build_datasets(config: PretrainConfig, tokenizer: PreTrainedTokenizerBase, accelerator: Accelerator):
    """Packed training rows and (possibly None) packed evaluation rows."""
    stats = LoadStats()  # skip counts of on_bad_record="skip" (for a stream they are logged as it is read)
    # The main process tokenizes first and fills the `datasets` cache; the others then read it instead of racing.
    with accelerator.main_process_first():
        documents = load_documents(
            _sources(config.data, "data"),
            streaming=config.streaming,
            seed=config.seed,
            on_bad_record=config.on_bad_record,
            stats=stats,
        )
        eval_documents = None
        if config.eval_data:
            eval_documents = load_documents(
                _sources(config.eval_data, "eval_data"),
                streaming=config.streaming,
                seed=config.seed,
                on_bad_record=config.on_bad_record,
            )
        elif config.eval_documents:
            if config.streaming:
                eval_documents = documents.take(config.eval_documents)
                documents = documents.skip(config.eval_documents)
            else:
                if config.eval_documents >= len(documents):
                    raise ValueError(
                        f"eval_documents={config.eval_documents} holds out the whole corpus ({len(documents)} "
                        "documents); lower it or give eval_data."
                    )
                split = documents.train_test_split(test_size=config.eval_documents, seed=config.seed)
                documents, eval_documents = split["train"], split["test"]
        if config.streaming:
            documents = documents.shuffle(seed=config.seed, buffer_size=10_000)
        train_rows = tokenize_and_pack(documents, tokenizer, config.seq_len, num_proc=config.tokenization_processes)
        eval_rows = None
        if eval_documents is not None:
            eval_rows = tokenize_and_pack(
                eval_documents, tokenizer, config.seq_len, num_proc=config.tokenization_processes
            )
    if stats.total_skipped:
        logger.warning("Skipped while loading the data:\n%s", stats.summary())
    return train_rows, eval_rows


def pretraining_model_config(
    preset: str, overrides: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> ApertusConfig:
    """The ApertusConfig of a fresh model: `preset` plus `overrides`, with the vocabulary and special ids of
    `tokenizer`, and room for rows of `seq_len` positions."""
    preset_positions = ApertusConfig.from_preset(preset).max_position_embeddings
    return ApertusConfig.from_preset(
        preset,
        **{
            **overrides,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "max_position_embeddings": max(overrides.get("max_position_embeddings", preset_positions), seq_len),
        },
    )


def _build_model(config: PretrainConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> torch.nn.Module:
    attn_implementation = resolve_attn_implementation(config.attn_implementation, device)
    if config.init_from:
        model = AutoModelForCausalLM.from_pretrained(
            config.init_from, dtype=torch.float32, attn_implementation=attn_implementation
        )
    else:
        model_config = pretraining_model_config(config.model_preset, config.model_overrides, tokenizer, config.seq_len)
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


def _micro_batches(loader, accelerator: Accelerator, progress: TrainingProgress) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches forever, epoch after epoch, starting at the position recorded in `progress`.

    `progress` is updated as batches are consumed, so a checkpoint taken between two optimizer steps records
    exactly where the next micro-batch comes from.
    """
    while True:
        loader.set_epoch(progress.epoch)
        skipped = progress.micro_batches_in_epoch
        epoch_loader = accelerator.skip_first_batches(loader, skipped) if skipped else loader
        produced = False
        for batch in epoch_loader:
            produced = True
            progress.micro_batches_in_epoch += 1
            yield {key: value.to(accelerator.device) for key, value in batch.items()}
        if not produced and not skipped:
            raise ValueError(
                "The training data yields no batch: fewer packed rows than per_device_batch_size x processes. "
                "Add data or lower per_device_batch_size / seq_len."
            )
        progress.epoch += 1
        progress.micro_batches_in_epoch = 0


def _count_targets(labels: torch.Tensor) -> torch.Tensor:
    # The model shifts labels by one: the first label of each row is never a target.
    return (labels[:, 1:] != -100).sum()


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, max_batches: int | None, chunked_loss: bool = True) -> float:
    """Mean next-token loss over the held-out rows (no Goldfish drops), averaged over every process.

    `chunked_loss`: compute it without the full logits (`skip_logits`), as in training.
    """
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    targets = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        # num_items_in_batch=1 makes the model's loss the sum over targets instead of the mean.
        outputs = model(**batch, use_cache=False, num_items_in_batch=1, skip_logits=chunked_loss)
        loss_sum += outputs.loss.double()
        targets += _count_targets(batch["labels"])
    model.train()
    loss_sum, targets = accelerator.reduce(torch.stack([loss_sum, targets]), reduction="sum")
    return (loss_sum / targets.clamp(min=1)).item()


RECIPE_FILE_NAME = "pretrain_config.yaml"


def _write_recipe(config: PretrainConfig, folder: Path) -> None:
    """The resolved options of the run, loadable again with `--config` (and read by the model card)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECIPE_FILE_NAME).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def _export(model, tokenizer, config: PretrainConfig, accelerator: Accelerator, model_dir: Path) -> None:
    """A plain `transformers` folder (safetensors, config, generation config, tokenizer, the recipe); consolidated
    under ZeRO-3 (the accelerate config must set `zero3_save_16bit_model: true`)."""
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        model_dir, state_dict=state_dict, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(model_dir)
        _write_recipe(config, model_dir)
    accelerator.wait_for_everyone()


def _set_accumulation(accelerator: Accelerator, model, config: PretrainConfig, accumulation: int) -> None:
    """Follow the batch ramp: accelerate scales the loss by it, DeepSpeed also steps by it."""
    if accelerator.gradient_accumulation_steps == accumulation:
        return
    accelerator.gradient_accumulation_steps = accumulation
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.set_train_batch_size(config.per_device_batch_size * accumulation * accelerator.num_processes)
    logger.info("Batch ramp: %d micro-batches per optimizer step from now on.", accumulation)


def _warn_about_changed_schedule(scheduler: WSDSchedule, config: PretrainConfig) -> None:
    """A checkpoint restores the schedule it was saved with; say so when the recipe now asks for another."""
    saved = (scheduler.warmup_steps, scheduler.total_steps, scheduler.decay_shape, scheduler.min_lr_ratio)
    wanted = (config.warmup_steps, config.max_steps, config.decay_shape, config.min_lr_ratio)
    if saved != wanted:
        logger.warning(
            "The checkpoint's learning-rate schedule (warmup, total steps, shape, min ratio) = %s differs from the "
            "recipe's %s; the checkpoint's is kept, so that the resumed run continues the saved one. Start a new "
            "output_dir with init_from=<exported model> to train on with another schedule.",
            saved,
            wanted,
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


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on any (a signal may reach only some ranks)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), reduction="sum").item() > 0


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    shown = {"loss": "train/loss", "lr": "train/lr", "tok/s": "train/tokens_per_second", "mfu": "train/mfu"}
    formats = {"loss": "{:.4f}", "lr": "{:.2e}", "tok/s": "{:,.0f}", "mfu": "{:.1%}"}
    return {name: formats[name].format(record[key]) for name, key in shown.items() if key in record}


def _flat_config(config: PretrainConfig) -> dict[str, Any]:
    """The config as tracker hyperparameters, which must be scalars."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
        for key, value in dataclasses.asdict(config).items()
    }


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Run (or resume) the pretraining described by `config`; see PretrainConfig for every option."""
    accelerator = _build_accelerator(config)
    _setup_logging(config, accelerator)
    if accelerator.is_main_process:
        _write_recipe(config, Path(config.output_dir))
    output_dir = Path(config.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    logger.info(
        "Pretraining on %d process(es), distributed type %s, mixed precision %s, %d CPU thread(s) per process.",
        accelerator.num_processes,
        accelerator.distributed_type.value,
        accelerator.mixed_precision,
        torch.get_num_threads(),
    )
    set_seed(config.seed)

    tokenizer = load_tokenizer(config.tokenizer)
    train_rows, eval_rows = _build_datasets(config, tokenizer, accelerator)
    collator = PackedBatchCollator(
        goldfish_k=config.goldfish_k if config.goldfish else None, goldfish_h=config.goldfish_h
    )
    eval_collator = PackedBatchCollator(goldfish_k=None)
    train_loader = DataLoader(
        train_rows,
        batch_size=config.per_device_batch_size,
        shuffle=not config.streaming,
        drop_last=True,
        collate_fn=collator,
    )
    eval_loader = None
    if eval_rows is not None:
        eval_loader = DataLoader(eval_rows, batch_size=config.per_device_batch_size, collate_fn=eval_collator)

    model = _build_model(config, tokenizer, accelerator.device)
    optimizer = _build_optimizer(config, model)
    scheduler = WSDSchedule(
        optimizer,
        warmup_steps=config.warmup_steps,
        total_steps=config.max_steps,
        decay_fraction=config.decay_fraction,
        min_lr_ratio=config.min_lr_ratio,
        decay_shape=config.decay_shape,
    )
    model, optimizer, scheduler, train_loader = accelerator.prepare(model, optimizer, scheduler, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)

    metrics = MetricsFile(output_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    if config.resume:
        resumed_from = load_latest_checkpoint(accelerator, checkpoints_dir)
        if resumed_from is not None:
            logger.info(
                "Resumed from %s at step %d (epoch %d, micro-batch %d).",
                resumed_from,
                progress.step,
                progress.epoch,
                progress.micro_batches_in_epoch,
            )
            metrics.truncate_after(progress.step)
            _warn_about_changed_schedule(scheduler.scheduler, config)
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
    tokens_per_micro_batch = config.per_device_batch_size * config.seq_len * accelerator.num_processes
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

    batches = _micro_batches(train_loader, accelerator, progress)
    bar = tqdm(
        total=config.max_steps,
        initial=progress.step,
        disable=not (accelerator.is_main_process and config.progress_bar),
        desc="pretrain",
        dynamic_ncols=True,
    )
    model.train()
    last_loss = last_eval_loss = None
    window_start, window_tokens = time.perf_counter(), 0
    with _StopRequest() as stop:
        while progress.step < config.max_steps:
            accumulation = config.gradient_accumulation_at(progress.step)
            _set_accumulation(accelerator, model, config, accumulation)
            micro_batches = [next(batches) for _ in range(accumulation)]
            local_targets = sum(_count_targets(batch["labels"]) for batch in micro_batches)
            # The loss of a step is the mean over all its kept targets, on every process and micro-batch, as in one
            # large batch. Each micro-batch contributes its sum / global count; the factors undo the averaging that
            # DDP/DeepSpeed (over processes) and accelerator.backward (over micro-batches) apply to gradients.
            global_targets = accelerator.reduce(local_targets.detach().clone(), reduction="sum").clamp(min=1)
            step_loss = torch.zeros((), device=accelerator.device)
            for index, batch in enumerate(micro_batches):
                is_last = index == accumulation - 1
                with accelerator.no_sync(model) if not is_last else contextlib.nullcontext():
                    # Keep only the loss: holding the model output would keep the logits alive through backward.
                    loss = model(
                        **batch, use_cache=False, num_items_in_batch=global_targets, skip_logits=config.chunked_loss
                    ).loss
                    accelerator.backward(loss * accelerator.num_processes * accumulation)
                step_loss += loss.detach()
            grad_norm = None
            if config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            progress.step += 1
            step_tokens = tokens_per_micro_batch * accumulation
            progress.tokens_seen += step_tokens
            window_tokens += step_tokens
            last_loss = accelerator.reduce(step_loss, reduction="sum").item()
            record = {
                "step": progress.step,
                "train/loss": last_loss,
                "train/lr": learning_rate,
                "train/tokens": progress.tokens_seen,
                "train/epoch": progress.epoch,
            }
            if grad_norm is not None:
                record["train/grad_norm"] = float(grad_norm)
            if progress.step % config.logging_steps == 0 or progress.step == config.max_steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_second = window_tokens / elapsed
                record["train/tokens_per_second"] = tokens_per_second
                if peak_flops:
                    record["train/mfu"] = tokens_per_second * flops_per_token / (peak_flops * accelerator.num_processes)
                window_start, window_tokens = time.perf_counter(), 0
                bar.set_postfix(_postfix(record), refresh=False)
                logger.info("step %d: %s", progress.step, _postfix(record))

            run_eval = eval_loader is not None and (
                progress.step == config.max_steps or (config.eval_steps and progress.step % config.eval_steps == 0)
            )
            if run_eval:
                last_eval_loss = evaluate(model, eval_loader, accelerator, config.max_eval_batches, config.chunked_loss)
                record["eval/loss"] = last_eval_loss
                record["eval/perplexity"] = math.exp(min(last_eval_loss, 50.0))
                logger.info("step %d: eval loss %.4f", progress.step, last_eval_loss)
            metrics.write(record)
            if config.report_to:
                accelerator.log({key: value for key, value in record.items() if key != "step"}, step=progress.step)
            bar.update(1)

            stop_now = _any_process(accelerator, stop.requested) or progress.step == config.stop_at_step
            if stop_now or (config.checkpoint_steps and progress.step % config.checkpoint_steps == 0):
                folder = save_checkpoint(accelerator, checkpoints_dir, progress.step, config.keep_checkpoints)
                logger.info("Saved checkpoint %s.", folder)
            if stop_now:
                break
    bar.close()

    interrupted = progress.step < config.max_steps
    model_dir = None
    if not interrupted:
        model_dir = output_dir / "model"
        _export(model, tokenizer, config, accelerator, model_dir)
        logger.info("Exported the model to %s.", model_dir)
        if config.push_to_hub and accelerator.is_main_process:
            # Imported here: apertus_hf.hub reads the recipe file name from this module.
            from ..hub import publish

            published = publish(model_dir, config.push_to_hub, private=config.hub_private)
            logger.info("Published %s to the Hub: %s", model_dir, published.commit_url)
        accelerator.wait_for_everyone()
    else:
        logger.warning(
            "Stopped at step %d of %d; relaunch the same command to resume.", progress.step, config.max_steps
        )
    accelerator.end_training()
    return PretrainResult(
        output_dir=output_dir,
        model_dir=model_dir,
        steps=progress.step,
        tokens_seen=progress.tokens_seen,
        final_loss=last_loss,
        final_eval_loss=last_eval_loss,
        interrupted=interrupted,
        is_main_process=accelerator.is_main_process,
    )
