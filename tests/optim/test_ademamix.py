"""AdEMAMix against a direct float64 transcription of its update, AdamW, its warmup formulas and checkpoint resume."""

import copy
import io
import math

import pytest
import torch
from torch import nn

import apertus_hf
from apertus_hf.optim import AdEMAMix, ademamix_alpha, ademamix_beta3, build_parameter_groups

LR, BETAS, ALPHA, EPS, WEIGHT_DECAY = 1e-2, (0.9, 0.999, 0.9999), 8.0, 1e-8, 0.1


def reference_ademamix(params, grads, weight_decays, lr, betas, alpha, eps, warmup):
    """The update of the AdEMAMix paper in float64, one tensor and one step at a time.

    `grads[t][i]` is the gradient of parameter i at step t, None when it has none (it then keeps its own count).
    """
    beta1, beta2, beta3_final = betas
    f_start = math.log(0.5) / math.log(beta1) - 1
    f_end = math.log(0.5) / math.log(beta3_final) - 1
    params = [p.double().clone() for p in params]
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [0] * len(params)
    for step_grads in grads:
        for i, grad in enumerate(step_grads):
            if grad is None:
                continue
            steps[i] += 1
            t, g = steps[i], grad.double()
            alpha_t = alpha * min(t / warmup, 1.0)
            f_t = (1 - t / warmup) * f_start + (t / warmup) * f_end
            beta3 = 0.5 ** (1 / (f_t + 1)) if t < warmup else beta3_final
            m1[i] = beta1 * m1[i] + (1 - beta1) * g
            m2[i] = beta3 * m2[i] + (1 - beta3) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            numerator = m1[i] / (1 - beta1**t) + alpha_t * m2[i]
            params[i] = params[i] - lr * (
                numerator / ((v[i] / (1 - beta2**t)).sqrt() + eps) + weight_decays[i] * params[i]
            )
    return params


