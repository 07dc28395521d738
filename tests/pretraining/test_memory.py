"""The per-GPU memory formula: parameter counts against the built model, the model states against a hand computation
and DeepSpeed's own ZeRO-3 estimate, the activation terms against the formula written out."""

import re

import pytest
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_live,
    model_to_params,
)

from apertus_hf import ApertusConfig, ApertusForCausalLM
from apertus_hf.pretraining.memory import GIB, estimate_training_memory, parameter_counts
from tests.helpers import tiny_config

# tests/helpers.TINY: vocabulary 256, hidden 64, intermediate 160, 2 layers, 4 query heads and 2 key/value heads of 16.
TINY_PARAMETERS = (
    2 * 256 * 64  # embeddings and LM head (untied)
    + 2
    * (
        64 * 64  # q_proj
        + 2 * 64 * 32  # k_proj, v_proj
        + 64 * 64  # o_proj
        + 2 * 16  # q_norm, k_norm
        + 2 * 64 * 160  # up_proj, down_proj
        + 2  # xIELU alpha_p, alpha_n
        + 2 * 64  # attention and feed-forward norms
    )
    + 64  # final norm
)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_parameter_counts_match_the_built_model(preset):
    """Counted from the config as DeepSpeed's model_to_params counts the built model (all, and the largest module)."""
    config = tiny_config() if preset == "tiny" else ApertusConfig.from_preset(preset)
    assert parameter_counts(config) == model_to_params(ApertusForCausalLM(config))


def test_parameter_counts_by_hand():
    assert parameter_counts(tiny_config()) == (TINY_PARAMETERS, 256 * 64)
    assert TINY_PARAMETERS == 98_692


def test_released_parameter_counts():
    assert parameter_counts(ApertusConfig.from_preset("apertus-8b")) == (8_053_338_176, 131072 * 4096)
    assert parameter_counts(ApertusConfig.from_preset("apertus-70b")) == (70_599_864_480, 131072 * 8192)


def test_model_states_by_hand():
    """AdEMAMix: bf16 weights 2 B, fp32 gradients 4 B, fp32 master weights 4 B, three fp32 moments 12 B per weight,
    sharded over 8 GPUs; plus the largest module gathered whole (bf16 weights and gradients, 4 B per weight)."""
    estimate = estimate_training_memory(tiny_config(), seq_len=32, rows_per_gpu=1, num_gpus=8)
    assert estimate.weights == 2 * TINY_PARAMETERS // 8 == 24_673
    assert estimate.gradients == 4 * TINY_PARAMETERS // 8 == 49_346
    assert estimate.master_weights == 4 * TINY_PARAMETERS // 8 == 49_346
    assert estimate.optimizer_moments == 12 * TINY_PARAMETERS // 8 == 148_038
    assert estimate.gathered_layer == 4 * 256 * 64 == 65_536
    assert estimate.model_states == 336_939


@pytest.mark.parametrize(("gpus_per_node", "nodes"), [(1, 1), (4, 2), (4, 64)])
def test_model_states_match_deepspeed_zero3_estimate(gpus_per_node, nodes):
    """With AdamW's two moments the model states are DeepSpeed's ZeRO-3 figure without offloading,
    18 P / N + 4 P_max; AdEMAMix's third moment adds 4 P / N."""
    config = ApertusConfig.from_preset("small")
    total, largest = model_to_params(ApertusForCausalLM(config))
    _, deepspeed_gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=False
    )
    gpus = gpus_per_node * nodes
    adamw = estimate_training_memory(config, seq_len=256, rows_per_gpu=1, num_gpus=gpus, optimizer="adamw")
    ademamix = estimate_training_memory(config, seq_len=256, rows_per_gpu=1, num_gpus=gpus)
    # DeepSpeed rounds 18 P / N once, we round each term; they differ by the rounding of four divisions at most.
    assert abs(adamw.model_states - deepspeed_gpu_bytes) <= 4
    assert ademamix.model_states - adamw.model_states == 4 * total // gpus


def test_model_states_match_deepspeed_all_live_printout(capsys):
    """estimate_zero3_model_states_mem_needs_all_live prints the GPU memory of each offload option in GB (2^30 B)
    with two decimals; its no-offload line is our AdamW model states."""
    config = ApertusConfig.from_preset("small")
    estimate_zero3_model_states_mem_needs_all_live(ApertusForCausalLM(config), num_gpus_per_node=1, num_nodes=1)
    line = next(
        line for line in capsys.readouterr().out.splitlines() if "offload_param=none, offload_optimizer=none" in line
    )
    printed_gpu_gb = float(re.findall(r"([\d.]+)GB", line)[1])
    adamw = estimate_training_memory(config, seq_len=256, rows_per_gpu=1, num_gpus=1, optimizer="adamw")
    assert printed_gpu_gb == round(adamw.model_states / GIB, 2) > 0


