"""Pretraining train-step throughput and peak memory: our loop (`apertus_hf.pretraining.pretrain`) against the
`transformers` Trainer with the stock `transformers.ApertusForCausalLM`.

Both train the same model shape on the same packed rows of the shipped corpus and tokenizer, with the same collator
(`PackedBatchCollator`: input_ids, position_ids, labels, no attention mask; Goldfish on in both or off in both), the
same per-device batch, gradient clipping at the same norm, AdamW in both by default (so the comparison measures
the loop and the model, not the optimizer; `--our-optimizer ademamix` runs ours with the Apertus optimizer), no
evaluation, no checkpoints, minimal logging, no DataLoader workers; float32 on CPU, bf16 mixed precision on GPU.

    python benchmarks/train_step.py                       # CPU (or GPU when CUDA is present) defaults
    python benchmarks/train_step.py --steps 20 --warmup 5 --seq-len 2048 --batch-size 8 --override num_hidden_layers=8

Timing: the steps after the first `--warmup` ones, `--steps` of them. For the Trainer, a callback takes the wall time
at the end of optimizer step `warmup` and of step `warmup + steps`. Ours logs with `logging_steps = warmup`, so its
throughput windows (metrics.jsonl `train/tokens_per_second`) tile exactly those steps; the time is their sum. Both
time complete steps (data, forward, backward, clipping, optimizer), and count rows x seq_len tokens per step.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` of the whole run. On CPU, the peak resident set size of the
measuring process (`getrusage`), which also holds the libraries (both processes import the same modules first), the
tokenizer and the packed data; its growth over the peak after those imports is printed for reference. Peak RSS
also depends on how glibc's malloc reuses freed memory, which varies by up to a few hundred MiB from run to run; with
`MALLOC_MMAP_THRESHOLD_=65536` in the environment every large buffer is returned to the OS when freed, so peak RSS
follows live tensor memory to within a MiB (the steps then run slower: compare its memory, not its tokens/s).
Each measurement runs in its own spawned process, alternating which loop goes first; the medians are reported.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import common

LOOPS = ("ours", "trainer")
# Goldfish settings of both loops (PretrainConfig's defaults, the Apertus values).
GOLDFISH_K = 50
GOLDFISH_H = 50


# Everything either loop uses, imported first so that both measuring processes start from the same resident set.
LIBRARIES = ("datasets", "transformers.trainer", "apertus_hf.pretraining")


def build_rows(args: argparse.Namespace, tokenizer):
    """The packed training rows, built the way `pretrain` builds them when nothing is held out for evaluation."""
    from apertus_hf.data import DataSource, load_documents, tokenize_and_pack

    documents = load_documents([DataSource(args.data)], seed=args.seed)
    return tokenize_and_pack(documents, tokenizer, args.seq_len)


def build_model_config(args: argparse.Namespace, tokenizer):
    """The ApertusConfig `pretrain` builds for `--preset` and `--override`."""
    from apertus_hf.pretraining import pretraining_model_config

    return pretraining_model_config(args.preset, args.override, tokenizer, args.seq_len)


def measure_ours(args: argparse.Namespace, results: multiprocessing.Queue) -> None:
    """Steady-state throughput and peak memory of `apertus_hf.pretraining.pretrain`; runs in a fresh process."""
    import_peak = common.peak_rss_after_imports(LIBRARIES)
    from apertus_hf.pretraining import PretrainConfig, pretrain, read_metrics

    if args.device == "cuda":
        os.environ["ACCELERATE_MIXED_PRECISION"] = args.mixed_precision
    with tempfile.TemporaryDirectory() as output_dir:
        config = PretrainConfig(
            output_dir=output_dir,
            seed=args.seed,
            resume=False,
            model_preset=args.preset,
            model_overrides=args.override,
            attn_implementation=args.attn_implementation,
            tokenizer=args.tokenizer,
            data=[{"path": args.data}],
            eval_documents=0,
            eval_steps=0,
            checkpoint_steps=0,
            seq_len=args.seq_len,
            goldfish=args.goldfish,
            goldfish_k=GOLDFISH_K,
            goldfish_h=GOLDFISH_H,
            per_device_batch_size=args.batch_size,
            optimizer=args.our_optimizer,
            learning_rate=args.learning_rate,
            max_grad_norm=args.max_grad_norm,
            max_steps=args.warmup + args.steps,
            # The schedule does not change the step's work; a cooldown over the whole run is valid for any length.
            warmup_steps=0,
            decay_fraction=1.0,
            logging_steps=args.warmup,
            progress_bar=False,
        )
        result = pretrain(config)
        records = read_metrics(Path(output_dir, "metrics.jsonl"))
    peak_memory = common.peak_memory_bytes(args.device)
    if result.steps != config.max_steps:
        raise RuntimeError(f"our loop stopped at step {result.steps} of {config.max_steps}")
    # Each throughput window runs from the previous log to this one; the windows after step `warmup` tile the
    # timed steps exactly.
    elapsed = 0.0
    tokens_at_last_log = 0
    for record in records:
        if "train/tokens_per_second" not in record:
            continue
        if record["step"] > args.warmup:
            elapsed += (record["train/tokens"] - tokens_at_last_log) / record["train/tokens_per_second"]
        tokens_at_last_log = record["train/tokens"]
    results.put(
        {
            "tokens_per_second": args.steps * args.batch_size * args.seq_len / elapsed,
            "peak_memory_bytes": peak_memory,
            "import_peak_rss_bytes": import_peak,
            "mean_loss": statistics.fmean(record["train/loss"] for record in records),
        }
    )


def measure_trainer(args: argparse.Namespace, results: multiprocessing.Queue) -> None:
    """Steady-state throughput and peak memory of `transformers.Trainer` with the stock Apertus; fresh process."""
    import_peak = common.peak_rss_after_imports(LIBRARIES)
    import transformers
    from transformers import Trainer, TrainingArguments

    from apertus_hf.data import PackedBatchCollator
    from apertus_hf.tokenization import load_tokenizer

    transformers.set_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    rows = build_rows(args, tokenizer)
    stock_config = transformers.ApertusConfig(**build_model_config(args, tokenizer).to_diff_dict())
    stock_config._attn_implementation = args.attn_implementation
    model = transformers.ApertusForCausalLM(stock_config)
    timer = common.make_step_timer(args.device, args.warmup, args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            seed=args.seed,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.warmup + args.steps,
            optim="adamw_torch",
            learning_rate=args.learning_rate,
            weight_decay=0.1,
            max_grad_norm=args.max_grad_norm,
            lr_scheduler_type="constant",
            bf16=args.device == "cuda" and args.mixed_precision == "bf16",
            use_cpu=args.device == "cpu",
            eval_strategy="no",
            save_strategy="no",
            logging_steps=args.warmup + args.steps + 1,
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_drop_last=True,
            remove_unused_columns=False,
        )
        collator = PackedBatchCollator(goldfish_k=GOLDFISH_K if args.goldfish else None, goldfish_h=GOLDFISH_H)
        trainer = Trainer(
            model=model, args=training_args, train_dataset=rows, data_collator=collator, callbacks=[timer]
        )
        output = trainer.train()
    peak_memory = common.peak_memory_bytes(args.device)
    elapsed = timer.elapsed_seconds()
    results.put(
        {
            "tokens_per_second": args.steps * args.batch_size * args.seq_len / elapsed,
            "peak_memory_bytes": peak_memory,
            "import_peak_rss_bytes": import_peak,
            "mean_loss": output.training_loss,
        }
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    has_cuda = torch.cuda.is_available()
    parser = common.model_benchmark_parser(__doc__)
    parser.add_argument("--seq-len", type=int, default=2048 if has_cuda else 256)
    parser.add_argument("--batch-size", type=int, default=8 if has_cuda else 16, help="packed rows per step")
    parser.add_argument("--steps", type=int, default=30 if has_cuda else 8, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5 if has_cuda else 3, help="untimed optimizer steps first")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved measurements of each loop")
    parser.add_argument("--our-optimizer", choices=("adamw", "ademamix"), default="adamw")
    parser.add_argument("--no-goldfish", dest="goldfish", action="store_false", help="Goldfish off in both loops")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--mixed-precision", choices=("bf16", "no"), default="bf16", help="on GPU only")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--max-grad-norm", type=float, default=0.1)
    common.add_input_output_arguments(parser)
    args = parser.parse_args(argv)
    return common.finish_args(parser, args, ("seq_len", "batch_size", "steps", "warmup", "rounds"), has_cuda)


def measure_isolated(loop: str, args: argparse.Namespace) -> dict:
    """One measurement of `loop` in its own spawned process; with `--json -` its prints go to stderr."""
    target = measure_ours if loop == "ours" else measure_trainer
    return common.run_isolated(loop, target, (args,), stdout_to_stderr=args.json == "-")


def describe_round(result: dict) -> str:
    return (
        f"{result['tokens_per_second']:9.1f} tokens/s, "
        f"peak memory {result['peak_memory_bytes'] / 2**20:8.1f} MiB, mean loss {result['mean_loss']:.4f}"
    )


def summarize(rounds: dict[str, list[dict]], args: argparse.Namespace, device_name: str) -> dict:
    summary = {}
    for loop, results in rounds.items():
        summary[loop] = {
            "tokens_per_second": common.median_of(results, "tokens_per_second"),
            "peak_memory_mib": common.median_of(results, "peak_memory_bytes") / 2**20,
            "mean_loss": common.median_of(results, "mean_loss"),
            "rounds": results,
        }
        if args.device == "cpu":
            summary[loop]["peak_rss_growth_over_imports_mib"] = common.median_rss_growth_mib(results)
    summary["speed_ratio"] = summary["ours"]["tokens_per_second"] / summary["trainer"]["tokens_per_second"]
    summary["memory_ratio"] = summary["ours"]["peak_memory_mib"] / summary["trainer"]["peak_memory_mib"]
    summary["device"] = device_name
    summary["memory_measure"] = (
        "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS of the measuring process"
    )
    return summary


def print_table(summary: dict, args: argparse.Namespace) -> None:
    memory_column = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    header = f"{'loop':<34} {'tokens/s':>10} {memory_column:>14}"
    if args.device == "cpu":
        header += f" {'RSS growth MiB':>15}"
    print(header + f" {'mean loss':>10}")
    names = {"ours": f"ours (pretrain, {args.our_optimizer})", "trainer": "transformers Trainer (adamw_torch)"}
    for loop in LOOPS:
        row = summary[loop]
        line = f"{names[loop]:<34} {row['tokens_per_second']:10.1f} {row['peak_memory_mib']:14.1f}"
        if args.device == "cpu":
            line += f" {row['peak_rss_growth_over_imports_mib']:15.1f}"
        print(line + f" {row['mean_loss']:10.4f}")
    print(f"tokens/s ratio (ours / Trainer): {summary['speed_ratio']:.2f}x")
    print(f"peak memory ratio (ours / Trainer): {summary['memory_ratio']:.2f}x")
    if args.device == "cpu":
        print(
            "Peak memory on CPU is the peak RSS of each measuring process: libraries, tokenizer and packed data "
            "included. 'RSS growth' is that peak minus the peak after importing the same libraries in both."
        )
    print(
        "Mean loss is a sanity check only: the two loops initialise the weights and order the rows differently, and "
        "the Trainer's loss is its running mean over all steps."
    )


def main(argv: list[str] | None = None) -> dict:
    common.go_offline()
    args = parse_args(argv)
    device_name = common.device_description(args.device)
    log = common.log_stream(args)
    print(f"device: {device_name}; torch {torch.__version__}; settings: {vars(args)}", file=log, flush=True)
    rounds = common.measure_interleaved(
        LOOPS, args.rounds, lambda loop: measure_isolated(loop, args), describe_round, log
    )
    summary = summarize(rounds, args, device_name)
    common.report(summary, args, print_table)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
