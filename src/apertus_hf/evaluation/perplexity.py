"""Perplexity and bits per byte of a causal LM on documents, per group (language, source or file) and overall.

What is scored. Each document is encoded as in pretraining: `<s>` followed by the text's tokens (special-token
strings inside the text are split into ordinary tokens, `split_special_tokens=True`). The model predicts every text
token; `<s>` is only context and the final `</s>` is not scored, so every scored token stands for bytes of the text.
Models whose tokenizer has no BOS token start the document with their EOS token instead, as lm-evaluation-harness
does for rolling log-likelihoods.

Long documents: the strided sliding window of the transformers perplexity guide. With `n` text tokens the document
is the sequence `x_0 = <s>`, `x_1 .. x_n`, of length `L = n + 1`. Window `k` (k = 0, 1, ...) is the input
`x[b_k : e_k]` with `b_k = k * stride` and `e_k = min(b_k + max_length, L)`; windows are taken until one reaches the
end of the document. Window k scores the targets `x_t` with `max(e_{k-1}, b_k + 1) <= t < e_k` (`e_{-1} = 1`): the
tokens no earlier window scored, each predicted from all the window's tokens before it.
* `stride < max_length` (the default is `max_length // 2`): every text token is scored exactly once; one scored in
  window k > 0 sees between `max_length - stride` and `max_length - 1` tokens of context (the window does not start
  with `<s>`).
* `stride = max_length`: independent, non-overlapping chunks, each scored as a sequence of its own; the first token
  of each chunk after the first has no context and is not scored (its bytes still count in bits per byte).
* A document of at most `max_length` tokens (with `<s>`) is one window: every token is scored with its full context.
Losses are summed per token (the guide averages per window and weights by window).

Metrics, over the tokens of a group (or of all documents):
* `loss`: the mean negative log-likelihood per scored token, in nats;
* `perplexity`: `exp(loss)`;
* `bits_per_byte`: total NLL in nats / ln(2) / total bytes, where the bytes are the UTF-8 encoding of each document's
  text exactly as read from the file (no `<s>`/`</s>`, no normalisation). It does not depend on the tokenizer, so it
  compares models with different vocabularies.
They are computed by the shipped `evaluate` module `bits_per_byte` (`apertus_hf.evaluation.load_metric`).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import DataSource, load_documents
from ..data.padding import pad_token_rows
from ..loss import IGNORE_INDEX
from ..runtime import resolve_source
from .common import MODEL_HINT, EvalResult, default_result_path, load_model_and_tokenizer
from .metrics import load_metric

GroupBy = Literal["language", "source", "file"]
GROUP_BY_CHOICES: tuple[str, ...] = ("language", "source", "file")
# The Apertus pretraining sequence length: the default window, capped by the model's own position limit.
DEFAULT_MAX_LENGTH = 4096
_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


@dataclass
class Document:
    """One text to score and the group it is reported under."""

    text: str
    group: str


@dataclass
class Window:
    """A slice of a document's token ids fed to the model; its last `scored` tokens are scored."""

    document: int
    input_ids: list[int]
    scored: int


@dataclass
class LossTotals:
    """Summed NLL (nats), scored tokens and UTF-8 bytes of some documents."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0

    def add(self, other: LossTotals) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.documents += other.documents

    def metrics(self) -> dict[str, float]:
        """`loss` (mean nats per token), `perplexity` = exp(loss), `bits_per_byte` = nll / ln 2 / bytes, by the
        `bits_per_byte` metric."""
        # In memory: no cache files under ~/.cache/huggingface/evaluate for a one-row computation.
        metric = load_metric("bits_per_byte", keep_in_memory=True)
        return metric.compute(nll=[self.nll], tokens=[self.tokens], bytes=[self.bytes])

    def summary(self) -> dict[str, float | int]:
        """The counts, and the metrics when there is text (a group of empty documents has none)."""
        counts = {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}
        return {**self.metrics(), **counts} if self.tokens and self.bytes else counts


def read_documents(
    paths: Sequence[str | Path], group_by: GroupBy = "file", text_column: str = "text"
) -> list[Document]:
    """The documents of `paths`, each labelled with its group.

    `group_by="file"` reads any format `load_documents` reads (jsonl/json(.gz), txt, parquet) and labels each
    document with its file name. `"language"` and `"source"` read JSON Lines files and label each document with
    that field of its record; a record without the field is an error naming file and line.
    """
    if group_by not in GROUP_BY_CHOICES:
        raise ValueError(f"group_by must be one of {GROUP_BY_CHOICES}, got {group_by!r}.")
    if not paths:
        raise ValueError("No data files given; pass one or more jsonl files (--data FILE ...).")
    documents = []
    for path in map(str, paths):
        if not Path(path).is_file():
            raise FileNotFoundError(f"Data file {path} does not exist; check the path passed to --data.")
        if group_by == "file":
            texts = load_documents([DataSource(path=path, text_column=text_column)])["text"]
            documents.extend(Document(text, Path(path).name) for text in texts)
        else:
            documents.extend(_grouped_json_records(path, group_by, text_column))
    return documents


def _grouped_json_records(path: str, group_field: str, text_column: str) -> Iterator[Document]:
    # load_documents keeps only the text; the group field needs the whole record, so JSON Lines are read here.
    if not path.endswith(_JSON_SUFFIXES):
        raise ValueError(
            f"{path}: --group_by {group_field} reads the {group_field!r} field of JSON Lines records, and this file "
            f"is not {', '.join(_JSON_SUFFIXES)}. Use --group_by file for it."
        )
    with gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg}, column {error.colno}); fix the line.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}; fix the line.")
            for name in (text_column, group_field):
                if not isinstance(record.get(name), str):
                    problem = "has no" if name not in record else "has a non-string"
                    fix = (
                        "Add it, or name the text field with --text_column"
                        if name == text_column
                        else "Add it, or pass --group_by file"
                    )
                    raise ValueError(f"{where}: the record {problem} {name!r} field (fields: {sorted(record)}). {fix}.")
            yield Document(record[text_column], record[group_field])


def document_token_ids(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`<s>` (or EOS when the tokenizer has no BOS) followed by the text's tokens, as in pretraining."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has neither a BOS nor an EOS token to start with.")
    encoded = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)
    return [start, *encoded["input_ids"]]


def sliding_windows(token_ids: Sequence[int], max_length: int, stride: int, document: int = 0) -> list[Window]:
    """The strided windows of one document (see the module docstring); the first token is never a target."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride} must be between 1 and max_length={max_length}.")
    windows = []
    scored_until = 1  # position 0 (<s>) is never a target
    for begin in range(0, len(token_ids), stride):
        end = min(begin + max_length, len(token_ids))
        first_target = max(scored_until, begin + 1)
        if end > first_target:
            windows.append(Window(document, list(token_ids[begin:end]), end - first_target))
            scored_until = end
        if end == len(token_ids):
            break
    return windows


