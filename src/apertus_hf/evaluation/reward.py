"""The reward a policy earns on held-out prompts: the figure that says whether preference alignment worked.

Each policy answers the same prompts (one completion each, greedy by default so that a run is reproducible and the
comparison is not blurred by sampling noise; a temperature > 0 samples with a seed instead), and every reward of
`rewards` scores the answers: the reward model or routed judge that QRPO trained against, and, where the prompts have
checkable answers, a reward that compares with them (a reward model can be fooled; the answer cannot). Reported per
reward: the mean over prompts with its standard error, and, for every policy after the first (the baseline, e.g. the
SFT model before QRPO), the mean of the per-prompt differences to the baseline with the standard error of that paired
difference (prompts are shared, so the paired error is the one to judge the change by). `groups` (e.g. each prompt's
route, judge or reward model) adds the same figures per group: rewards of different scorers live on different scales,
so a mean over both routes mixes scales.

Generation goes through `preference.sampling.generate_completions` and scoring through
`preference.scoring.score_completions`, the code that built the QRPO data, so the evaluation sees completions and
rewards exactly as training did; under `accelerate launch` both are shared out between the processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..preference.sampling import Prompt, generate_completions, is_chat_prompt
from ..preference.scoring import RewardFunction, score_completions
from ..preference.selection import stored_completion
from .common import EvalResult, load_model_and_tokenizer

# Completions written into each result's details, for a reader to see what the numbers are about.
EXAMPLES_PER_RESULT = 8


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean); the error is None for fewer than two values."""
    if not values:
        raise ValueError("No values to average: the evaluation has no prompts.")
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = math.fsum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def _summary(values: Sequence[float]) -> dict[str, Any]:
    mean, stderr = mean_and_stderr(values)
    return {"mean": mean, "stderr": stderr, "num_prompts": len(values)}


def _grouped(values: Sequence[float], groups: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    if groups is None:
        return {}
    return {
        group: _summary([value for value, label in zip(values, groups, strict=True) if label == group])
        for group in sorted(set(groups))
    }


def policy_completions(
    model: str | Path,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
) -> tuple[list[str], dict[str, Any]]:
    """(one completion text per prompt, generation facts) of the causal LM at `model` (folder or Hub id)."""
    loaded, tokenizer = load_model_and_tokenizer(model, device=device, dtype=dtype)
    completions = generate_completions(
        loaded,
        tokenizer,
        prompts,
        num_samples=1,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
    )
    del loaded  # the reward models may need the memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    flat = [samples[0] for samples in completions]
    facts = {
        "truncated_completions": sum(not completion.finished for completion in flat),
        "mean_completion_tokens": sum(completion.num_tokens for completion in flat) / len(flat),
    }
    return [completion.text for completion in flat], facts


def evaluate_rewards(
    models: Sequence[str | Path],
    prompts: Sequence[Prompt],
    rewards: Mapping[str, RewardFunction],
    *,
    columns: Mapping[str, Sequence[Any]] | None = None,
    groups: Sequence[str] | None = None,
    dataset_name: str = "prompts",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    reward_batch_size: int = 32,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    settings: Mapping[str, Any] | None = None,
) -> list[EvalResult]:
    """One `EvalResult` per model: the mean of each reward over `prompts` with its standard error, and for every model
    after the first the paired difference to the first (see the module docstring).

    `columns` are passed to the rewards as keyword lists (TRL's convention, as in QRPO data preparation), `groups`
    labels each prompt for a per-group breakdown. The policies answer first, one in memory at a time; then each reward
    (loaded by the caller) scores every policy's answers.
    """
    if not models:
        raise ValueError("Give at least one model to evaluate.")
    if not rewards:
        raise ValueError("Give at least one reward to score the completions with.")
    if groups is not None and len(groups) != len(prompts):
        raise ValueError(f"groups has {len(groups)} labels for {len(prompts)} prompts; give one per prompt.")
    texts: dict[str, list[str]] = {}
    generation: dict[str, dict[str, Any]] = {}
    for model in models:
        texts[str(model)], generation[str(model)] = policy_completions(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size,
            seed=seed,
            device=device,
            dtype=dtype,
        )
    scores: dict[str, dict[str, list[float]]] = {str(model): {} for model in models}
    for reward_name, reward in rewards.items():
        for model in models:
            stored = [
                [stored_completion(text, is_chat_prompt(prompt))]
                for prompt, text in zip(prompts, texts[str(model)], strict=True)
            ]
            per_prompt = score_completions(reward, prompts, stored, dict(columns or {}), batch_size=reward_batch_size)
            scores[str(model)][reward_name] = [values[0] for values in per_prompt]

    baseline = str(models[0])
    results = []
    for model in models:
        name = str(model)
        details: dict[str, Any] = {"num_prompts": len(prompts), **generation[name], "rewards": {}}
        for reward_name, values in scores[name].items():
            entry = {**_summary(values), "per_group": _grouped(values, groups)}
            if name != baseline:
                differences = [value - base for value, base in zip(values, scores[baseline][reward_name], strict=True)]
                entry["paired_difference"] = {
                    "baseline": baseline,
                    **_summary(differences),
                    "per_group": _grouped(differences, groups),
                }
            details["rewards"][reward_name] = entry
        details["examples"] = [
            {
                "prompt": prompt,
                "completion": text,
                **{reward_name: scores[name][reward_name][index] for reward_name in rewards},
                **({"group": groups[index]} if groups is not None else {}),
            }
            for index, (prompt, text) in enumerate(zip(prompts[:EXAMPLES_PER_RESULT], texts[name], strict=False))
        ]
        results.append(
            EvalResult(
                evaluation="reward",
                model=name,
                task_name="reward",
                task_type="text-generation",
                dataset_name=dataset_name,
                dataset_type=dataset_name,
                metrics={f"{reward_name}_mean": details["rewards"][reward_name]["mean"] for reward_name in rewards},
                settings={
                    "max_new_tokens": max_new_tokens,
                    "temperature": temperature,
                    "top_p": top_p,
                    "batch_size": batch_size,
                    "seed": seed,
                    "dtype": dtype,
                    "baseline": baseline,
                    **dict(settings or {}),
                },
                details=details,
            )
        )
    return results