def test_matches_reference_through_warmups_with_missed_steps():
    shapes = [(5, 3), (7,), (2, 4)]
    params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    initial = [p.detach().clone() for p in params]
    # The third parameter gets a gradient only every other step, so its step count (and its alpha and beta3) lags
    # behind that of the first, in the same group.
    grads = [[torch.randn(shape) if i < 2 or t % 2 == 0 else None for i, shape in enumerate(shapes)] for t in range(20)]
    optimizer = AdEMAMix(
        [{"params": [params[0], params[2]]}, {"params": [params[1]], "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        alpha=ALPHA,
        eps=EPS,
        weight_decay=WEIGHT_DECAY,
        alpha_warmup_steps=10,
        beta3_warmup_steps=10,
    )
    for step_grads in grads:
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad
        optimizer.step()

    expected = reference_ademamix(initial, grads, [WEIGHT_DECAY, 0.0, WEIGHT_DECAY], LR, BETAS, ALPHA, EPS, warmup=10)
    assert [optimizer.state[p]["step"] for p in params] == [20, 20, 10]
    for param, start, want in zip(params, initial, expected, strict=True):
        assert not torch.allclose(param, start)  # it trained
        torch.testing.assert_close(param.double(), want, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_adamw():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    # beta3 and its warmup are irrelevant once the slow EMA has weight 0.
    ours = AdEMAMix(model.parameters(), lr=LR, betas=BETAS, alpha=0.0, eps=EPS, weight_decay=WEIGHT_DECAY)
    adamw = torch.optim.AdamW(
        twin.parameters(), lr=LR, betas=BETAS[:2], eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False
    )
    inputs, targets = torch.randn(100, 32, 8), torch.randn(100, 32, 4)
    for x, y in zip(inputs, targets, strict=True):
        for net, optimizer in ((model, ours), (twin, adamw)):
            optimizer.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
    # AdamW's theta *= 1 - lr * wd before its update is the formula's lr * wd * theta of the pre-update theta, and
    # AdEMAMix groups its arithmetic as AdamW does, so the two agree to the last bit, not just to rounding.
    for param, twin_param in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(param, twin_param)


def test_alpha_warmup_is_linear():
    assert ademamix_alpha(1, 8.0, 100) == pytest.approx(0.08)
    assert ademamix_alpha(25, 8.0, 100) == pytest.approx(2.0)
    assert ademamix_alpha(100, 8.0, 100) == 8.0
    assert ademamix_alpha(5000, 8.0, 100) == 8.0
    assert ademamix_alpha(1, 8.0, None) == ademamix_alpha(1, 8.0, 0) == 8.0


def test_beta3_warmup_is_half_life_linear():
    # f(0.9) = ln(0.5)/ln(0.9) - 1 = 5.5788, f(0.9999) = 6930.1252. At t = 50 of T = 100 the half-life is the mean
    # 1 + (5.5788 + 6930.1252) / 2 = 3468.852 steps, so beta3 = 0.5 ** (1 / 3468.852) = exp(-1.99820e-4).
    assert ademamix_beta3(50, 0.9, 0.9999, 100) == pytest.approx(0.9998001996254803, rel=1e-12)
    assert ademamix_beta3(1, 0.9, 0.9999, 100) == pytest.approx(0.9909001624025741, rel=1e-12)
    assert ademamix_beta3(99, 0.9, 0.9999, 100) == pytest.approx(0.9998989909183897, rel=1e-12)
    assert ademamix_beta3(100, 0.9, 0.9999, 100) == 0.9999
    assert ademamix_beta3(1, 0.9, 0.9999, None) == ademamix_beta3(1, 0.9, 0.9999, 0) == 0.9999

    half_life = [math.log(0.5) / math.log(ademamix_beta3(t, 0.9, 0.9999, 100)) for t in range(1, 101)]
    start, end = math.log(0.5) / math.log(0.9), math.log(0.5) / math.log(0.9999)
    assert half_life == pytest.approx([start + (end - start) * t / 100 for t in range(1, 101)], rel=1e-9)
    # beta1 = 0 (no fast EMA) starts the warmup from an EMA that has no memory.
    assert ademamix_beta3(1, 0.0, 0.9999, 100) == pytest.approx(0.5 ** (1 / (6931.1252 / 100)), rel=1e-6)


def run(model, optimizer, batches):
    for x in batches:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def make_optimizer(model):
    return AdEMAMix(build_parameter_groups(model, WEIGHT_DECAY), lr=LR, alpha_warmup_steps=8, beta3_warmup_steps=8)


def test_resume_from_state_dict_is_exact():
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 3))
    resumed = copy.deepcopy(model)
    batches = torch.randn(12, 5, 6)
    # The uninterrupted run and the first half of the interrupted one cross the end of the warmups (step 8) apart.
    run(model, make_optimizer(model), batches)

    optimizer = make_optimizer(resumed)
    run(resumed, optimizer, batches[:6])
    checkpoint = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
    checkpoint.seek(0)
    loaded = torch.load(checkpoint)

    restarted = copy.deepcopy(resumed)
    restarted.load_state_dict(loaded["model"])
    optimizer = make_optimizer(restarted)
    optimizer.load_state_dict(loaded["optimizer"])
    run(restarted, optimizer, batches[6:])

    assert optimizer.state[restarted[0].weight]["step"] == 12
    for param, want in zip(restarted.parameters(), model.parameters(), strict=True):
        assert torch.equal(param, want)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"betas": (0.9, 0.999)}, "betas"),
        ({"betas": (1.0, 0.999, 0.9999)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1, 0.9999)}, r"betas\[1\]"),
        ({"betas": (0.9, 0.999, 1.0)}, r"betas\[2\]"),
        ({"alpha": -1.0}, "alpha"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"alpha_warmup_steps": -1}, "alpha_warmup_steps"),
        ({"beta3_warmup_steps": 10.5}, "beta3_warmup_steps"),
    ],
)
def test_invalid_arguments_raise(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        AdEMAMix([nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_gradients_raise():
    embedding = nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdEMAMix(embedding.parameters()).step()


def test_parameter_groups_of_apertus():
    model = apertus_hf.ApertusForCausalLM(apertus_hf.ApertusConfig.from_preset("tiny"))
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    decayed, not_decayed = build_parameter_groups(model, 0.1)

    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    for group in (decayed, not_decayed):
        assert [id(p) for p in group["params"]] == [id(model.get_parameter(n)) for n in group["param_names"]]
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert set(decayed["param_names"]) | set(not_decayed["param_names"]) == trainable
    assert not set(decayed["param_names"]) & set(not_decayed["param_names"])
    assert "model.layers.1.mlp.up_proj.weight" not in trainable

    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"} <= set(
        decayed["param_names"]
    )
    assert all(model.get_parameter(name).ndim == 2 for name in decayed["param_names"])
    no_decay_suffixes = (
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "attention_layernorm.weight",
        "feedforward_layernorm.weight",
        "mlp.act_fn.alpha_p",
        "mlp.act_fn.alpha_n",
    )
    expected = {f"model.layers.{i}.{suffix}" for i in range(2) for suffix in no_decay_suffixes} | {"model.norm.weight"}
    assert set(not_decayed["param_names"]) == expected

    # The groups go straight into the optimizer, which keeps the names in its state dict.
    optimizer = AdEMAMix(build_parameter_groups(model, 0.1))
    assert [g["param_names"] for g in optimizer.state_dict()["param_groups"]] == [
        decayed["param_names"],
        not_decayed["param_names"],
    ]
