"""Zero-shot multiple choice by log-likelihood, scored exactly as lm-evaluation-harness (0.4.x) scores its
`output_type: multiple_choice` tasks with `--model hf`, on a task given as a JSONL file.

Each record is `{"context": str, "choices": [str, ...], "gold": int}` (an optional `"language"` adds a per-language
breakdown). A choice's score is the summed log-probability of the tokens of `target_delimiter + choice` after the
context. `acc` takes the highest score, `acc_norm` the highest score per character of the choice, `acc_bytes` the
highest score per UTF-8 byte of the choice: lm-eval's three definitions (its `acc_norm` divides by `len(choice)`,
which counts characters; `acc_bytes` is its byte-normalised variant). The shipped `evaluate` module
`multiple_choice_accuracy` (`apertus_hf.evaluation.load_metric`) turns the log-likelihoods into them.

lm-eval itself needs a task YAML per dataset and runs the model through its own loader; this module scores any
local JSONL with an already loaded model, so the same scoring runs inside tests and training jobs. The agreement
with lm-eval is tested item by item on the task shipped in `eval/tasks/`.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from ..data.padding import pad_token_rows
from .common import EvalResult, load_model_and_tokenizer
from .metrics import load_metric

TARGET_DELIMITER = " "
# lm-eval's HFLM falls back to this context length when neither the config nor the tokenizer names one.
DEFAULT_MAX_LENGTH = 2048
NORMALISATIONS = ("acc", "acc_norm", "acc_bytes")


class TaskFormatError(ValueError):
    """A task file record that is not `{"context": str, "choices": [str, ...], "gold": int}`."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: the context, its candidate continuations, and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int
    language: str | None = None


def _record_error(path: Path, line_number: int, problem: str) -> TaskFormatError:
    return TaskFormatError(
        f"{path}:{line_number}: {problem}. Each line must be a JSON object "
        '{"context": str, "choices": [str, str, ...], "gold": <index into choices>}; fix or remove that line.'
    )


def read_task(path: str | Path) -> list[MultipleChoiceItem]:
    """Every record of a JSONL task file, validated; a bad record raises `TaskFormatError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Task file {path} does not exist; pass a JSONL file with one question per line.")
    items = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise _record_error(path, line_number, f"not valid JSON ({error})") from error
            if not isinstance(record, dict):
                raise _record_error(path, line_number, f"expected a JSON object, got {type(record).__name__}")
            missing = [name for name in ("context", "choices", "gold") if name not in record]
            if missing:
                raise _record_error(path, line_number, f"missing field(s) {', '.join(missing)}")
            context, choices, gold = record["context"], record["choices"], record["gold"]
            if not isinstance(context, str):
                raise _record_error(path, line_number, f"context must be a string, got {context!r}")
            if not isinstance(choices, list) or len(choices) < 2:
                raise _record_error(path, line_number, f"choices must be a list of at least 2 strings, got {choices!r}")
            if not all(isinstance(choice, str) and choice for choice in choices):
                raise _record_error(path, line_number, f"every choice must be a non-empty string, got {choices!r}")
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise _record_error(
                    path,
                    line_number,
                    f"gold must be an integer in 0..{len(choices) - 1} (one per choice), got {gold!r}",
                )
            language = record.get("language")
            items.append(MultipleChoiceItem(context, tuple(choices), gold, None if language is None else str(language)))
    if not items:
        raise TaskFormatError(f"{path} holds no records; add one JSON object per line.")
    return items


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, prefix_text: str) -> list[int]:
    # As lm-eval's HFLM.tok_encode: the tokenizer's own special tokens (BOS for most base models), unless the text
    # already starts with the prefix token's text.
    return tokenizer.encode(text, add_special_tokens=not text.startswith(prefix_text))


def encode_context_continuation(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split as lm-eval's causal `loglikelihood` splits them.

    Trailing whitespace of the context moves to the continuation; the continuation's tokens are those of
    `tokenize(context + continuation)` after the first `len(tokenize(context))`, so a merge across the boundary is
    scored as part of the continuation. An empty context becomes the BOS token (EOS when there is none).
    """
    prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if not context:
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        if continuation_ids and continuation_ids[0] == prefix_token_id:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix_token_id], continuation_ids
    prefix_text = tokenizer.decode([prefix_token_id])
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole_ids = _encode(tokenizer, stripped + continuation, prefix_text)
    context_ids = _encode(tokenizer, stripped, prefix_text)
    return context_ids, whole_ids[len(context_ids) :]


def model_max_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The context length lm-eval's HFLM assumes: from the config, else the tokenizer, else 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    # Tokenizers report VERY_LARGE_INTEGER when no length was set.
    if tokenizer.model_max_length not in (None, VERY_LARGE_INTEGER):
        return int(tokenizer.model_max_length)
    return DEFAULT_MAX_LENGTH


