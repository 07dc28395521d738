"""The memory one GPU needs for a pretraining step: a formula with named terms, for planning a run before launching it.

The setting is the one the Apertus recipes run in: bf16 mixed precision, activation checkpointing per decoder layer,
flash or SDPA memory-efficient attention, the compiled xIELU and the chunked LM-head loss (apertus_hf.loss), under one
of three engines (the shipped accelerate configs):

    zero3          DeepSpeed ZeRO-3 (accelerate_configs/zero3.yaml): the model cast to bf16; weights, gradients,
                   master weights and optimizer moments sharded over the N GPUs
    zero3_offload  the same with offload_param and offload_optimizer on the CPU (zero3_offload.yaml): the sharded
                   model states and the optimizer step live in host memory; the GPU keeps the gathered modules
    ddp            data parallel (ddp.yaml): every GPU holds the fp32 model, its gradients and optimizer state whole;
                   torch autocast runs the matmuls in bf16

For a model of P parameters, L layers, hidden size h, intermediate size f, a query heads and k key/value heads of size
d, vocabulary V, and a micro-batch of T = rows x seq_len tokens per GPU, in bytes:

Model states. Under zero3 (and zero3_offload, where the first four live in host memory):
    weights                2 P / N      bf16 partitions
    gradients              2 P / N      the bf16 gradient partition (DeepSpeed accumulates in the model's dtype); with
                                        offload also the 4 P / N fp32 gradient buffer the CPU optimizer steps from
    master_weights         4 P / N      fp32 copy the optimizer updates
    optimizer_moments      4 m P / N    m fp32 moments per weight: AdEMAMix 3 (m1, m2, nu), AdamW 2
    gathered_layer         4 P_max      the largest module (at Apertus' vocabulary the embedding or the LM head)
                                        gathered whole for its forward and backward: bf16 weights and gradients
    communication_buffers  2 B + 2 min(Q, P)
                                        the reduce bucket (B = reduce_bucket_size, DeepSpeed's default 5e8 elements)
                                        and the parameters prefetched ahead (Q = stage3_prefetch_bucket_size, 5e7)
Under ddp: weights 2 P (the bf16 copies autocast caches through the forward), gradients 4 P (fp32, on the fp32
parameters), master_weights 4 P (the fp32 parameters themselves), optimizer_moments 4 m P, gathered_layer 0, and
communication_buffers 4 P (DDP's gradient buckets, a second copy of the gradients: gradient_as_bucket_view is off).
The optimizer step, when the activations are gone:
    optimizer_step         4 S + 4 t S  the fp32 copy of the gradient of the sub-group being stepped (S = min(P / N,
                                        sub_group_size 1e9); none with offload, which keeps the buffer above) and the
                                        update's temporaries: t fp32 tensors per weight, AdEMAMix 2 (numerators and
                                        denominators), torch AdamW 1; 4 t P under ddp; in host memory with offload

DeepSpeed's own estimate (`estimate_zero3_model_states_mem_needs`) is 18 P / N + 4 P_max for AdamW: 2 (bf16 weights)
+ 4 (fp32 gradients) + 4 (master weights) + 8 (moments). The code it estimates keeps the gradient partition in bf16
(2 B) through the backward and makes the fp32 copy (4 B) only in the step: our model states are 16 P / N + 4 P_max
during the forward and backward and 20 P / N + 4 P_max in the step (AdEMAMix's third moment adds 4 P / N to each).

Activations of one micro-batch. The residual stream (the layer inputs and outputs, the norms' outputs, the final
hidden states) is r bytes per value: 2 under ZeRO-3, whose bf16 model computes everything in bf16 but the norms; 4
under DDP, where autocast runs only the matmuls in bf16.
    checkpointed_inputs  r L T h          the input of every layer, kept by activation checkpointing
  then the larger of two phases, which never overlap: the loss is computed (with its gradients) before the first
  layer's backward starts, and its buffers are freed by then.
  The layer phase: one layer recomputed for its backward
    layer_norms          T (2 h (4 + r) + (a + k) d (4 + 2))
                                          attention and feed-forward RMSNorms and the q/k norms: each keeps an fp32
                                          copy of its input (4 B) and passes on its output
    layer_attention      2 T (a + 2 k) d + 2 T (a + k) d + 2 T a d + 4 T a + r T h
                                          q/k/v projections, q/k after RoPE, the attention output and its fp32
                                          log-sum-exp (flash and SDPA's memory-efficient kernels keep no T x T
                                          scores), the residual sum
    layer_mlp            4 T f            up_proj output (the xIELU input) and xIELU output (the down_proj input);
                                          the compiled xIELU keeps nothing else
    layer_backward       2 T f + r T h    the activation gradient flowing back through the layer: one of width f in
                                          the MLP and one of width h on the residual stream
  The loss phase:
    loss                 (4 + r) T h + 2 r T h + 6 C V + 6 V h
                                          the final norm; the chunked loss's selected hidden states and their
                                          gradient; one chunk of C = min(T, 1024) rows of bf16 logits and their fp32
                                          softmax; the LM head's weight gradient, which the chunked loss computes in
                                          the forward: accumulated in fp32, plus its bf16 copy (ZeRO-3) or the bf16 copy
                                          of the fp32 weight it multiplies by (DDP)
Without activation checkpointing there is no checkpointed_inputs term and every layer keeps its layer_norms,
layer_attention and layer_mlp; without the chunked loss the logits are materialised: 10 T V (bf16 logits, their fp32
copy and fp32 gradient) in place of the chunk and the selected rows.

The peak of a step is model states + the larger of the activations and the optimizer step (conservative for the
step: ZeRO-3 has released the gathered modules by then).

Checked against measurements. The ZeRO-3 layer and loss phases against benchmarks/long_context_memory.py on an H200
(Apertus-8B layer shape, one row, benchmarks/RESULTS.md): the checkpointed input per layer is exact (64, 128, 256,
512 MiB at 8k, 16k, 32k, 64k), and the part paid once (the larger phase: 4,160, 4,480, 8,004, 16,008 MiB) is 0.5-3%
below the measured 4,228, 4,617, 8,130 and 16,091 MiB. The ZeRO-3 model states and reduce bucket against the tensors
a two-process bf16 DeepSpeed engine holds on the CPU (exact to its partition padding), and what its step adds in the
forward and backward (tests/pretraining/test_memory.py): 0.3% above the plan, or one to three more bf16 copies of
the embedding or LM head (2 P_max each) when DeepSpeed's gathering and prefetch time so. The DDP activations (r = 4)
are derived, not measured.

Not counted: the CUDA context and the allocator's fragmentation (commonly 1-3 GiB), NCCL's buffers, ZeRO-3 parameters
kept gathered beyond the prefetch (bounded by stage3_max_live_parameters, 1e9 by default; the extra copies of the
largest modules above) and those under stage3_param_persistence_threshold (1e5 elements: the norms), which stay
gathered on every GPU. A plan leaves headroom for them (apertus_hf.pretraining.capacity).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..configuration_apertus import ApertusConfig
from ..loss import DEFAULT_CHUNK_SIZE

GIB = 2**30

OPTIMIZER_MOMENTS = {"ademamix": 3, "adamw": 2}
"""fp32 moments per weight that each optimizer keeps."""

OPTIMIZER_STEP_TEMPORARIES = {"ademamix": 2, "adamw": 1}
"""fp32 tensors per weight that each optimizer's update allocates: AdEMAMix's numerators and denominators (its
torch._foreach_* update), torch AdamW's denominators (its foreach implementation, the default on GPUs)."""

