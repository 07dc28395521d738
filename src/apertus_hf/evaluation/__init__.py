"""Evaluation of causal language models: perplexity and bits per byte, multiple choice (equal to
lm-evaluation-harness), the Goldfish memorization audit; each writes an `EvalResult` JSON file that the model card
reads."""

from .common import EvalResult, default_result_path, load_model_and_tokenizer, read_results, resolve_device
from .lm_eval_harness import run_lm_eval
from .memorization import build_passages, evaluate_memorization, matching_prefix_lengths
from .multiple_choice import MultipleChoiceItem, TaskFormatError, evaluate_multiple_choice, read_task, score_items
from .perplexity import LossTotals, compute_perplexity, evaluate_perplexity, read_documents

__all__ = [
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
    "load_model_and_tokenizer",
    "matching_prefix_lengths",
    "read_documents",
    "read_results",
    "read_task",
    "resolve_device",
    "run_lm_eval",
    "score_items",
]
