"""The shape of a pretraining run in optimizer steps, samples and tokens.

Megatron-LM, which trained Apertus, counts its schedule in samples (rows of `seq_len` tokens): `--train-samples`,
`--lr-warmup-samples`, `--lr-wsd-decay-samples`, and the global batch changes at a sample count. Counted in steps
instead, the same numbers give another run as soon as the batch size changes mid-run (a cooldown of 2.34T tokens
instead of 1.654T for Apertus-8B). `RunPlan` maps each optimizer step to its global batch, to the samples consumed
before it (the learning-rate schedule's position in sample mode) and to its data stage; it is a pure function of the
recipe, so a resumed run recomputes the same plan and continues the schedule exactly.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

ScheduleUnit = Literal["steps", "samples"]

STAGE_START_KEYS = ("start_step", "start_sample", "start_tokens")
STAGE_KEYS = ("name", "data", "seed", *STAGE_START_KEYS)


@dataclass(frozen=True)
class BatchSegment:
    """From optimizer step `start_step` (which consumes sample `start_sample` first) on, `rows_per_step` rows (all
    processes together) per optimizer step."""

    start_step: int
    start_sample: int
    rows_per_step: int


@dataclass(frozen=True)
class DataStage:
    """A stretch of the run with its own data mixture and data seed, from optimizer step `start_step` on."""

    name: str
    data: list[dict[str, Any]]
    seed: int
    start_step: int


@dataclass(frozen=True)
class RunPlan:
    """Steps, samples and tokens of a run; see the module docstring.

    `warmup`, `decay` and `total` are in `unit`: optimizer steps, or samples consumed before a step. In sample mode
    the learning rate of step s is the WSD value at `samples_before(s)`, which is Megatron's: its scheduler advances
    by the global batch after every step.
    """

    seq_len: int
    unit: ScheduleUnit
    segments: tuple[BatchSegment, ...]
    max_steps: int
    warmup: int
    decay: int
    total: int
    rows_per_micro_batch: int = 1
    """Rows of one micro-batch over all processes (per_device_batch_size x processes)."""
    stages: tuple[DataStage, ...] = field(default=())

    def segment_at(self, step: int) -> BatchSegment:
        starts = [segment.start_step for segment in self.segments]
        return self.segments[bisect.bisect_right(starts, step) - 1]

    def rows_at(self, step: int) -> int:
        """Global batch (rows over all processes) of optimizer step `step` (0-based)."""
        return self.segment_at(step).rows_per_step

    def micro_batches_at(self, step: int) -> int:
        """Micro-batches each process accumulates in optimizer step `step`."""
        return self.rows_at(step) // self.rows_per_micro_batch

    def samples_before(self, step: int) -> int:
        """Rows consumed by the `step` optimizer steps before step `step`."""
        segment = self.segment_at(step)
        return segment.start_sample + (step - segment.start_step) * segment.rows_per_step

    def schedule_position(self, step: int) -> int:
        """Where step `step` is on the learning-rate schedule, in `unit`."""
        return self.samples_before(step) if self.unit == "samples" else step

    def stage_at(self, step: int) -> int:
        """Index of the data stage that feeds optimizer step `step` (0 without stages)."""
        starts = [stage.start_step for stage in self.stages]
        return max(bisect.bisect_right(starts, step) - 1, 0)

    @property
    def cooldown_start(self) -> int:
        """The first optimizer step on the cooldown (its position at or past `total - decay`)."""
        return min(self.first_step_at(self.total - self.decay), self.max_steps)

    def first_step_at(self, position: int) -> int:
        """The first optimizer step whose schedule position is at or past `position` (in `unit`)."""
        return position if self.unit == "steps" else self.step_of_sample(position)

    def step_of_sample(self, sample: int) -> int:
        """The first optimizer step that starts at or after sample `sample`."""
        for segment in reversed(self.segments):
            if sample >= segment.start_sample:
                return segment.start_step + math.ceil((sample - segment.start_sample) / segment.rows_per_step)
        return 0

    def describe(self, per_device_rows: int | None = None, processes: int | None = None) -> str:
        """The plan as lines of text (the `--dry-run` of recipes/pretrain.py)."""
        tokens = self.samples_before(self.max_steps) * self.seq_len
        lines = [
            f"{self.max_steps:,} optimizer steps, {self.samples_before(self.max_steps):,} samples of {self.seq_len:,} "
            f"tokens = {tokens:,} tokens ({format_tokens(tokens)}).",
            "Global batch:",
        ]
        for segment in self.segments:
            row = (
                f"  from step {segment.start_step:,} (sample {segment.start_sample:,}, token "
                f"{format_tokens(segment.start_sample * self.seq_len)}): {segment.rows_per_step:,} rows = "
                f"{segment.rows_per_step * self.seq_len:,} tokens per step"
            )
            if per_device_rows and processes:
                row += f"; {segment.rows_per_step / (per_device_rows * processes):g} micro-batches of {per_device_rows}"
                row += f" rows on each of {processes} processes"
            lines.append(row)
        unit = "samples" if self.unit == "samples" else "steps"
        cooldown = self.cooldown_start
        cooldown_tokens = (self.samples_before(self.max_steps) - self.samples_before(cooldown)) * self.seq_len
        lines += [
            f"Learning rate counted in {unit}: warmup {self.warmup:,}, cooldown {self.decay:,}, total {self.total:,}.",
            f"  warmup ends at step {self.first_step_at(self.warmup):,}; cooldown from step {cooldown:,} (token "
            f"{format_tokens(self.samples_before(cooldown) * self.seq_len)}): {self.max_steps - cooldown:,} steps, "
            f"{format_tokens(cooldown_tokens)} tokens.",
        ]
        if self.stages:
            lines.append("Data stages:")
            ends = [stage.start_step for stage in self.stages[1:]] + [self.max_steps]
            for stage, end in zip(self.stages, ends, strict=True):
                begin_tokens = self.samples_before(stage.start_step) * self.seq_len
                end_tokens = self.samples_before(end) * self.seq_len
                sources = ", ".join(source_label(source) for source in stage.data)
                lines.append(
                    f"  {stage.name}: steps {stage.start_step:,}-{end - 1:,} (tokens {format_tokens(begin_tokens)}-"
                    f"{format_tokens(end_tokens)}), data seed {stage.seed}: {sources}"
                )
        return "\n".join(lines)


def source_label(source: dict[str, Any]) -> str:
    """`path`, `path:name` for a dataset configuration, and its weight when it has one."""
    label = str(source.get("path")) + (f":{source['name']}" if source.get("name") else "")
    return label + (f" x{source['weight']:g}" if "weight" in source else "")


def format_tokens(tokens: int) -> str:
    """A token count at the scale it lives at: 15.000T, 16.78B, 4.19M, 2,048."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if tokens >= scale:
            return f"{tokens / scale:.{3 if suffix == 'T' else 2}f}{suffix}"
    return f"{tokens:,}"