@torch.no_grad()
def continuation_loglikelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    progress: bool = True,
) -> list[float]:
    """Summed log-probability of each `(context, continuation)` pair's continuation tokens, in request order.

    Sequences longer than the model's context keep their last tokens, as in lm-eval. Batches hold sequences of
    similar length (longest first) and are right-padded without an attention mask: with causal attention no real
    position sees the padding, and it is what lm-eval does, so the scores match it to the last bit where the
    kernels allow.
    """
    max_length = model_max_length(model, tokenizer)
    encoded = [encode_context_continuation(tokenizer, context, continuation) for context, continuation in requests]
    for (context, continuation), (_, continuation_ids) in zip(requests, encoded, strict=True):
        if not continuation_ids:
            raise ValueError(f"Continuation {continuation!r} of context {context[-80:]!r} encodes to no tokens.")
        if len(continuation_ids) > max_length:
            raise ValueError(
                f"Continuation {continuation[:80]!r} has {len(continuation_ids)} tokens, more than the model's "
                f"context of {max_length}; shorten the choice."
            )
    order = sorted(range(len(encoded)), key=lambda index: -len(encoded[index][0]) - len(encoded[index][1]))
    device = model.device
    scores: list[float] = [0.0] * len(encoded)
    truncated = 0
    with tqdm(total=len(order), desc="Scoring choices", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = []
            for index in batch:
                context_ids, continuation_ids = encoded[index]
                tokens = context_ids + continuation_ids
                truncated += len(tokens) > max_length + 1
                # The last token is only ever a target, never an input.
                inputs.append(tokens[-(max_length + 1) :][:-1])
            input_ids, _ = pad_token_rows(inputs, pad_value=0)  # no attention mask, as lm-eval (see above)
            logits = model(input_ids=input_ids.to(device)).logits
            for row, index in enumerate(batch):
                continuation_ids = encoded[index][1]
                end = len(inputs[row])
                # Log-softmax over the continuation positions only, in float32 whatever the model's dtype.
                log_probs = torch.log_softmax(logits[row, end - len(continuation_ids) : end].float(), dim=-1)
                targets = torch.tensor(continuation_ids, device=log_probs.device).unsqueeze(-1)
                scores[index] = float(log_probs.gather(-1, targets).squeeze(-1).sum())
            bar.update(len(batch))
    if truncated:
        warnings.warn(
            f"{truncated} of {len(encoded)} context+choice sequences exceed the model's context of {max_length} "
            "tokens and lost their first tokens, as lm-eval does.",
            stacklevel=2,
        )
    return scores


def score_items(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[MultipleChoiceItem],
    batch_size: int = 8,
    target_delimiter: str = TARGET_DELIMITER,
    progress: bool = True,
) -> list[list[float]]:
    """Per item, the log-likelihood of each of its choices."""
    requests = [(item.context, target_delimiter + choice) for item in items for choice in item.choices]
    flat = continuation_loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    loglikelihoods, position = [], 0
    for item in items:
        loglikelihoods.append(flat[position : position + len(item.choices)])
        position += len(item.choices)
    return loglikelihoods


def accuracy_metrics(items: Sequence[MultipleChoiceItem], loglikelihoods: Sequence[Sequence[float]]) -> dict[str, Any]:
    """The `multiple_choice_accuracy` metric of the items: `acc`, `acc_norm`, `acc_bytes`, their standard errors
    (`acc_stderr`, ...) and, per normalisation, the choice picked for each item (`predictions`)."""
    # In memory: no cache files under ~/.cache/huggingface/evaluate.
    metric = load_metric("multiple_choice_accuracy", keep_in_memory=True)
    return metric.compute(
        loglikelihoods=[list(scores) for scores in loglikelihoods],
        choices=[list(item.choices) for item in items],
        gold=[item.gold for item in items],
    )


def _per_language(
    items: Sequence[MultipleChoiceItem], loglikelihoods: Sequence[Sequence[float]]
) -> dict[str, dict[str, float]]:
    indices_by_language: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        if item.language is not None:
            indices_by_language[item.language].append(index)
    breakdown = {}
    for language, indices in sorted(indices_by_language.items()):
        accuracy = accuracy_metrics([items[index] for index in indices], [loglikelihoods[index] for index in indices])
        breakdown[language] = {"num_items": len(indices), **{name: accuracy[name] for name in NORMALISATIONS}}
    return breakdown


def evaluate_multiple_choice(
    model: str | Path,
    task: str | Path,
    *,
    task_name: str | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    limit: int | None = None,
    target_delimiter: str = TARGET_DELIMITER,
    progress: bool = True,
) -> EvalResult:
    """Zero-shot accuracy of a causal LM folder (or Hub id) on a JSONL multiple-choice task file.

    `limit` scores only the first `limit` records. The result holds `acc`, `acc_norm` and `acc_bytes`; `details`
    holds their standard errors, a per-language breakdown when the records name a language, and every item's
    predictions (to compare runs, or with lm-eval's logged samples, item by item).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    items = read_task(task)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}.")
        items = items[:limit]
    loaded, tokenizer = load_model_and_tokenizer(model, device=device, dtype=dtype)
    loglikelihoods = score_items(
        loaded, tokenizer, items, batch_size=batch_size, target_delimiter=target_delimiter, progress=progress
    )
    accuracy = accuracy_metrics(items, loglikelihoods)
    metrics = {name: accuracy[name] for name in NORMALISATIONS}
    details: dict = {"num_items": len(items), "stderr": {name: accuracy[f"{name}_stderr"] for name in NORMALISATIONS}}
    per_language = _per_language(items, loglikelihoods)
    if per_language:
        details["per_language"] = per_language
    details["predictions"] = accuracy["predictions"]
    return EvalResult(
        evaluation="multiple_choice",
        model=str(model),
        task_name=task_name or Path(task).stem,
        task_type="text-generation",
        dataset_name=task_name or Path(task).stem,
        dataset_type=str(task),
        metrics=metrics,
        settings={
            "task_file": str(task),
            "num_fewshot": 0,
            "target_delimiter": target_delimiter,
            "batch_size": batch_size,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "limit": limit,
            "max_length": model_max_length(loaded, tokenizer),
        },
        details=details,
    )
