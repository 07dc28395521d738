"""The WSD schedule against its formulas at the phase boundaries, per-group peaks, resume and argument checks."""

import math

import pytest
import torch

from apertus_hf.optim import WSDSchedule, wsd_lr_factor

PEAK, WARMUP, TOTAL, DECAY, MIN_RATIO = 3e-4, 10, 100, 20, 0.1


def make_optimizer(peaks=(PEAK,)):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": peak} for peak in peaks])


def learning_rates(scheduler, steps):
    """The learning rate of every parameter group at scheduler steps 0 .. steps - 1, stepping as a training loop."""
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(
    ("decay_shape", "shape"),
    [
        ("1-sqrt", lambda p: 1 - math.sqrt(p)),
        ("linear", lambda p: 1 - p),
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
    ],
)
def test_learning_rate_follows_the_formulas(decay_shape, shape):
    scheduler = WSDSchedule(
        make_optimizer(), WARMUP, TOTAL, decay_steps=DECAY, min_lr_ratio=MIN_RATIO, decay_shape=decay_shape
    )
    rates = [lr for (lr,) in learning_rates(scheduler, TOTAL + 11)]
    minimum = MIN_RATIO * PEAK
    expected = {
        0: 0.0,  # the first optimizer step runs at lr 0
        5: PEAK * 5 / WARMUP,
        WARMUP - 1: PEAK * 9 / 10,
        WARMUP: PEAK,
        50: PEAK,
        TOTAL - DECAY: PEAK,  # the cooldown starts from the peak
        TOTAL - DECAY + 10: minimum + (PEAK - minimum) * shape(10 / DECAY),
        TOTAL - 1: minimum + (PEAK - minimum) * shape(19 / DECAY),  # the last step of the run
        TOTAL: minimum,
        TOTAL + 10: minimum,
    }
    for step, lr in expected.items():
        assert rates[step] == pytest.approx(lr, rel=1e-12, abs=1e-15), f"step {step}"
        assert wsd_lr_factor(step, WARMUP, TOTAL, DECAY, MIN_RATIO, decay_shape) * PEAK == pytest.approx(lr)
    # Non-increasing after the warmup, and strictly decreasing through the cooldown.
    assert all(a >= b for a, b in zip(rates[WARMUP:], rates[WARMUP + 1 :], strict=False))
    assert all(a > b for a, b in zip(rates[TOTAL - DECAY : TOTAL], rates[TOTAL - DECAY + 1 : TOTAL + 1], strict=True))


def test_each_group_peaks_at_its_own_learning_rate():
    scheduler = WSDSchedule(make_optimizer(peaks=(1e-3, 1e-4)), WARMUP, TOTAL, decay_steps=DECAY)
    for step, (high, low) in enumerate(learning_rates(scheduler, TOTAL + 1)):
        factor = wsd_lr_factor(step, WARMUP, TOTAL, DECAY)
        assert (high, low) == pytest.approx((1e-3 * factor, 1e-4 * factor), rel=1e-12)


def test_decay_fraction_and_no_warmup():
    by_fraction = WSDSchedule(make_optimizer(), warmup_steps=0, total_steps=TOTAL, decay_fraction=0.2)
    by_steps = WSDSchedule(make_optimizer(), warmup_steps=0, total_steps=TOTAL, decay_steps=20)
    assert by_fraction.decay_steps == 20
    rates = learning_rates(by_fraction, TOTAL + 1)
    assert rates == learning_rates(by_steps, TOTAL + 1)
    assert rates[0] == [PEAK]  # no warmup: the first step already runs at the peak


def test_resume_from_state_dict():
    def make():
        optimizer = make_optimizer(peaks=(PEAK, 2 * PEAK))
        return WSDSchedule(optimizer, WARMUP, TOTAL, decay_steps=DECAY, decay_shape="cosine")

    uninterrupted = learning_rates(make(), TOTAL)

    scheduler = make()
    first_half = learning_rates(scheduler, 63)
    checkpoint = {"optimizer": scheduler.optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    restarted = make()  # a fresh run starts at lr 0 until the checkpoint is loaded
    restarted.optimizer.load_state_dict(checkpoint["optimizer"])
    restarted.load_state_dict(checkpoint["scheduler"])
    assert first_half + learning_rates(restarted, TOTAL - 63) == uninterrupted


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"total_steps": 0, "warmup_steps": 0}, "total_steps"),
        ({"decay_steps": -1}, "decay_steps"),
        ({"decay_steps": 95}, "warmup_steps \\+ decay_steps"),
        ({"decay_steps": None}, "exactly one of decay_steps and decay_fraction"),
        ({"decay_fraction": 0.2}, "exactly one of decay_steps and decay_fraction"),
        ({"decay_steps": None, "decay_fraction": 1.5}, "decay_fraction"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"decay_shape": "exponential"}, "decay_shape"),
    ],
)
def test_invalid_arguments_raise(kwargs, argument):
    arguments = {"warmup_steps": WARMUP, "total_steps": TOTAL, "decay_steps": DECAY, **kwargs}
    with pytest.raises(ValueError, match=argument):
        WSDSchedule(make_optimizer(), **arguments)
