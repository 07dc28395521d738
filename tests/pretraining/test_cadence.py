"""The cadence: which of log, evaluate, checkpoint and stop follow each optimizer step."""

from apertus_hf.pretraining import PretrainConfig
from apertus_hf.pretraining.step import Cadence


def _due(cadence: Cadence, action: str, steps: int, stop_requested_at: int | None = None) -> list[int]:
    return [
        step
        for step in range(1, steps + 1)
        if getattr(cadence.after(step, stop_requested=step == stop_requested_at), action)
    ]


def test_logs_evaluations_and_checkpoints_fall_on_their_steps_and_the_last():
    config = PretrainConfig(max_steps=20, warmup_steps=2, logging_steps=6, eval_steps=8, checkpoint_steps=5)
    cadence = Cadence.from_config(config, evaluates=True)
    assert _due(cadence, "log", 20) == [6, 12, 18, 20]
    assert _due(cadence, "evaluate", 20) == [8, 16, 20]
    assert _due(cadence, "checkpoint", 20) == [5, 10, 15, 20]
    assert _due(cadence, "stop", 20) == []
    # Metrics are written whenever one of them is due, so that a checkpoint never covers unwritten steps.
    assert _due(cadence, "write_metrics", 20) == [5, 6, 8, 10, 12, 15, 16, 18, 20]


def test_zero_disables_periodic_evaluation_and_checkpoints():
    config = PretrainConfig(max_steps=10, warmup_steps=1, eval_steps=0, checkpoint_steps=0)
    assert _due(Cadence.from_config(config, evaluates=True), "evaluate", 10) == [10]
    assert _due(Cadence.from_config(config, evaluates=False), "evaluate", 10) == []
    assert _due(Cadence.from_config(config, evaluates=True), "checkpoint", 10) == []


def test_a_stop_request_or_stop_at_step_saves_and_stops():
    config = PretrainConfig(max_steps=10, warmup_steps=1, checkpoint_steps=0, stop_at_step=7)
    cadence = Cadence.from_config(config, evaluates=False)
    assert _due(cadence, "stop", 10) == [7]
    assert _due(cadence, "stop", 10, stop_requested_at=3) == [3, 7]
    assert _due(cadence, "checkpoint", 10, stop_requested_at=3) == [3, 7]