def test_activation_terms_by_hand():
    """The activation terms of tests/helpers.TINY (h 64, f 160, 4 query and 2 key/value heads of 16, 2 layers,
    vocabulary 256) for 2 rows of 512 tokens: T = 1024."""
    tokens, hidden, intermediate, vocab = 1024, 64, 160, 256
    estimate = estimate_training_memory(tiny_config(), seq_len=512, rows_per_gpu=2, num_gpus=1)
    assert estimate.checkpointed_inputs == 2 * 2 * tokens * hidden
    assert estimate.layer_norms == tokens * (2 * hidden + (4 + 2) * 16) * 6
    assert estimate.layer_attention == (
        2 * tokens * (4 + 2 * 2) * 16
        + 2 * tokens * (4 + 2) * 16
        + 2 * tokens * 4 * 16
        + 4 * tokens * 4
        + 2 * tokens * hidden
    )
    assert estimate.layer_mlp == 4 * tokens * intermediate
    assert estimate.layer_backward == 2 * tokens * (intermediate + hidden)
    assert estimate.loss == 6 * tokens * hidden + 4 * tokens * hidden + 6 * 1024 * vocab + 6 * vocab * hidden
    # The layer and loss phases never overlap: the total takes the larger.
    layer_phase = estimate.layer_norms + estimate.layer_attention + estimate.layer_mlp + estimate.layer_backward
    assert estimate.total == estimate.model_states + estimate.checkpointed_inputs + max(layer_phase, estimate.loss)


def test_activations_without_checkpointing_keep_every_layer_and_no_seq_squared_term():
    config = tiny_config()
    checkpointed = estimate_training_memory(config, seq_len=256, rows_per_gpu=1, num_gpus=1)
    stored = estimate_training_memory(config, seq_len=256, rows_per_gpu=1, num_gpus=1, gradient_checkpointing=False)
    assert stored.checkpointed_inputs == 0
    for term in ("layer_norms", "layer_attention", "layer_mlp"):
        assert getattr(stored, term) == config.num_hidden_layers * getattr(checkpointed, term)
    # Without checkpointing every layer's activations are still alive while the loss is computed.
    assert stored.total == sum(stored.terms().values())
    # Linear in the tokens (no seq_len x seq_len attention scores): doubling seq_len doubles every per-token term.
    doubled = estimate_training_memory(config, seq_len=512, rows_per_gpu=1, num_gpus=1)
    for term in ("checkpointed_inputs", "layer_norms", "layer_attention", "layer_mlp", "layer_backward"):
        assert getattr(doubled, term) == 2 * getattr(checkpointed, term)


# Measured on an H200 by benchmarks/long_context_memory.py (benchmarks/RESULTS.md): Apertus-8B layer shape, one row,
# bf16, activation checkpointing, chunked loss, SDPA; MiB per checkpointed layer and MiB paid once, by seq_len.
MEASURED_8B_LAYER_SHAPE = {
    8192: (64.0, 4228.3),
    16384: (128.0, 4616.6),
    32768: (256.0, 8129.5),
    65536: (512.0, 16091.0),
}


@pytest.mark.parametrize("seq_len", sorted(MEASURED_8B_LAYER_SHAPE))
def test_activations_match_the_measured_step(seq_len):
    """The checkpointed input per layer is exact; the part paid once (the larger of the layer and loss phases) is
    within 5% of what the GPU measured."""
    per_layer, once = MEASURED_8B_LAYER_SHAPE[seq_len]
    estimate = estimate_training_memory(
        ApertusConfig.from_preset("apertus-8b"), seq_len=seq_len, rows_per_gpu=1, num_gpus=1
    )
    assert estimate.checkpointed_inputs / 32 / 2**20 == per_layer
    assert max(estimate.layer_phase, estimate.loss) / 2**20 == pytest.approx(once, rel=0.05)


def test_plain_loss_materialises_the_logits():
    config = tiny_config()
    plain = estimate_training_memory(config, seq_len=4096, rows_per_gpu=1, num_gpus=1, chunked_loss=False)
    assert plain.loss == 6 * 4096 * 64 + 10 * 4096 * 256


def test_released_64k_memory():
    """The figures the long-context recipes quote: 8B on 128 GPUs and 70B on 256, one 65,536-token row each."""
    eight = estimate_training_memory(
        ApertusConfig.from_preset("apertus-8b"), seq_len=65536, rows_per_gpu=1, num_gpus=128
    )
    seventy = estimate_training_memory(
        ApertusConfig.from_preset("apertus-70b"), seq_len=65536, rows_per_gpu=1, num_gpus=256
    )
    assert eight.checkpointed_inputs == 32 * 65536 * 4096 * 2 == 16 * GIB
    assert seventy.checkpointed_inputs == 80 * 65536 * 8192 * 2 == 80 * GIB
    assert round(eight.total / GIB, 1) == 34.9
    assert round(seventy.total / GIB, 1) == 120.2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seq_len": 0}, "seq_len=0 must be >= 1"),
        ({"num_gpus": 0}, "num_gpus=0 must be >= 1"),
        ({"optimizer": "sgd"}, "optimizer='sgd' is unknown"),
    ],
)
def test_bad_input_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        estimate_training_memory(tiny_config(), **{"seq_len": 8, "rows_per_gpu": 1, "num_gpus": 1, **options})
