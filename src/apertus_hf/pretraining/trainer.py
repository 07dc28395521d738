"""The Apertus pretraining loop on Accelerate.

One loop for one CPU process, DDP, DeepSpeed ZeRO-3 and FSDP2: the `accelerate launch --config_file ...` choice
changes the engine, never this code. `pretrain` reads top to bottom as torchtitan's trainer does: build the run
(build.py: data, model, optimizer, schedule, resume), loop {micro-batches, one optimizer step (step.py), what the
cadence makes due: log, evaluate, checkpoint, stop}, export (export.py). Publishing is the recipe's business.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .build import Run, build_run
from .checkpointing import save_checkpoint
from .config import PretrainConfig
from .export import export_model
from .step import Cadence, StageFeed, any_process, evaluate, set_accumulation, train_step

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


class StopRequest:
    """Turns SIGTERM/SIGINT into a request to save and stop at the next optimizer step.

    A second SIGINT restores the default handler, so an impatient Ctrl-C twice still kills the job. A second SIGTERM
    does not: Slurm signals every process of a job step and torchrun's agent passes on the one it got, so each worker
    of a multi-node job receives two (tests/pretraining/test_multinode.py).
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            logger.warning(
                "Received %s: saving a checkpoint after this step, then stopping.", signal.Signals(signum).name
            )
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _progress_bar(run: Run) -> tqdm:
    return tqdm(
        total=run.config.max_steps,
        initial=run.progress.step,
        disable=not (run.accelerator.is_main_process and run.config.progress_bar),
        desc="pretrain",
        dynamic_ncols=True,
    )


def _show(bar: tqdm, record: dict) -> None:
    """A logged step's loss, learning rate, throughput and MFU in the bar and train.log."""
    shown = {"loss": "train/loss", "lr": "train/lr", "tok/s": "train/tokens_per_second", "mfu": "train/mfu"}
    formats = {"loss": "{:.4f}", "lr": "{:.2e}", "tok/s": "{:,.0f}", "mfu": "{:.1%}"}
    postfix = {name: formats[name].format(record[key]) for name, key in shown.items() if key in record}
    bar.set_postfix(postfix, refresh=False)
    logger.info("step %d: %s", record["step"], postfix)


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Run (or resume) the pretraining described by `config`; see PretrainConfig for every option."""
    run = build_run(config)
    try:
        cadence = Cadence.from_config(config, evaluates=run.eval_loader is not None)
        feed = StageFeed(run)
        run.model.train()
        with StopRequest() as stop, _progress_bar(run) as bar:
            while run.progress.step < config.max_steps:
                set_accumulation(run, run.plan.micro_batches_at(run.progress.step))
                output = train_step(run, feed.batches_of_step(run.progress.step))
                step_tokens = run.tokens_of_step(run.progress.step)
                run.progress.samples_in_stage += run.plan.rows_at(run.progress.step)
                run.progress.step += 1
                run.progress.tokens_seen += step_tokens
                row_ids = torch.tensor(feed.row_ids) if config.record_row_ids else None
                run.records.add(run.progress.step, output, step_tokens, run.progress.tokens_seen, feed.epoch, row_ids)
                bar.update(1)

                due = cadence.after(run.progress.step, stop_requested=any_process(run.accelerator, stop.requested))
                if due.log:
                    _show(bar, run.records.close_window())
                if due.evaluate:
                    eval_loss = evaluate(
                        run.model, run.eval_loader, run.accelerator, config.max_eval_batches, config.chunked_loss
                    )
                    run.records.add_eval(eval_loss)
                    logger.info("step %d: eval loss %.4f", run.progress.step, eval_loss)
                if due.write_metrics:
                    run.records.write()
                if due.checkpoint:
                    folder = save_checkpoint(
                        run.accelerator, run.checkpoints_dir, run.progress.step, config.keep_checkpoints
                    )
                    logger.info("Saved checkpoint %s.", folder)
                if due.stop:
                    break

        interrupted = run.progress.step < config.max_steps
        if interrupted:
            logger.warning(
                "Stopped at step %d of %d; relaunch the same command to resume.", run.progress.step, config.max_steps
            )
        model_dir = None if interrupted else export_model(run)
        run.accelerator.end_training()
        return PretrainResult(
            output_dir=run.output_dir,
            model_dir=model_dir,
            steps=run.progress.step,
            tokens_seen=run.progress.tokens_seen,
            final_loss=run.records.last_loss,
            final_eval_loss=run.records.last_eval_loss,
            interrupted=interrupted,
            is_main_process=run.accelerator.is_main_process,
        )
    finally:
        run.close()
