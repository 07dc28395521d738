"""The warmup-stable-decay (WSD) learning-rate schedule of the Apertus pretraining recipe.

WSD (Hu et al., MiniCPM, arXiv 2404.06395; Hägele et al., arXiv 2405.18392) warms up linearly, holds the peak
learning rate, and cools down only over the last `decay_steps` steps, so a run can be extended or branched off
before its cooldown. Apertus cools down with the "1-sqrt" shape to 10% of the peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

# Fraction of the way from the minimum to the peak learning rate, as a function of cooldown progress in [0, 1].
_DECAY_SHAPES = {
    "1-sqrt": lambda progress: 1.0 - math.sqrt(progress),
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_wsd_arguments(
    warmup_steps: int, total_steps: int, decay_steps: int, min_lr_ratio: float, decay_shape: str
) -> None:
    if not _is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if not _is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if not _is_int(decay_steps) or decay_steps < 0:
        raise ValueError(f"decay_steps must be an integer >= 0 (0: no cooldown), got {decay_steps!r}")
    if warmup_steps + decay_steps > total_steps:
        raise ValueError(
            f"warmup_steps + decay_steps must be <= total_steps, got {warmup_steps} + {decay_steps} > {total_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if decay_shape not in _DECAY_SHAPES:
        raise ValueError(f"decay_shape must be one of {sorted(_DECAY_SHAPES)}, got {decay_shape!r}")


def wsd_lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    decay_steps: int,
    min_lr_ratio: float = 0.1,
    decay_shape: str = "1-sqrt",
) -> float:
    """The learning rate at `step` as a fraction of the peak, for the WSD schedule.

    `step` counts the optimizer steps taken before the one that uses this learning rate (the scheduler's
    `last_epoch`): the first step of training runs at `step` 0. With r = `min_lr_ratio`, D = `decay_steps` and
    s0 = `total_steps` - D the first cooldown step:

        step < warmup_steps:            step / warmup_steps          (0 at step 0: the first update has lr 0)
        warmup_steps <= step < s0:      1
        s0 <= step:                     r + (1 - r) * shape(min((step - s0) / D, 1))

    with shape(p) = 1 - sqrt(p) ("1-sqrt"), 1 - p ("linear") or (1 + cos(pi * p)) / 2 ("cosine"). The cooldown
    starts at the peak at s0 and reaches r at `total_steps`, one past the last of the `total_steps` steps (as in
    `transformers.get_wsd_schedule` and Megatron-LM), and stays there after it.
    """
    _check_wsd_arguments(warmup_steps, total_steps, decay_steps, min_lr_ratio, decay_shape)
    return _wsd_factor(step, warmup_steps, total_steps, decay_steps, min_lr_ratio, decay_shape)


def _wsd_factor(
    step: int, warmup_steps: int, total_steps: int, decay_steps: int, min_lr_ratio: float, decay_shape: str
) -> float:
    """`wsd_lr_factor` on arguments already checked (the scheduler checks them once, not at every step)."""
    if step < warmup_steps:
        return step / warmup_steps
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = min((step - decay_start) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * _DECAY_SHAPES[decay_shape](progress)


class WSDSchedule(LRScheduler):
    """Warmup-stable-decay learning rate for each parameter group, peaking at the group's initial `lr`.

    The learning rate at scheduler step s (the number of `scheduler.step()` calls so far, one per optimizer step)
    is `initial_lr * wsd_lr_factor(s, ...)`; see `wsd_lr_factor` for the exact formula. Resumable with
    `state_dict` / `load_state_dict` like any `torch.optim.lr_scheduler.LRScheduler`.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: steps of linear warmup from 0 to the peak, >= 0.
        total_steps: length of the run in optimizer steps, >= 1.
        decay_steps: steps of cooldown at the end of the run, >= 0 (0: constant after the warmup, as the long-context
            stages run). Give this or `decay_fraction`.
        decay_fraction: cooldown length as a fraction of `total_steps`, in [0, 1], rounded to whole steps.
        min_lr_ratio: learning rate at the end of the cooldown as a fraction of the peak, in [0, 1].
        decay_shape: "1-sqrt" (Apertus), "linear" or "cosine".
        last_epoch: index of the last step taken, -1 to start a run (the `LRScheduler` convention).
        step_position: maps the scheduler step s to the schedule's position; `warmup_steps`, `total_steps` and
            `decay_steps` are then in its unit. Megatron-LM counts the schedule in samples: with
            `step_position = lambda s: samples consumed before step s`, the learning rate follows the samples across a
            change of the batch size (apertus_hf.pretraining.plan). None: the position is the step. It is not part of
            the state dict; the resuming code passes it again.
        position_unit: the unit of the position ("steps", "samples"), kept in the state dict so that a resume can
            tell a schedule counted in another unit.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        decay_steps: int | None = None,
        decay_fraction: float | None = None,
        min_lr_ratio: float = 0.1,
        decay_shape: str = "1-sqrt",
        last_epoch: int = -1,
        step_position: Callable[[int], int] | None = None,
        position_unit: str = "steps",
    ):
        if (decay_steps is None) == (decay_fraction is None):
            raise ValueError(
                f"give exactly one of decay_steps and decay_fraction, got {decay_steps=} and {decay_fraction=}"
            )
        if decay_fraction is not None:
            if not 0.0 <= decay_fraction <= 1.0:
                raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
            if not _is_int(total_steps):
                raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
            decay_steps = round(decay_fraction * total_steps)
        _check_wsd_arguments(warmup_steps, total_steps, decay_steps, min_lr_ratio, decay_shape)
        # Set before the parent constructor, which already computes the learning rate of step 0.
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay_steps = decay_steps
        self.min_lr_ratio = min_lr_ratio
        self.decay_shape = decay_shape
        self.step_position = step_position
        self.position_unit = position_unit
        super().__init__(optimizer, last_epoch)

    def state_dict(self) -> dict[str, Any]:
        # A function is no state (and would not survive torch.load(weights_only=True)).
        return {key: value for key, value in super().state_dict().items() if key != "step_position"}

    def get_lr(self) -> list[float | torch.Tensor]:
        position = self.step_position(self.last_epoch) if self.step_position is not None else self.last_epoch
        factor = _wsd_factor(
            position, self.warmup_steps, self.total_steps, self.decay_steps, self.min_lr_ratio, self.decay_shape
        )
        return [base_lr * factor for base_lr in self.base_lrs]
