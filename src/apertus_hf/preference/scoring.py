"""Scoring completions: a reward model folder or a Python reward function, called in TRL's reward convention.

A reward is `reward(prompts, completions, **kwargs) -> list[float]`, one float per completion (what TRL's
`GRPOTrainer` calls): a completion is a string for string prompts and `[{"role": "assistant", "content": ...}]` for
chat prompts, and the keyword arguments are the other columns of the prompt dataset. `load_reward` builds one from a
reward model (`RewardModelScorer`) or an import path; `score_completions` calls it on every prompt's completions,
shared out between the processes under `accelerate launch`, and checks that every reward is one finite number.
"""

from __future__ import annotations

import importlib
import math
import operator
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..data.padding import pad_token_rows
from ..runtime import resolve_source
from .errors import QRPOPrepareError
from .sampling import Prompt, is_chat_prompt

# A reward in TRL's convention: reward(prompts, completions, **kwargs) -> one float per completion.
RewardFunction = Callable[..., Sequence[float]]


def check_reward_choice(reward_model: str | None, reward_function: str | None, reward_kwargs: dict[str, Any]) -> None:
    """Raise unless exactly one of `reward_model` and `reward_function` is set, and `reward_kwargs` only with the latter."""
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


def resolve_reward_model(name_or_path: str) -> Path | str:
    """The reward model folder (a Path) or Hub id, checked by `runtime.resolve_source` as the `reward_model` option."""
    return resolve_source(name_or_path, "reward_model", "Give a sequence-classification model folder or a Hub id.")


def import_reward_function(path: str) -> Callable[..., Sequence[float]]:
    """The callable at `path`, written 'package.module:function' (or 'package.module:Class.method')."""
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise QRPOPrepareError(
            f"reward_function {path!r} is not an import path; write it as 'package.module:function', e.g. "
            "'apertus_hf.preference.rewards:answer_similarity'."
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
        source = str(resolve_reward_model(name_or_path))
        self.name_or_path = name_or_path
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype)
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
            input_ids, attention_mask = pad_token_rows(encoded[start : start + self.batch_size], self.pad_token_id)
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
    check_reward_choice(reward_model, reward_function, reward_kwargs)
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
