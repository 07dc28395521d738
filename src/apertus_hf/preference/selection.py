"""Which samples become rows of the QRPO dataset, in the layouts of `schema`:

- `all`: every sample becomes an unpaired row {prompt, completion, reward, ref_rewards}, n rows a prompt.
- `pairs` (what Apertus did): one paired row a prompt {prompt, chosen, rejected, chosen_reward, rejected_reward,
  ref_rewards}. The chosen sample has quantile reward 1 (a reward >= every reference reward); the rejected one a
  quantile reward below `rejected_quantile` (0.2: below the 20th percentile); each is picked at random (seeded) among
  the samples that qualify. A prompt without a sample that qualifies as rejected (all rewards tied, say) is skipped
  and counted.

The samples of a prompt are also its reference completions: their rewards are the row's `ref_rewards`, and a
sample's quantile reward counts its own reward (so it is at least 1/n); `apertus_hf.preference.prepare` says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch

from .sampling import Prompt, is_chat_prompt
from .schema import PAIRED_COLUMNS, UNPAIRED_COLUMNS, quantile_rewards


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
        as_completion = partial(stored_completion, chat=is_chat_prompt(prompt))
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


def stored_completion(text: str, chat: bool) -> str | list[dict[str, str]]:
    """A sampled text as a row stores it: the text for string prompts, one assistant message for chat prompts."""
    return [{"role": "assistant", "content": text}] if chat else text
