"""The QRPO data pipeline: reference completions, their rewards, and the dataset the QRPO trainer (and DPO) reads.

QRPO (Apertus tech report, arXiv 2509.14233, §4.3 'Preference Alignment'; arXiv 2507.08068) needs, for every prompt,
the rewards of n completions sampled from the reference
policy (the SFT model, at temperature 1): a training completion's quantile reward is the fraction of those reference
rewards at or below its own. `prepare_qrpo_dataset` samples the n completions of each prompt
(`sampling.generate_completions`), scores them with a reward model folder or a Python reward function
(`load_reward`), and saves the rows the trainer reads:

- `selection: all`: every sample becomes an unpaired row {prompt, completion, reward, ref_rewards}, n rows a prompt.
- `selection: pairs` (what Apertus did): one paired row a prompt {prompt, chosen, rejected, chosen_reward,
  rejected_reward, ref_rewards}. The chosen sample has quantile reward 1 (a reward >= every reference reward); the
  rejected one a quantile reward below `rejected_quantile` (0.2: below the 20th percentile); each is picked at random
  (seeded) among the samples that qualify. A prompt without a sample that qualifies as rejected (all rewards tied,
  say) is skipped and counted.

The training completions are the reference samples themselves and `ref_rewards` holds all n rewards, each
completion's own included. That is how the QRPO paper built its datasets (training completions picked among the
reference completions, whose rewards are the reference rewards) and what the Apertus tech report (arXiv 2509.14233)
§4.3 'Preference Alignment' describes; a separate pool of
candidates scored against the references would cost more samples for the same rows and is in neither. A consequence:
a completion counts itself, so its quantile reward is at least 1/n, and `pairs` needs n > 1 / rejected_quantile
(n >= 6 for 0.2).

Rewards follow TRL's reward-function convention, `reward(prompts, completions, **kwargs) -> list[float]`, where the
keyword arguments are the other columns of the prompt dataset and, for conversations that ended with an assistant
turn, `answer`: that turn's text, which the prompt leaves out (the toy default reward compares with it).

Completions cut at `max_new_tokens` are kept (dropping them would bias the reference rewards) and counted; the
trainers close them with the end-of-turn token like any other completion, so keep max_new_tokens above the length of
typical answers.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import operator
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from ..runtime import check_attn_implementation, resolve_attn_implementation
from .qrpo import PAIRED_COLUMNS, UNPAIRED_COLUMNS, quantile_rewards
from .recipe import check_model_source, load_chat_tokenizer, load_dataset_splits
from .sampling import Completion, Prompt, generate_completions, is_chat_prompt

logger = logging.getLogger(__name__)

STATS_FILE_NAME = "prepare_stats.json"
# The reward-function keyword that carries the final assistant answers dropped from conversation prompts.
ANSWER_COLUMN = "answer"

# A reward in TRL's convention: reward(prompts, completions, **kwargs) -> one float per completion.
RewardFunction = Callable[..., Sequence[float]]


class QRPOPrepareError(ValueError):
    """An option or input of the QRPO data pipeline that cannot work; the message names the problem and the fix."""


@dataclass
class QRPOPrepareConfig:
    # Prompts
    dataset: str = field(
        default="data/chat",
        metadata={
            "help": (
                "Prompts: a .jsonl/.json/.parquet/.csv file, a folder of them, a `save_to_disk` folder or a Hub dataset "
                "id. The default is the chat dataset the repo ships."
            )
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset` to take the prompts from."})
    prompt_column: str = field(
        default="messages",
        metadata={
            "help": (
                "Column holding the prompts: strings, or chat conversations (lists of {role, content} messages). A "
                "conversation that ends with an assistant turn (a `messages` column of SFT data) loses that turn: the "
                "prompt is everything before it, and the turn's text goes to reward_function as `answer`. The other "
                "columns are passed to reward_function too, as keyword lists (TRL's convention)."
            )
        },
    )
    max_prompts: int | None = field(
        default=256, metadata={"help": "Use only the first this many prompts; null: all of them."}
    )

    # Reference policy
    model_name_or_path: str = field(
        default="outputs/sft-tiny",
        metadata={
            "help": (
                "The reference policy (for QRPO: the SFT model to be trained next): a local folder or a Hub id. The "
                "default is the model `recipes/sft.py` writes by default."
            )
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id; default: the policy's own."}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype the policy and the reward model are loaded in."}
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": (
                "Attention backend of the policy: sdpa, eager, flex_attention, flash_attention_2, or auto "
                "(flash_attention_2 on CUDA when flash-attn is installed, else sdpa)."
            )
        },
    )

    # Sampling
    num_samples: int = field(
        default=8,
        metadata={
            "help": (
                "n: reference completions sampled per prompt; their rewards are every row's ref_rewards (10 in the "
                "QRPO paper, 30 in the Apertus data). More gives finer quantiles."
            )
        },
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Longest completion, in tokens."})
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature. Keep 1 (with top_p 1): QRPO's quantiles are over the reference policy's own "
            "distribution."
        },
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass; keep 1 for QRPO."})
    batch_size: int = field(
        default=64,
        metadata={
            "help": (
                "Sequences per `generate` call. Samples are reproducible for a given (seed, batch_size), on any number "
                "of processes."
            )
        },
    )

    # Reward
    reward_model: str | None = field(
        default=None,
        metadata={
            "help": (
                "A sequence-classification reward model (num_labels 1) folder or Hub id, loaded with "
                "AutoModelForSequenceClassification: the score is the logit of prompt + completion (chat template for "
                "chat prompts). Set this or reward_function."
            )
        },
    )
    reward_function: str | None = field(
        default="apertus_hf.trainers.rewards:answer_similarity",
        metadata={
            "help": (
                "A Python reward as 'package.module:function', in TRL's convention: function(prompts, completions, "
                "**kwargs) -> list[float]. The default is a toy: how close the completion is to the dataset's own "
                "answer. Set this or reward_model."
            )
        },
    )
    reward_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Keyword arguments passed to reward_function on every call."},
    )
    reward_batch_size: int = field(
        default=32, metadata={"help": "Completions per reward call (per reward-model forward)."}
    )

    # Selection
    selection: Literal["all", "pairs"] = field(
        default="pairs",
        metadata={
            "help": (
                "all: every sample is an unpaired row (prompt, completion, reward, ref_rewards). pairs (Apertus): one "
                "row per prompt with a chosen sample of quantile reward 1 and a rejected one below rejected_quantile; "
                "prompts with no such rejected sample are skipped. DPO (recipes/dpo.py) needs pairs."
            )
        },
    )
    rejected_quantile: float = field(
        default=0.2,
        metadata={"help": "pairs: the rejected sample's quantile reward must be below this (0.2: 20th percentile)."},
    )

    # Run
    seed: int = field(default=42, metadata={"help": "Seed of the sampling and of the pair picks."})
    output_dir: str = field(
        default="outputs/qrpo-data-tiny",
        metadata={"help": f"Folder the dataset is saved to (`save_to_disk`), with {STATS_FILE_NAME}."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an existing dataset in output_dir (only once the new one is completely written)."},
    )

    def __post_init__(self):
        try:
            check_attn_implementation(self.attn_implementation)
        except ValueError as error:
            raise QRPOPrepareError(str(error)) from None
        for name in ("num_samples", "max_new_tokens", "batch_size", "reward_batch_size"):
            if getattr(self, name) < 1:
                raise QRPOPrepareError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise QRPOPrepareError(f"max_prompts must be >= 1 or null (all prompts), got {self.max_prompts}.")
        if not 0 < self.rejected_quantile <= 1:
            raise QRPOPrepareError(f"rejected_quantile must be in (0, 1], got {self.rejected_quantile}.")
        if self.selection == "pairs" and 1 / self.num_samples >= self.rejected_quantile:
            # Each sample is among its own references, so the lowest possible quantile reward is 1/n.
            raise QRPOPrepareError(
                f"selection pairs with num_samples={self.num_samples}: a sample's quantile reward is at least "
                f"1/{self.num_samples}, never below rejected_quantile={self.rejected_quantile}, so every prompt would be "
                f"skipped. Use num_samples > {1 / self.rejected_quantile:g}."
            )
        _check_reward_choice(self.reward_model, self.reward_function, self.reward_kwargs)


@dataclass
class QRPOPrepareResult:
    """Where the dataset went and what is in it (`stats` is also saved as prepare_stats.json)."""

    output_dir: Path
    stats: dict[str, Any]
    is_main_process: bool


# ---------------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------------


def load_prompts(
    dataset: str, split: str, prompt_column: str, max_prompts: int | None = None
) -> tuple[list[Prompt], dict[str, list[Any]]]:
    """(prompts, columns for the reward function) of a prompt dataset, checked.

    The columns are the dataset's other columns, plus `answer` when conversations end with an assistant turn: that
    turn's text (None for rows without one), the dataset's own answer, which a reward can compare with.
    """
    splits = load_dataset_splits(dataset)
    if split not in splits:
        raise QRPOPrepareError(f"{dataset} has no split {split!r}; it has {sorted(splits)}. Set dataset_split.")
    rows = splits[split]
    if prompt_column not in rows.column_names:
        raise QRPOPrepareError(
            f"{dataset} (split {split}) has no column {prompt_column!r}; its columns are {rows.column_names}. Set "
            "prompt_column to the one holding the prompts (strings or chat messages)."
        )
    if max_prompts is not None:
        rows = rows.select(range(min(max_prompts, len(rows))))
    if len(rows) == 0:
        raise QRPOPrepareError(f"{dataset} (split {split}) has no rows.")
    checked = [_checked_prompt(value, row, prompt_column) for row, value in enumerate(rows[prompt_column])]
    prompts = [prompt for prompt, _ in checked]
    columns = {name: rows[name] for name in rows.column_names if name != prompt_column}
    if any(answer is not None for _, answer in checked):
        if ANSWER_COLUMN in columns:
            raise QRPOPrepareError(
                f"{dataset} has a column {ANSWER_COLUMN!r}, and its conversations end with answers, which are passed to "
                f"the reward function under that name too. Rename the column."
            )
        columns[ANSWER_COLUMN] = [answer for _, answer in checked]
    return prompts, columns


def _checked_prompt(value: Any, row: int, column: str) -> tuple[Prompt, str | None]:
    """(the prompt, the final assistant answer dropped from it or None)."""
    where = f"Row {row} of column {column!r}"
    if isinstance(value, str):
        if not value.strip():
            raise QRPOPrepareError(f"{where} is an empty prompt; fill it in or drop the row.")
        return value, None
    if not isinstance(value, list) or not value:
        raise QRPOPrepareError(
            f"{where} is {value!r}; a prompt is a non-empty string or a list of {{role, content}} messages."
        )
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
            raise QRPOPrepareError(f"{where} has the message {message!r}; messages are {{role, content}} mappings.")
        if not isinstance(message.get("content"), str):
            raise QRPOPrepareError(f"{where} has a {message['role']} message without text content: {message!r}.")
    answer = value[-1]["content"] if value[-1]["role"] == "assistant" else None
    messages = value[:-1] if answer is not None else value
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise QRPOPrepareError(
            f"{where} does not end with a non-empty user turn (once a final assistant answer is dropped); a prompt is "
            "the conversation the model answers next. Fix or drop the row."
        )
    return [{"role": message["role"], "content": message["content"]} for message in messages], answer


# ---------------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------------


def _check_reward_choice(reward_model: str | None, reward_function: str | None, reward_kwargs: dict[str, Any]) -> None:
    if (reward_model is None) == (reward_function is None):
        raise QRPOPrepareError(
            "Set exactly one of reward_model (a reward model folder or Hub id) and reward_function (an import path "
            f"'package.module:function'); got reward_model={reward_model!r}, reward_function={reward_function!r}. "
            "With --reward_model, also pass --reward_function null."
        )
    if reward_model is not None and reward_kwargs:
        raise QRPOPrepareError(
            f"reward_kwargs {reward_kwargs} are passed to reward_function only; with a reward_model, set reward_kwargs "
            "to {}."
        )


def import_reward_function(path: str) -> Callable[..., Sequence[float]]:
    """The callable at `path`, written 'package.module:function' (or 'package.module:Class.method')."""
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise QRPOPrepareError(
            f"reward_function {path!r} is not an import path; write it as 'package.module:function', e.g. "
            "'apertus_hf.trainers.rewards:answer_similarity'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise QRPOPrepareError(
            f"reward_function {path!r}: cannot import module {module_name!r} ({error}). Install the package that has "
            "it, or put its folder on PYTHONPATH."
        ) from error
    try:
        function = operator.attrgetter(attribute)(module)
    except AttributeError as error:
        public = sorted(name for name, value in vars(module).items() if callable(value) and not name.startswith("_"))
        raise QRPOPrepareError(
            f"reward_function {path!r}: module {module_name!r} has no attribute {attribute!r}. Its public callables: "
            f"{public}."
        ) from error
    if not callable(function):
        raise QRPOPrepareError(
            f"reward_function {path!r} is a {type(function).__name__}, not a function; point it at a callable "
            "reward(prompts, completions, **kwargs) -> list[float]."
        )
    return function


class RewardModelScorer:
    """A reward in TRL's convention from a sequence-classification reward model (num_labels 1).

    Each (prompt, completion) is rendered the way TRL's `RewardTrainer` renders its training rows, so a reward model
    trained there scores what it saw: chat prompts through the reward tokenizer's chat template (prompt + completion,
    ending with the end-of-turn token), string prompts as prompt + completion + EOS. The score is the logit at the
    last token, computed in right-padded batches of `batch_size`.
    """

    def __init__(self, name_or_path: str, batch_size: int = 32, dtype: str = "float32", device: Any = None):
        check_model_source(name_or_path)
        self.name_or_path = name_or_path
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=dtype)
        if self.model.config.num_labels != 1:
            raise QRPOPrepareError(
                f"The reward model {name_or_path} has num_labels={self.model.config.num_labels}; a reward model "
                "outputs one score (num_labels 1), as TRL's RewardTrainer trains them."
            )
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if pad is None:
            raise QRPOPrepareError(
                f"The tokenizer of the reward model {name_or_path} has neither a pad nor an EOS token."
            )
        self.pad_token_id = pad
        # The classification head pools at the last token that is not padding, which it finds by this id.
        self.model.config.pad_token_id = pad
        self.model.to(device if device is not None else PartialState().device).eval()

    def encode(self, prompt: Prompt, completion: str | list[dict[str, Any]]) -> list[int]:
        if is_chat_prompt(prompt):
            if not self.tokenizer.chat_template:
                raise QRPOPrepareError(
                    f"The reward model {self.name_or_path} has no chat template, so it cannot score chat prompts."
                )
            ids = self.tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
            return list(ids)
        eos = self.tokenizer.eos_token or ""
        text = prompt + completion
        return list(self.tokenizer(text if text.endswith(eos) else text + eos)["input_ids"])

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        encoded = [self.encode(prompt, completion) for prompt, completion in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(encoded), self.batch_size):
            rows = encoded[start : start + self.batch_size]
            width = max(len(row) for row in rows)
            input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for index, row in enumerate(rows):
                input_ids[index, : len(row)] = torch.tensor(row)
                attention_mask[index, : len(row)] = 1
            logits = self.model(
                input_ids=input_ids.to(self.model.device), attention_mask=attention_mask.to(self.model.device)
            ).logits
            scores += logits[:, 0].float().tolist()
        return scores


def load_reward(
    reward_model: str | None,
    reward_function: str | None,
    reward_kwargs: dict[str, Any] | None = None,
    *,
    batch_size: int = 32,
    dtype: str = "float32",
) -> RewardFunction:
    """A reward callable `(prompts, completions, **kwargs) -> list[float]` (TRL's reward-function convention).

    Exactly one of `reward_model` (a `RewardModelScorer` over that folder or Hub id) and `reward_function` (an import
    path 'package.module:function', called with `reward_kwargs` on top of the call's own keyword arguments).
    """
    reward_kwargs = dict(reward_kwargs or {})
    _check_reward_choice(reward_model, reward_function, reward_kwargs)
    if reward_model is not None:
        return RewardModelScorer(reward_model, batch_size=batch_size, dtype=dtype)
    function = import_reward_function(reward_function)
    return partial(function, **reward_kwargs) if reward_kwargs else function


def score_completions(
    reward: RewardFunction,
    prompts: Sequence[Prompt],
    completions: Sequence[Sequence[str | list[dict[str, Any]]]],
    columns: dict[str, Sequence[Any]] | None = None,
    batch_size: int = 32,
) -> list[list[float]]:
    """The reward of every completion, as `completions` is laid out (per prompt, a list of completions).

    The reward is called TRL-style on flat, aligned lists (each prompt repeated once per completion, and each of
    `columns` likewise as a keyword argument), about `batch_size` completions at a time and whole prompts at a time.
    Under `accelerate launch` the prompts are shared out between the processes and the rewards gathered back in order.
    Raises QRPOPrepareError, naming the prompt, unless every reward is one finite number.
    """
    columns = dict(columns or {})
    counts = {len(samples) for samples in completions}
    if len(completions) != len(prompts) or len(counts) > 1:
        raise ValueError("completions must hold the same number of completions for every prompt, in prompt order.")
    per_prompt = counts.pop() if counts else 1
    prompts_per_call = max(1, batch_size // per_prompt)
    scored: list[tuple[int, list[float]]] = []
    with PartialState().split_between_processes(list(range(len(prompts)))) as mine:
        for start in range(0, len(mine), prompts_per_call):
            indices = mine[start : start + prompts_per_call]
            flat = [(index, completion) for index in indices for completion in completions[index]]
            values = reward(
                [prompts[index] for index, _ in flat],
                [completion for _, completion in flat],
                **{name: [column[index] for index, _ in flat] for name, column in columns.items()},
            )
            rewards = _checked_rewards(values, indices, per_prompt)
            scored += [(index, rewards[i * per_prompt : (i + 1) * per_prompt]) for i, index in enumerate(indices)]
    return [rewards for _, rewards in sorted(gather_object(scored))]


def _checked_rewards(values: Any, indices: Sequence[int], per_prompt: int) -> list[float]:
    expected = len(indices) * per_prompt
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple, np.ndarray)) or len(values) != expected:
        got = f"{len(values)} values" if hasattr(values, "__len__") else repr(values)
        which = f"prompt {indices[0]}" if len(indices) == 1 else f"prompts {indices[0]}..{indices[-1]}"
        raise QRPOPrepareError(
            f"The reward returned {got} for the {expected} completions of {which}; it must return one float per "
            "completion, in order."
        )
    checked = []
    for position, value in enumerate(values):
        number = float(value) if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else None
        if number is None or not math.isfinite(number):
            prompt, sample = indices[position // per_prompt], position % per_prompt
            raise QRPOPrepareError(
                f"The reward of completion {sample} of prompt {prompt} is {value!r}; every reward must be a finite "
                "number. Fix the reward function (or model) for that input."
            )
        checked.append(number)
    return checked


# ---------------------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------------------


def select_pair(
    rewards: Sequence[float], rng: np.random.Generator, rejected_quantile: float = 0.2
) -> tuple[int, int] | None:
    """(chosen, rejected) indices among samples whose `rewards` are also the reference rewards, or None.

    Chosen: quantile reward 1 (no reference reward above it); rejected: quantile reward below `rejected_quantile`;
    each drawn uniformly with `rng` among those that qualify. None when no sample qualifies as rejected.
    """
    as_tensor = torch.tensor(rewards, dtype=torch.float64)
    quantiles = quantile_rewards(as_tensor, as_tensor.expand(len(rewards), -1)).tolist()
    rejected = [index for index, quantile in enumerate(quantiles) if quantile < rejected_quantile]
    if not rejected:
        return None
    chosen = [index for index, quantile in enumerate(quantiles) if quantile == 1.0]
    return int(rng.choice(chosen)), int(rng.choice(rejected))


def build_qrpo_rows(
    prompts: Sequence[Prompt],
    completions: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]],
    selection: Literal["all", "pairs"],
    seed: int = 0,
    rejected_quantile: float = 0.2,
) -> tuple[list[dict[str, Any]], list[int]]:
    """(rows in the trainer's columns, indices of the skipped prompts); see the module docstring.

    Completions are texts; with chat prompts they are stored as `[{"role": "assistant", "content": text}]`. The pair
    picks use a generator seeded with (seed, prompt index), so they do not depend on the other prompts.
    """
    rows, skipped = [], []
    for index, (prompt, texts, scores) in enumerate(zip(prompts, completions, rewards, strict=True)):
        ref_rewards = [float(score) for score in scores]
        as_completion = partial(_as_completion, chat=is_chat_prompt(prompt))
        if selection == "all":
            for text, score in zip(texts, ref_rewards, strict=True):
                rows.append(dict(zip(UNPAIRED_COLUMNS, (prompt, as_completion(text), score, ref_rewards), strict=True)))
            continue
        pair = select_pair(ref_rewards, np.random.default_rng([seed, index]), rejected_quantile)
        if pair is None:
            skipped.append(index)
            continue
        chosen, rejected = pair
        values = (
            prompt,
            as_completion(texts[chosen]),
            as_completion(texts[rejected]),
            ref_rewards[chosen],
            ref_rewards[rejected],
            ref_rewards,
        )
        rows.append(dict(zip(PAIRED_COLUMNS, values, strict=True)))
    return rows, skipped


def _as_completion(text: str, chat: bool) -> str | list[dict[str, str]]:
    return [{"role": "assistant", "content": text}] if chat else text


# ---------------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Raise unless `output_dir` is free, or holds a dataset this pipeline wrote and `overwrite` is on."""
    path = Path(output_dir)
    if not path.exists():
        return
    if not overwrite:
        raise QRPOPrepareError(
            f"{path} already exists. Choose another output_dir, or set overwrite: true to replace it (the old dataset "
            "is removed only once the new one is completely written)."
        )
    if not (path / STATS_FILE_NAME).is_file():
        raise QRPOPrepareError(
            f"{path} exists and is not a dataset written by qrpo_prepare (no {STATS_FILE_NAME}); refusing to replace "
            "it even with overwrite. Choose another output_dir."
        )


def save_dataset_atomically(dataset: Dataset, stats: dict[str, Any], output_dir: str | Path, overwrite: bool) -> Path:
    """`dataset.save_to_disk(output_dir)` plus prepare_stats.json, so that output_dir is never seen half-written.

    Writes to a temporary sibling folder and renames it into place; an existing dataset (with `overwrite`) is moved
    aside first and deleted last, so an interruption leaves either the old or the new dataset complete.
    """
    path = Path(output_dir)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    dataset.save_to_disk(str(staging))
    (staging / STATS_FILE_NAME).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    if path.exists():
        previous = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(previous)
        staging.rename(path)
        shutil.rmtree(previous)
    else:
        staging.rename(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------------


def prepare_qrpo_dataset(config: QRPOPrepareConfig) -> QRPOPrepareResult:
    """Sample, score, select and save; see the module docstring and `QRPOPrepareConfig`.

    Every input is checked before the (expensive) sampling. Under `accelerate launch` the sampling and the scoring
    are shared out between the processes, and the main process saves.
    """
    # Without a GPU, processes started by `accelerate launch` only form a group (gloo) when the state is told so.
    state = PartialState(cpu=not torch.cuda.is_available())
    check_output_dir(config.output_dir, config.overwrite)
    if config.temperature != 1.0 or config.top_p != 1.0:
        logger.warning(
            "Sampling at temperature %s, top_p %s: the samples are no longer the reference policy's distribution, so "
            "the quantile rewards are relative to another one (QRPO samples at temperature 1, top_p 1).",
            config.temperature,
            config.top_p,
        )
    with state.main_process_first():  # the first load fills the datasets cache; the others then read it
        prompts, columns = load_prompts(config.dataset, config.dataset_split, config.prompt_column, config.max_prompts)
    clashes = sorted(set(config.reward_kwargs) & set(columns))
    if clashes and config.reward_function is not None:
        raise QRPOPrepareError(
            f"reward_kwargs {clashes} are also columns of {config.dataset}, which are passed to the reward function "
            "under their names too. Rename the keyword or the column."
        )
    if config.reward_function is not None:
        import_reward_function(config.reward_function)  # a wrong path fails now, not after the sampling
    else:
        check_model_source(config.reward_model)

    check_model_source(config.model_name_or_path)
    if is_chat_prompt(prompts[0]):
        tokenizer = load_chat_tokenizer(config)  # reads only the two name_or_path fields
    else:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path or config.model_name_or_path)
    policy = AutoModelForCausalLM.from_pretrained(
        config.model_name_or_path,
        dtype=config.dtype,
        attn_implementation=resolve_attn_implementation(config.attn_implementation, state.device),
    ).to(state.device)
    samples = generate_completions(
        policy,
        tokenizer,
        prompts,
        num_samples=config.num_samples,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        batch_size=config.batch_size,
        seed=config.seed,
    )
    del policy  # the reward model may need the memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    reward = load_reward(
        config.reward_model,
        config.reward_function,
        config.reward_kwargs,
        batch_size=config.reward_batch_size,
        dtype=config.dtype,
    )
    texts = [[completion.text for completion in completions] for completions in samples]
    as_scored = [
        [_as_completion(text, is_chat_prompt(prompt)) for text in completions]
        for prompt, completions in zip(prompts, texts, strict=True)
    ]
    rewards = score_completions(reward, prompts, as_scored, columns, batch_size=config.reward_batch_size)
    rows, skipped = build_qrpo_rows(prompts, texts, rewards, config.selection, config.seed, config.rejected_quantile)
    if not rows:
        raise QRPOPrepareError(
            f"All {len(prompts)} prompts were skipped: none had a sample with quantile reward below "
            f"{config.rejected_quantile} (rewards tied). Raise num_samples, use a finer reward, or selection: all."
        )
    stats = _stats(config, prompts, samples, rewards, rows, skipped, state.num_processes)
    if stats["truncated_completions"]:
        logger.warning(
            "%d of %d completions reached max_new_tokens=%d without a stop token; they are kept as cut. Raise "
            "max_new_tokens if answers are longer.",
            stats["truncated_completions"],
            stats["completions"],
            config.max_new_tokens,
        )
    if state.is_main_process:
        save_dataset_atomically(Dataset.from_list(rows), stats, config.output_dir, config.overwrite)
        logger.info(
            "Saved %d rows (%d prompts, %d skipped) to %s.", len(rows), len(prompts), len(skipped), config.output_dir
        )
    state.wait_for_everyone()
    return QRPOPrepareResult(Path(config.output_dir), stats, state.is_main_process)


def _stats(
    config: QRPOPrepareConfig,
    prompts: Sequence[Prompt],
    samples: Sequence[Sequence[Completion]],
    rewards: Sequence[Sequence[float]],
    rows: Sequence[dict[str, Any]],
    skipped: Sequence[int],
    processes: int,
) -> dict[str, Any]:
    flat_rewards = [reward for scores in rewards for reward in scores]
    flat_samples = [completion for completions in samples for completion in completions]
    return {
        "prompts": len(prompts),
        "rows": len(rows),
        "layout": "paired" if config.selection == "pairs" else "unpaired",
        "skipped_prompts": len(skipped),
        "skipped_prompt_indices": list(skipped),
        "num_samples": config.num_samples,
        "completions": len(flat_samples),
        "truncated_completions": sum(not completion.finished for completion in flat_samples),
        "mean_completion_tokens": sum(completion.num_tokens for completion in flat_samples) / len(flat_samples),
        "reward_mean": sum(flat_rewards) / len(flat_rewards),
        "reward_min": min(flat_rewards),
        "reward_max": max(flat_rewards),
        "processes": processes,
        "config": dataclasses.asdict(config),
    }
