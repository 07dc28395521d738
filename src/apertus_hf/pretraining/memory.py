"""The memory one GPU needs for a pretraining step: a formula with named terms, for planning a run before launching it.

The setting is the one the Apertus recipes run in: DeepSpeed ZeRO-3 over N GPUs, bf16 mixed precision with fp32
gradients and master weights, activation checkpointing per decoder layer, flash or SDPA memory-efficient attention,
the compiled xIELU and the chunked LM-head loss (apertus_hf.loss). For a model of P parameters, L layers, hidden size
h, intermediate size f, a query heads and k key/value heads of size d, vocabulary V, and a micro-batch of
T = rows x seq_len tokens per GPU, in bytes:

Model states, sharded by ZeRO-3 (each GPU keeps 1/N of them):
    weights            2 P / N     bf16 weights
    gradients          4 P / N     fp32 gradients
    master_weights     4 P / N     fp32 copy the optimizer updates
    optimizer_moments  4 m P / N   m fp32 moments per weight: AdEMAMix keeps 3 (m1, m2, nu), AdamW 2
    gathered_layer     4 P_max     the largest module (at Apertus' vocabulary: the embedding or the LM head) gathered
                                   whole for its forward and backward, bf16 weights and bf16 gradients
With m = 2 these are the 18 P / N + 4 P_max of DeepSpeed's `estimate_zero3_model_states_mem_needs`; AdEMAMix's third
moment makes it 22 P / N + 4 P_max.

Activations of one micro-batch:
    checkpointed_inputs  2 L T h          the bf16 input of every layer, kept by activation checkpointing
  then the larger of two phases, which never overlap: the loss is computed (with its gradients) before the first
  layer's backward starts, and its buffers are freed by then.
  The layer phase: one layer recomputed for its backward
    layer_norms          T (2 h + (a + k) d) x 6
                                          attention and feed-forward RMSNorms and the q/k norms: each keeps an fp32
                                          copy of its input (4 B) and passes on a bf16 output (2 B)
    layer_attention      2 T (a + 2 k) d + 2 T (a + k) d + 2 T a d + 4 T a + 2 T h
                                          q/k/v projections, q/k after RoPE, the attention output and its fp32
                                          log-sum-exp (flash and SDPA's memory-efficient kernels keep no T x T
                                          scores), the residual sum
    layer_mlp            4 T f            up_proj output (the xIELU input) and xIELU output (the down_proj input);
                                          the compiled xIELU keeps nothing else
    layer_backward       2 T (f + h)      the bf16 activation gradient flowing back through the layer: one of width
                                          f in the MLP and one of width h on the residual stream
  The loss phase:
    loss                 6 T h + 4 T h + 6 C V + 6 V h
                                          the final norm (fp32 copy and bf16 output); the chunked loss's selected
                                          hidden states and their gradient; one chunk of C = min(T, 1024) rows of bf16
                                          logits and their fp32 softmax; the LM head's weight gradient, which the
                                          chunked loss computes in the forward: accumulated in fp32, kept in bf16
Without activation checkpointing there is no checkpointed_inputs term and every layer keeps its layer_norms,
layer_attention and layer_mlp; without the chunked loss the logits are materialised: 10 T V (bf16 logits, their fp32
copy and fp32 gradient) in place of the chunk and the selected rows.

Checked against a measurement (benchmarks/long_context_memory.py on an H200, Apertus-8B layer shape, one row,
benchmarks/RESULTS.md): the checkpointed input per layer is exact (64, 128, 256, 512 MiB at 8k, 16k, 32k, 64k), and
the part paid once (the larger phase: 4,160, 4,480, 8,004, 16,008 MiB) is 0.5-3% below the measured 4,228, 4,617,
8,130 and 16,091 MiB.

Not counted: the CUDA context and the allocator's fragmentation (commonly 1-3 GiB), communication buffers, and
DeepSpeed's prefetch of the next layers (`stage3_prefetch_bucket_size`), which adds up to one more layer's weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..configuration_apertus import ApertusConfig
from ..loss import DEFAULT_CHUNK_SIZE

GIB = 2**30

OPTIMIZER_MOMENTS = {"ademamix": 3, "adamw": 2}
"""fp32 moments per weight that each optimizer keeps."""


def parameter_counts(config: ApertusConfig) -> tuple[int, int]:
    """(all parameters, those of the largest single module), counted from the shape in `config` as DeepSpeed's
    `model_to_params` counts them on a built model: a module's own parameters, not its children's."""
    hidden, vocab, intermediate = config.hidden_size, config.vocab_size, config.intermediate_size
    head_dim, heads, kv_heads = config.resolved_head_dim, config.num_attention_heads, config.num_key_value_heads
    query_size, kv_size = heads * head_dim, kv_heads * head_dim
    attention = hidden * query_size + 2 * hidden * kv_size + query_size * hidden + 2 * head_dim  # + q/k norms
    mlp = 2 * hidden * intermediate + 2  # up, down and xIELU's alpha_p, alpha_n
    layer = attention + mlp + 2 * hidden  # + attention and feed-forward norms
    embeddings = vocab * hidden * (1 if config.tie_word_embeddings else 2)
    total = embeddings + config.num_hidden_layers * layer + hidden  # + final norm
    largest = max(vocab * hidden, hidden * intermediate, hidden * query_size)
    return total, largest


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one GPU needs for a training step, by term (see the module docstring for each formula)."""

    weights: int = field(metadata={"help": "bf16 weights, sharded: 2 P / N"})
    gradients: int = field(metadata={"help": "fp32 gradients, sharded: 4 P / N"})
    master_weights: int = field(metadata={"help": "fp32 master weights, sharded: 4 P / N"})
    optimizer_moments: int = field(metadata={"help": "fp32 optimizer moments, sharded: 4 m P / N"})
    gathered_layer: int = field(metadata={"help": "largest module gathered whole, bf16 weights + gradients: 4 P_max"})
    checkpointed_inputs: int = field(metadata={"help": "bf16 input of every layer (activation checkpointing)"})
    layer_norms: int = field(metadata={"help": "RMSNorm fp32 input copies and bf16 outputs"})
    layer_attention: int = field(metadata={"help": "q/k/v, RoPE outputs, attention output, log-sum-exp, residual"})
    layer_mlp: int = field(metadata={"help": "up_proj output and xIELU output"})
    layer_backward: int = field(metadata={"help": "activation gradient flowing back through the layer"})
    loss: int = field(metadata={"help": "final norm, LM head and cross-entropy buffers (the loss phase)"})
    activation_checkpointing: bool = field(
        default=True,
        metadata={"help": "Layers recomputed in the backward; without, their activations also live in the loss phase."},
    )

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.master_weights + self.optimizer_moments + self.gathered_layer

    @property
    def layer_phase(self) -> int:
        """The layer recomputed and backpropagated (with the layers kept whole when nothing is checkpointed)."""
        return self.layer_norms + self.layer_attention + self.layer_mlp + self.layer_backward

    @property
    def activations(self) -> int:
        if self.activation_checkpointing:
            return self.checkpointed_inputs + max(self.layer_phase, self.loss)
        return self.layer_phase + self.loss

    @property
    def total(self) -> int:
        return self.model_states + self.activations

    def terms(self) -> dict[str, int]:
        """{term name: bytes}, in the order of the formula."""
        return {name: getattr(self, name) for name in _TERMS}

    def table(self) -> str:
        """The terms in GiB, one per line, and the total."""
        width = max(len(name) for name in _TERMS)
        lines = [f"  {name:<{width}}  {value / GIB:8.2f} GiB  {_TERMS[name]}" for name, value in self.terms().items()]
        if self.activation_checkpointing:
            how = (
                f"model states + checkpointed_inputs + the larger of the layer phase ({self.layer_phase / GIB:.2f} "
                f"GiB) and the loss phase ({self.loss / GIB:.2f} GiB)"
            )
        else:
            how = "the sum of the terms (no activation checkpointing)"
        return "\n".join([*lines, f"  {'total':<{width}}  {self.total / GIB:8.2f} GiB  {how}"])


