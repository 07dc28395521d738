"""Throughput accounting (FLOPs per token, MFU) and the JSONL metrics file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..configuration_apertus import ApertusConfig

# Dense bf16 tensor-core peak of one device, FLOP/s, from the vendors' data sheets (without sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "GH200": 989.4e12,
    "H100": 989.4e12,
    "H800": 989.4e12,
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


def training_flops_per_token(config: ApertusConfig, seq_len: int) -> float:
    """FLOPs of one forward and backward pass per token, as in PaLM (Chowdhery et al. 2022, appendix B).

    6 x the parameters of every matrix multiply (the input embedding is a lookup and is left out; the LM head is a
    matmul and is counted), plus 12 x layers x heads x head_dim x seq_len for the attention scores and values over a
    full row. Like PaLM we do not discount causal or document masking, so MFU compares across setups.
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
