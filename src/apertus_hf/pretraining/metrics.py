"""Throughput accounting (FLOPs per token, MFU), the JSONL metrics file, and the records of the steps."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedConfig

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


def training_flops_per_token(config: PreTrainedConfig, seq_len: int) -> float:
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
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = config.hidden_size * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    # Apertus' MLP is up/down; the Llama-family baselines of the ablations gate theirs (gate/up/down).
    mlp_matrices = 2 if config.model_type == "apertus" else 3
    mlp = mlp_matrices * config.hidden_size * config.intermediate_size
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


def last_evaluation(path: str | Path) -> dict[str, float]:
    """The held-out loss and perplexity of the last evaluation recorded in a metrics.jsonl file ({} when none)."""
    evaluated = [record for record in read_metrics(path) if "eval/loss" in record] if Path(path).is_file() else []
    if not evaluated:
        return {}
    return {"loss": evaluated[-1]["eval/loss"], "perplexity": evaluated[-1]["eval/perplexity"]}


@dataclass
class StepOutput:
    """What one optimizer step measured, still on the device (reading it would wait for the step to finish)."""

    loss: torch.Tensor
    """This process's share of the step's loss: the loss is the sum of the shares over all processes."""
    grad_norm: torch.Tensor | float | None
    """The global gradient norm before clipping, None without clipping."""
    learning_rate: float


class StepRecords:
    """One metrics record per optimizer step, in metrics.jsonl and the Accelerate trackers.

    The values stay tensors until a log line, an evaluation, a checkpoint or the end needs them; then the pending steps
    are reduced over the processes together and read at once, so the host waits for the device once per write instead
    of once per step. Throughput is measured over the window between two logged steps, after that read, so that it
    counts the finished work.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        metrics: MetricsFile,
        trackers: bool,
        flops_per_token: float,
        peak_flops: float | None,
    ):
        self.accelerator = accelerator
        self.metrics = metrics
        self.trackers = trackers
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        # step, output, tokens seen, epoch, this process's row ids (or None)
        self._pending: list[tuple[int, StepOutput, int, int, torch.Tensor | None]] = []
        self._records: list[dict[str, Any]] = []
        self._window_start, self._window_tokens = time.perf_counter(), 0
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None

    def add(
        self,
        step: int,
        output: StepOutput,
        step_tokens: int,
        tokens_seen: int,
        epoch: int,
        row_ids: torch.Tensor | None = None,
    ) -> None:
        """Record optimizer step `step`; `row_ids`: the rows this process read in it (PretrainConfig.record_row_ids),
        gathered over the processes into the record's `data/row_ids`, sorted."""
        self._pending.append((step, output, tokens_seen, epoch, row_ids))
        self._window_tokens += step_tokens

    def _read_pending(self) -> None:
        if not self._pending:
            return
        local_losses = torch.stack([output.loss for _, output, _, _, _ in self._pending])
        losses = self.accelerator.reduce(local_losses, reduction="sum").tolist()
        for (step, output, tokens_seen, epoch, row_ids), loss in zip(self._pending, losses, strict=True):
            record = {
                "step": step,
                "train/loss": loss,
                "train/lr": output.learning_rate,
                "train/tokens": tokens_seen,
                "train/epoch": epoch,
            }
            if output.grad_norm is not None:
                record["train/grad_norm"] = float(output.grad_norm)
            if row_ids is not None:
                record["data/row_ids"] = sorted(self.accelerator.gather(row_ids.to(self.accelerator.device)).tolist())
            self._records.append(record)
        self.last_loss = losses[-1]
        self._pending = []

    def close_window(self) -> dict[str, Any]:
        """Add tokens/s (and MFU against a known peak) over the window ending at the last step to its record, and
        return that record."""
        self._read_pending()
        record = self._records[-1]
        tokens_per_second = self._window_tokens / (time.perf_counter() - self._window_start)
        record["train/tokens_per_second"] = tokens_per_second
        if self.peak_flops:
            record["train/mfu"] = (
                tokens_per_second * self.flops_per_token / (self.peak_flops * self.accelerator.num_processes)
            )
        self._window_start, self._window_tokens = time.perf_counter(), 0
        return record

    def add_eval(self, loss: float) -> None:
        """The held-out loss measured after the last step, in that step's record."""
        self._read_pending()
        self.last_eval_loss = loss
        self._records[-1]["eval/loss"] = loss
        self._records[-1]["eval/perplexity"] = math.exp(min(loss, 50.0))

    def write(self) -> None:
        """Write every step's record so far."""
        self._read_pending()
        for record in self._records:
            self.metrics.write(record)
            if self.trackers:
                # Trackers take scalars: the row ids stay in metrics.jsonl.
                scalars = {key: value for key, value in record.items() if key not in ("step", "data/row_ids")}
                self.accelerator.log(scalars, step=record["step"])
        self._records = []
