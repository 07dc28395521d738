"""Forward+backward speed and peak memory: apertus_hf.ApertusForCausalLM against transformers' built-in Apertus.

Both models get the same config, the same weights and the same batches, in the same run. Each measurement runs in
its own spawned process so peak memory is not shared between them; the two are interleaved over several rounds
in alternating order, and the median is reported, so drift of the machine affects both alike.

    python benchmarks/model_speed.py                  # CPU default (or GPU default when CUDA is present)
    python benchmarks/model_speed.py --device cuda --dtype bfloat16 --seq-len 4096 --hidden-size 2048 ...

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` over the training steps; on CPU, the growth of the
process's peak resident set size from just before the first step (weights are already resident then).
"""

from __future__ import annotations

import argparse
import json
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
    dtype = getattr(torch, args.dtype)
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
    model.to(device=device, dtype=dtype).train()

    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(device)
        for _ in range(args.steps + args.warmup)
    ]

    def step(input_ids: torch.Tensor) -> float:
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory_before = torch.cuda.memory_allocated()
    else:
        memory_before = common.peak_rss_bytes()
    losses = [step(batch) for batch in batches[: args.warmup]]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses += [step(batch) for batch in batches[args.warmup :]]
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated() - memory_before
    else:
        peak_memory = common.peak_rss_bytes() - memory_before
    results.put(
        {
            "implementation": implementation,
            "tokens_per_second": args.steps * args.batch_size * args.seq_len / elapsed,
            "peak_step_memory_bytes": peak_memory,
            "first_loss": losses[0],
        }
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    has_cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if has_cuda else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if has_cuda else "float32")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--vocab-size", type=int, default=131072 if has_cuda else 32768)
    parser.add_argument("--hidden-size", type=int, default=2048 if has_cuda else 256)
    parser.add_argument("--intermediate-size", type=int, default=8192 if has_cuda else 1024)
    parser.add_argument("--num-layers", type=int, default=16 if has_cuda else 4)
    parser.add_argument("--num-heads", type=int, default=16 if has_cuda else 4)
    parser.add_argument("--num-kv-heads", type=int, default=4 if has_cuda else 1)
    parser.add_argument("--seq-len", type=int, default=4096 if has_cuda else 512)
    parser.add_argument("--batch-size", type=int, default=1 if has_cuda else 2)
    parser.add_argument("--steps", type=int, default=10 if has_cuda else 6)
    parser.add_argument("--warmup", type=int, default=3 if has_cuda else 1)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved measurements of each implementation")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import apertus_hf

    args = parse_args(argv)
    device_name = common.device_description(args.device)
    print(f"device: {device_name}; torch {torch.__version__}; settings: {vars(args)}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        args.weights_file = f"{scratch}/weights.safetensors"
        torch.manual_seed(0)
        save_file(apertus_hf.ApertusForCausalLM(build_config(args)).state_dict(), args.weights_file)
        rounds = common.measure_interleaved(
            IMPLEMENTATIONS,
            args.rounds,
            lambda implementation: common.run_isolated(implementation, measure, (implementation, args)),
            describe_round,
        )
    summary = summarize(rounds, device_name)
    print(
        f"median tokens/s: transformers {summary['transformers']['tokens_per_second']:.1f}, "
        f"apertus_hf {summary['apertus_hf']['tokens_per_second']:.1f}  ->  speed ratio {summary['speed_ratio']:.3f}"
    )
    print(
        f"median peak step memory (MiB): transformers {summary['transformers']['peak_step_memory_mib']:.1f}, "
        f"apertus_hf {summary['apertus_hf']['peak_step_memory_mib']:.1f}  ->  memory ratio {summary['memory_ratio']:.3f}"
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


def summarize(rounds: dict[str, list[dict]], device_name: str) -> dict:
    summary = {
        name: {
            "tokens_per_second": common.median_of(results, "tokens_per_second"),
            "peak_step_memory_mib": common.median_of(results, "peak_step_memory_bytes") / 2**20,
        }
        for name, results in rounds.items()
    }
    speed_ratio = summary["apertus_hf"]["tokens_per_second"] / summary["transformers"]["tokens_per_second"]
    memory_ratio = summary["apertus_hf"]["peak_step_memory_mib"] / summary["transformers"]["peak_step_memory_mib"]
    summary.update({"device": device_name, "speed_ratio": speed_ratio, "memory_ratio": memory_ratio})
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
