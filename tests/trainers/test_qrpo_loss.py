"""`qrpo_loss` against the QRPO loss of the Apertus tech report (arXiv 2509.14233, §4.3 'Preference Alignment')
computed by hand, and its partition functions against numerical integration."""

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from apertus_hf.preference import quantile_rewards
from apertus_hf.trainers import qrpo_loss
from apertus_hf.trainers.qrpo import beta_log_partition, transform_quantile_reward


def spec_loss(logp, ref_logp, reward, ref_rewards, beta, transform, length=None, length_normalize=False, cap=0.1):
    """The QRPO loss (Apertus tech report, arXiv 2509.14233, §4.3 'Preference Alignment') for one completion, in
    plain Python."""
    n = len(ref_rewards)
    quantile = sum(ref <= reward for ref in ref_rewards) / n
    if length_normalize:
        beta = min(beta / length, cap)
    if transform == "identity":
        f = quantile
        beta_log_z = beta * math.log(beta) + 1 + beta * math.log1p(-math.exp(-1 / beta))
    elif transform == "log":
        f = math.log(max(quantile, 1 / n))
        beta_log_z = beta * math.log(beta / (beta + 1))
    else:
        f = NormalDist().inv_cdf(min(max(quantile, 1 / n), (n - 1) / n))
        beta_log_z = beta * (1 / (2 * beta**2))
    return (f - beta_log_z - beta * (logp - ref_logp)) ** 2


def test_quantile_reward_counts_ties_as_below():
    rewards = torch.tensor([0.5, 0.1, 2.0, 0.2])
    ref_rewards = torch.tensor([[0.2, 0.5, 0.5, 0.9]] * 4)
    assert quantile_rewards(rewards, ref_rewards).tolist() == [0.75, 0.0, 1.0, 0.25]


@pytest.mark.parametrize(
    ("transform", "beta", "logp", "ref_rewards", "reward", "expected"),
    [
        # Worked by hand: beta log Z = 0.5 ln 0.5 + 1 + 0.5 ln(1 - e^-2) = 0.580720; (0.75 - 0.580720 - 0.2)^2.
        ("identity", 0.5, -9.6, [0.2, 0.5, 0.5, 0.9], 0.5, 0.0009436987875690255),
        # R_q = 0 clamps to 1/4: (ln 0.25 - 2 ln(2/3) + 0.6)^2.
        ("log", 2.0, -10.3, [0.2, 0.5, 0.5, 0.9], 0.1, 0.0006069253563327098),
        # R_q = 1 clamps to 3/4: (Phi^-1(0.75) - 1/3 - 0.3)^2.
        ("normal_icdf", 1.5, -9.8, [0.2, 0.5, 0.5, 0.9], 3.0, 0.0016938506489803163),
    ],
)
def test_loss_equals_hand_computed_values(transform, beta, logp, ref_rewards, reward, expected):
    loss = qrpo_loss(
        torch.tensor([logp], dtype=torch.float64),
        torch.tensor([-10.0], dtype=torch.float64),
        torch.tensor([reward]),
        torch.tensor([ref_rewards]),
        beta=beta,
        transform=transform,
    )
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("transform", ["identity", "log", "normal_icdf"])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_loss_matches_spec_on_a_batch(transform, length_normalize):
    generator = torch.Generator().manual_seed(0)
    batch, n = 7, 5
    logps = -20 * torch.rand(batch, generator=generator, dtype=torch.float64)
    ref_logps = logps + torch.randn(batch, generator=generator, dtype=torch.float64)
    ref_rewards = torch.randint(0, 4, (batch, n), generator=generator).double()  # ties on purpose
    rewards = torch.randint(0, 4, (batch,), generator=generator).double()
    lengths = torch.tensor([3, 10, 49, 50, 51, 200, 1000])
    beta = 5.0 if length_normalize else 0.3

    losses = qrpo_loss(
        logps,
        ref_logps,
        rewards,
        ref_rewards,
        beta,
        transform,
        completion_lengths=lengths,
        length_normalize=length_normalize,
    )

    expected = [
        spec_loss(
            logps[i].item(),
            ref_logps[i].item(),
            rewards[i].item(),
            ref_rewards[i].tolist(),
            beta,
            transform,
            length=lengths[i].item(),
            length_normalize=length_normalize,
        )
        for i in range(batch)
    ]
    np.testing.assert_allclose(losses.tolist(), expected, rtol=1e-5, atol=1e-7)


def test_length_normalised_beta_is_capped():
    """beta=5: completions up to 50 tokens use the cap 0.1, longer ones 5/|y|."""
    args = dict(rewards=torch.tensor([1.0, 1.0]), ref_rewards=torch.tensor([[0.0, 2.0]] * 2), transform="identity")
    logps, ref_logps = torch.tensor([-3.0, -3.0]), torch.tensor([-4.0, -4.0])
    normalised = qrpo_loss(
        logps, ref_logps, beta=5.0, completion_lengths=torch.tensor([20, 100]), length_normalize=True, **args
    )
    capped = qrpo_loss(logps, ref_logps, beta=0.1, **args)
    plain = qrpo_loss(logps, ref_logps, beta=0.05, **args)
    assert normalised[0].item() == pytest.approx(capped[0].item())
    assert normalised[1].item() == pytest.approx(plain[1].item())


