"""Measured GPU memory of one long-context training step, to check the long-context memory formula against.

Builds an Apertus model with the layer shape of a preset (default: Apertus-8B) but only a few decoder layers, in
bf16 as DeepSpeed's bf16 mode runs it, with activation checkpointing and the chunked loss (the long-context
recipe's settings), and measures for each sequence length the peak memory of forward + backward of one row beyond
what the weights and gradients hold. Two layer counts separate what each decoder layer adds (the checkpointed input
kept per layer) from what is paid once (one layer recomputed in the backward, embeddings, the loss chunk):

    per layer  = (peak(L2) - peak(L1)) / (L2 - L1)
    once       = peak(L1) - L1 x per layer

    python benchmarks/long_context_memory.py                          # 8B layer shape, 8k..64k, 1 and 2 layers
    python benchmarks/long_context_memory.py --preset apertus-70b --seq-lens 65536

Needs CUDA: the attention kernels that keep memory linear in the sequence length (flash / memory-efficient SDPA)
are what the formula assumes.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from apertus_hf import ApertusConfig, ApertusForCausalLM

MIB = 2**20


def measure(preset: str, num_layers: int, seq_len: int, vocab_size: int) -> dict:
    config = ApertusConfig.from_preset(
        preset, num_hidden_layers=num_layers, vocab_size=vocab_size, max_position_embeddings=max(seq_len, 65536)
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = ApertusForCausalLM(config).to(torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    input_ids = torch.randint(0, vocab_size, (1, seq_len), device="cuda")
    # One warm-up step allocates the gradients, so the measured step's peak is activations only.
    for measured in (False, True):
        model.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False, skip_logits=True).loss
        loss.backward()
        torch.cuda.synchronize()
        if measured:
            peak = torch.cuda.max_memory_allocated() - before
    weights = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    del model, loss
    torch.cuda.empty_cache()
    return {"layers": num_layers, "seq_len": seq_len, "step_peak_mib": peak / MIB, "weights_mib": weights / MIB}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="apertus-8b", help="ApertusConfig preset giving the layer shape.")
    parser.add_argument("--layers", type=int, nargs=2, default=[1, 2], help="The two layer counts measured.")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--vocab-size", type=int, default=131072)
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("long_context_memory.py measures CUDA memory; run it on a GPU.")
    results = []
    for seq_len in args.seq_lens:
        low, high = (measure(args.preset, layers, seq_len, args.vocab_size) for layers in args.layers)
        per_layer = (high["step_peak_mib"] - low["step_peak_mib"]) / (args.layers[1] - args.layers[0])
        row = {
            "preset": args.preset,
            "seq_len": seq_len,
            "per_layer_mib": per_layer,
            "once_mib": low["step_peak_mib"] - args.layers[0] * per_layer,
            "measured": [low, high],
        }
        results.append(row)
        print(
            f"{args.preset} seq {seq_len:>6}: activations {per_layer:8.1f} MiB per checkpointed layer + "
            f"{row['once_mib']:8.1f} MiB once (peaks {low['step_peak_mib']:.1f} / {high['step_peak_mib']:.1f} MiB "
            f"at {args.layers[0]} / {args.layers[1]} layers)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, file)
    return results


if __name__ == "__main__":
    main()
