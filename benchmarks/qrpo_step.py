"""Preference-training step time and peak memory: `apertus_hf.trainers.QRPOTrainer` against TRL's `DPOTrainer`.

Three configurations train the same model (an `apertus_hf.ApertusForCausalLM` of `--preset` with `--override`,
vocabulary from the shipped tokenizer, the same seed and so the same initial weights) on the same pairs:

- `qrpo`: `QRPOTrainer` with its defaults. Reference log-probs are computed once in `__init__` (by the initial
  policy), no reference model is kept, and each step is one forward/backward over the 2B completions of B pairs.
- `dpo`: `DPOTrainer` with its defaults: a reference model is kept in memory and each step adds a reference forward
  (no grad) over the same 2B completions. TRL builds that reference by loading the policy's path again; a freshly
  built model has no path, so the benchmark hands it `ref_model=` a copy of the initial model, which is the same thing.
- `dpo_precomputed`: `DPOTrainer` with `precompute_ref_log_probs=True`: reference log-probs once before training, no
  reference model in memory, one forward/backward per step, like QRPO. This is the like-for-like comparison.

    python benchmarks/qrpo_step.py                        # CPU (or GPU when CUDA is present) defaults
    python benchmarks/qrpo_step.py --prompt-tokens 512 --completion-tokens 512 --batch-size 16 \\
        --override num_hidden_layers=8 --override hidden_size=512

Pairs: deterministic, from the shipped corpus (`data/corpus/*.jsonl`, documents in a seeded order). Each pair is a
window of a document: the prompt is ~`--prompt-tokens` tokens of text, `chosen` the ~`--completion-tokens` tokens that
follow it and `rejected` the ~`--completion-tokens` tokens after those (a different continuation), all plain text.
Rewards and the 8 reference rewards per prompt are synthetic and fixed by the seed (QRPO reads them; they change no
amount of work). DPO gets the same rows with those columns removed. Both trainers tokenize plain-text rows the same
way (prompt, then prompt + completion + EOS), which the benchmark checks: every configuration must see the same
number of tokens. `max_length` is the longest tokenized row, so nothing is truncated.

Training arguments, the same in all three: the per-device batch (`--batch-size` pairs, so 2x completions per
forward), AdamW (`adamw_torch`), the same learning rate, constant schedule, no weight decay, gradient clipping at 1.0,
activation checkpointing off (TRL's configs default it on; it is set off explicitly in both), no evaluation, no
saving, no logging inside the timed steps, `report_to="none"`, no DataLoader workers; float32 on CPU (`use_cpu`),
bf16 mixed precision on GPU. The reference pass of `qrpo` and `dpo_precomputed` runs with the same batch size
(`precompute_ref_batch_size` = `--batch-size` pairs). TRL's DPO computes some extra per-token metrics in its fused
LM head (entropy, mean logit, top-1 accuracy); that is part of its default step and is timed with it.

Timing: a callback takes the wall time at the end of optimizer step `--warmup` and of step `--warmup + --steps`
(CUDA synchronised), so seconds/step cover complete steps (data, forward(s), backward, clipping, optimizer, the
trainers' metrics). Completions/s = 2 x batch / (seconds/step). The one-time reference pass (QRPO's in `__init__`,
DPO precomputed's in `__init__`) is timed on its own and reported separately, over the whole dataset of
`batch x (warmup + steps)` pairs; it is not part of the step time. Both passes run under the training autocast (bf16
on GPU), so the reference log-probs match the policy's at step 0.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` during `trainer.train()` (peak statistics reset just before;
weights, a reference model and optimizer state are all counted as they are resident then). On CPU, the peak resident
set size of the measuring process (`getrusage`), which also holds the libraries (every process imports the same
modules first) and the datasets, and covers the reference pass too (forward only, so below a training step's peak);
its growth over the peak after those imports is printed as well, and is the figure that moves with the trainer. Peak
RSS also depends on how glibc's malloc reuses freed memory (a few tens to hundreds of MiB between runs); with
`MALLOC_MMAP_THRESHOLD_=65536` in the environment every large buffer is returned to the OS when freed, so peak RSS
follows live tensor memory (the steps then run slower: compare its memory, not its speed). What DPO's default adds
is one float32 copy of the weights (printed with the table): at the `small` preset that is about 27 MiB, far below
the CPU peak, which is dominated by activations and by the fused LM head both trainers use (TRL's; off CUDA it scores
every position in one chunk, several tokens x vocabulary float32 tensors). The memory saving shows with a larger model
(`--override`) or on a GPU.

Each measurement runs in its own spawned process; the rounds are interleaved, alternating the order of the
configurations, and the medians are reported. Ratios are against `dpo` (TRL's default): speed = dpo s/step over the
configuration's s/step (above 1: faster than DPO), memory = the configuration's peak over dpo's (below 1: less).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

import common

CONFIGS = ("qrpo", "dpo", "dpo_precomputed")
BASELINE = "dpo"
NUM_REF_REWARDS = 8


# Everything any configuration uses, imported first so that all measuring processes start from the same resident set.
LIBRARIES = (
    "datasets",
    "transformers.trainer",
    "trl.trainer.dpo_trainer",
    "apertus_hf.pretraining",
    "apertus_hf.trainers.qrpo",
)


def build_pairs(args: argparse.Namespace) -> tuple[list[dict], int]:
    """`batch x (warmup + steps)` deterministic pairs from the corpus, and the longest tokenized prompt + completion.

    The rows are QRPO's paired layout {prompt, chosen, rejected, chosen_reward, rejected_reward, ref_rewards}; DPO
    reads {prompt, chosen, rejected} of the same rows.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    documents = []
    for path in sorted(Path(args.data).glob("*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            documents.extend(json.loads(line)["text"] for line in handle if line.strip())
    if not documents:
        raise ValueError(f"no documents in {args.data}/*.jsonl")
    rng = random.Random(args.seed)
    rng.shuffle(documents)

    needed = args.batch_size * (args.warmup + args.steps)
    window = args.prompt_tokens + 2 * args.completion_tokens
    pairs = []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - window + 1, window):
            cut = [start, start + args.prompt_tokens, start + args.prompt_tokens + args.completion_tokens]
            prompt = tokenizer.decode(ids[cut[0] : cut[1]])
            chosen = tokenizer.decode(ids[cut[1] : cut[2]])
            rejected = tokenizer.decode(ids[cut[2] : cut[2] + args.completion_tokens])
            if not (prompt.strip() and chosen.strip() and rejected.strip()) or chosen == rejected:
                continue
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_reward": round(rng.uniform(0.5, 1.5), 4),
                    "rejected_reward": round(rng.uniform(-1.0, 0.5), 4),
                    "ref_rewards": [round(rng.gauss(0.0, 1.0), 4) for _ in range(NUM_REF_REWARDS)],
                }
            )
            if len(pairs) == needed:
                break
        if len(pairs) == needed:
            break
    if len(pairs) < needed:
        raise ValueError(
            f"the corpus gives only {len(pairs)} windows of {window} tokens, {needed} pairs are needed: lower "
            "--batch-size, --steps, --warmup, --prompt-tokens or --completion-tokens"
        )
    # What both trainers tokenize for a plain-text row: prompt + completion + EOS, special tokens added.
    max_length = max(
        len(tokenizer(pair["prompt"] + pair[member] + tokenizer.eos_token)["input_ids"])
        for pair in pairs
        for member in ("chosen", "rejected")
    )
    return pairs, max_length


