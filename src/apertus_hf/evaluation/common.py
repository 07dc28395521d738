"""What every evaluation shares: loading any causal LM folder, and the JSON result file that the model card reads."""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..runtime import resolve_source

RESULTS_DIR_NAME = "eval_results"
MODEL_HINT = "Pass a saved model folder or a Hub id to --model."


@dataclass
class EvalResult:
    """One evaluation of one model on one dataset or task, as written to `<name>.json`.

    `task_type` and `dataset_*` follow the Hub's model-index vocabulary (e.g. task_type "text-generation",
    metric names "perplexity", "acc", "acc_norm"), so the model card can list the result as it is.
    """

    evaluation: str  # e.g. "perplexity", "multiple_choice", "memorization", "lm_eval"
    model: str
    task_name: str
    task_type: str
    dataset_name: str
    dataset_type: str
    metrics: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # per-language / per-source breakdowns and the like
    date: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")
        return path


def default_result_path(model: str | Path, name: str) -> Path:
    """`<model>/eval_results/<name>.json` for a local model folder, else `eval_results/<name>.json` in the cwd."""
    model_path = Path(model)
    base = model_path if model_path.is_dir() else Path(".")
    return base / RESULTS_DIR_NAME / f"{name}.json"


def read_results(model_dir: str | Path) -> list[EvalResult]:
    """Every result file in `<model_dir>/eval_results/`, sorted by name; unreadable files raise with their path."""
    results = []
    for path in sorted(Path(model_dir, RESULTS_DIR_NAME).glob("*.json")):
        try:
            results.append(EvalResult(**json.loads(path.read_text())))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path} is not an evaluation result file ({error}); remove or fix it.") from error
    return results


def resolve_device(device: str | None) -> torch.device:
    """`device`, or CUDA when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_and_tokenizer(
    model: str | Path, device: str | None = None, dtype: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any `AutoModelForCausalLM`-loadable folder or Hub id (Apertus or another architecture), in eval mode; a local
    path that does not exist raises `SourceNotFoundError` (a FileNotFoundError) naming it."""
    source = resolve_source(str(model), "model", MODEL_HINT)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype).to(resolve_device(device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    return loaded, tokenizer
