"""Choosing the fast paths of a training run: the attention backend, the fused xIELU, compiled decoder layers."""

from __future__ import annotations

import importlib.util

import torch

from .modeling_apertus import ApertusPreTrainedModel

ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2")


def check_attn_implementation(requested: str) -> None:
    """Raise a ValueError naming the choices when `requested` is not an attention backend a recipe can ask for."""
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={requested!r} is not one of {ATTENTION_IMPLEMENTATIONS}.")


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """The attention backend a run uses: `requested`, or for "auto" FlashAttention-2 where it runs, else SDPA.

    FlashAttention-2 (`flash-attn`) on CUDA attends over packed rows as variable-length sequences: `transformers`
    derives the document boundaries from the restarts of `position_ids` (the packed batches carry no attention
    mask), so no (seq x seq) mask is built and masked-out blocks cost nothing. SDPA gets the document mask instead.
    """
    check_attn_implementation(requested)
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def apply_speed_options(model: torch.nn.Module, xielu_implementation: str, compile_layers: bool) -> None:
    """Set the xIELU implementation of an apertus_hf model and compile its decoder layers in place if asked."""
    if not isinstance(model, ApertusPreTrainedModel):
        raise ValueError(
            f"{type(model).__name__} is not an apertus_hf model, so xIELU and layer compilation cannot be set on it; "
            "train an `apertus` checkpoint (init_from must hold model_type apertus)."
        )
    model.set_xielu_implementation(xielu_implementation)
    if compile_layers:
        model.compile_decoder_layers()
