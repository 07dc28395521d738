"""The Goldfish memorization audit: how much of its training text a model reproduces verbatim, against unseen text.

Passages. A document qualifies when its text has at least `prefix_tokens + suffix_tokens` tokens (encoded as in
pretraining: no special tokens added, special-token strings in the text split into ordinary tokens); its passage is
the first `prefix_tokens + suffix_tokens` of them. Documents are taken in file order (files in the order given) and
the first `max_passages` qualifying ones are kept; shorter documents are counted as `too_short` and left out.

Extraction. The model reads `<s>` + the first `prefix_tokens` tokens, as at the start of a training document, and
greedily decodes `suffix_tokens` tokens. Per passage: an exact match when all of them equal the passage's next
`suffix_tokens` tokens, and the matching-prefix length, the number of tokens generated before the first mismatch.

Metrics, for the training and the held-out passages: `exact_match_*` (the rate of exact matches) and
`prefix_match_*` (the mean matching-prefix length in tokens), computed by the shipped `evaluate` module
`memorization_exact_match` (`apertus_hf.evaluation.load_metric`), and their `*_difference` = train - heldout. Without
Goldfish a model that saw its training passages many times extracts far more of them than of held-out text; the
Goldfish loss should bring the difference near zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..data import DataSource, load_documents
from ..runtime import resolve_source
from .common import MODEL_HINT, EvalResult, default_result_path, load_model_and_tokenizer
from .metrics import load_metric


@dataclass
class Passages:
    """Prompts (`<s>` + prefix, `[n, 1 + prefix_tokens]`) and the continuations they should produce
    (`[n, suffix_tokens]`), plus how many documents were too short to give a passage."""

    prompts: torch.Tensor
    continuations: torch.Tensor
    too_short: int = 0


def build_passages(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    prefix_tokens: int = 32,
    suffix_tokens: int = 32,
    max_passages: int | None = None,
) -> Passages:
    """The passages of `texts` (see the module docstring)."""
    if prefix_tokens < 0 or suffix_tokens < 1:
        raise ValueError(f"Need prefix_tokens >= 0 and suffix_tokens >= 1, got {prefix_tokens} and {suffix_tokens}.")
    if tokenizer.bos_token_id is None:
        raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has no BOS token to start the prompts with.")
    length = prefix_tokens + suffix_tokens
    passages, too_short = [], 0
    for text in texts:
        if max_passages is not None and len(passages) == max_passages:
            break
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
        if len(ids) < length:
            too_short += 1
        else:
            passages.append([tokenizer.bos_token_id, *ids[:length]])
    if not passages:
        raise ValueError(
            f"No passage: none of the {too_short} documents has {length} tokens "
            f"(prefix_tokens={prefix_tokens} + suffix_tokens={suffix_tokens}). Pass longer documents or lower them."
        )
    ids = torch.tensor(passages)
    return Passages(ids[:, : 1 + prefix_tokens], ids[:, 1 + prefix_tokens :], too_short)


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel, prompts: torch.Tensor, new_tokens: int, batch_size: int = 16, pad_token_id: int = 0
) -> torch.Tensor:
    """`new_tokens` greedily decoded tokens after each prompt (`[n, new_tokens]`).

    All prompts have the same length, so batches need no padding. A row that emits EOS may stop early; the
    positions after it hold padding, or -1 past the longest row of its batch. Either way they follow a mismatch,
    since a passage's tokens never include EOS.
    """
    device = next(model.parameters()).device
    # An explicit config, so that sampling or penalties in the model's generation_config.json cannot apply.
    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_token_id, eos_token_id=None
    )
    outputs = torch.full((len(prompts), new_tokens), -1, dtype=torch.long)
    for start in tqdm(range(0, len(prompts), batch_size), desc="memorization", unit="batch"):
        batch = prompts[start : start + batch_size].to(device)
        generated = model.generate(batch, attention_mask=torch.ones_like(batch), generation_config=config)
        continuation = generated[:, batch.shape[1] :].cpu()
        outputs[start : start + len(batch), : continuation.shape[1]] = continuation
    return outputs


def extract(model: PreTrainedModel, passages: Passages, batch_size: int = 16, pad_token_id: int = 0) -> dict[str, Any]:
    """Greedy extraction of each passage's continuation from its prompt, scored by the `memorization_exact_match`
    metric: `exact_match`, `prefix_match` and their per-passage values."""
    generated = greedy_continuations(model, passages.prompts, passages.continuations.shape[1], batch_size, pad_token_id)
    # In memory: no cache files under ~/.cache/huggingface/evaluate.
    metric = load_metric("memorization_exact_match", keep_in_memory=True)
    return metric.compute(predictions=generated.tolist(), references=passages.continuations.tolist())


def _read_texts(paths: Sequence[str | Path], option: str) -> list[str]:
    texts = []
    for path in map(str, paths):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{option} file {path} does not exist; check the path.")
        texts.extend(load_documents([DataSource(path=path)])["text"])
    return texts


def evaluate_memorization(
    model: str | Path,
    train: Sequence[str | Path],
    heldout: Sequence[str | Path],
    prefix_tokens: int = 32,
    suffix_tokens: int = 32,
    max_passages: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str = "auto",
    output: str | Path | None = None,
) -> EvalResult:
    """Audit the model folder (or Hub id) `model` on passages of its training data `train` and of unseen data
    `heldout`; write the EvalResult JSON (default `<model>/eval_results/memorization.json`) and return it."""
    resolve_source(str(model), "model", MODEL_HINT)  # a missing model folder fails before the data is read
    if not train or not heldout:
        raise ValueError("The audit needs training (--train) and held-out (--heldout) files; pass both.")
    train_texts, heldout_texts = _read_texts(train, "--train"), _read_texts(heldout, "--heldout")
    loaded, tokenizer = load_model_and_tokenizer(model, device, dtype)
    pad_token_id = next((token for token in (tokenizer.pad_token_id, tokenizer.eos_token_id) if token is not None), 0)
    results, details = {}, {}
    for name, texts in (("train", train_texts), ("heldout", heldout_texts)):
        passages = build_passages(texts, tokenizer, prefix_tokens, suffix_tokens, max_passages)
        results[name] = extract(loaded, passages, batch_size, pad_token_id)
        details[name] = {
            "passages": len(results[name]["exact_match_per_passage"]),
            "too_short": passages.too_short,
            "exact_match": results[name]["exact_match"],
            "prefix_match": results[name]["prefix_match"],
            "prefix_match_per_passage": results[name]["prefix_match_per_passage"],
        }
    metrics = {}
    for metric in ("exact_match", "prefix_match"):
        train_value, heldout_value = results["train"][metric], results["heldout"][metric]
        metrics |= {
            f"{metric}_train": train_value,
            f"{metric}_heldout": heldout_value,
            f"{metric}_difference": train_value - heldout_value,
        }
    result = EvalResult(
        evaluation="memorization",
        model=str(model),
        task_name="memorization",
        task_type="text-generation",
        dataset_name=", ".join(Path(path).name for path in train),
        dataset_type="local",
        metrics=metrics,
        settings={
            "train": [str(path) for path in train],
            "heldout": [str(path) for path in heldout],
            "prefix_tokens": prefix_tokens,
            "suffix_tokens": suffix_tokens,
            "max_passages": max_passages,
            "batch_size": batch_size,
            "dtype": dtype,
            "decoding": "greedy",
        },
        details=details,
    )
    result.write(output or default_result_path(model, "memorization"))
    return result
