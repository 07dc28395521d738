"""AdEMAMix, the optimizer of the Apertus pretraining recipe, and its weight-decay parameter groups.

AdEMAMix (Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", arXiv 2409.03137) is
AdamW with a second, much slower EMA of the gradients mixed into the numerator. At optimizer step t (from 1):

    m1 = beta1 * m1 + (1 - beta1) * g                      fast EMA, bias-corrected
    m2 = beta3(t) * m2 + (1 - beta3(t)) * g                slow EMA, not bias-corrected
    v  = beta2 * v + (1 - beta2) * g^2
    theta -= lr * ((m1 / (1 - beta1^t) + alpha(t) * m2) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * theta)

alpha(t) and beta3(t) warm up to their final values (`ademamix_alpha`, `ademamix_beta3`) because a slow EMA that
is mixed in at full strength from the start destabilises early training. Apertus uses betas (0.9, 0.999, 0.9999),
alpha 8, eps 1e-8, weight decay 0.1 and 100k warmup steps for both alpha and beta3.

Why not a library class: `torch.optim` has no AdEMAMix, and `bitsandbytes.optim.AdEMAMix` (0.50), which computes
the same update, is not a dependency of this project, keeps its state in its own layout and updates one tensor at
a time on CPU. This one is a plain `torch.optim.Optimizer` on `torch._foreach_*` ops.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# The learnable scalars of the xIELU activation: activation-shape parameters rather than weights, so never decayed.
_NO_DECAY_SUFFIXES = ("act_fn.alpha_p", "act_fn.alpha_n")


def ademamix_alpha(step: int, alpha: float, warmup_steps: int | None) -> float:
    """The weight of the slow EMA at optimizer step `step` (counted from 1), after a linear warmup from 0.

        alpha(t) = min(t / T, 1) * alpha

    `warmup_steps` (T) None or 0 means no warmup. This is the reference code's `linear_warmup_scheduler`.
    """
    if not warmup_steps or step >= warmup_steps:
        return alpha
    return step / warmup_steps * alpha


def _half_life_minus_one(beta: float) -> float:
    """f(beta) = ln(0.5) / ln(beta) - 1, where ln(0.5) / ln(beta) is the half-life in steps of an EMA with `beta`."""
    if beta == 0.0:
        return -1.0  # The limit beta -> 0: an EMA that keeps nothing of the past has a half-life of 0 steps.
    return math.log(0.5) / math.log(beta) - 1.0


def ademamix_beta3(step: int, beta_start: float, beta_end: float, warmup_steps: int | None) -> float:
    """The slow-EMA factor at optimizer step `step` (counted from 1), after the half-life-linear warmup.

    f(beta) = ln(0.5) / ln(beta) - 1 is interpolated linearly from `beta_start` (AdEMAMix: beta1) to `beta_end`
    (beta3) and mapped back, so the half-life of the slow EMA grows linearly (a linear ramp of beta itself would
    stay near beta_start, in half-life terms, for almost the whole warmup):

        f_t = (1 - t / T) * f(beta_start) + (t / T) * f(beta_end),    beta3(t) = 0.5 ** (1 / (f_t + 1))    for t < T
        beta3(t) = beta_end                                                                              for t >= T

    `warmup_steps` (T) None or 0 means no warmup. This is the reference code's `linear_hl_warmup_scheduler`, without
    the 1e-8 that it adds to beta inside the logarithm (which moves beta3 by about 1e-8 and guards beta = 0,
    handled here by its limit).
    """
    if not warmup_steps or step >= warmup_steps:
        return beta_end
    fraction = step / warmup_steps
    f_t = (1.0 - fraction) * _half_life_minus_one(beta_start) + fraction * _half_life_minus_one(beta_end)
    return 0.5 ** (1.0 / (f_t + 1.0))


def _check_warmup_steps(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be None or an integer >= 0 (None or 0: no warmup), got {value!r}")


class AdEMAMix(torch.optim.Optimizer):
    """AdEMAMix (arXiv 2409.03137) with the alpha and beta3 warmups and decoupled weight decay, as Apertus uses it.

    The update is the one in this module's docstring; weight decay is decoupled as in AdamW (`lr * weight_decay *
    theta`, on the parameter before the update), so with `alpha=0` this is exactly `torch.optim.AdamW`.

    Args:
        params: parameters or parameter groups (see `build_parameter_groups` for the Apertus weight-decay split).
        lr: learning rate, >= 0 (usually driven by a scheduler such as `WSDSchedule`).
        betas: (beta1, beta2, beta3), each in [0, 1): fast EMA, second moment, final slow EMA.
        alpha: final weight of the slow EMA, >= 0.
        eps: added to the denominator, >= 0.
        weight_decay: decoupled weight decay, >= 0.
        alpha_warmup_steps: steps of the linear alpha warmup from 0 (`ademamix_alpha`); None or 0 for none.
        beta3_warmup_steps: steps of the half-life-linear beta3 warmup from beta1 (`ademamix_beta3`); None or 0 for
            none.

    State per parameter: `step` (an int, so that parameters that miss updates keep their own count, as in
    `torch.optim.AdamW`), `exp_avg` (m1), `exp_avg_slow` (m2) and `exp_avg_sq` (v). Sparse gradients are not
    supported.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 8.0,
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        alpha_warmup_steps: int | None = None,
        beta3_warmup_steps: int | None = None,
    ):
        # `not x >= 0` rather than `x < 0` so that NaN is rejected too.
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 3:
            raise ValueError(f"betas must be (beta1, beta2, beta3), got {betas!r}")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{index}] must be in [0, 1), got {beta}")
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        _check_warmup_steps("alpha_warmup_steps", alpha_warmup_steps)
        _check_warmup_steps("beta3_warmup_steps", beta3_warmup_steps)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "alpha": alpha,
            "eps": eps,
            "weight_decay": weight_decay,
            "alpha_warmup_steps": alpha_warmup_steps,
            "beta3_warmup_steps": beta3_warmup_steps,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one optimization step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            # alpha(t) and beta3(t) depend on each parameter's own step count; bucketing by it lets every foreach
            # call below take plain scalars (in practice a group has a single bucket).
            params_by_step: dict[int, list[torch.Tensor]] = defaultdict(list)
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("AdEMAMix does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_slow"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                params_by_step[state["step"]].append(param)

            for step, params in params_by_step.items():
                self._update(group, params, step)

        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], step: int) -> None:
        """The AdEMAMix update of `params`, which all are at optimizer step `step`, with torch._foreach_* ops."""
        beta1, beta2, beta3_final = group["betas"]
        alpha = ademamix_alpha(step, group["alpha"], group["alpha_warmup_steps"])
        beta3 = ademamix_beta3(step, beta1, beta3_final, group["beta3_warmup_steps"])
        grads = [param.grad for param in params]
        states = [self.state[param] for param in params]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_slows = [state["exp_avg_slow"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]

        # m = beta * m + (1 - beta) * g, written as m += (1 - beta) * (g - m).
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_lerp_(exp_avg_slows, grads, 1.0 - beta3)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        # The decoupled decay lr * weight_decay * theta of the pre-update theta, applied first as AdamW does.
        if group["weight_decay"] != 0.0:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])

        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, math.sqrt(1.0 - beta2**step))
        torch._foreach_add_(denominators, group["eps"])

        # lr * (m1 / bc1 + alpha * m2) / denominator, written as lr / bc1 * (m1 + alpha * bc1 * m2) / denominator:
        # the grouping of torch.optim.AdamW, so that alpha = 0 reproduces AdamW bit for bit.
        bias_correction1 = 1.0 - beta1**step
        numerators = torch._foreach_add(exp_avgs, exp_avg_slows, alpha=alpha * bias_correction1)
        torch._foreach_addcdiv_(params, numerators, denominators, value=-group["lr"] / bias_correction1)


def build_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters of `model` into a weight-decay group and a no-weight-decay group.

    As in the Apertus (Megatron-LM) recipe, parameters with fewer than two dimensions (RMSNorm weights, including
    the attention's q_norm/k_norm, and any bias) and the xIELU scalars (`act_fn.alpha_p`, `act_fn.alpha_n`) get no
    weight decay; all matrices, the embeddings and the LM head included, get `weight_decay`. Parameters with
    `requires_grad=False` are left out, and tied weights appear once (`named_parameters` deduplicates them).

    Returns two groups, `[decayed, not decayed]`, each with `params`, `param_names` (which torch >= 2.6 optimizers
    record in their state dicts) and `weight_decay`; pass them to any `torch.optim` optimizer, e.g.
    `AdEMAMix(build_parameter_groups(model, 0.1), lr=...)`.
    """
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decayed = {"params": [], "param_names": [], "weight_decay": weight_decay}
    not_decayed = {"params": [], "param_names": [], "weight_decay": 0.0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Under DeepSpeed ZeRO-3 a parameter is a flat shard; its real shape is kept in `ds_shape`.
        dimensions = len(getattr(param, "ds_shape", param.shape))
        group = not_decayed if dimensions < 2 or name.endswith(_NO_DECAY_SUFFIXES) else decayed
        group["params"].append(param)
        group["param_names"].append(name)
    return [decayed, not_decayed]
