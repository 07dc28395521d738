"""The fused xIELU and the regionally compiled decoder layers compute what the eager model computes; generation
compiles as one graph and exports with a static cache."""

import copy

import pytest
import torch
import torch._dynamo
from transformers.masking_utils import create_causal_mask

from apertus_hf import ApertusConfig, ApertusForCausalLM
from apertus_hf.modeling_apertus import ApertusXIELU


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def trained_xielu() -> ApertusXIELU:
    """An xIELU whose scalars moved away from their initial values, as after training."""
    activation = ApertusXIELU()
    with torch.no_grad():
        activation.alpha_p.fill_(0.3)
        activation.alpha_n.fill_(-0.7)
    return activation


def xielu_output_and_gradients(activation, hidden_states):
    hidden_states = hidden_states.detach().requires_grad_()
    activation.zero_grad(set_to_none=True)
    output = activation(hidden_states)
    # A weighted sum so every output element gets its own upstream gradient.
    (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
    return output.detach(), hidden_states.grad, activation.alpha_p.grad, activation.alpha_n.grad


def test_compiled_xielu_equals_the_formula_forward_and_backward():
    generator = torch.Generator().manual_seed(0)
    # Both branches, the eps clamp near zero and large magnitudes.
    hidden_states = torch.cat([torch.randn(4, 300, generator=generator) * 4, torch.linspace(-1e-5, 1e-5, 300)[None]])
    activation = trained_xielu()
    activation.implementation = "eager"
    expected = xielu_output_and_gradients(activation, hidden_states)
    activation.implementation = "compiled"
    actual = xielu_output_and_gradients(activation, hidden_states)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_xielu_implementation_is_chosen_per_device_and_validated():
    model = ApertusForCausalLM(ApertusConfig.from_preset("tiny"))
    activations = [m for m in model.modules() if isinstance(m, ApertusXIELU)]
    assert len(activations) == model.config.num_hidden_layers
    assert {a.implementation for a in activations} == {"auto"}
    model.set_xielu_implementation("eager")
    assert {a.implementation for a in activations} == {"eager"}
    with pytest.raises(ValueError, match="not one of"):
        model.set_xielu_implementation("triton")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("xielu_implementation", ["eager", "compiled"])
def test_a_decoder_layer_compiles_to_one_graph_without_breaks(attn_implementation, xielu_implementation):
    torch.manual_seed(0)
    config = ApertusConfig.from_preset("tiny")
    model = ApertusForCausalLM(config).train()
    model.set_attn_implementation(attn_implementation)
    model.set_xielu_implementation(xielu_implementation)
    hidden_states = torch.randn(2, 48, config.hidden_size, requires_grad=True)
    # Two packed documents per row: the layer gets the document mask, as in pretraining.
    position_ids = torch.cat([torch.arange(30), torch.arange(18)]).expand(2, -1)
    mask = create_causal_mask(
        config=model.config,
        inputs_embeds=hidden_states,
        attention_mask=None,
        cache=None,
        position_ids=position_ids,
    )
    assert mask is not None
    explanation = torch._dynamo.explain(model.model.layers[0])(
        hidden_states,
        attention_mask=mask,
        position_embeddings=model.model.rotary_emb(hidden_states, position_ids),
        position_ids=position_ids,
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_layers_train_with_the_losses_and_weights_of_the_eager_model():
    torch.manual_seed(0)
    config = ApertusConfig.from_preset("tiny")
    eager = ApertusForCausalLM(config).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_decoder_layers()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (2, 64), generator=generator)
    position_ids = torch.cat([torch.arange(40), torch.arange(24)]).expand(2, -1)

    def train(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses, first_gradients = [], None
        for _ in range(3):
            loss = model(input_ids=input_ids, labels=input_ids, position_ids=position_ids, use_cache=False).loss
            loss.backward()
            if first_gradients is None:
                first_gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, first_gradients

    (eager_losses, eager_gradients), (compiled_losses, compiled_gradients) = train(eager), train(compiled)
    assert eager_losses[-1] < eager_losses[0]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    # Compiled in place: the names (and so the checkpoints) are those of the eager model.
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    for name, gradient in eager_gradients.items():
        torch.testing.assert_close(compiled_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_generation_compiled_full_graph_with_a_static_cache_equals_eager_and_stock():
    """`_can_compile_fullgraph = True` holds: the decoding forward compiles without a graph break (the document mask
    decides on the static cache's tensor length inside the mask, not in Python), and generates what eager does."""
    from transformers import CompileConfig

    from tests.helpers import left_padded_batch, model_pair, tiny_config

    ours, stock = model_pair(tiny_config(), "sdpa")
    input_ids, attention_mask = left_padded_batch([6, 3], vocab_size=256)
    generate_kwargs = {
        "attention_mask": attention_mask,
        "max_new_tokens": 6,
        "do_sample": False,
        "pad_token_id": 3,
        "cache_implementation": "static",
    }
    eager = ours.generate(input_ids, **generate_kwargs)
    # `backend="eager"` runs Dynamo alone: a full graph is proven without paying for Inductor on the CPU.
    # `_compile_all_devices` makes `generate` compile off CUDA too (transformers' own tests set it the same way).
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True
    compiled = ours.generate(input_ids, compile_config=compile_config, **generate_kwargs)
    assert hasattr(ours, "_compiled_call"), "generate did not take the compiled path"
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled, stock.generate(input_ids, **generate_kwargs))


def test_torch_export_with_a_static_cache_decodes_like_generate():
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    from tests.helpers import tiny_config

    model = ApertusForCausalLM(tiny_config()).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.cache_implementation = "static"
    exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=24)
    exported = exportable.export(
        input_ids=torch.tensor([[1]], dtype=torch.long), cache_position=torch.tensor([0], dtype=torch.long)
    )
    # One module for the whole sequence: its buffers are the static cache (each `exported.module()` starts empty).
    decoder = exported.module()
    prompt = torch.randint(4, 256, (1, 5))
    tokens = prompt[0].tolist()
    for position in range(prompt.shape[1] + 6):
        logits = decoder(input_ids=torch.tensor([[tokens[position]]]), cache_position=torch.tensor([position]))
        if position >= prompt.shape[1] - 1:
            tokens.append(int(logits[0, -1].argmax()))
    model.generation_config.cache_implementation = None
    expected = model.generate(prompt, max_new_tokens=7, do_sample=False, pad_token_id=3)
    assert tokens == expected[0].tolist()
