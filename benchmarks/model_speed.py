"""Training-step speed and peak memory: apertus_hf.ApertusForCausalLM against transformers' built-in Apertus.

Both models get the same config, the same weights and the same batches, in the same run; a step is forward with
labels, backward and an AdamW step (`--optimizer none`: no optimizer). Ours runs as a pretraining run would: the
chunked loss (training mode with labels), xIELU `auto` (fused on CUDA), optionally compiled decoder layers. Each
measurement runs in its own spawned process so peak memory is not shared between them; the two are interleaved over
several rounds in alternating order, and the median is reported, so drift of the machine affects both alike.

    python benchmarks/model_speed.py        # CPU default: vocabulary 131072, 4 small layers, seq 1024
    python benchmarks/model_speed.py        # on a GPU: a ~1.1B model (16 x 2048, vocabulary 131072), seq 4096, bf16
    python benchmarks/model_speed.py --hidden-size 4096 --intermediate-size 21504 --num-layers 4 \
        --num-heads 32 --num-kv-heads 8 --compile-layers          # an 8B-shaped layer stack with fewer layers

Peak memory of a step: on CUDA, `torch.cuda.max_memory_allocated` over the training steps minus the memory
allocated before them (weights); on CPU, the growth of the process's peak resident set size from just before the
first step (weights are already resident then). Both include gradients and optimizer state, alike in both models.
MFU: tokens/s x `training_flops_per_token` (PaLM's model FLOPs; see apertus_hf/pretraining/metrics.py) over the
peak FLOP/s, both the data sheet's (GPU) and the one measured here with a large matmul in the benchmark's dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

import common

IMPLEMENTATIONS = ("transformers", "apertus_hf")


def build_config(args: argparse.Namespace):
    from apertus_hf import ApertusConfig

    return ApertusConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=max(args.seq_len, 8192) * 2,
        initializer_range=0.008944,
    )


def measure(implementation: str, args: argparse.Namespace, results: multiprocessing.Queue) -> None:
    """Train-step throughput and peak memory of one implementation; runs in a fresh process."""
    import transformers

    import apertus_hf

    device = torch.device(args.device)
    config = build_config(args)
    if implementation == "apertus_hf":
        model = apertus_hf.ApertusForCausalLM(config)
    else:
        model = transformers.models.apertus.ApertusForCausalLM(
            transformers.models.apertus.ApertusConfig(**config.to_diff_dict())
        )
    # Both load the same weights the same way, so the memory high-water mark before the steps is alike too.
    model.load_state_dict(load_file(args.weights_file))
    model.set_attn_implementation(args.attn_implementation)
    # Weights in float32 with bf16 autocast on GPU (mixed precision, as in pretraining); float32 on CPU.
    model.to(device=device).train()
    if implementation == "apertus_hf":
        model.set_xielu_implementation(args.xielu)
        if args.compile_layers:
            model.compile_decoder_layers()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5) if args.optimizer == "adamw" else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(device)
        for _ in range(args.steps + args.warmup)
    ]

    def step(input_ids: torch.Tensor) -> float:
        with autocast:
            # Only the loss is kept, as Trainer.compute_loss does: the stock model's logits are freed before backward.
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    common.synchronize(device.type)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        memory_before = torch.cuda.memory_allocated()
    else:
        memory_before = common.peak_rss_bytes()
    losses = [step(batch) for batch in batches[: args.warmup]]
    common.synchronize(device.type)
    start = time.perf_counter()
    losses += [step(batch) for batch in batches[args.warmup :]]
    common.synchronize(device.type)
    elapsed = time.perf_counter() - start
    peak_memory = common.peak_memory_bytes(device.type)
    results.put(
        {
            "implementation": implementation,
            "tokens_per_second": args.steps * args.batch_size * args.seq_len / elapsed,
            "peak_step_memory_bytes": peak_memory - memory_before,
            "peak_memory_bytes": peak_memory,
            "first_loss": losses[0],
        }
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    has_cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if has_cuda else "cpu")
    parser.add_argument(
        "--dtype",
        default="bfloat16" if has_cuda else "float32",
        choices=["bfloat16", "float32"],
        help="bfloat16: float32 weights with bf16 autocast (mixed precision); float32: plain float32",
    )
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--vocab-size", type=int, default=131072)
    parser.add_argument("--hidden-size", type=int, default=2048 if has_cuda else 256)
    parser.add_argument("--intermediate-size", type=int, default=8192 if has_cuda else 1024)
    parser.add_argument("--num-layers", type=int, default=16 if has_cuda else 4)
    parser.add_argument("--num-heads", type=int, default=16 if has_cuda else 4)
    parser.add_argument("--num-kv-heads", type=int, default=4 if has_cuda else 1)
    parser.add_argument("--seq-len", type=int, default=4096 if has_cuda else 1024)
    parser.add_argument("--batch-size", type=int, default=1 if has_cuda else 2)
    parser.add_argument("--steps", type=int, default=10 if has_cuda else 4)
    parser.add_argument("--warmup", type=int, default=3 if has_cuda else 1)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "none"], help="AdamW step in both, or none")
    parser.add_argument("--xielu", default="auto", choices=["auto", "eager", "compiled"], help="our xIELU")
    parser.add_argument("--compile-layers", action="store_true", help="compile our decoder layers (regional)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved measurements of each implementation")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import apertus_hf
    from apertus_hf.pretraining.metrics import measure_matmul_flops, peak_flops_per_device, training_flops_per_token

    args = parse_args(argv)
    config = build_config(args)
    device = torch.device(args.device)
    device_name = common.device_description(args.device)
    print(f"device: {device_name}; torch {torch.__version__}; settings: {vars(args)}", flush=True)
    measured_peak = measure_matmul_flops(
        device, getattr(torch, args.dtype), size=8192 if device.type == "cuda" else 2048
    )
    print(f"measured matmul peak ({args.dtype}): {measured_peak / 1e12:.2f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        args.weights_file = f"{scratch}/weights.safetensors"
        torch.manual_seed(0)
        save_file(apertus_hf.ApertusForCausalLM(config).state_dict(), args.weights_file)
        rounds = common.measure_interleaved(
            IMPLEMENTATIONS,
            args.rounds,
            lambda implementation: common.run_isolated(implementation, measure, (implementation, args)),
            describe_round,
        )
    flops_per_token = training_flops_per_token(config, args.seq_len)
    summary = summarize(rounds, device_name, flops_per_token, measured_peak, peak_flops_per_device(device))
    print(f"model FLOPs per token (forward + backward): {flops_per_token / 1e9:.3f} GFLOP")
    for name in IMPLEMENTATIONS:
        result = summary[name]
        mfu = f"MFU {result['mfu_measured_peak']:.1%} of the measured peak"
        if result["mfu_datasheet_peak"] is not None:
            mfu += f", {result['mfu_datasheet_peak']:.1%} of the data sheet's"
        print(
            f"{name:>12}: {result['tokens_per_second']:10.1f} tokens/s, peak step memory "
            f"{result['peak_step_memory_mib']:9.1f} MiB (process peak {result['peak_memory_mib']:9.1f} MiB), {mfu}"
        )
    print(
        f"apertus_hf / transformers: speed {summary['speed_ratio']:.3f}x, peak step memory "
        f"{summary['memory_ratio']:.3f}x (process peak {summary['process_memory_ratio']:.3f}x)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), **summary}, handle, indent=2)
    return summary


def describe_round(result: dict) -> str:
    return (
        f"{result['tokens_per_second']:9.1f} tokens/s, "
        f"peak step memory {result['peak_step_memory_bytes'] / 2**20:8.1f} MiB, "
        f"first loss {result['first_loss']:.6f}"
    )


def summarize(
    rounds: dict[str, list[dict]],
    device_name: str,
    flops_per_token: float,
    measured_peak: float,
    datasheet_peak: float | None,
) -> dict:
    summary = {}
    for name, results in rounds.items():
        tokens_per_second = common.median_of(results, "tokens_per_second")
        summary[name] = {
            "tokens_per_second": tokens_per_second,
            "peak_step_memory_mib": common.median_of(results, "peak_step_memory_bytes") / 2**20,
            "peak_memory_mib": common.median_of(results, "peak_memory_bytes") / 2**20,
            "mfu_measured_peak": tokens_per_second * flops_per_token / measured_peak,
            "mfu_datasheet_peak": tokens_per_second * flops_per_token / datasheet_peak if datasheet_peak else None,
        }
    ours, stock = summary["apertus_hf"], summary["transformers"]
    summary.update(
        {
            "device": device_name,
            "flops_per_token": flops_per_token,
            "measured_peak_flops": measured_peak,
            "datasheet_peak_flops": datasheet_peak,
            "speed_ratio": ours["tokens_per_second"] / stock["tokens_per_second"],
            # A tiny model's step can fit in memory the process already had: no growth, no ratio.
            "memory_ratio": ours["peak_step_memory_mib"] / stock["peak_step_memory_mib"]
            if stock["peak_step_memory_mib"]
            else math.nan,
            "process_memory_ratio": ours["peak_memory_mib"] / stock["peak_memory_mib"],
        }
    )
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