_TERMS = {field.name: field.metadata["help"] for field in dataclasses.fields(MemoryEstimate) if field.type == "int"}
"""The byte terms of MemoryEstimate and their help texts."""


def estimate_training_memory(
    config: ApertusConfig,
    *,
    seq_len: int,
    rows_per_gpu: int,
    num_gpus: int,
    optimizer: str = "ademamix",
    gradient_checkpointing: bool = True,
    chunked_loss: bool = True,
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> MemoryEstimate:
    """The per-GPU memory of one micro-batch of `rows_per_gpu` rows of `seq_len` tokens, with the model states
    sharded over `num_gpus` GPUs by ZeRO-3 (the formula of the module docstring)."""
    for name, value in (("seq_len", seq_len), ("rows_per_gpu", rows_per_gpu), ("num_gpus", num_gpus)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1.")
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(f"optimizer={optimizer!r} is unknown; choose one of {sorted(OPTIMIZER_MOMENTS)}.")
    parameters, largest = parameter_counts(config)
    hidden, vocab, intermediate = config.hidden_size, config.vocab_size, config.intermediate_size
    head_dim, heads, kv_heads = config.resolved_head_dim, config.num_attention_heads, config.num_key_value_heads
    layers = config.num_hidden_layers
    tokens = seq_len * rows_per_gpu

    layer_norms = tokens * (2 * hidden + (heads + kv_heads) * head_dim) * (4 + 2)
    layer_attention = (
        2 * tokens * (heads + 2 * kv_heads) * head_dim  # q, k, v projections
        + 2 * tokens * (heads + kv_heads) * head_dim  # q, k after RoPE
        + 2 * tokens * heads * head_dim  # attention output
        + 4 * tokens * heads  # fp32 log-sum-exp per query and head
        + 2 * tokens * hidden  # residual sum
    )
    layer_mlp = 2 * 2 * tokens * intermediate
    stored_layers = 1 if gradient_checkpointing else layers
    final_norm = 6 * tokens * hidden
    if chunked_loss:
        head = 2 * 2 * tokens * hidden + (2 + 4) * min(tokens, loss_chunk_size) * vocab + (4 + 2) * vocab * hidden
    else:
        head = (2 + 4 + 4) * tokens * vocab
    return MemoryEstimate(
        weights=2 * parameters // num_gpus,
        gradients=4 * parameters // num_gpus,
        master_weights=4 * parameters // num_gpus,
        optimizer_moments=4 * OPTIMIZER_MOMENTS[optimizer] * parameters // num_gpus,
        gathered_layer=4 * largest,
        checkpointed_inputs=2 * layers * tokens * hidden if gradient_checkpointing else 0,
        layer_norms=stored_layers * layer_norms,
        layer_attention=stored_layers * layer_attention,
        layer_mlp=stored_layers * layer_mlp,
        layer_backward=2 * tokens * (intermediate + hidden),
        loss=final_norm + head,
        activation_checkpointing=gradient_checkpointing,
    )


__all__ = ["GIB", "OPTIMIZER_MOMENTS", "MemoryEstimate", "estimate_training_memory", "parameter_counts"]
