"""GPU checks: bf16 and fp32 parity with the stock model, packed rows on the GPU attention kernels."""

import importlib.util

import pytest
import torch

from apertus_hf import ApertusForCausalLM
from tests.helpers import left_padded_batch, model_pair, tiny_config

pytestmark = pytest.mark.cuda

GPU_BACKENDS = ["eager", "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_logits_and_generation_equal_stock_on_cuda(backend, dtype):
    ours, stock = model_pair(tiny_config(num_attention_heads=8, num_key_value_heads=2, head_dim=32), backend)
    ours.to("cuda", dtype)
    stock.to("cuda", dtype)
    input_ids, attention_mask = left_padded_batch([12, 7], vocab_size=256)
    input_ids, attention_mask = input_ids.cuda(), attention_mask.cuda()
    real = attention_mask.bool()
    with torch.no_grad():
        ours_logits = ours(input_ids, attention_mask=attention_mask).logits
        stock_logits = stock(input_ids, attention_mask=attention_mask).logits
    tolerance = 1e-5 if dtype == torch.float32 else 0.0  # same kernels in the same order: bf16 must match exactly
    assert (ours_logits[real] - stock_logits[real]).abs().max().item() <= tolerance
    generated = [
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, pad_token_id=3)
        for model in (ours, stock)
    ]
    assert torch.equal(*generated)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_packed_row_equals_documents_alone_on_cuda(backend):
    model = ApertusForCausalLM(tiny_config()).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation(backend)
    lengths = [37, 64, 27]
    documents = [torch.randint(4, 256, (length,), device="cuda") for length in lengths]
    row = torch.cat(documents)[None]
    position_ids = torch.cat([torch.arange(length, device="cuda") for length in lengths])[None]
    with torch.no_grad():
        for use_cache in (False, True):
            packed = model(row, position_ids=position_ids, use_cache=use_cache).logits[0].float()
            alone = torch.cat([model(d[None], use_cache=False).logits[0] for d in documents]).float()
            assert (packed - alone).abs().max().item() < 0.05, use_cache
            mixed = model(row, use_cache=False).logits[0].float()
            assert (mixed[37:] - alone[37:]).abs().max().item() > 0.05


def test_bf16_training_step_gradients_equal_stock():
    ours, stock = model_pair(tiny_config(), "sdpa")
    ours.to("cuda", torch.bfloat16).train()
    stock.to("cuda", torch.bfloat16).train()
    input_ids = torch.randint(4, 256, (2, 64), device="cuda")
    ours(input_ids, labels=input_ids).loss.backward()
    stock(input_ids, labels=input_ids).loss.backward()
    stock_grads = dict(stock.named_parameters())
    for name, parameter in ours.named_parameters():
        assert torch.equal(parameter.grad, stock_grads[name].grad), name