ENGINES = {
    "zero3": "DeepSpeed ZeRO-3 (accelerate_configs/zero3.yaml)",
    "zero3_offload": (
        "DeepSpeed ZeRO-3, parameters and optimizer offloaded to the CPU (accelerate_configs/zero3_offload.yaml)"
    ),
    "ddp": "DDP with bf16 autocast (accelerate_configs/ddp.yaml)",
}
"""The engines a plan can assume, as the shipped accelerate configs run them."""

DEEPSPEED_REDUCE_BUCKET_SIZE = 500_000_000
"""zero_optimization.reduce_bucket_size, DeepSpeed's default (the shipped configs leave it): the elements of the bucket
ZeRO reduce-scatters gradients through, allocated once in the gradients' dtype."""

DEEPSPEED_PREFETCH_BUCKET_SIZE = 50_000_000
"""zero_optimization.stage3_prefetch_bucket_size, DeepSpeed's default: parameters gathered ahead of their module."""

DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000
"""zero_optimization.sub_group_size, DeepSpeed's default: the optimizer steps the partition in groups of this many."""

STATE_TERMS = ("weights", "gradients", "master_weights", "optimizer_moments")
"""The model states that ZeRO-3 shards (and that offloading moves to host memory)."""


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

    weights: int = field(metadata={"help": "weights: bf16 partitions (ZeRO-3) or autocast's bf16 copies (DDP)"})
    gradients: int = field(metadata={"help": "gradients: bf16 partition (+ fp32 buffer offloaded) or fp32 (DDP)"})
    master_weights: int = field(metadata={"help": "fp32 master weights (the fp32 parameters under DDP)"})
    optimizer_moments: int = field(metadata={"help": "fp32 optimizer moments: 4 m bytes per weight"})
    gathered_layer: int = field(metadata={"help": "largest module gathered whole, bf16 weights + gradients: 4 P_max"})
    communication_buffers: int = field(metadata={"help": "ZeRO reduce bucket and prefetch, or DDP's gradient buckets"})
    checkpointed_inputs: int = field(metadata={"help": "input of every layer (activation checkpointing)"})
    layer_norms: int = field(metadata={"help": "RMSNorm fp32 input copies and outputs"})
    layer_attention: int = field(metadata={"help": "q/k/v, RoPE outputs, attention output, log-sum-exp, residual"})
    layer_mlp: int = field(metadata={"help": "up_proj output and xIELU output"})
    layer_backward: int = field(metadata={"help": "activation gradient flowing back through the layer"})
    loss: int = field(metadata={"help": "final norm, LM head and cross-entropy buffers (the loss phase)"})
    optimizer_step: int = field(metadata={"help": "fp32 gradient copy and update temporaries of the optimizer step"})
    activation_checkpointing: bool = field(
        default=True,
        metadata={"help": "Layers recomputed in the backward; without, their activations also live in the loss phase."},
    )
    engine: str = field(default="zero3", metadata={"help": f"The engine the terms assume: one of {sorted(ENGINES)}."})

    @property
    def host_terms(self) -> tuple[str, ...]:
        """The terms that live in host memory rather than on the GPU."""
        return (*STATE_TERMS, "optimizer_step") if self.engine == "zero3_offload" else ()

    def _on_gpu(self, names) -> int:
        return sum(getattr(self, name) for name in names if name not in self.host_terms)

    @property
    def model_states(self) -> int:
        """The model states on the GPU (with offloading, the gathered module and the buffers only)."""
        return self._on_gpu((*STATE_TERMS, "gathered_layer", "communication_buffers"))

    @property
    def host_model_states(self) -> int:
        """The model states in host memory (offloading only)."""
        return sum(getattr(self, name) for name in STATE_TERMS if name in self.host_terms)

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
        """The GPU's peak: the model states and the larger of the activations and the optimizer step."""
        return self.model_states + max(self.activations, self._on_gpu(("optimizer_step",)))

    @property
    def host_total(self) -> int:
        """Host memory per GPU (offloading only): the offloaded states and the optimizer step run on the CPU."""
        return self.host_model_states + sum(
            getattr(self, name) for name in ("optimizer_step",) if name in self.host_terms
        )

    def terms(self) -> dict[str, int]:
        """{term name: bytes}, in the order of the formula."""
        return {name: getattr(self, name) for name in TERMS}

    def table(self) -> str:
        """The terms in GiB, one per line (host memory marked), and the total."""
        width = max(len(name) for name in TERMS)
        lines = []
        for name, value in self.terms().items():
            where = " (host)" if name in self.host_terms else ""
            lines.append(f"  {name:<{width}}  {value / GIB:8.2f} GiB  {TERMS[name]}{where}")
        activations = (
            f"checkpointed_inputs + the larger of the layer phase ({self.layer_phase / GIB:.2f} GiB) and the loss "
            f"phase ({self.loss / GIB:.2f} GiB)"
            if self.activation_checkpointing
            else "the layer and loss terms of every layer (no activation checkpointing)"
        )
        how = f"model states ({self.model_states / GIB:.2f} GiB) + the larger of the activations ({activations})"
        how += " and the optimizer step" if "optimizer_step" not in self.host_terms else ""
        lines.append(f"  {'total':<{width}}  {self.total / GIB:8.2f} GiB  {how}")
        if self.host_terms:
            lines.append(
                f"  {'host memory':<{width}}  {self.host_total / GIB:8.2f} GiB  per GPU, the terms marked (host)"
            )
        return "\n".join(lines)


