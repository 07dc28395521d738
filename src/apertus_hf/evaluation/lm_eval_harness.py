"""lm-evaluation-harness on a causal LM folder, one `EvalResult` per task (and per task group).

lm-eval (the `eval` extra) owns the benchmarks: prompts, few-shot sampling, scoring, and the task registry; this
module only runs `lm_eval.simple_evaluate` with the `hf` backend and turns its results into our result files.
Tasks of our own (e.g. `eval/tasks/apertus_toy_mc`) come in through `include_path`.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ..runtime import resolve_source
from .common import MODEL_HINT, EvalResult, resolve_device

STDERR_SUFFIX = "_stderr"
NO_FILTER = "none"


def _metric_name(key: str) -> tuple[str, bool]:
    """lm-eval's result key `metric,filter` as our metric name (`acc`, or `exact_match_strict-match` when a filter
    other than "none" applies), and whether it is a standard error."""
    metric, _, filter_name = key.partition(",")
    is_stderr = metric.endswith(STDERR_SUFFIX)
    metric = metric.removesuffix(STDERR_SUFFIX)
    if filter_name and filter_name != NO_FILTER:
        metric = f"{metric}_{filter_name}"
    return metric, is_stderr


def results_to_eval_results(output: dict[str, Any], model: str, settings: dict[str, Any]) -> list[EvalResult]:
    """One `EvalResult` per entry of `simple_evaluate(...)["results"]`; standard errors go to `details`."""
    results = []
    for task_name, task_results in output["results"].items():
        metrics: dict[str, float] = {}
        stderr: dict[str, float | None] = {}
        for key, value in task_results.items():
            if "," not in key:  # "alias", "name", "sample_len": labels, not metrics
                continue
            metric, is_stderr = _metric_name(key)
            if is_stderr:
                stderr[metric] = value if isinstance(value, int | float) else None  # lm-eval writes "N/A"
            elif isinstance(value, int | float):
                metrics[metric] = float(value)
        task_config = output.get("configs", {}).get(task_name, {})
        results.append(
            EvalResult(
                evaluation="lm_eval",
                model=model,
                task_name=task_name,
                task_type="text-generation",
                dataset_name=task_name,
                dataset_type=str(task_config.get("dataset_path") or task_name),
                metrics=metrics,
                settings={**settings, "num_fewshot": output.get("n-shot", {}).get(task_name)},
                details={
                    "stderr": stderr,
                    "num_items": output.get("n-samples", {}).get(task_name, {}).get("effective"),
                    "task_version": output.get("versions", {}).get(task_name),
                    "lm_eval_version": version("lm_eval"),
                },
            )
        )
    return results


def run_lm_eval(
    model: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    batch_size: int | str = 8,
    device: str | None = None,
    dtype: str = "auto",
    limit: int | float | None = None,
    num_fewshot: int | None = None,
) -> list[EvalResult]:
    """Evaluate a causal LM folder or Hub id on lm-eval tasks (by name, e.g. `arc_easy`, `apertus_toy_mc`).

    `include_path` adds folders of task YAMLs to lm-eval's registry; `include_defaults=False` leaves out lm-eval's
    built-in tasks (indexing its ~15,000 task files takes seconds). `limit` is lm-eval's: a count of documents per
    task, or a fraction when below 1. `batch_size` may be "auto". Offline runs need `HF_HUB_OFFLINE=1` and
    `HF_DATASETS_OFFLINE=1` and tasks whose data is local.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            "lm-evaluation-harness is not installed; install the eval extra: pip install 'apertus_hf[eval]'."
        ) from error
    if not tasks:
        raise ValueError("No task given; name at least one lm-eval task, e.g. apertus_toy_mc or arc_easy.")
    source = resolve_source(str(model), "model", MODEL_HINT)
    if include_path is None or isinstance(include_path, str | Path):
        include_paths = [] if include_path is None else [include_path]
    else:
        include_paths = list(include_path)
    for path in include_paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"Task folder {path} does not exist; pass a folder of lm-eval task YAML files.")
    task_manager = TaskManager(
        include_path=[str(path) for path in include_paths] or None, include_defaults=include_defaults
    )
    unknown = [task for task in tasks if not task_manager.match_tasks([task])]
    if unknown:
        raise ValueError(
            f"Unknown lm-eval task(s) {unknown}; list them with `lm_eval list tasks`, or add their folder via "
            "include_path."
        )
    device_name = str(resolve_device(device))
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(source), "dtype": dtype},
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device_name,
        limit=limit,
        log_samples=False,
        task_manager=task_manager,
    )
    settings = {
        "tasks": list(tasks),
        "include_path": [str(path) for path in include_paths],
        "include_defaults": include_defaults,
        "batch_size": batch_size,
        "device": device_name,
        "dtype": dtype,
        "limit": limit,
    }
    return results_to_eval_results(output, str(model), settings)
