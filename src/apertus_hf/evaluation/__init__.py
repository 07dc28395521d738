"""Evaluation of causal language models: perplexity and bits per byte, multiple choice (equal to
lm-evaluation-harness), the Goldfish memorization audit; each writes an `EvalResult` JSON file that the model card
reads. The metrics are `evaluate` modules shipped in the package (`load_metric`), loadable offline."""

from .common import EvalResult, default_result_path, load_model_and_tokenizer, read_results, resolve_device
from .lm_eval_harness import run_lm_eval
from .memorization import build_passages, evaluate_memorization
from .metrics import METRIC_NAMES, load_metric, metric_path
from .multiple_choice import MultipleChoiceItem, TaskFormatError, evaluate_multiple_choice, read_task, score_items
from .perplexity import LossTotals, compute_perplexity, evaluate_perplexity, read_documents

__all__ = [
    "METRIC_NAMES",
    "EvalResult",
    "LossTotals",
    "MultipleChoiceItem",
    "TaskFormatError",
    "build_passages",
    "compute_perplexity",
    "default_result_path",
    "evaluate_memorization",
    "evaluate_multiple_choice",
    "evaluate_perplexity",
    "load_metric",
    "load_model_and_tokenizer",
    "metric_path",
    "read_documents",
    "read_results",
    "read_task",
    "resolve_device",
    "run_lm_eval",
    "score_items",
]