TERMS = {field.name: field.metadata["help"] for field in dataclasses.fields(MemoryEstimate) if field.type == "int"}
"""The byte terms of MemoryEstimate and their help texts."""


def estimate_training_memory(
    config: ApertusConfig,
    *,
    seq_len: int,
    rows_per_gpu: int,
    num_gpus: int,
    optimizer: str = "ademamix",
    engine: str = "zero3",
    gradient_checkpointing: bool = True,
    chunked_loss: bool = True,
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> MemoryEstimate:
    """The per-GPU memory of one micro-batch of `rows_per_gpu` rows of `seq_len` tokens on `num_gpus` GPUs under
    `engine` (the formula of the module docstring)."""
    for name, value in (("seq_len", seq_len), ("rows_per_gpu", rows_per_gpu), ("num_gpus", num_gpus)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1.")
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(f"optimizer={optimizer!r} is unknown; choose one of {sorted(OPTIMIZER_MOMENTS)}.")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is unknown; choose one of {sorted(ENGINES)}.")
    parameters, largest = parameter_counts(config)
    hidden, vocab, intermediate = config.hidden_size, config.vocab_size, config.intermediate_size
    head_dim, heads, kv_heads = config.resolved_head_dim, config.num_attention_heads, config.num_key_value_heads
    layers = config.num_hidden_layers
    tokens = seq_len * rows_per_gpu
    moments, temporaries = OPTIMIZER_MOMENTS[optimizer], OPTIMIZER_STEP_TEMPORARIES[optimizer]

    if engine == "ddp":
        residual = 4  # autocast leaves the embeddings, norms and residual adds in fp32
        states = {
            "weights": 2 * parameters,
            "gradients": 4 * parameters,
            "master_weights": 4 * parameters,
            "optimizer_moments": 4 * moments * parameters,
            "gathered_layer": 0,
            "communication_buffers": 4 * parameters,
            "optimizer_step": 4 * temporaries * parameters,
        }
    else:
        residual = 2
        shard = parameters // num_gpus
        step_group = min(shard, DEEPSPEED_SUB_GROUP_SIZE)
        # Offloaded, the optimizer keeps a pinned fp32 gradient buffer beside the bf16 partition, and steps from it.
        fp32_gradients = 4 * shard if engine == "zero3_offload" else 0
        states = {
            "weights": 2 * shard,
            "gradients": 2 * shard + fp32_gradients,
            "master_weights": 4 * shard,
            "optimizer_moments": 4 * moments * shard,
            "gathered_layer": 4 * largest,
            "communication_buffers": 2 * DEEPSPEED_REDUCE_BUCKET_SIZE
            + 2 * min(DEEPSPEED_PREFETCH_BUCKET_SIZE, parameters),
            "optimizer_step": (0 if fp32_gradients else 4 * step_group) + 4 * temporaries * step_group,
        }

    layer_norms = tokens * (2 * hidden * (4 + residual) + (heads + kv_heads) * head_dim * (4 + 2))
    layer_attention = (
        2 * tokens * (heads + 2 * kv_heads) * head_dim  # q, k, v projections
        + 2 * tokens * (heads + kv_heads) * head_dim  # q, k after RoPE
        + 2 * tokens * heads * head_dim  # attention output
        + 4 * tokens * heads  # fp32 log-sum-exp per query and head
        + residual * tokens * hidden  # residual sum
    )
    layer_mlp = 2 * 2 * tokens * intermediate
    stored_layers = 1 if gradient_checkpointing else layers
    final_norm = (4 + residual) * tokens * hidden
    if chunked_loss:
        head = (
            2 * residual * tokens * hidden + (2 + 4) * min(tokens, loss_chunk_size) * vocab + (4 + 2) * vocab * hidden
        )
    else:
        head = (2 + 4 + 4) * tokens * vocab
    return MemoryEstimate(
        **states,
        checkpointed_inputs=residual * layers * tokens * hidden if gradient_checkpointing else 0,
        layer_norms=stored_layers * layer_norms,
        layer_attention=stored_layers * layer_attention,
        layer_mlp=stored_layers * layer_mlp,
        layer_backward=tokens * (2 * intermediate + residual * hidden),
        loss=final_norm + head,
        activation_checkpointing=gradient_checkpointing,
        engine=engine,
    )


__all__ = [
    "ENGINES",
    "GIB",
    "OPTIMIZER_MOMENTS",
    "OPTIMIZER_STEP_TEMPORARIES",
    "STATE_TERMS",
    "TERMS",
    "MemoryEstimate",
    "estimate_training_memory",
    "parameter_counts",
]
