"""One optimizer step, the data it eats, the held-out evaluation, and the cadence of what follows a step."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator, DistributedType

from ..data import GlobalRowSampler, GlobalRowStream
from .build import Run
from .config import PretrainConfig
from .logs import CONSOLE
from .metrics import StepOutput
from .plan import source_label

logger = logging.getLogger("apertus_hf.pretraining")


class StageFeed:
    """The micro-batches of each optimizer step, from the data stage the run plan assigns to it.

    Each stage's rows are read in their global order (data/global_rows.py) from the stage's position in `progress`
    (`samples_in_stage`, rows consumed by all processes), so a run resumed on another number of processes continues
    with exactly the rows an uninterrupted run would have read next. At a stage boundary the run switches to the next
    stage's rows (its own data seed) from their first row, as the Apertus run did at each stage switch.
    """

    def __init__(self, run: Run):
        self.run = run
        self._stage: int | None = None
        self._next_rows: Iterator[Any] | None = None
        self._next_indices: Iterator[int] | None = None
        self._stream: GlobalRowStream | None = None
        self.row_ids: list[int | None] = []
        """The indices (in the stage's rows) of the rows of the last step's micro-batches; None for a stream."""

    def _open(self, stage: int) -> None:
        run, progress = self.run, self.run.progress
        accelerator, rows = run.accelerator, run.train_rows[stage]
        position = {
            "process_index": accelerator.process_index,
            "num_processes": accelerator.num_processes,
            "micro_batch_rows": run.config.per_device_batch_size,
        }
        if run.config.streaming:
            self._stream = GlobalRowStream(rows, start=progress.samples_in_stage, **position)
            self._next_rows, self._next_indices = iter(self._stream), None
        else:
            self._stream = None
            sampler = GlobalRowSampler(len(rows), run.data_seeds[stage], progress.samples_in_stage, **position)
            self._next_rows, self._next_indices = None, iter(sampler)
        self._stage = stage

    def _micro_batch(self) -> tuple[dict[str, torch.Tensor], list[int | None]]:
        # Rows are read in this process (no DataLoader workers): reading a packed row is a cheap slice, and the
        # stream position must advance exactly as the rows are consumed.
        size = self.run.config.per_device_batch_size
        if self._next_indices is None:
            indices, rows = [None] * size, [next(self._next_rows) for _ in range(size)]
        else:
            indices, dataset = [next(self._next_indices) for _ in range(size)], self.run.train_rows[self._stage]
            # `__getitems__` (what DataLoader calls too) reads a `datasets.Dataset`'s rows in one Arrow query.
            getitems = getattr(dataset, "__getitems__", None)
            rows = getitems(indices) if getitems else [dataset[index] for index in indices]
        batch = self.run.collator(rows)
        device = self.run.accelerator.device
        return {key: value.to(device) for key, value in batch.items()}, indices

    def batches_of_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of optimizer step `step` (0-based) for this process."""
        run, progress = self.run, self.run.progress
        stage = run.plan.stage_at(step)
        if stage != self._stage:
            if stage != progress.stage:
                progress.stage, progress.samples_in_stage = stage, 0
                described = run.plan.stages[stage]
                logger.info(
                    "Data stage %r from step %d: data seed %d, %s.",
                    described.name,
                    step,
                    described.seed,
                    ", ".join(source_label(source) for source in described.data),
                    extra=CONSOLE,
                )
            self._open(stage)
        batches, self.row_ids = [], []
        for _ in range(run.plan.micro_batches_at(step)):
            batch, row_ids = self._micro_batch()
            batches.append(batch)
            self.row_ids += row_ids
        return batches

    @property
    def epoch(self) -> int:
        """The epoch of the current stage's rows that the run has reached."""
        if self._stream is not None:
            return self._stream.epoch
        return self.run.progress.samples_in_stage // len(self.run.train_rows[self.run.progress.stage])


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    # The model shifts labels by one: the first label of each row is never a target.
    return (labels[:, 1:] != -100).sum()


def set_accumulation(run: Run, accumulation: int) -> int:
    """Follow the batch ramp: accelerate scales the loss by `accumulation`, DeepSpeed also steps by it."""
    accelerator = run.accelerator
    if accelerator.gradient_accumulation_steps != accumulation:
        accelerator.gradient_accumulation_steps = accumulation
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            run.model.set_train_batch_size(run.config.per_device_batch_size * accumulation * accelerator.num_processes)
        logger.info("Batch ramp: %d micro-batches per optimizer step from now on.", accumulation)
    return accumulation


def loss_options(chunked_loss: bool) -> dict[str, bool]:
    """`skip_logits` only for the chunked loss: a stock transformers model (model_type other than apertus) never gets
    it. The batch's `seq_idx` may reach a stock model: its attention functions take unknown keyword arguments and
    leave them unused (its documents come from the restarting position ids)."""
    return {"skip_logits": True} if chunked_loss else {}


def train_step(run: Run, batches: list[dict[str, torch.Tensor]]) -> StepOutput:
    """One optimizer step over `batches`, the micro-batches it accumulates; nothing is read back from the device.

    The loss of a step follows `loss_averaging`. per_token: the mean over all its kept targets, on every process and
    micro-batch, as in one large batch; each micro-batch contributes its sum / global count. per_micro_batch
    (Megatron without --calculate-per-token-loss): each micro-batch's mean over its own kept targets (0 when it has
    none), averaged over the micro-batches and processes. DDP/DeepSpeed average gradients over processes and
    accelerator.backward over micro-batches; the `scale` of each micro-batch's loss turns that average into the
    gradient of the step's loss, which is also the loss logged.
    """
    accelerator, model, accumulation = run.accelerator, run.model, len(batches)
    averaged_over = accelerator.num_processes * accumulation
    per_token = run.config.loss_averaging == "per_token"
    if per_token:
        local_targets = sum(count_targets(batch["labels"]) for batch in batches)
        global_targets = accelerator.reduce(local_targets.detach().clone(), reduction="sum").clamp(min=1)
    step_loss = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(batches):
        is_last = index == accumulation - 1
        if per_token:
            # Its sum over the step's targets, scaled back up from the averaging: together, the step's mean.
            num_items_in_batch, scale = global_targets, averaged_over
        else:
            # Its own mean: the averaging makes the step's loss the mean of the micro-batch means.
            num_items_in_batch, scale = count_targets(batch["labels"]).clamp(min=1), 1
        with accelerator.no_sync(model) if not is_last else contextlib.nullcontext():
            # Keep only the loss: holding the model output would keep the logits alive through backward.
            loss = model(
                **batch, **loss_options(run.config.chunked_loss), use_cache=False, num_items_in_batch=num_items_in_batch
            ).loss
            # DeepSpeed's engine steps its optimizer after every backward that accelerate marks as syncing gradients
            # (accelerate's `accumulate` would mark it from a step counter): only the step's last micro-batch is.
            accelerator.sync_gradients = is_last
            accelerator.backward(loss * scale)
        # This process's share of the step's loss: what the averaging leaves of loss * scale.
        step_loss += loss.detach() if per_token else loss.detach() / averaged_over
    grad_norm = None
    if run.config.max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.config.max_grad_norm)
    learning_rate = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepOutput(loss=step_loss, grad_norm=grad_norm, learning_rate=learning_rate)


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
        outputs = model(**batch, **loss_options(chunked_loss), use_cache=False, num_items_in_batch=1)
        loss_sum += outputs.loss.double()
        targets += count_targets(batch["labels"])
    model.train()
    loss_sum, targets = accelerator.reduce(torch.stack([loss_sum, targets]), reduction="sum")
    return (loss_sum / targets.clamp(min=1)).item()


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on any (a signal may reach only some ranks)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), reduction="sum").item() > 0


