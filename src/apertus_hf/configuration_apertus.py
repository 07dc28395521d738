"""Configuration of the Apertus architecture.

`ApertusConfig` has the same fields, defaults and serialization as `transformers.ApertusConfig`, so a
config.json written by either loads into the other. On top of that it validates its values (the stock
class accepts e.g. a hidden size that the heads do not divide) and knows the released model shapes as
named presets.
"""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "dynamic", "yarn", "longrope")

# Keys of the v4.56-era release config.json that describe the architecture rather than configure it. They are
# kept as attributes (the base class stores unknown keys) so that such a file round-trips, but any value other
# than the one Apertus uses would describe a different model, which we refuse instead of silently ignoring.
RELEASE_ARCHITECTURE_FLAGS = {"qk_norm": True, "post_norm": False, "mlp_bias": False, "hidden_dropout": 0.0}

# The pretraining initialisation scale of the Apertus runs (`--init-method-std` in swiss-ai/pretrain-code
# `pretraining/submit_apertus_8b.sh`; `scaled_init_method_normal` in swiss-ai/Megatron-LM `megatron/core/utils.py`):
# std 0.008944 for embeddings, q/k/v, up_proj and the LM head; output projections use it divided by
# sqrt(2 * num_hidden_layers).
APERTUS_INIT_STD = 0.008944

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 12_000_000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}

PRESETS: dict[str, dict] = {
    # The released shapes (Apertus tech report, arXiv 2509.14233, §2.1 'Model Architecture', Table 1); note that
    # `ApertusConfig()` alone is NOT the 8B model.
    "apertus-8b": {
        "vocab_size": 131072,
        "hidden_size": 4096,
        "intermediate_size": 21504,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 65536,
        "initializer_range": APERTUS_INIT_STD,
        "rope_parameters": _LLAMA3_ROPE,
    },
    "apertus-70b": {
        "vocab_size": 131072,
        "hidden_size": 8192,
        "intermediate_size": 43008,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 65536,
        "initializer_range": APERTUS_INIT_STD,
        "rope_parameters": _LLAMA3_ROPE,
    },
    # Small shapes with the same proportions (GQA 4:1, MLP ~5.25x, head_dim 64 or smaller) for CPU work and tests.
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "initializer_range": APERTUS_INIT_STD,
        "rope_parameters": {**_LLAMA3_ROPE, "rope_theta": 500_000.0, "original_max_position_embeddings": 1024},
    },
    "small": {
        "vocab_size": 8192,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "max_position_embeddings": 16384,
        "initializer_range": APERTUS_INIT_STD,
        "rope_parameters": {**_LLAMA3_ROPE, "rope_theta": 500_000.0, "original_max_position_embeddings": 4096},
    },
}


@strict
class ApertusConfig(PreTrainedConfig):
    r"""
    Configuration of an Apertus decoder (Swiss AI, arXiv 2509.14233).

    The fields and defaults are those of `transformers.ApertusConfig`; use [`ApertusConfig.from_preset`] for the
    released 8B/70B shapes. An optional `head_dim` may be passed to decouple the head size from
    `hidden_size // num_attention_heads`; like the stock class, it is only serialized when set.

    ```python
    >>> from apertus_hf import ApertusConfig
    >>> config = ApertusConfig.from_preset("apertus-8b")
    >>> config.num_key_value_heads
    8
    ```
    """

    model_type = "apertus"
    default_theta = 12000000.0
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "xielu"
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 3
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = dict(_LLAMA3_ROPE)
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ApertusConfig:
        """Build the config of a named shape (`apertus-8b`, `apertus-70b`, `tiny`, `small`), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown Apertus preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})

    @property
    def resolved_head_dim(self) -> int:
        """The attention head size: `head_dim` when set, else `hidden_size // num_attention_heads`."""
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    def validate_architecture(self):
        """Part of `@strict` validation: every shape and option must describe a buildable Apertus model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if getattr(self, "head_dim", None) is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                f"{self.num_attention_heads}, or set head_dim explicitly."
            )
        head_dim = self.resolved_head_dim
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim={head_dim!r} must be a positive even integer (RoPE rotates pairs).")
        if not isinstance(self.num_key_value_heads, int) or self.num_key_value_heads <= 0:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads!r} must be a positive integer.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads} (grouped-query attention)."
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not an activation of transformers' ACT2FN; Apertus uses 'xielu', "
                f"an ablation may use any of {sorted(ACT2FN)}."
            )
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps!r} must be positive.")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout={self.attention_dropout!r} must be in [0, 1).")
        if self.initializer_range is not None and not self.initializer_range > 0:
            raise ValueError(f"initializer_range={self.initializer_range!r} must be positive.")
        if self.attention_bias:
            raise ValueError("attention_bias=True is not an Apertus architecture: its projections have no bias.")
        for flag, apertus_value in RELEASE_ARCHITECTURE_FLAGS.items():
            value = getattr(self, flag, apertus_value)
            if value != apertus_value:
                raise ValueError(
                    f"{flag}={value!r} describes another architecture; Apertus has {flag}={apertus_value!r}. "
                    f"Remove the key from config.json or set it to {apertus_value!r}."
                )

    def validate_rope(self):
        rope_type = (self.rope_parameters or {}).get("rope_type", (self.rope_parameters or {}).get("type"))
        if rope_type is not None and rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_parameters['rope_type']={rope_type!r} is unknown; use one of {SUPPORTED_ROPE_TYPES}."
            )
        super().validate_rope()

    def validate_token_ids(self):
        """Special token ids must index the vocabulary (the stock class only warns)."""
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            for token_id in ids:
                if token_id is not None and not 0 <= token_id < self.vocab_size:
                    raise ValueError(
                        f"{name}={value!r} lies outside the vocabulary [0, {self.vocab_size}); "
                        "fix the token id or the vocab_size."
                    )


class InvalidApertusConfigError(StrictDataclassClassValidationError, ValueError):
    """An invalid `ApertusConfig` value. A `ValueError`, as users expect, and still the error `@strict` documents."""

    def __init__(self, cause: Exception):
        ValueError.__init__(self, str(cause))


_run_strict_validators = ApertusConfig.validate


def _validate_with_value_error(self: ApertusConfig) -> None:
    # `@strict` re-raises validator errors as a class that is not a ValueError; keep its message, add the base.
    try:
        _run_strict_validators(self)
    except StrictDataclassClassValidationError as error:
        raise InvalidApertusConfigError(error.__cause__) from error.__cause__


_validate_with_value_error.__is_defined_by_strict_decorator__ = True
ApertusConfig.validate = _validate_with_value_error

__all__ = ["APERTUS_INIT_STD", "PRESETS", "ApertusConfig", "InvalidApertusConfigError"]