def dataset_tokens(dataset) -> int:
    """Tokens a trainer will run per epoch (prompt + chosen, prompt + rejected), from its tokenized dataset."""
    return sum(
        2 * len(prompt) + len(chosen) + len(rejected)
        for prompt, chosen, rejected in zip(
            dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True
        )
    )


def measure_config(
    config_name: str, args: argparse.Namespace, pairs: list[dict], max_length: int, results: multiprocessing.Queue
) -> None:
    """Step time and peak memory of one configuration; runs in a fresh process."""
    import_peak = common.peak_rss_after_imports(LIBRARIES)
    import datasets
    import transformers
    from transformers import AutoTokenizer
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    from apertus_hf import ApertusForCausalLM
    from apertus_hf.pretraining import pretraining_model_config
    from apertus_hf.trainers.qrpo import QRPOConfig, QRPOTrainer

    datasets.disable_progress_bars()
    cuda = args.device == "cuda"
    reference_seconds = [0.0]

    def timed(method):
        """Wrap a trainer's one-time reference pass so its wall time adds to `reference_seconds`."""

        def wrapper(self, *method_args, **method_kwargs):
            common.synchronize(args.device)
            start = time.perf_counter()
            output = method(self, *method_args, **method_kwargs)
            common.synchronize(args.device)
            reference_seconds[0] += time.perf_counter() - start
            return output

        return wrapper

    class TimedQRPOTrainer(QRPOTrainer):
        _with_reference_logps = timed(QRPOTrainer._with_reference_logps)

    class TimedDPOTrainer(DPOTrainer):
        _precompute_ref_logps = timed(DPOTrainer._precompute_ref_logps)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    transformers.set_seed(args.seed)
    model_config = pretraining_model_config(args.preset, args.override, tokenizer, max_length)
    model_config._attn_implementation = args.attn_implementation
    model = ApertusForCausalLM(model_config)
    weight_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    timer = common.make_step_timer(args.device, args.warmup, args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as output_dir:
        shared_args = dict(
            output_dir=output_dir,
            seed=args.seed,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            precompute_ref_batch_size=args.batch_size,
            max_steps=args.warmup + args.steps,
            max_length=max_length,
            optim="adamw_torch",
            learning_rate=args.learning_rate,
            weight_decay=0.0,
            max_grad_norm=1.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            activation_checkpointing=False,
            bf16=cuda and args.mixed_precision == "bf16",
            fp16=False,
            use_cpu=not cuda,
            eval_strategy="no",
            save_strategy="no",
            logging_steps=args.warmup + args.steps + 1,
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        start = time.perf_counter()
        if config_name == "qrpo":
            trainer = TimedQRPOTrainer(
                model=model,
                args=QRPOConfig(**shared_args),
                train_dataset=datasets.Dataset.from_list(pairs),
                processing_class=tokenizer,
                callbacks=[timer],
            )
        else:
            precompute = config_name == "dpo_precomputed"
            dpo_rows = [{key: pair[key] for key in ("prompt", "chosen", "rejected")} for pair in pairs]
            # TRL's default reference model is the policy loaded again from its path: an identical, separate copy.
            ref_model = None if precompute else copy.deepcopy(model).eval()
            trainer = TimedDPOTrainer(
                model=model,
                ref_model=ref_model,
                args=DPOConfig(**shared_args, precompute_ref_log_probs=precompute),
                train_dataset=datasets.Dataset.from_list(dpo_rows),
                processing_class=tokenizer,
                callbacks=[timer],
            )
            if precompute and trainer.ref_model is not None:
                raise RuntimeError("DPOTrainer kept a reference model despite precompute_ref_log_probs=True")
        common.synchronize(args.device)
        init_seconds = time.perf_counter() - start
        if trainer.args.activation_checkpointing or trainer.args.gradient_checkpointing:
            raise RuntimeError(f"{config_name}: activation checkpointing is on")
        tokens = dataset_tokens(trainer.train_dataset)
        longest = max(
            len(prompt) + max(len(chosen), len(rejected))
            for prompt, chosen, rejected in zip(
                trainer.train_dataset["prompt_ids"],
                trainer.train_dataset["chosen_ids"],
                trainer.train_dataset["rejected_ids"],
                strict=True,
            )
        )
        if len(trainer.train_dataset) != len(pairs) or longest > max_length:
            raise RuntimeError(
                f"{config_name}: {len(trainer.train_dataset)} of {len(pairs)} rows kept, longest sequence {longest} "
                f"tokens for max_length={max_length}; rows were dropped or truncated"
            )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        output = trainer.train()
        common.synchronize(args.device)
    peak_memory = common.peak_memory_bytes(args.device)
    if trainer.state.global_step != args.warmup + args.steps:
        raise RuntimeError(f"{config_name} stopped at step {trainer.state.global_step} of {args.warmup + args.steps}")
    seconds_per_step = timer.elapsed_seconds() / args.steps
    results.put(
        {
            "seconds_per_step": seconds_per_step,
            "completions_per_second": 2 * args.batch_size / seconds_per_step,
            "peak_memory_bytes": peak_memory,
            "import_peak_rss_bytes": import_peak,
            "weight_bytes": weight_bytes,
            "reference_pass_seconds": reference_seconds[0],
            "init_seconds": init_seconds,
            "dataset_tokens": tokens,
            "training_loss": output.training_loss,
        }
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    has_cuda = torch.cuda.is_available()
    parser = common.model_benchmark_parser(__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=512 if has_cuda else 128, help="~tokens per prompt")
    parser.add_argument(
        "--completion-tokens", type=int, default=512 if has_cuda else 128, help="~tokens per chosen/rejected"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (2x completions)")
    parser.add_argument("--steps", type=int, default=30 if has_cuda else 6, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5 if has_cuda else 2, help="untimed optimizer steps first")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved measurements of each configuration")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--mixed-precision", choices=("bf16", "no"), default="bf16", help="on GPU only")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    common.add_input_output_arguments(parser, data_help="folder of *.jsonl documents")
    args = parser.parse_args(argv)
    positive = ("prompt_tokens", "completion_tokens", "batch_size", "steps", "warmup", "rounds")
    return common.finish_args(parser, args, positive, has_cuda)


def measure_isolated(config_name: str, args: argparse.Namespace, pairs: list[dict], max_length: int) -> dict:
    """One measurement of `config_name` in its own spawned process; with `--json -` its prints go to stderr."""
    target_args = (config_name, args, pairs, max_length)
    return common.run_isolated(config_name, measure_config, target_args, stdout_to_stderr=args.json == "-")


def describe_round(result: dict) -> str:
    return (
        f"{result['seconds_per_step']:8.3f} s/step, "
        f"{result['completions_per_second']:8.2f} completions/s, "
        f"peak memory {result['peak_memory_bytes'] / 2**20:8.1f} MiB, "
        f"reference pass {result['reference_pass_seconds']:6.2f} s, loss {result['training_loss']:.4f}"
    )


def summarize(rounds: dict[str, list[dict]], args: argparse.Namespace, device_name: str, max_length: int) -> dict:
    token_counts = {result["dataset_tokens"] for results in rounds.values() for result in results}
    if len(token_counts) != 1:
        raise RuntimeError(f"the configurations tokenized the pairs differently: {sorted(token_counts)} tokens")
    summary: dict = {"configs": {}}
    for name, results in rounds.items():
        row = {
            "seconds_per_step": common.median_of(results, "seconds_per_step"),
            "completions_per_second": common.median_of(results, "completions_per_second"),
            "peak_memory_mib": common.median_of(results, "peak_memory_bytes") / 2**20,
            "reference_pass_seconds": common.median_of(results, "reference_pass_seconds"),
            "init_seconds": common.median_of(results, "init_seconds"),
            "rounds": results,
        }
        if args.device == "cpu":
            row["peak_rss_growth_over_imports_mib"] = common.median_rss_growth_mib(results)
        summary["configs"][name] = row
    baseline = summary["configs"][BASELINE]
    for row in summary["configs"].values():
        row["speed_vs_dpo"] = baseline["seconds_per_step"] / row["seconds_per_step"]
        row["memory_vs_dpo"] = row["peak_memory_mib"] / baseline["peak_memory_mib"]
        if args.device == "cpu":
            row["rss_growth_vs_dpo"] = (
                row["peak_rss_growth_over_imports_mib"] / baseline["peak_rss_growth_over_imports_mib"]
            )
    summary["speed_ratio"] = summary["configs"]["qrpo"]["speed_vs_dpo"]
    summary["memory_ratio"] = summary["configs"]["qrpo"]["memory_vs_dpo"]
    summary["pairs"] = args.batch_size * (args.warmup + args.steps)
    summary["dataset_tokens"] = token_counts.pop()
    summary["weights_mib"] = rounds["qrpo"][0]["weight_bytes"] / 2**20
    summary["max_length"] = max_length
    summary["device"] = device_name
    summary["memory_measure"] = (
        "torch.cuda.max_memory_allocated during trainer.train()"
        if args.device == "cuda"
        else "peak RSS of the measuring process"
    )
    return summary


def print_table(summary: dict, args: argparse.Namespace) -> None:
    cpu = args.device == "cpu"
    memory_column = "peak CUDA MiB" if not cpu else "peak RSS MiB"
    header = f"{'config':<16} {'s/step':>8} {'compl./s':>9} {memory_column:>14}"
    if cpu:
        header += f" {'RSS growth MiB':>15}"
    header += f" {'speed vs dpo':>13} {'memory vs dpo':>14}"
    if cpu:
        header += f" {'growth vs dpo':>14}"
    print(header + f" {'ref. pass s':>12}")
    for name in CONFIGS:
        row = summary["configs"][name]
        line = f"{name:<16} {row['seconds_per_step']:8.3f} {row['completions_per_second']:9.2f}"
        line += f" {row['peak_memory_mib']:14.1f}"
        if cpu:
            line += f" {row['peak_rss_growth_over_imports_mib']:15.1f}"
        line += f" {row['speed_vs_dpo']:12.2f}x {row['memory_vs_dpo']:13.2f}x"
        if cpu:
            line += f" {row['rss_growth_vs_dpo']:13.2f}x"
        reference = "per step" if name == "dpo" else f"{row['reference_pass_seconds']:.2f}"
        print(line + f" {reference:>12}")
    qrpo, precomputed = summary["configs"]["qrpo"], summary["configs"]["dpo_precomputed"]
    print(
        f"QRPO vs DPO (TRL default): {summary['speed_ratio']:.2f}x the speed, {summary['memory_ratio']:.2f}x the peak "
        f"memory" + (f" ({qrpo['rss_growth_vs_dpo']:.2f}x the RSS growth)" if cpu else "") + "."
    )
    print(
        f"QRPO vs DPO precomputed: {precomputed['seconds_per_step'] / qrpo['seconds_per_step']:.2f}x the speed, "
        f"{qrpo['peak_memory_mib'] / precomputed['peak_memory_mib']:.2f}x the peak memory."
    )
    print(
        f"{2 * args.batch_size} completions ({args.batch_size} pair{'s' if args.batch_size > 1 else ''}) per step; {summary['pairs']} pairs, "
        f"{summary['dataset_tokens']} tokens in all, max_length {summary['max_length']}. 'ref. pass s' is the one-time "
        "reference log-prob pass over all the pairs before training, not part of s/step; dpo runs a reference "
        "forward in every step instead."
    )
    print(
        f"Model weights: {summary['weights_mib']:.1f} MiB (float32), which is what DPO's reference model adds to "
        "memory; the rest of the peak is the same training state and activations in every configuration."
    )
    if cpu:
        print(
            "Peak memory on CPU is the peak RSS of each measuring process: libraries and data included. 'RSS growth' "
            "is that peak minus the peak after importing the same libraries in every process."
        )


def main(argv: list[str] | None = None) -> dict:
    common.go_offline()
    os.environ.setdefault("TQDM_DISABLE", "1")  # DPO's reference pass reads it for its progress bar
    args = parse_args(argv)
    device_name = common.device_description(args.device)
    log = common.log_stream(args)
    pairs, max_length = build_pairs(args)
    print(
        f"device: {device_name}; torch {torch.__version__}; {len(pairs)} pairs, max_length {max_length}; "
        f"settings: {vars(args)}",
        file=log,
        flush=True,
    )
    rounds = common.measure_interleaved(
        CONFIGS, args.rounds, lambda name: measure_isolated(name, args, pairs, max_length), describe_round, log
    )
    summary = summarize(rounds, args, device_name, max_length)
    common.report(summary, args, print_table)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