def batch_segments_in_steps(
    ramp: list[list[int]], rows_per_accumulation_step: int, gradient_accumulation_steps: int
) -> tuple[BatchSegment, ...]:
    """Segments of a ramp given as [[step, gradient_accumulation_steps], ...] (`rows_per_accumulation_step`: rows of
    one micro-batch over all processes)."""
    segments = [BatchSegment(0, 0, rows_per_accumulation_step * gradient_accumulation_steps)]
    for step, accumulation in ramp:
        previous = segments[-1]
        start_sample = previous.start_sample + (step - previous.start_step) * previous.rows_per_step
        segments.append(BatchSegment(step, start_sample, rows_per_accumulation_step * accumulation))
    return tuple(segments)


def batch_segments_in_samples(ramp: list[list[int]], global_batch_size: int) -> tuple[BatchSegment, ...]:
    """Segments of a ramp given as [[sample, global_batch_size], ...]: the new batch starts with the first step at
    or after that sample, as Megatron's consumed-samples counter decides."""
    segments = [BatchSegment(0, 0, global_batch_size)]
    for sample, rows in ramp:
        previous = segments[-1]
        steps = math.ceil((sample - previous.start_sample) / previous.rows_per_step)
        segments.append(
            BatchSegment(previous.start_step + steps, previous.start_sample + steps * previous.rows_per_step, rows)
        )
    return tuple(segments)


def steps_for_samples(segments: tuple[BatchSegment, ...], train_samples: int) -> int:
    """Optimizer steps of a run of `train_samples` samples: every full global batch that fits (Megatron's
    `train_samples // global_batch_size`, segment by segment)."""
    last = segments[-1]
    if train_samples < last.start_sample:
        raise ValueError(
            f"train_samples={train_samples:,} ends before the batch ramp's last change at sample {last.start_sample:,}; "
            "move the ramp or lengthen the run."
        )
    return last.start_step + (train_samples - last.start_sample) // last.rows_per_step


def resolve_stages(
    entries: list[dict[str, Any]], default_seed: int, segments: tuple[BatchSegment, ...], seq_len: int, max_steps: int
) -> tuple[DataStage, ...]:
    """The `stages` option as DataStages with their start steps; raises ValueError naming a malformed entry."""
    probe = RunPlan(seq_len, "steps", segments, max_steps, warmup=0, decay=0, total=max_steps)
    stages = []
    for index, entry in enumerate(entries):
        where = f"stages[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping with `data` and a start, got {entry!r}.")
        unknown = set(entry) - set(STAGE_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}; valid keys: {list(STAGE_KEYS)}.")
        if not entry.get("data"):
            raise ValueError(f"{where} needs `data`: a list of sources like the top-level `data` option.")
        starts = [key for key in STAGE_START_KEYS if entry.get(key) is not None]
        if index == 0 and not starts:
            start_step = 0
        elif len(starts) != 1:
            raise ValueError(
                f"{where} needs exactly one of {list(STAGE_START_KEYS)} (the first stage may leave it out and then "
                f"starts at step 0), got {starts or 'none'}."
            )
        else:
            value = entry[starts[0]]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}.{starts[0]}={value!r} must be an integer >= 0.")
            if starts[0] == "start_step":
                start_step = value
            elif starts[0] == "start_sample":
                start_step = probe.step_of_sample(value)
            else:
                start_step = probe.step_of_sample(math.ceil(value / seq_len))
        if index == 0 and start_step != 0:
            raise ValueError(f"{where} must start at step 0 (the run has to begin with a stage), got {start_step:,}.")
        if stages and start_step <= stages[-1].start_step:
            raise ValueError(
                f"{where} starts at step {start_step:,}, not after {stages[-1].name!r} (step {stages[-1].start_step:,}); "
                "list the stages in the order they run."
            )
        if start_step >= max_steps:
            raise ValueError(f"{where} starts at step {start_step:,}, at or after the run's end ({max_steps:,} steps).")
        for source in entry["data"]:
            if not isinstance(source, dict) or "path" not in source:
                raise ValueError(f"Every source of {where}.data needs a `path`; got {source!r}.")
        stages.append(
            DataStage(
                name=str(entry.get("name", f"stage-{index + 1}")),
                data=list(entry["data"]),
                seed=int(entry.get("seed", default_seed + index)),
                start_step=start_step,
            )
        )
    return tuple(stages)
