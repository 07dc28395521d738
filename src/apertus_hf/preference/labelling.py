"""Labelling prompts as contested, so that qrpo_prepare routes them to the charter judge (`recipes/label_prompts.py`).

Apertus (tech report arXiv 2509.14233, §4.3) had an LLM classifier (Qwen3-32B) pick out the contested prompts (those
on which people disagree because of their values) and scored their completions with the charter judge instead of the
reward model. `contested_probabilities` asks any chat model that question (`charter.contested_messages`, with the
charter's topics as context when a charter is given) and reads the answer from one forward pass: the next-token
probabilities of the words "Yes" and "No", renormalised over the two, as the judge reads its digits. Nothing is
generated and no text is parsed. The probability both words together got (the answer mass) shows whether the model
answered the question at all.

`label_prompts` writes a copy of a prompt dataset with two more columns, a boolean `contested` (probability above
`threshold`) and the probability, as a `save_to_disk` folder (every split, or one) with label_stats.json beside it,
written atomically and never over an existing folder. qrpo_prepare reads it with `route_column: contested`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..data.tables import load_dataset_splits
from ..runtime import (
    check_attn_implementation,
    init_cpu_process_group,
    resolve_attn_implementation,
    resolve_source,
)
from ..tokenization import load_chat_tokenizer
from .charter import NO_WORD, YES_WORD, Charter, contested_messages, load_charter
from .errors import QRPOPrepareError
from .judge import answer_log_probs, single_token_ids
from .prepare import checked_prompt, save_dataset_atomically
from .sampling import Prompt

logger = logging.getLogger(__name__)

LABEL_STATS_FILE_NAME = "label_stats.json"


class LabelPromptsError(ValueError):
    """An option or input of the prompt labelling that cannot work; the message names the problem and the fix."""


def contested_probabilities(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    charter: Charter | None = None,
    batch_size: int = 8,
    yes_word: str = YES_WORD,
    no_word: str = NO_WORD,
    chat_template_kwargs: dict[str, Any] | None = None,
    name: str = "the classifier",
) -> tuple[list[float], list[float]]:
    """(probability that each prompt is contested, answer mass): p(yes) / (p(yes) + p(no)) for the next token after
    the question of `charter.contested_messages`, and p(yes) + p(no). Both words must be single tokens."""
    answer_ids = single_token_ids(tokenizer, (yes_word, no_word), "the answer", name)
    conversations = [contested_messages(prompt, charter, yes_word, no_word) for prompt in prompts]
    log_probs = answer_log_probs(model, tokenizer, conversations, answer_ids, batch_size, chat_template_kwargs)
    return torch.softmax(log_probs, dim=-1)[:, 0].tolist(), torch.logsumexp(log_probs, dim=-1).exp().tolist()


@dataclass
class LabelPromptsConfig:
    dataset: str = field(
        default="data/judge_prompts",
        metadata={
            "help": (
                "Prompts to label: a .jsonl/.json/.parquet/.csv file, a folder of them, a `save_to_disk` folder or a "
                "Hub dataset id. The default is the mix of task and contested prompts that data/build_judge_data.py "
                "writes (train and test splits; contested test questions are on topics train never asks about)."
            )
        },
    )
    dataset_split: str | None = field(
        default=None, metadata={"help": "Label only this split (the output then has only it); null: every split."}
    )
    prompt_column: str = field(
        default="messages",
        metadata={
            "help": (
                "Column holding the prompts: strings, or chat conversations. A conversation that ends with an assistant "
                "turn is classified without it (as qrpo_prepare samples answers to it without it)."
            )
        },
    )
    model_name_or_path: str = field(
        default="outputs/judge-tiny",
        metadata={
            "help": (
                "The classifier: a chat model folder or Hub id (Apertus used Qwen/Qwen3-32B). The default is the tiny "
                "judge that recipes/sft.py trains on data/judge (docs/judge.md), which can tell only its toy rule."
            )
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id; default: the classifier's own."}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype the classifier is loaded in."}
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "Attention backend: sdpa, eager, flex_attention, flash_attention_2, or auto (flash_attention_2 "
            "on CUDA when flash-attn is installed, else sdpa)."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per forward pass."})
    charter: str | None = field(
        default="data/charters/example_charter.yaml",
        metadata={
            "help": (
                "A charter file (YAML or Markdown, docs/judge.md) whose topics (its principles' titles) go into the "
                "question as context; null: the question without them. Use the charter the judge rates by."
            )
        },
    )
    chat_template_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Keyword arguments for the classifier's chat template, e.g. {enable_thinking: false} for Qwen3 "
            "(else it opens a thinking block instead of answering)."
        },
    )
    yes_word: str = field(
        default=YES_WORD,
        metadata={"help": "The answer meaning 'contested': one token of the classifier's tokenizer."},
    )
    no_word: str = field(
        default=NO_WORD, metadata={"help": "The answer meaning 'not contested': one token of the tokenizer."}
    )
    threshold: float = field(
        default=0.5,
        metadata={"help": "A prompt is contested when p(yes) / (p(yes) + p(no)) is above this."},
    )
    label_column: str = field(
        default="contested",
        metadata={"help": "Name of the boolean column written (qrpo_prepare's route_column)."},
    )
    probability_column: str = field(
        default="contested_probability",
        metadata={"help": "Name of the column with the probability the label comes from."},
    )
    output_dir: str = field(
        default="outputs/prompts-labelled-tiny",
        metadata={
            "help": (
                f"Folder the labelled dataset is saved to (`save_to_disk`), with {LABEL_STATS_FILE_NAME}. It must not "
                "exist: labels are never written over anything."
            )
        },
    )

    def __post_init__(self):
        try:
            check_attn_implementation(self.attn_implementation)
        except ValueError as error:
            raise LabelPromptsError(str(error)) from None
        if self.batch_size < 1:
            raise LabelPromptsError(f"batch_size must be >= 1, got {self.batch_size}.")
        if not 0 < self.threshold < 1:
            raise LabelPromptsError(f"threshold must be in (0, 1), got {self.threshold}.")
        if self.yes_word == self.no_word:
            raise LabelPromptsError(f"yes_word and no_word are both {self.yes_word!r}; give two different words.")
        if self.label_column == self.probability_column:
            raise LabelPromptsError(
                f"label_column and probability_column are both {self.label_column!r}; give two different names."
            )


@dataclass
class LabelPromptsResult:
    """Where the labelled dataset went and what is in it (`stats` is also saved as label_stats.json)."""

    output_dir: Path
    stats: dict[str, Any]
    is_main_process: bool


def label_prompts(config: LabelPromptsConfig) -> LabelPromptsResult:
    """Label every prompt of `config.dataset` as contested or not and save the dataset with the two new columns; see
    the module docstring and `LabelPromptsConfig`. Under `accelerate launch` the prompts are shared out between the
    processes, and the main process saves."""
    init_cpu_process_group()
    state = PartialState()
    output_dir = Path(config.output_dir)
    if output_dir.exists():
        raise LabelPromptsError(
            f"{output_dir} already exists; labels are never written over anything. Choose another output_dir, or "
            "delete that folder first."
        )
    with state.main_process_first():
        splits = load_dataset_splits(config.dataset)
    if config.dataset_split is not None:
        if config.dataset_split not in splits:
            raise LabelPromptsError(
                f"{config.dataset} has no split {config.dataset_split!r}; it has {sorted(splits)}. Set dataset_split "
                "(or null for every split)."
            )
        splits = DatasetDict({config.dataset_split: splits[config.dataset_split]})
    prompts = {name: _split_prompts(config, name, rows) for name, rows in splits.items()}
    charter = load_charter(config.charter) if config.charter is not None else None

    source = resolve_source(config.model_name_or_path, "model_name_or_path", "Give a chat model folder or a Hub id.")
    tokenizer_option = "tokenizer_name_or_path" if config.tokenizer_name_or_path else "model_name_or_path"
    tokenizer = load_chat_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path, tokenizer_option)
    single_token_ids(tokenizer, (config.yes_word, config.no_word), "the answer", config.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(source),
        dtype=config.dtype,
        attn_implementation=resolve_attn_implementation(config.attn_implementation, state.device),
    ).to(state.device)

    flat = [(name, index) for name, split_prompts in prompts.items() for index in range(len(split_prompts))]
    mine: list[tuple[int, float, float]] = []
    with state.split_between_processes(list(range(len(flat)))) as positions:
        if positions:
            probabilities, masses = contested_probabilities(
                model,
                tokenizer,
                [prompts[flat[position][0]][flat[position][1]] for position in positions],
                charter=charter,
                batch_size=config.batch_size,
                yes_word=config.yes_word,
                no_word=config.no_word,
                chat_template_kwargs=config.chat_template_kwargs,
                name=config.model_name_or_path,
            )
            mine = list(zip(positions, probabilities, masses, strict=True))
    gathered = sorted(gather_object(mine))
    probability = {flat[position]: value for position, value, _ in gathered}
    mass = {flat[position]: value for position, _, value in gathered}

    labelled = DatasetDict()
    stats: dict[str, Any] = {"splits": {}}
    for name, rows in splits.items():
        values = [probability[(name, index)] for index in range(len(rows))]
        labels = [value > config.threshold for value in values]
        labelled[name] = rows.add_column(config.label_column, labels).add_column(config.probability_column, values)
        masses = [mass[(name, index)] for index in range(len(rows))]
        stats["splits"][name] = {
            "prompts": len(rows),
            "contested": sum(labels),
            "mean_probability": sum(values) / len(values),
            "mean_answer_mass": sum(masses) / len(masses),
            "min_answer_mass": min(masses),
        }
    stats["processes"] = state.num_processes
    stats["config"] = dataclasses.asdict(config)
    mean_mass = sum(mass.values()) / len(mass)
    if mean_mass < 0.5:
        logger.warning(
            "The classifier put only %.3f of its probability on %r and %r on average: it mostly wants to answer "
            "something else, and its labels mean little. Check chat_template_kwargs (Qwen3: enable_thinking: false).",
            mean_mass,
            config.yes_word,
            config.no_word,
        )
    if state.is_main_process:
        save_dataset_atomically(
            labelled, stats, output_dir, overwrite=False, stats_file=LABEL_STATS_FILE_NAME, writer="label_prompts"
        )
        logger.info("Saved the labelled prompts to %s.", output_dir)
    state.wait_for_everyone()
    return LabelPromptsResult(output_dir, stats, state.is_main_process)


def _split_prompts(config: LabelPromptsConfig, split: str, rows: Any) -> list[Prompt]:
    """The checked prompts of one split (without a final assistant answer); raises LabelPromptsError."""
    if config.prompt_column not in rows.column_names:
        raise LabelPromptsError(
            f"{config.dataset} (split {split}) has no column {config.prompt_column!r}; its columns are "
            f"{rows.column_names}. Set prompt_column to the one holding the prompts."
        )
    taken = [name for name in (config.label_column, config.probability_column) if name in rows.column_names]
    if taken:
        raise LabelPromptsError(
            f"{config.dataset} (split {split}) already has the columns {taken}; set label_column and "
            "probability_column to new names (or drop those columns)."
        )
    if len(rows) == 0:
        raise LabelPromptsError(f"{config.dataset} (split {split}) has no rows.")
    try:
        return [
            checked_prompt(value, row, config.prompt_column)[0] for row, value in enumerate(rows[config.prompt_column])
        ]
    except QRPOPrepareError as error:
        raise LabelPromptsError(f"{config.dataset} (split {split}): {error}") from None
