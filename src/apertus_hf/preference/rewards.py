"""Toy reward functions, for the tiny default recipes and the tests. They measure nothing about quality.

They follow TRL's reward-function convention (what `GRPOTrainer` calls, and what `recipes/qrpo_prepare.py` takes as
`reward_function: package.module:function`): `reward(prompts, completions, **kwargs) -> list[float]`, one float per
completion, where a completion is a string for string prompts and `[{"role": "assistant", "content": ...}]` for chat
prompts, and `kwargs` holds the recipe's `reward_kwargs` and the other columns of the prompt dataset. A real run
scores with a reward model (`reward_model`) or a task-specific function of this shape instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any


def completion_text(completion: str | Sequence[dict[str, Any]]) -> str:
    """The text of a completion in either convention: a string, or a list of (assistant) messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def substring_frequency(
    prompts: Sequence[Any], completions: Sequence[Any], substring: str = "e", **kwargs: Any
) -> list[float]:
    """Toy reward: the fraction of a completion's characters that belong to occurrences of `substring`.

    In [0, 1]: 0 for a completion without `substring` (or empty), 1 for one made only of it. It needs no answer to
    compare with, so it scores any prompt; on short answers many samples score 0 and tie.
    """
    if not substring:
        raise ValueError("substring_frequency needs a non-empty `substring` (set it in reward_kwargs).")
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        rewards.append(text.count(substring) * len(substring) / len(text) if text else 0.0)
    return rewards


def answer_similarity(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    answer: Sequence[str | None],
    ignore_case: bool = False,
    **kwargs: Any,
) -> list[float]:
    """Toy reward: how close each completion is to the dataset's own answer, in [0, 1] (1: identical).

    The character-level similarity of Python's `difflib.SequenceMatcher`. `answer` is the column `qrpo_prepare`
    fills with the final assistant turn of each conversation (or a column of the prompt dataset). For the shipped chat
    tasks, whose answers are exactly determined, closer means more nearly correct; graded, so that n samples of a prompt
    rarely tie.
    """
    rewards = []
    for index, (completion, expected) in enumerate(zip(completions, answer, strict=True)):
        if expected is None:
            raise ValueError(
                f"answer_similarity compares with the dataset's answer, and completion {index} has none (its "
                "conversation does not end with an assistant turn, or the `answer` column is empty there)."
            )
        text = completion_text(completion)
        if ignore_case:
            text, expected = text.casefold(), expected.casefold()
        rewards.append(difflib.SequenceMatcher(None, text, expected, autojunk=False).ratio())
    return rewards
