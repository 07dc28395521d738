"""What the benchmarks share: isolated measuring processes, interleaved rounds, memory figures, arguments, output.

The benchmarks run as scripts (`python benchmarks/X.py`), so this folder is on `sys.path` and they import this module
as `common`; so do their spawned measuring processes, which get the parent's `sys.path`. Nothing heavy is imported
here at module level beyond torch (which every benchmark imports anyway), so the measuring processes' resident set
after their own imports is not changed by this module.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


# Memory


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_rss_after_imports(modules: Iterable[str]) -> int:
    """Import `modules`, so every measuring process starts from the same resident set; the peak RSS after."""
    for module in modules:
        importlib.import_module(module)
    return peak_rss_bytes()


def peak_memory_bytes(device_type: str) -> int:
    """`torch.cuda.max_memory_allocated` on CUDA, else the peak RSS of the process."""
    return torch.cuda.max_memory_allocated() if device_type == "cuda" else peak_rss_bytes()


def median_rss_growth_mib(results: Iterable[dict]) -> float:
    """Median over rounds of `peak_memory_bytes - import_peak_rss_bytes` (CPU: RSS growth over the imports), MiB."""
    return statistics.median(r["peak_memory_bytes"] - r["import_peak_rss_bytes"] for r in results) / 2**20


# Timing


def synchronize(device_type: str) -> None:
    """Wait for queued CUDA work, so wall times cover it; nothing on CPU."""
    if device_type == "cuda":
        torch.cuda.synchronize()


def make_step_timer(device_type: str, first_step: int, last_step: int):
    """A `transformers.TrainerCallback` that takes the wall time at the end of optimizer steps `first_step` and
    `last_step` (CUDA synchronised); `elapsed_seconds()` is the time between the two."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = {}

        def on_step_end(self, training_args, state, control, **kwargs):
            if state.global_step in (first_step, last_step):
                synchronize(device_type)
                self.times[state.global_step] = time.perf_counter()

        def elapsed_seconds(self) -> float:
            return self.times[last_step] - self.times[first_step]

    return StepTimer()


# Isolated measurements, interleaved


def run_measurement(
    target: Callable, target_args: tuple, stdout_to_stderr: bool, results: multiprocessing.Queue
) -> None:
    """Entry point of a measuring process: `target(*target_args, results)`, its prints sent to stderr if asked."""
    with contextlib.redirect_stdout(sys.stderr) if stdout_to_stderr else contextlib.nullcontext():
        target(*target_args, results)


def run_isolated(name: str, target: Callable, target_args: tuple, stdout_to_stderr: bool = False) -> dict:
    """Run `target(*target_args, results)` in a fresh spawned process and return the one result it puts on
    `results`; `target` must be a module-level function (it is pickled by name)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=run_measurement, args=(target, target_args, stdout_to_stderr, results))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"measurement of {name} failed with exit code {process.exitcode}")
    return results.get()


def measure_interleaved(
    names: Sequence[str], rounds: int, measure_one: Callable[[str], dict], describe: Callable[[dict], str], log=None
) -> dict[str, list[dict]]:
    """`rounds` measurements of each of `names` by `measure_one(name)`, alternating the order every round so that
    warm-up or drift of the machine favours none; after each, prints `round R NAME: describe(result)` to `log`
    (None: stdout). Returns each name's results in round order."""
    measured: dict[str, list[dict]] = {name: [] for name in names}
    width = max(len(name) for name in names)
    for round_index in range(rounds):
        order = tuple(names) if round_index % 2 == 0 else tuple(reversed(names))
        for name in order:
            result = measure_one(name)
            measured[name].append(result)
            print(f"round {round_index + 1} {name:>{width}}: {describe(result)}", file=log, flush=True)
    return measured


def median_of(results: Iterable[dict], key: str) -> float:
    """Median over rounds of `result[key]`."""
    return statistics.median(r[key] for r in results)


# Arguments and output


def parse_override(text: str) -> tuple[str, object]:
    """`KEY=VALUE` of `--override`; the value is JSON when it parses, else the text."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"--override {text!r} must be KEY=VALUE, e.g. num_hidden_layers=8")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def model_benchmark_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser showing `description` as written (the script's docstring), with `--preset` and
    `--override` (repeatable), the ApertusConfig the benchmark trains."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="ApertusConfig preset of the model")
    parser.add_argument(
        "--override",
        type=parse_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ApertusConfig field set on top of the preset (JSON value), repeatable",
    )
    return parser


def add_input_output_arguments(parser: argparse.ArgumentParser, data_help: str | None = None) -> None:
    """`--seed`, `--data` (the shipped corpus), `--tokenizer` (the shipped tokenizer) and `--json`."""
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", default=str(REPO_ROOT / "data" / "corpus"), help=data_help)
    parser.add_argument(
        "--tokenizer",
        default=str(REPO_ROOT / "data" / "tokenizer"),
        help="tokenizer folder, or apertus for the real 131,072-token Apertus tokenizer (built offline)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file ('-': print them instead)")


def finish_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, positive: Iterable[str], has_cuda: bool
) -> argparse.Namespace:
    """Reject counts below 1 among `positive`, turn the `--override` pairs into a dict and set `args.device`."""
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    args.override = dict(args.override)
    args.device = "cuda" if has_cuda else "cpu"
    return args


def go_offline() -> None:
    """Nothing may reach the Hub: the tokenizer and the corpus are local."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def device_description(device_type: str) -> str:
    """The GPU's name on CUDA, else `CPU (N threads)`."""
    return torch.cuda.get_device_name() if device_type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def log_stream(args: argparse.Namespace):
    """Where progress lines go: stderr when the JSON results are printed to stdout (`--json -`), else stdout."""
    return sys.stderr if args.json == "-" else sys.stdout


def report(summary: dict, args: argparse.Namespace, print_table: Callable[[dict, argparse.Namespace], None]) -> None:
    """With `--json -` print the settings and the summary as JSON only; else `print_table`, and with `--json PATH`
    write that JSON to PATH too."""
    output = {"settings": vars(args), **summary}
    if args.json == "-":
        print(json.dumps(output, indent=2))
        return
    print_table(summary, args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(output, handle, indent=2)
