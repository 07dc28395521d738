"""The FLOP count behind MFU, checked against PyTorch's FLOP counter, and the device peak lookup."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from apertus_hf import ApertusConfig, ApertusForCausalLM
from apertus_hf.pretraining.metrics import measure_matmul_flops, peak_flops_per_device, training_flops_per_token


@pytest.mark.parametrize("num_key_value_heads", [1, 4])
def test_flops_per_token_equal_the_matmul_flops_of_a_training_step(num_key_value_heads):
    config = ApertusConfig.from_preset(
        "tiny", num_attention_heads=4, num_key_value_heads=num_key_value_heads, vocab_size=512
    )
    model = ApertusForCausalLM(config).train()
    # Eager attention multiplies full (seq x seq) score matrices, which is what the count assumes (no discount for
    # the causal mask); the plain loss projects every position.
    model.set_attn_implementation("eager")
    seq_len, batch = 48, 2
    input_ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, labels=input_ids, use_cache=False, skip_logits=False).loss.backward()
    assert counter.get_total_flops() == training_flops_per_token(config, seq_len) * batch * seq_len


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Some Future GPU", None),
    ],
)
def test_the_peak_is_looked_up_from_the_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops_per_device(torch.device("cuda")) == peak
    assert peak_flops_per_device(torch.device("cpu")) is None


def test_the_measured_matmul_peak_is_a_rate():
    flops = measure_matmul_flops(torch.device("cpu"), torch.float32, size=256, seconds=0.05)
    assert 1e8 < flops < 1e14
