"""Causal-LM cross-entropy computed from the hidden states in chunks, without the [tokens, vocabulary] logits.

At the Apertus vocabulary of 131,072, the float32 logits of one 4096-token row are 2 GiB, and the plain path
(`lm_head` then `transformers`' `ForCausalLMLoss`) holds several tensors of that size at once: the logits, the
log-softmax saved for the backward, its gradient. Here the LM head and the cross-entropy run on `chunk_size` rows
at a time, and only for the positions whose target is kept (ignored and Goldfish-dropped targets, -100, are never
projected), so the largest tensor is `chunk_size x vocabulary`.

Why by hand: `liger-kernel` and `cut-cross-entropy` implement this with Triton kernels, which need a GPU, and
TRL's chunked log-prob head recomputes the logits in the backward pass (four matmuls instead of three). Here, as
in Liger's fused linear cross-entropy, each chunk's gradients are computed in the forward pass while its logits
are at hand: d loss / d logits = softmax - one_hot(target), turned in place into the two gradient matmuls, so the
head costs the same three matmuls as the plain path and the backward pass only scales the stored gradients.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# The label of a position left out of the loss (transformers' and PyTorch's convention); the packer uses it too.
IGNORE_INDEX = -100

# Rows of the LM head projected at once: 1024 x 131,072 float32 logits are 512 MiB. Fewer rows lower the peak
# further but re-read the whole head weight once per chunk, which starves the matmul of arithmetic intensity.
DEFAULT_CHUNK_SIZE = 1024


class ChunkedLinearCrossEntropyFunction(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), with its gradients computed in the forward.

    Inputs are already selected: `hidden` (N, H) holds only rows whose target (N,) is a real token id. The gradients
    are returned for the loss *sum*; the caller divides. A graph built through this function can be backpropagated
    once (the stored gradients are scaled in place).
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        compute_hidden_grad: bool,
        compute_weight_grad: bool,
    ) -> torch.Tensor:
        # Under autocast the matmuls run in the autocast dtype (bf16 on GPU), the softmax in float32, as the plain
        # path does with `ForCausalLMLoss`'s `.float()`.
        device_type = hidden.device.type
        compute_dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        )
        weight_compute = weight.to(compute_dtype)
        rows, vocab = hidden.shape[0], weight.shape[0]
        loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if compute_hidden_grad else None
        # Accumulated in float32 over the chunks whatever the compute dtype, like the plain path's matmul does.
        grad_weight = (
            torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if compute_weight_grad else None
        )
        # One logits buffer for all chunks, worked on in place: allocating (and on CPU page-faulting) a fresh
        # chunk x vocab tensor per chunk and per operation costs as much as the arithmetic.
        logits_buffer = torch.empty((min(rows, chunk_size), vocab), device=hidden.device, dtype=compute_dtype)
        # The softmax works in float32; in float32 that is the logits buffer itself.
        computes_in_float32 = compute_dtype == torch.float32
        float_buffer = logits_buffer if computes_in_float32 else torch.empty_like(logits_buffer, dtype=torch.float32)

        with torch.autocast(device_type, enabled=False):
            for start in range(0, rows, chunk_size):
                hidden_chunk = hidden[start : start + chunk_size].to(compute_dtype)
                target_chunk = targets[start : start + chunk_size]
                logits = logits_buffer[: hidden_chunk.shape[0]]
                torch.mm(hidden_chunk, weight_compute.t(), out=logits)
                probabilities = float_buffer[: hidden_chunk.shape[0]]
                if not computes_in_float32:
                    probabilities.copy_(logits)
                target_logits = probabilities.gather(1, target_chunk.unsqueeze(1)).squeeze(1)
                # log-sum-exp with the row maximum subtracted in place, turning the buffer into exp(logits - max).
                row_max = probabilities.amax(dim=1)
                sum_exp = probabilities.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)
                loss_sum += (row_max + sum_exp.log() - target_logits).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d loss / d logits = softmax - one_hot(target)
                probabilities.div_(sum_exp.unsqueeze(1))
                probabilities[torch.arange(target_chunk.shape[0], device=hidden.device), target_chunk] -= 1.0
                grad_logits = probabilities if computes_in_float32 else logits.copy_(probabilities)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = grad_logits @ weight_compute
                if grad_weight is not None:
                    _add_matmul_in_float32(grad_weight, grad_logits.t(), hidden_chunk)

        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        ctx.backpropagated = False
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.backpropagated:
            raise RuntimeError(
                "The chunked LM-head loss was backpropagated twice; it stores its gradients once. Run a fresh forward "
                "pass, or pass skip_logits=False to use the plain loss."
            )
        ctx.backpropagated = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaling in place spares a second weight-sized buffer.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def _add_matmul_in_float32(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """accumulator += left @ right for a float32 accumulator, without rounding the product to bf16 first."""
    if left.dtype == torch.float32:
        accumulator.addmm_(left, right)
    elif accumulator.device.type == "cuda":
        torch.addmm(accumulator, left, right, out_dtype=torch.float32, out=accumulator)
    else:
        accumulator.addmm_(left.float(), right.float())


def _gathered_under_zero3(weight: torch.Tensor):
    """Gather a DeepSpeed ZeRO-3 partitioned weight for direct use (the module's own forward hook gathers it only
    when the module is called, and we read the weight without calling `lm_head`). A null context otherwise."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters([weight])


def shift_causal_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Position t predicts labels[t + 1]; the last position predicts nothing (as `ForCausalLMLoss` shifts)."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """The causal-LM loss of `transformers`' `ForCausalLMLoss` on `lm_head(hidden_states)`, never building the logits.

    Args:
        hidden_states: (batch, seq, hidden) final hidden states (after the last norm).
        lm_head_weight: (vocab, hidden) weight of the bias-free LM head.
        labels: (batch, seq) unshifted targets; `ignore_index` leaves a target out. Either this or `shift_labels`.
        num_items_in_batch: the loss is the sum over kept targets divided by this (gradient accumulation and
            multi-process training count targets globally); None: the mean over this batch's kept targets.
        shift_labels: (batch, seq) targets already aligned with the positions that predict them.
        chunk_size: rows projected at once; the peak extra memory is about chunk_size x vocab x 4 bytes.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if shift_labels is None:
        if labels is None:
            raise ValueError("Pass labels (unshifted) or shift_labels (aligned with the positions that predict them).")
        shift_labels = shift_causal_labels(labels, ignore_index)
    if shift_labels.shape != hidden_states.shape[:-1]:
        raise ValueError(
            f"Labels of shape {tuple(shift_labels.shape)} do not match the hidden states' positions "
            f"{tuple(hidden_states.shape[:-1])}; pass one label per input position."
        )
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    kept_positions = (targets != ignore_index).nonzero().squeeze(1)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, kept_positions)
    targets = targets.index_select(0, kept_positions)

    with _gathered_under_zero3(lm_head_weight):
        track_gradients = torch.is_grad_enabled()
        loss_sum = ChunkedLinearCrossEntropyFunction.apply(
            hidden,
            lm_head_weight,
            targets,
            chunk_size,
            track_gradients and hidden.requires_grad,
            track_gradients and lm_head_weight.requires_grad,
        )
    if num_items_in_batch is None:
        # The mean over kept targets: NaN when there are none, as in `ForCausalLMLoss`.
        return loss_sum / targets.shape[0]
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch
