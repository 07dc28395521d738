"""GPU checks: bf16 and fp32 parity with the stock model, packed rows on the GPU attention kernels."""

import importlib.util

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from apertus_hf import ApertusForCausalLM
from apertus_hf.loss import chunked_causal_lm_loss
from apertus_hf.modeling_apertus import ApertusXIELU
from tests.helpers import left_padded_batch, model_pair, tiny_config

pytestmark = pytest.mark.cuda

GPU_BACKENDS = ["eager", "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_logits_and_generation_equal_stock_on_cuda(backend, dtype):
    ours, stock = model_pair(tiny_config(num_attention_heads=8, num_key_value_heads=2, head_dim=32), backend)
    ours.set_xielu_implementation("eager")  # op by op, like the stock model; the fused one is tested below
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
    ours.set_xielu_implementation("eager")
    ours.to("cuda", torch.bfloat16).train()
    stock.to("cuda", torch.bfloat16).train()
    input_ids = torch.randint(4, 256, (2, 64), device="cuda")
    # The plain path (full logits, op-by-op xIELU) runs the stock kernels in the stock order: bit-equal gradients.
    ours(input_ids, labels=input_ids, skip_logits=False).loss.backward()
    stock(input_ids, labels=input_ids).loss.backward()
    stock_grads = dict(stock.named_parameters())
    for name, parameter in ours.named_parameters():
        assert torch.equal(parameter.grad, stock_grads[name].grad), name


def test_fast_training_step_stays_close_to_stock_in_bf16_autocast():
    ours, stock = model_pair(tiny_config(), "sdpa")
    ours.to("cuda").train()  # fused xIELU (auto on CUDA) and the chunked loss (training mode, labels given)
    stock.to("cuda").train()
    input_ids = torch.randint(4, 256, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours_output = ours(input_ids, labels=input_ids)
        stock_output = stock(input_ids, labels=input_ids)
    assert ours_output.logits is None
    ours_output.loss.backward()
    stock_output.loss.backward()
    assert ours_output.loss.item() == pytest.approx(stock_output.loss.item(), rel=1e-2)
    stock_grads = dict(stock.named_parameters())
    for name, parameter in ours.named_parameters():
        cosine = torch.nn.functional.cosine_similarity(
            parameter.grad.flatten().float(), stock_grads[name].grad.flatten().float(), dim=0
        )
        assert cosine > 0.99, (name, cosine.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_xielu_equals_the_formula_on_cuda(dtype):
    activation = ApertusXIELU().cuda()
    with torch.no_grad():
        activation.alpha_p.fill_(0.3)
        activation.alpha_n.fill_(-0.7)
    hidden_states = (torch.randn(8, 4096, device="cuda") * 3).to(dtype)
    upstream = torch.randn_like(hidden_states)

    def run(implementation, inputs):
        activation.implementation = implementation
        activation.zero_grad(set_to_none=True)
        inputs = inputs.detach().requires_grad_()
        output = activation(inputs)
        (output * upstream.to(output.dtype)).sum().backward()
        return output.float(), inputs.grad.float(), activation.alpha_p.grad, activation.alpha_n.grad

    # The reference: the formula in float32 on the same (rounded) inputs.
    reference = run("eager", hidden_states.float())
    fused = run("compiled", hidden_states)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(fused[0], reference[0], **tolerance)
    torch.testing.assert_close(fused[1], reference[1], **tolerance)
    # The scalar gradients are sums over 32k elements: relative tolerance only.
    for got, want in zip(fused[2:], reference[2:], strict=True):
        torch.testing.assert_close(got.float(), want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_loss_equals_the_plain_path_on_cuda(autocast):
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 700, 64, device="cuda", generator=generator)
    weight = torch.randn(4096, 64, device="cuda", generator=generator) * 0.1
    labels = torch.randint(0, 4096, (2, 700), device="cuda", generator=generator)
    labels[:, :50] = -100

    def run(loss_fn):
        inputs = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(*inputs)
        loss.backward()
        return loss.detach(), inputs[0].grad, inputs[1].grad

    plain = run(lambda h, w: ForCausalLMLoss(h @ w.t(), labels, vocab_size=4096))
    chunked = run(lambda h, w: chunked_causal_lm_loss(h, w, labels, chunk_size=256))
    tolerance = {"rtol": 2e-2, "atol": 1e-4} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    for got, want in zip(chunked, plain, strict=True):
        torch.testing.assert_close(got.float(), want.float(), **tolerance)
