"""The Apertus decoder (Swiss AI, arXiv 2509.14233), written for training.

Numerically the same function as `transformers.ApertusForCausalLM` and loading the same checkpoints (same
parameter and buffer names), with what the stock model does not do for training:

- Packed rows stay document-masked whatever else is passed. `transformers` detects documents from restarting
  `position_ids` only when there is neither an attention mask nor a cache; here a fresh forward pass (empty or
  no cache) is document-masked on every attention backend also with a cache (the default in eval mode) or a
  padding mask. The documents can also be given apart from the positions, as `seq_idx` (the document of every
  token, `transformers`' packed-batch argument): then they alone decide what attends to what, on every backend
  (FlashAttention through its variable-length arguments), so that positions that do not restart can be masked
  and restarting ones left unmasked.
- The pretraining initialisation of the Apertus runs (output projections scaled by 1/sqrt(2 * layers)) and an
  `_init_weights` that covers every parameter and buffer, so `from_pretrained` with missing keys never leaves
  memory uninitialised.
- A loss that never builds the logits in training (`apertus_hf.loss`: LM head and cross-entropy in chunks, at kept
  targets only), a fused xIELU on GPU (`compiled_xielu`), and regional compilation of the decoder layers
  (`compile_decoder_layers`).

Read top to bottom: xIELU, RMSNorm, rotary embedding, attention, MLP, decoder layer, pretrained base, model,
heads.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_layers import (
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import is_flash_attention_requested, merge_with_config_defaults
from transformers.utils.import_utils import is_tracing
from transformers.utils.output_capturing import capture_outputs

from .configuration_apertus import ApertusConfig
from .loss import chunked_causal_lm_loss


def xielu(
    hidden_states: torch.Tensor,
    alpha_p: torch.Tensor,
    alpha_n: torch.Tensor,
    beta: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """xIELU of `hidden_states` from the stored (pre-softplus) `alpha_p`, `alpha_n` and the fixed `beta`, `eps`."""
    alpha_p = nn.functional.softplus(alpha_p)
    alpha_n = beta + nn.functional.softplus(alpha_n)
    # Same operations in the same order as transformers' XIELUActivation, so bf16 gradients match bit for bit.
    positive = alpha_p * hidden_states * hidden_states + beta * hidden_states
    negative = (torch.expm1(torch.min(hidden_states, eps)) - hidden_states) * alpha_n + beta * hidden_states
    return torch.where(hidden_states > 0, positive, negative)


@functools.cache
def compiled_xielu() -> Callable:
    """The fused GPU xIELU: `torch.compile(xielu)`.

    Inductor turns the element-wise graph into one Triton kernel for the forward and one for the backward, and its
    partitioner saves only the input for the backward instead of four intermediates. Built on first use (importing
    the compiler costs most of a second); `dynamic=None` compiles static shapes first and symbolic ones after a
    shape changes.
    """
    return torch.compile(xielu, dynamic=None)


XIELU_IMPLEMENTATIONS = ("auto", "eager", "compiled")


class ApertusXIELU(nn.Module):
    """xIELU activation (arXiv 2411.13010) with the Apertus constants.

    Two learnable scalars stored before softplus, `alpha_p` and `alpha_n`; `beta` and `eps` are fixed buffers that
    are saved with the weights (the release checkpoints contain them).

        a_p = softplus(alpha_p)          a_n = beta + softplus(alpha_n)
        x > 0 :  a_p * x^2 + beta * x
        x <= 0:  a_n * (expm1(min(x, eps)) - x) + beta * x

    `implementation`: "eager" runs the formula op by op (bit-equal to `transformers`), "compiled" runs
    `compiled_xielu` (fused kernels; rounds once instead of after each op in bf16), "auto" compiles on CUDA only.
    Set it for a whole model with `ApertusPreTrainedModel.set_xielu_implementation`.
    """

    alpha_p_init = 0.8
    alpha_n_init = 0.8
    beta_value = 0.5
    eps_value = -1e-6

    def __init__(self):
        super().__init__()
        self.alpha_p = nn.Parameter(torch.tensor([self.initial_alpha_p()]))
        self.alpha_n = nn.Parameter(torch.tensor([self.initial_alpha_n()]))
        self.beta = nn.Buffer(torch.tensor(self.beta_value))
        self.eps = nn.Buffer(torch.tensor(self.eps_value))
        self.implementation = "auto"

    @classmethod
    def initial_alpha_p(cls) -> float:
        """softplus^-1(0.8): the stored value that gives a_p = 0.8."""
        return math.log(math.expm1(cls.alpha_p_init))

    @classmethod
    def initial_alpha_n(cls) -> float:
        """softplus^-1(0.8 - beta): the stored value that gives a_n = beta + softplus(alpha_n) = 0.8."""
        return math.log(math.expm1(cls.alpha_n_init - cls.beta_value))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = self.implementation == "compiled" or (self.implementation == "auto" and hidden_states.is_cuda)
        # Inside a compiled region (`compile_decoder_layers`) the formula is traced and fused with its neighbours.
        fused = fused and not torch.compiler.is_compiling()
        activation = compiled_xielu() if fused else xielu
        return activation(hidden_states, self.alpha_p, self.alpha_n, self.beta, self.eps)

    def extra_repr(self) -> str:
        return f"implementation={self.implementation}"


class ApertusRMSNorm(nn.Module):
    """RMSNorm computed in float32; the weight multiplies after the cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class ApertusRotaryEmbedding(nn.Module):
    """RoPE with the frequencies of `config.rope_parameters` (Llama-3 scaling for Apertus).

    Follows the library's rotary conventions (`rope_type`, `inv_freq`, `original_inv_freq`) so that
    `PreTrainedModel._init_weights` recomputes the non-persistent buffers after a meta-device load.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: ApertusConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: ApertusConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.resolved_head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (batch, seq) x (head_dim / 2) -> (batch, seq, head_dim / 2), angles in float32 whatever x's dtype
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (batch, heads, seq, head_dim) queries and keys by (batch, seq, head_dim) cos/sin."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (query * cos) + (rotate_half(query) * sin), (key * cos) + (rotate_half(key) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> (batch, kv_heads * n_rep, seq, head_dim) for grouped-query attention."""
    batch, num_key_value_heads, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class ApertusAttention(nn.Module):
    """Grouped-query attention with QK-norm (one RMSNorm over head_dim for q and for k, applied before RoPE)."""

    def __init__(self, config: ApertusConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.resolved_head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = ApertusRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = ApertusRMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_proj.writes_to_residual_stream = True

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        # (batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)
        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2))
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2))
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        # (batch, seq, heads, head_dim) -> (batch, seq, heads * head_dim)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class ApertusMLP(nn.Module):
    """The ungated Apertus MLP: down_proj(act(up_proj(x))), with xIELU as Apertus' activation.

    Like the stock class, any other activation of `transformers`' `ACT2FN` may be configured (`hidden_act`), e.g.
    for an ablation of the activation; only xIELU has parameters.
    """

    def __init__(self, config: ApertusConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.writes_to_residual_stream = True
        self.act_fn = ApertusXIELU() if config.hidden_act == "xielu" else ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))


class ApertusDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ApertusConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = ApertusAttention(config=config, layer_idx=layer_idx)
        self.mlp = ApertusMLP(config)
        self.attention_layernorm = ApertusRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feedforward_layernorm = ApertusRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.attention_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class ApertusPreTrainedModel(PreTrainedModel):
    config: ApertusConfig
    config_class = ApertusConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ApertusDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": ApertusDecoderLayer,
        "attentions": ApertusAttention,
    }

    def set_xielu_implementation(self, implementation: str) -> None:
        """Run every xIELU "eager" (op by op), "compiled" (fused kernels) or "auto" (compiled on CUDA only)."""
        if implementation not in XIELU_IMPLEMENTATIONS:
            raise ValueError(f"xIELU implementation {implementation!r} is not one of {XIELU_IMPLEMENTATIONS}.")
        for module in self.modules():
            if isinstance(module, ApertusXIELU):
                module.implementation = implementation

    def compile_decoder_layers(self, **compile_kwargs) -> None:
        """Regional compilation: `torch.compile` each decoder layer in place (arguments go to `torch.compile`).

        Compiling the repeated block instead of the whole model compiles one graph and reuses it for every layer
        (each layer's guards only differ in its parameters), and leaves what varies from batch to batch outside:
        the document mask construction and the loss. In place (`nn.Module.compile`), so parameter names and
        checkpoints stay those of the eager model.
        """
        for module in self.modules():
            if isinstance(module, ApertusDecoderLayer):
                module.compile(**compile_kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The Apertus pretraining initialisation, covering every parameter and buffer (`--init-method-std 0.008944` in
        swiss-ai/pretrain-code `pretraining/submit_apertus_8b.sh`; `scaled_init_method_normal` in swiss-ai/Megatron-LM
        `megatron/core/utils.py`).

        Normal(0, initializer_range) for embeddings, q/k/v, up_proj, LM head and classification heads; the output
        projections (o_proj, down_proj) are scaled down by sqrt(2 * num_hidden_layers) so the residual stream
        keeps its variance with depth. Norms start at one, xIELU at a_p = a_n = 0.8.
        """
        # `transformers` skips modules without parameters of their own when initialising custom code, so each
        # leaf initialises itself; the output projections carry a marker set in their parent's __init__.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) and getattr(module, "writes_to_residual_stream", False):
            init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, ApertusXIELU):
            init.constant_(module.beta, module.beta_value)
            init.constant_(module.eps, module.eps_value)
            init.constant_(module.alpha_p, module.initial_alpha_p())
            init.constant_(module.alpha_n, module.initial_alpha_n())
        else:
            # Other linear layers (q/k/v, up_proj, LM head, score head), embeddings (pad row zeroed), norms and
            # rotary buffers: the library's defaults with std = initializer_range are exactly the Apertus ones.
            super()._init_weights(module)


def flash_attention_document_kwargs(seq_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """FlashAttention's variable-length arguments (`cu_seq_lens_q/k`, `max_length_q/k`) for the documents of `seq_idx`
    (batch, seq): the batch flattened into one sequence of documents, each row starting a new one."""
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    # Zeros at the document starts make "position ids" whose restarts are exactly those starts.
    (cu_seq_lens_q, cu_seq_lens_k), (max_length_q, max_length_k) = prepare_fa_kwargs_from_position_ids((~starts).int())
    return {
        "cu_seq_lens_q": cu_seq_lens_q,
        "cu_seq_lens_k": cu_seq_lens_k,
        "max_length_q": max_length_q,
        "max_length_k": max_length_k,
    }


class ApertusModel(ApertusPreTrainedModel):
    def __init__(self, config: ApertusConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [ApertusDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = ApertusRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ApertusRotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        self.post_init()

    @staticmethod
    def document_mask_function(
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        batch_size: int,
    ) -> Callable | None:
        """A mask function keeping attention inside each packed document, where `transformers` would not add one.

        `create_causal_mask` finds documents from restarting `position_ids` only without a 2D mask and without a
        cache. A prefill (empty cache) or a padded batch of packed rows needs the same mask, so we build it from the
        same document indices. Decoding steps (a non-empty cache) continue the last document and need none.
        """
        library_detects_documents = attention_mask is None and cache is None
        if position_ids is None or library_detects_documents:
            return None
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        # A dynamic cache counts in Python ints; a static one in a tensor, on which a Python branch would break
        # `torch.compile(fullgraph=True)` and `torch.export`, so that case is decided inside the mask below.
        if isinstance(past_seen_tokens, int) and past_seen_tokens > 0:
            return None
        document_ids = find_packed_sequence_indices(position_ids.expand(batch_size, -1))
        if document_ids is None:
            return None
        last_index = document_ids.shape[-1] - 1
        decoding = torch.as_tensor(past_seen_tokens, device=document_ids.device) > 0

        def same_document(batch_idx, head_idx, q_idx, kv_idx):
            # A static cache makes kv longer than the prompt, and a decoding step's queries sit after it; those
            # slots are causally masked or, when decoding, not document-masked at all: the clamps only keep the
            # lookups in bounds.
            q_idx = torch.clamp(q_idx, max=last_index)
            kv_idx = torch.clamp(kv_idx, max=last_index)
            return decoding | (document_ids[batch_idx, q_idx] == document_ids[batch_idx, kv_idx])

        return same_document

    @staticmethod
    def given_document_mask_function(seq_idx: torch.Tensor, cache: Cache | None) -> Callable | None:
        """A mask function keeping attention inside the documents of `seq_idx` (batch, seq): the document of every
        token of a fresh forward pass. None when every row is a single document (plain causal attention)."""
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        if isinstance(past_seen_tokens, int) and past_seen_tokens > 0:
            raise ValueError(
                f"seq_idx gives the documents of a fresh forward pass, but the cache already holds {past_seen_tokens} "
                "tokens; pass seq_idx without a cache (or with an empty one)."
            )
        if not is_tracing(seq_idx) and bool((seq_idx == seq_idx[:, :1]).all()):
            return None
        last_index = seq_idx.shape[-1] - 1

        def same_document(batch_idx, head_idx, q_idx, kv_idx):
            # A static cache makes kv longer than the prompt; those slots are causally masked, the clamps only keep
            # the lookups in bounds.
            q_idx = torch.clamp(q_idx, max=last_index)
            kv_idx = torch.clamp(kv_idx, max=last_index)
            return seq_idx[batch_idx, q_idx] == seq_idx[batch_idx, kv_idx]

        return same_document

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        seq_idx = kwargs.pop("seq_idx", None)
        if seq_idx is None:
            mask_position_ids = position_ids
            and_mask_function = self.document_mask_function(position_ids, attention_mask, cache, inputs_embeds.shape[0])
        else:
            # Given documents, not restarts of the position ids, decide what attends to what.
            mask_position_ids = None
            and_mask_function = self.given_document_mask_function(seq_idx, cache)
            if is_flash_attention_requested(self.config) and attention_mask is None:
                # FlashAttention takes no mask function: its variable-length kernel takes the documents as lengths.
                kwargs.update(flash_attention_document_kwargs(seq_idx))
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=mask_position_ids,
            and_mask_function=and_mask_function,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class ApertusForCausalLM(ApertusPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: ApertusConfig):
        super().__init__(config)
        self.model = ApertusModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids to predict, unshifted (the loss shifts them); -100 marks positions left out of the loss.
        skip_logits (`bool`, *optional*):
            Compute the loss with `apertus_hf.loss.chunked_causal_lm_loss` (the LM head and cross-entropy in chunks,
            only at kept targets) and return no logits. Default: in training mode when labels are given, as
            `liger-kernel` does; `Trainer.evaluate` passes `True` itself when it needs only the loss, and reads the
            logits otherwise. A LoRA adapter on `lm_head` (or `logits_to_keep`) falls back to the full logits.

        ```python
        >>> import torch
        >>> from apertus_hf import ApertusConfig, ApertusForCausalLM
        >>> model = ApertusForCausalLM(ApertusConfig.from_preset("tiny"))
        >>> out = model(torch.tensor([[1, 17, 42]]), labels=torch.tensor([[1, 17, 42]]))
        >>> out.logits.shape
        torch.Size([1, 3, 1024])
        ```"""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

        has_targets = labels is not None or kwargs.get("shift_labels") is not None
        if skip_logits is None:
            skip_logits = self.training and has_targets
        if skip_logits and not has_targets:
            raise ValueError("skip_logits=True returns only the loss, so it needs labels (or shift_labels).")
        # A PEFT adapter replaces the `nn.Linear` head with a wrapper whose weight alone is not the head.
        chunked = (
            skip_logits and type(self.lm_head) is nn.Linear and isinstance(logits_to_keep, int) and logits_to_keep == 0
        )

        logits = loss = None
        if chunked:
            loss = chunked_causal_lm_loss(
                outputs.last_hidden_state,
                self.lm_head.weight,
                labels,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
                shift_labels=kwargs.get("shift_labels"),
            )
        else:
            hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
            logits = self.lm_head(hidden_states)
            if has_targets:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class ApertusForSequenceClassification(GenericForSequenceClassification, ApertusPreTrainedModel):
    """Apertus with a linear `score` head on the last non-padding token: the reward-model architecture."""


class ApertusForTokenClassification(GenericForTokenClassification, ApertusPreTrainedModel):
    """Apertus with a linear `score` head on every token (tagging), as `transformers.ApertusForTokenClassification`."""


__all__ = [
    "ApertusForCausalLM",
    "ApertusForSequenceClassification",
    "ApertusForTokenClassification",
    "ApertusModel",
    "ApertusPreTrainedModel",
    "ApertusXIELU",
]