@torch.no_grad()
def score_windows(
    model: PreTrainedModel, windows: Sequence[Window], batch_size: int = 8, pad_id: int = 0
) -> list[float]:
    """The summed NLL (nats) of the scored tokens of each window; windows are right-padded into batches."""
    device = next(model.parameters()).device
    totals = []
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch"):
        batch = windows[start : start + batch_size]
        input_ids, attention_mask = pad_token_rows([window.input_ids for window in batch], pad_id)
        # Only each window's last `scored` tokens are targets.
        label_rows = [
            [IGNORE_INDEX] * (len(window.input_ids) - window.scored) + window.input_ids[-window.scored :]
            for window in batch
        ]
        labels, _ = pad_token_rows(label_rows, IGNORE_INDEX)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        targets = labels[:, 1:].to(device)
        for row in range(len(batch)):  # one row at a time keeps the float32 copy of the logits small
            nll = F.cross_entropy(logits[row, :-1].float(), targets[row], ignore_index=IGNORE_INDEX, reduction="sum")
            totals.append(nll.item())
    return totals


def window_settings(model: PreTrainedModel, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """`max_length` (default: 4096, the pretraining sequence length, capped by the model's `max_position_embeddings`)
    and `stride` (default: `max_length // 2`)."""
    if max_length is None:
        limit = getattr(model.config, "max_position_embeddings", None)
        max_length = min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 (a context token and a target).")
    return max_length, stride if stride is not None else max(1, max_length // 2)


def compute_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[Document],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> tuple[LossTotals, dict[str, LossTotals]]:
    """Totals over all documents and per group (sorted by name), scoring each document with strided windows
    (defaults: see `window_settings`)."""
    max_length, stride = window_settings(model, max_length, stride)
    windows = []
    per_document = []
    for index, document in enumerate(documents):
        token_ids = document_token_ids(document.text, tokenizer)
        windows.extend(sliding_windows(token_ids, max_length, stride, document=index))
        per_document.append(LossTotals(bytes=len(document.text.encode("utf-8")), documents=1))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for window, nll in zip(windows, score_windows(model, windows, batch_size, pad_id), strict=True):
        per_document[window.document].nll += nll
        per_document[window.document].tokens += window.scored
    overall, groups = LossTotals(), {}
    for document, totals in zip(documents, per_document, strict=True):
        overall.add(totals)
        groups.setdefault(document.group, LossTotals()).add(totals)
    return overall, dict(sorted(groups.items()))


def evaluate_perplexity(
    model: str | Path,
    data: Sequence[str | Path],
    group_by: GroupBy = "file",
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    output: str | Path | None = None,
    text_column: str = "text",
) -> EvalResult:
    """Score `data` with the model folder (or Hub id) `model`, write the EvalResult JSON (default
    `<model>/eval_results/perplexity.json`, or `eval_results/perplexity.json` for a Hub id) and return it."""
    resolve_source(str(model), "model", MODEL_HINT)  # a missing model folder fails before the data is read
    documents = read_documents(data, group_by, text_column)
    loaded, tokenizer = load_model_and_tokenizer(model, device, dtype)
    max_length, stride = window_settings(loaded, max_length, stride)
    overall, groups = compute_perplexity(loaded, tokenizer, documents, max_length, stride, batch_size)
    result = EvalResult(
        evaluation="perplexity",
        model=str(model),
        task_name="perplexity",
        task_type="text-generation",
        dataset_name=", ".join(Path(path).name for path in data),
        dataset_type="local",
        metrics=overall.metrics(),
        settings={
            "data": [str(path) for path in data],
            "group_by": group_by,
            "max_length": max_length,
            "stride": stride,
            "batch_size": batch_size,
            "dtype": dtype,
            "scored": "text tokens after <s>; </s> not scored; bytes = UTF-8 bytes of the text",
        },
        details={"overall": overall.summary(), "groups": {name: totals.summary() for name, totals in groups.items()}},
    )
    result.write(output or default_result_path(model, "perplexity"))
    return result