@pytest.mark.parametrize(
    ("cap_unnormalized_beta", "expected"),
    [
        # The QRPO paper: beta 5 as given. beta log Z = 5 ln 5 + 1 + 5 ln(1 - e^-0.2) = 8.047190 + 1 - 8.538859
        # = 0.508331; (0.75 - 0.508331 - 5 * 0.1)^2 = (-0.258331)^2.
        (False, 0.0667346768441783),
        # swiss-ai/posttraining: beta min(5, 0.1) = 0.1. beta log Z = 0.1 ln 0.1 + 1 + 0.1 ln(1 - e^-10)
        # = -0.230259 + 1 - 0.000005 = 0.769737; (0.75 - 0.769737 - 0.1 * 0.1)^2 = (-0.029737)^2.
        (True, 0.0008842862312579517),
    ],
)
def test_unnormalized_beta_is_capped_only_on_request(cap_unnormalized_beta, expected):
    loss = qrpo_loss(
        torch.tensor([-9.9], dtype=torch.float64),
        torch.tensor([-10.0], dtype=torch.float64),
        torch.tensor([0.5]),
        torch.tensor([[0.2, 0.5, 0.5, 0.9]]),  # R_q = 3/4
        beta=5.0,
        transform="identity",
        cap_unnormalized_beta=cap_unnormalized_beta,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_cap_unnormalized_beta_leaves_the_length_normalised_loss_alone():
    args = dict(
        logps=torch.tensor([-3.0, -3.0, -3.0]),
        ref_logps=torch.tensor([-4.0, -4.0, -4.0]),
        rewards=torch.tensor([1.0, 0.0, 2.0]),
        ref_rewards=torch.tensor([[0.0, 2.0]] * 3),
        beta=5.0,
        completion_lengths=torch.tensor([20, 100, 1000]),  # beta/|y| = 0.25 (capped to 0.1), 0.05, 0.005
        length_normalize=True,
    )
    assert torch.equal(qrpo_loss(**args, cap_unnormalized_beta=True), qrpo_loss(**args, cap_unnormalized_beta=False))


@pytest.mark.parametrize("transform", ["identity", "log", "normal_icdf"])
@pytest.mark.parametrize("beta", [0.05, 0.3, 1.0, 5.0])
def test_partition_function_is_exact(transform, beta):
    """beta log Z_f = beta log E_{u ~ U(0,1)}[exp(f(u) / beta)]: the quantile of a reference sample is uniform."""
    if transform == "normal_icdf":
        # Phi^-1(u) for uniform u is a standard normal z: integrate over z, where the heavy upper tail is resolved.
        z = np.linspace(-60.0, 60.0, 2_000_001)
        log_weights = -0.5 * z**2 - 0.5 * np.log(2 * np.pi) + np.log(z[1] - z[0])
        scaled = z / beta + log_weights
    else:
        u = (np.arange(2_000_000) + 0.5) / 2_000_000
        scaled = (u if transform == "identity" else np.log(u)) / beta - np.log(u.size)
    log_z = scaled.max() + np.log(np.sum(np.exp(scaled - scaled.max())))
    exact = beta_log_partition(torch.tensor(beta, dtype=torch.float64), transform).item()
    assert exact == pytest.approx(beta * log_z, rel=1e-4, abs=1e-6)


def test_transform_clamps_keep_the_loss_finite():
    quantile = torch.tensor([0.0, 1.0])
    assert transform_quantile_reward(quantile, "log", 10).tolist() == pytest.approx([math.log(0.1), 0.0])
    icdf = transform_quantile_reward(quantile, "normal_icdf", 10)
    assert icdf.tolist() == pytest.approx([NormalDist().inv_cdf(0.1), NormalDist().inv_cdf(0.9)])
    with pytest.raises(ValueError, match="at least 2 reference rewards"):
        transform_quantile_reward(quantile, "normal_icdf", 1)


def test_gradient_moves_the_log_ratio_towards_the_target():
    """The best completion (R_q = 1) is pushed up, the worst (R_q = 0) down, from an equal start."""
    logps = torch.tensor([-5.0, -5.0], requires_grad=True)
    losses = qrpo_loss(
        logps, torch.tensor([-5.0, -5.0]), torch.tensor([9.0, -9.0]), torch.tensor([[0.0, 1.0, 2.0]] * 2), beta=0.5
    )
    losses.sum().backward()
    assert logps.grad[0] < 0 < logps.grad[1]


def test_invalid_arguments_are_named():
    args = (torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="beta must be > 0"):
        qrpo_loss(*args, torch.zeros(2, 3), beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        qrpo_loss(*args, torch.zeros(2, 0), beta=1.0)
    with pytest.raises(ValueError, match="completion_lengths"):
        qrpo_loss(*args, torch.zeros(2, 3), beta=1.0, length_normalize=True)
    with pytest.raises(ValueError, match="Unknown QRPO transform"):
        qrpo_loss(*args, torch.zeros(2, 3), beta=1.0, transform="square")
