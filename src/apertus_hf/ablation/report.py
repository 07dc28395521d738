"""The results of a study: a Markdown table, a JSON file and a loss-vs-tokens plot, written beside the runs.

Per variant: the final held-out loss and bits per byte at the study's token budget as mean ± standard error over
seeds, the difference to the baseline paired by seed (runs of one seed read the same rows, so the pairing removes the
data-order part of the noise), the share of the budget a variant needs to reach the baseline's final held-out loss (the
report's "same loss with fewer tokens"), throughput and parameters. The report also checks, from the rows each step recorded
(`data/row_ids` in metrics.jsonl), that the variants of a seed did read the same rows in the same order.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors import safe_open

from ..pretraining import PretrainConfig, read_metrics
from .plots import plot_loss_curves
from .study import BITS_PER_BYTE_FILE_NAME, AblationStudy, resolve_runs, run_status

RESULTS_TABLE_NAME = "results.md"
RESULTS_JSON_NAME = "results.json"
PLOT_NAME = "loss_vs_tokens.png"


@dataclass
class RunResult:
    variant: str
    seed: int
    eval_loss: float
    bits_per_byte: float | None
    tokens: int
    tokens_per_second: float | None
    parameters: int | None
    row_ids: list[list[int]] = field(repr=False)
    eval_curve: list[tuple[int, float]] = field(default_factory=list, repr=False)
    """(training tokens, held-out loss) at each evaluation."""


@dataclass
class Estimate:
    """A mean and its standard error (None with one value) over `count` values."""

    mean: float
    stderr: float | None
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Estimate | None:
        if not values:
            return None
        stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
        return cls(statistics.fmean(values), stderr, len(values))

    def text(self, digits: int = 4, signed: bool = False) -> str:
        mean = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        return mean if self.stderr is None else f"{mean} ± {self.stderr:.{digits}f}"


@dataclass
class VariantSummary:
    variant: str
    description: str
    seeds: list[int]
    eval_loss: Estimate | None
    eval_loss_difference: Estimate | None
    bits_per_byte: Estimate | None
    bits_per_byte_difference: Estimate | None
    tokens_to_baseline_loss: Estimate | None
    """Tokens at which the held-out loss first reaches the baseline's final one (same seed), as a fraction of the
    baseline's tokens; over the seeds that reach it."""
    seeds_reaching_baseline_loss: int
    tokens_per_second: Estimate | None
    parameters: int | None