@dataclass(frozen=True)
class StepActions:
    """What is due after an optimizer step."""

    log: bool
    evaluate: bool
    checkpoint: bool
    stop: bool

    @property
    def write_metrics(self) -> bool:
        """Whether the step records so far are written: before a log line, with an evaluation, and before a
        checkpoint or a stop, so that metrics.jsonl holds every step a checkpoint covers."""
        return self.log or self.evaluate or self.checkpoint or self.stop


@dataclass(frozen=True)
class Cadence:
    """Decides, from the step number, what follows an optimizer step (PretrainConfig's *_steps options)."""

    max_steps: int
    logging_steps: int
    eval_steps: int
    checkpoint_steps: int
    stop_at_step: int | None
    evaluates: bool

    @classmethod
    def from_config(cls, config: PretrainConfig, evaluates: bool) -> Cadence:
        return cls(
            max_steps=config.max_steps,
            logging_steps=config.logging_steps,
            eval_steps=config.eval_steps,
            checkpoint_steps=config.checkpoint_steps,
            stop_at_step=config.stop_at_step,
            evaluates=evaluates,
        )

    def after(self, step: int, stop_requested: bool) -> StepActions:
        """The actions due after optimizer step `step` (1-based); `stop_requested`: a signal asked to stop."""
        last = step == self.max_steps
        stop = stop_requested or step == self.stop_at_step
        return StepActions(
            log=last or step % self.logging_steps == 0,
            evaluate=self.evaluates and (last or (self.eval_steps > 0 and step % self.eval_steps == 0)),
            checkpoint=stop or (self.checkpoint_steps > 0 and step % self.checkpoint_steps == 0),
            stop=stop,
        )
