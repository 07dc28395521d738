"""Measure what a DeepSpeed ZeRO-3 pretraining process holds, for tests/pretraining/test_memory.py.

`accelerate launch --config_file accelerate_configs/zero3.yaml ... zero3_memory_probe.py OPTIONS.json OUT_DIR` builds
the run of the PretrainConfig in OPTIONS.json (apertus_hf.pretraining.build_run), trains two steps, and writes
OUT_DIR/rank<i>.json: the bytes of the tensors the engine keeps for this process (its bf16 weight partitions, its
gradient partition, its fp32 master weights, the optimizer's moments, the reduce bucket), and the peak growth of the
bytes allocated during the second step over those at its start, from torch's profiler (every allocation and free on
the CPU, in order).
"""

import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from apertus_hf.pretraining import PretrainConfig
from apertus_hf.pretraining.build import build_run
from apertus_hf.pretraining.step import StageFeed, train_step


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def peak_allocation_growth(profiler: profile, until: float = float("inf")) -> int:
    """The largest excess of bytes allocated over bytes freed since the profile started (and before time `until`).
    An operator's own allocations (self_cpu_memory_usage, its children's excluded) count at its start; frees outside
    operators are the profiler's [memory] events."""
    changes = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in profiler.events()
        if event.self_cpu_memory_usage and event.time_range.start < until
    )
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


def main() -> None:
    options, out_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    run = build_run(PretrainConfig(**options))
    feed = StageFeed(run)
    train_step(run, feed.batches_of_step(0))  # creates the optimizer's moments
    batches = feed.batches_of_step(1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        train_step(run, batches)

    # torch.optim.Optimizer.step is recorded as "Optimizer.step#<class>.step": before it, the forward and backward.
    optimizer_start = min(
        event.time_range.start for event in profiler.events() if event.name.startswith("Optimizer.step")
    )
    zero = run.model.optimizer  # DeepSpeedZeroOptimizer_Stage3
    weights, masters = zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat
    moments = [value for state in zero.optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    measured = {
        "weights": tensor_bytes(weights),
        "weights_dtype": str(weights[0].dtype),
        "gradients": tensor_bytes([zero.grad_partitions_flat_buffer]),
        "gradients_dtype": str(zero.grad_partitions_flat_buffer.dtype),
        # DeepSpeed uses the weight partition itself as master copy when they share dtype and device.
        "master_weights": sum(
            tensor_bytes([master])
            for master, weight in zip(masters, weights, strict=True)
            if master.data_ptr() != weight.data_ptr()
        ),
        "optimizer_moments": tensor_bytes(moments),
        "moment_tensors": len(moments),
        "reduce_bucket": tensor_bytes(
            bucket.buffer for bucket in zero.ipg_buckets.values() if getattr(bucket, "buffer", None) is not None
        ),
        "step_peak_growth": peak_allocation_growth(profiler),
        "backward_peak_growth": peak_allocation_growth(profiler, until=optimizer_start),
        "num_processes": run.accelerator.num_processes,
        "mixed_precision": run.accelerator.mixed_precision,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{run.accelerator.process_index}.json").write_text(json.dumps(measured))
    run.close()


if __name__ == "__main__":
    main()