def read_run_result(variant: str, config: PretrainConfig) -> RunResult:
    """The figures of a finished run from its folder."""
    run_dir = Path(config.output_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    evaluated = [record for record in records if "eval/loss" in record]
    if not evaluated or evaluated[-1]["step"] != config.max_steps:
        raise ValueError(f"{run_dir} has no held-out loss at its last step {config.max_steps}; is it finished?")
    bits_per_byte_file = run_dir / BITS_PER_BYTE_FILE_NAME
    bits_per_byte = None
    if bits_per_byte_file.is_file():
        bits_per_byte = json.loads(bits_per_byte_file.read_text())["metrics"]["bits_per_byte"]
    speeds = [record["train/tokens_per_second"] for record in records if "train/tokens_per_second" in record]
    return RunResult(
        variant=variant,
        seed=config.seed,
        eval_loss=evaluated[-1]["eval/loss"],
        bits_per_byte=bits_per_byte,
        tokens=records[-1]["train/tokens"],
        tokens_per_second=statistics.fmean(speeds) if speeds else None,
        parameters=count_parameters(run_dir / "model"),
        row_ids=[record["data/row_ids"] for record in records if "data/row_ids" in record],
        eval_curve=[(record["train/tokens"], record["eval/loss"]) for record in evaluated],
    )


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The tokens at which a held-out loss curve first reaches `target`, interpolated linearly between evaluations
    (from the first one); None when it never does."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None:
                return float(tokens)
            previous_tokens, previous_loss = previous
            return previous_tokens + (tokens - previous_tokens) * (previous_loss - target) / (previous_loss - loss)
        previous = (tokens, loss)
    return None


def tokens_to_baseline_loss(results: list[RunResult], variant: str, baseline: str) -> list[float | None]:
    """Per seed both finished: the tokens the variant needs to reach the baseline's final held-out loss, as a fraction
    of the baseline's tokens (None where it never does)."""
    by_seed = {(result.variant, result.seed): result for result in results}
    fractions = []
    for (name, seed), result in by_seed.items():
        reference = by_seed.get((baseline, seed))
        if name != variant or reference is None:
            continue
        reached = tokens_to_reach(result.eval_curve, reference.eval_loss)
        fractions.append(None if reached is None else reached / reference.tokens)
    return fractions


def count_parameters(model_dir: Path) -> int | None:
    """Parameters of a safetensors model folder, read from the file headers (no weights are loaded)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(path, framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is no mapping)
                total += math.prod(weights.get_slice(key).get_shape())
    return total


def collect_results(study: AblationStudy) -> tuple[list[RunResult], list[str]]:
    """The results of the study's finished runs and the names of the unfinished ones."""
    results, unfinished = [], []
    for name, config in resolve_runs(study).items():
        variant = name.split("/")[0]
        if run_status(config, study.bits_per_byte) != "done":
            unfinished.append(name)
            continue
        results.append(read_run_result(variant, config))
    return results, unfinished


def paired_difference(results: list[RunResult], variant: str, baseline: str, metric: str) -> Estimate | None:
    """Mean ± standard error over seeds of (variant - baseline) for `metric`, on the seeds both finished."""
    by_seed = {(result.variant, result.seed): getattr(result, metric) for result in results}
    differences = [
        by_seed[(variant, seed)] - by_seed[(baseline, seed)]
        for (name, seed) in by_seed
        if name == variant
        and (baseline, seed) in by_seed
        and by_seed[(variant, seed)] is not None
        and by_seed[(baseline, seed)] is not None
    ]
    return Estimate.of(differences)


def summarize(study: AblationStudy, results: list[RunResult]) -> list[VariantSummary]:
    summaries = []
    for variant in study.variants:
        own = [result for result in results if result.variant == variant.name]
        if not own:
            continue
        compare = variant.name != study.baseline
        bits = [result.bits_per_byte for result in own if result.bits_per_byte is not None]
        speeds = [result.tokens_per_second for result in own if result.tokens_per_second is not None]
        fractions = tokens_to_baseline_loss(results, variant.name, study.baseline) if compare else []
        reached = [fraction for fraction in fractions if fraction is not None]
        summaries.append(
            VariantSummary(
                variant=variant.name,
                description=variant.description,
                seeds=sorted(result.seed for result in own),
                eval_loss=Estimate.of([result.eval_loss for result in own]),
                eval_loss_difference=(
                    paired_difference(results, variant.name, study.baseline, "eval_loss") if compare else None
                ),
                bits_per_byte=Estimate.of(bits),
                bits_per_byte_difference=(
                    paired_difference(results, variant.name, study.baseline, "bits_per_byte") if compare else None
                ),
                tokens_to_baseline_loss=Estimate.of(reached),
                seeds_reaching_baseline_loss=len(reached),
                tokens_per_second=Estimate.of(speeds),
                parameters=own[0].parameters,
            )
        )
    return summaries


def rows_differ(results: list[RunResult]) -> dict[int, list[str]]:
    """Per seed, the variants whose recorded rows differ from the first variant's of that seed (empty: all equal)."""
    differing = {}
    for seed in sorted({result.seed for result in results}):
        runs = [result for result in results if result.seed == seed]
        odd = [result.variant for result in runs[1:] if result.row_ids != runs[0].row_ids or not result.row_ids]
        if odd or not runs[0].row_ids:
            differing[seed] = odd or [runs[0].variant]
    return differing


def _cell(estimate: Estimate | None, digits: int = 4, signed: bool = False) -> str:
    return "—" if estimate is None else estimate.text(digits, signed)


def _share_of_budget(summary: VariantSummary) -> str:
    """The tokens-to-baseline-loss cell: a percentage of the baseline's tokens, with the seeds that never got there."""
    if summary.tokens_to_baseline_loss is None:
        return "not reached" if summary.eval_loss_difference is not None else "—"
    estimate = summary.tokens_to_baseline_loss
    text = f"{estimate.mean:.0%}" if estimate.stderr is None else f"{estimate.mean:.0%} ± {estimate.stderr:.0%}"
    paired = summary.eval_loss_difference.count if summary.eval_loss_difference else len(summary.seeds)
    if summary.seeds_reaching_baseline_loss < paired:
        text += f" ({summary.seeds_reaching_baseline_loss} of {paired} seeds)"
    return text


def markdown_table(study: AblationStudy, summaries: list[VariantSummary]) -> str:
    header = (
        "| variant | what changes | seeds | eval loss | Δ loss vs baseline | bits per byte | Δ bits per byte | "
        "tokens to baseline loss | tokens/s | parameters |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for summary in summaries:
        name = f"**{summary.variant}** (baseline)" if summary.variant == study.baseline else summary.variant
        speed = "—" if summary.tokens_per_second is None else f"{summary.tokens_per_second.mean:,.0f}"
        parameters = "—" if summary.parameters is None else f"{summary.parameters / 1e6:.2f}M"
        rows.append(
            f"| {name} | {summary.description} | {len(summary.seeds)} | {_cell(summary.eval_loss)} | "
            f"{_cell(summary.eval_loss_difference, signed=True)} | {_cell(summary.bits_per_byte)} | "
            f"{_cell(summary.bits_per_byte_difference, signed=True)} | {_share_of_budget(summary)} | {speed} | "
            f"{parameters} |"
        )
    return header + "\n".join(rows) + "\n"


def write_report(study: AblationStudy) -> Path:
    """Write results.md, results.json and loss_vs_tokens.png into the study's output_dir from its finished runs;
    returns the table's path. Raises FileNotFoundError when no run has finished."""
    results, unfinished = collect_results(study)
    if not results:
        raise FileNotFoundError(
            f"No run of study {study.name!r} in {study.output_dir} has finished; run `recipes/ablate.py` first."
        )
    output_dir = Path(study.output_dir)
    summaries = summarize(study, results)
    differing = rows_differ(results)
    tokens = sorted({result.tokens for result in results})
    lines = [f"# Ablation study: {study.name}", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [
        f"Base recipe `{study.base}`, {study.tokens:,} training tokens per run, seeds {study.seeds}; eval loss is the "
        "held-out loss at the last step (nats per token), bits per byte that of the final model on the held-out text; "
        "mean ± standard error over seeds, Δ paired by seed against the baseline (negative: better); tokens to baseline "
        "loss: where the held-out loss first reaches the baseline's final one (same seed, interpolated between "
        "evaluations), as a share of the baseline's tokens.",
        "",
        markdown_table(study, summaries),
    ]
    steps = len(results[0].row_ids)
    if not any(result.row_ids for result in results):
        lines.append(
            "The runs streamed their data, which has no row indices to record: the variants of a seed read the same "
            "stream in the same order, but the report could not check it."
        )
    elif differing:
        lines.append(
            "**The variants did not all read the same rows**: "
            + "; ".join(f"seed {seed}: {', '.join(names)}" for seed, names in differing.items())
            + ". Their differences mix the change with the data."
        )
    else:
        lines.append(
            f"Every variant of a seed read the same rows in the same order (checked from the rows of each of the "
            f"{steps} steps in metrics.jsonl)."
        )
    if len(tokens) > 1:
        lines.append(f"**Runs stopped at different token counts**: {tokens}.")
    if unfinished:
        lines.append(f"Not finished yet, so not in the table: {', '.join(unfinished)}.")
    lines += ["", f"![loss vs tokens]({PLOT_NAME})", ""]
    table_path = output_dir / RESULTS_TABLE_NAME
    table_path.write_text("\n".join(lines))
    (output_dir / RESULTS_JSON_NAME).write_text(
        json.dumps(
            {
                "study": study.name,
                "tokens": study.tokens,
                "seeds": study.seeds,
                "baseline": study.baseline,
                "same_rows_across_variants": not differing,
                "unfinished": unfinished,
                "variants": [asdict(summary) for summary in summaries],
                "runs": [
                    {key: value for key, value in asdict(result).items() if key != "row_ids"} for result in results
                ],
            },
            indent=2,
        )
    )
    groups = {
        summary.variant: [output_dir / summary.variant / f"seed-{seed}" for seed in summary.seeds]
        for summary in summaries
    }
    plot_loss_curves(groups, output_dir / PLOT_NAME, title=f"{study.name}: {study.tokens:,} tokens per run")
    return table_path
