"""Throughput accounting (FLOPs per token, MFU) and the JSONL metrics file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..configuration_apertus import ApertusConfig

# Dense bf16 tensor-core peak of one device, FLOP/s, from the vendors' data sheets (without sparsity). Matched
# against the CUDA device name in this order, so the PCIe and NVL variants come before the SXM "H100".
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "GH200": 989.4e12,
    "H200": 989.4e12,
    "H100": 989.4e12,
    "H800": 989.4e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362.05e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def peak_flops_per_device(device: torch.device) -> float | None:
    """The bf16 peak of a CUDA `device` from its name, or None when unknown (and on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model_name, flops in PEAK_BF16_FLOPS.items():
        if model_name in name:
            return flops
    return None


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192, seconds: float = 2.0
) -> float:
    """The FLOP/s a square `size` matmul reaches on `device`: the achievable peak, to state next to the data sheet's.

    Timed over about `seconds` after a warm-up; 2 * size^3 FLOPs per matmul.
    """
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    output = torch.empty(size, size, device=device, dtype=dtype)

    def run(count: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(count):
            torch.mm(left, right, out=output)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = run(1)
    count = max(1, int(seconds / max(first, 1e-6)))
    return 2 * size**3 * count / run(count)


def training_flops_per_token(config: ApertusConfig, seq_len: int) -> float:
    """Model FLOPs of one forward and backward pass per token, as in PaLM (Chowdhery et al. 2022, appendix B).

    Matmuls: 2 FLOPs per parameter per token forward, 4 backward (gradients of the input and of the weight), so
    6 x the parameters of every matrix multiply: q/k/v/o and up/down projections of each layer, and the LM head. The
    input embedding is a lookup and is left out; norms, xIELU and the softmax are element-wise and left out.
    Attention: QK^T and the attention-weighted values are each 2 x heads x head_dim FLOPs per token per attended
    position forward, x3 with the backward, over seq_len positions: 12 x layers x heads x head_dim x seq_len.

    These are the FLOPs the model needs, not the ones an implementation runs: like PaLM we do not discount causal or
    document masking, nor the targets the chunked loss skips, and we do not add activation-checkpointing
    recomputation, so MFU compares across implementations and setups. MFU = tokens/s x this / peak FLOP/s.
    """
    head_dim = config.resolved_head_dim
    attention = config.hidden_size * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 2 * config.hidden_size * config.intermediate_size
    matmul_parameters = config.num_hidden_layers * (attention + mlp) + config.hidden_size * config.vocab_size
    attention_scores = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
    return 6 * matmul_parameters + attention_scores


class MetricsFile:
    """Appends one JSON object per line; a resumed run first drops the records past its checkpoint."""

    def __init__(self, path: str | Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Forget records of steps after `step`: they came from a run that died before its next checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
