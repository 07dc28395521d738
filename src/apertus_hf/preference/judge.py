"""An LLM judge that rates completions by a charter: the reward of contested prompts in Apertus' preference data.

Apertus (tech report arXiv 2509.14233, §4.3) scored ordinary prompts with a reward model and contested ones with an
LLM judge (Qwen3-32B) that had the Swiss AI Charter in its prompt: a rating from 1 to 9, the probability-weighted mean
of the digit tokens, and the top 5 completions of a prompt re-ranked by comparing them in pairs. `CharterJudge` does
this with any chat model (a local folder or a Hub id) and any charter file (`charter.load_charter`). It is a reward in
TRL's convention, `judge(prompts, completions, **kwargs) -> list[float]`, so `scoring.score_completions` (and TRL's
GRPOTrainer) call it like any reward function.

The rating. The judge's question (`charter.rating_messages`: the charter, the conversation, the response, "answer with
one digit from 1 to 9") is rendered with the judge's chat template and `add_generation_prompt`, and one forward pass
gives the next-token distribution p. Restricted to the tokens "1".."9" and renormalised over them, its mean is the
rating: score = sum_d d * p(d) / sum_d p(d). Nothing is generated and no text is parsed, so the rating is a
continuous, deterministic function of the inputs (which also makes ties among a prompt's completions rare). The
probability the judge put on the digits at all, sum_d p(d), is the digit mass: a judge that wants to answer something
else (a reasoning model that opens a thinking block, a model that does not follow the instruction) has a low mass,
and its renormalised rating means little; `JudgeTally` keeps the mean and the minimum for prepare_stats.json.

The pairwise re-ranking (`pairwise_top_k`, 5 as in Apertus; 0 or 1: off). Within a prompt's completions, the top k
by rating are compared in every pair, each pair in both orders (`charter.comparison_messages`, "A or B"), from the
next-token probabilities of "A" and "B" renormalised over the two. The probability that completion i beats j is the
mean of p(A) with i shown first and p(B) with i shown second, which cancels a judge's preference for a position: a
judge that always answers "A" rates every pair 0.5. A completion's win rate is its mean probability of beating the
other k - 1. The rule for the rewards (`reranked_rewards`): the k ratings keep their values, but are handed out again
in the order of the win rates (the highest rating to the highest win rate; ties by the old rating, then by position).
So the order among the top k follows the pairwise result, the top k stay at or above every other completion of the
prompt, the other completions keep their ratings, and the rewards stay on the 1-9 scale. QRPO needs no more: its
quantile reward compares a completion only with the reference rewards of its own prompt. The pairs need whole
prompts in one call: `completions_per_prompt` says how many consecutive completions belong to one prompt (as TRL's
`num_generations`; `score_completions` calls with whole prompts), else each run of equal consecutive prompts is one.

Batches are left-padded (with the positions `generate` uses), so a completion's rating does not depend on its batch
neighbours beyond float rounding; the model runs in eval mode under `torch.inference_mode`.

A tiny judge cannot judge anything; real use needs a capable chat model (Apertus used Qwen/Qwen3-32B; a Qwen3 judge
needs `chat_template_kwargs={"enable_thinking": False}` to answer at once instead of opening a thinking block) and the
real charter. docs/judge.md has the design, the statistics and the tiny judge of the tiny recipes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..data.padding import pad_token_rows
from ..runtime import resolve_attn_implementation, resolve_source
from ..tokenization import load_chat_tokenizer
from .charter import COMPARISON_LETTERS, Charter, comparison_messages, load_charter, rating_messages
from .sampling import Prompt

DIGITS = tuple(str(digit) for digit in range(1, 10))
# Below this mean digit mass the judge mostly wants to answer something other than a digit (docs/judge.md).
LOW_DIGIT_MASS = 0.5


class JudgeError(ValueError):
    """A judge model, tokenizer or call that cannot work; the message names the problem and the fix."""


def single_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str], what: str, model: str) -> list[int]:
    """The token id of each of `words`, which must each be one token of `tokenizer` (the judge reads its answer from
    the probability of one next token). Raises JudgeError naming the word and how it is split."""
    ids = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) != 1 or tokenizer.decode(encoded).strip() != word:
            raise JudgeError(
                f"The tokenizer of {model} writes {what} {word!r} as the tokens "
                f"{tokenizer.convert_ids_to_tokens(encoded)}, not as one token of its own; the answer is read from the "
                f"probability of a single next token, so each of {list(words)} must be one. Use a model whose tokenizer "
                "has them as single tokens (the Apertus, Qwen3 and Llama 3 tokenizers do)."
            )
        ids.append(encoded[0])
    return ids


@torch.inference_mode()
def answer_log_probs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    answer_ids: Sequence[int],
    batch_size: int,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """(len(conversations), len(answer_ids)) float64: the log-probability (over the whole vocabulary) of each answer
    token as the next token after each conversation, rendered with the chat template and `add_generation_prompt`.

    One forward pass per batch of `batch_size` conversations, sorted by length so that a batch holds similar lengths,
    left-padded with the positions `generate` uses (counted from each row's first token).
    """
    kwargs = chat_template_kwargs or {}
    encoded = [
        list(
            tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
            )
        )
        for conversation in conversations
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise JudgeError(
            "The judge's tokenizer has neither a pad nor an EOS token to pad batches with; set its pad_token."
        )
    order = sorted(range(len(encoded)), key=lambda index: -len(encoded[index]))
    answers = torch.tensor(list(answer_ids), dtype=torch.long, device=model.device)
    result = torch.empty(len(encoded), len(answer_ids), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = pad_token_rows([encoded[row] for row in rows], pad, padding_side="left")
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        logits = model(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            position_ids=position_ids.to(model.device),
            use_cache=False,
            logits_to_keep=1,
        ).logits[:, -1]
        # In float64: a float32 normaliser over the whole vocabulary moves the digit mass by about 1e-5.
        result[rows] = torch.log_softmax(logits.double(), dim=-1)[:, answers].cpu()
    return result


def digit_ratings(digit_log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratings, digit masses) from (N, 9) log-probabilities of the tokens "1".."9": the rating is the mean digit
    under the distribution renormalised over the nine, sum_d d * p(d) / sum_d p(d); the mass is sum_d p(d)."""
    digits = torch.arange(1, 10, dtype=digit_log_probs.dtype)
    ratings = torch.softmax(digit_log_probs, dim=-1) @ digits
    return ratings, torch.logsumexp(digit_log_probs, dim=-1).exp()


def top_k_indices(scores: Sequence[float], k: int) -> list[int]:
    """The positions of the `k` highest scores, highest first (ties: the earlier position first)."""
    return sorted(range(len(scores)), key=lambda index: (-scores[index], index))[:k]


def win_rates(first_wins: dict[tuple[int, int], float], candidates: Sequence[int]) -> dict[int, float]:
    """Each candidate's mean probability of beating the others. `first_wins[(i, j)]` is the judge's probability
    that the first shown, i, is better than j; both orders of every pair are needed, which cancels position bias:
    p(i beats j) = (first_wins[(i, j)] + 1 - first_wins[(j, i)]) / 2."""
    rates = {}
    for i in candidates:
        beats = [(first_wins[(i, j)] + 1 - first_wins[(j, i)]) / 2 for j in candidates if j != i]
        rates[i] = sum(beats) / len(beats)
    return rates


def reranked_rewards(scores: Sequence[float], wins: dict[int, float]) -> list[float]:
    """`scores` with the values at the positions in `wins` (the top k) handed out again by win rate: the highest of
    those values to the highest win rate, and so on (ties by the old score, then by position). The other positions
    keep their scores; the multiset of values does not change, so the re-ranked ones stay at or above the rest."""
    positions = list(wins)
    values = sorted((scores[position] for position in positions), reverse=True)
    ranked = sorted(positions, key=lambda position: (-wins[position], -scores[position], position))
    rewards = list(scores)
    for position, value in zip(ranked, values, strict=True):
        rewards[position] = value
    return rewards


@dataclass
class JudgeTally:
    """What a judge did, summed over its calls (and, with `total`, over processes): for prepare_stats.json."""

    ratings: int = 0
    digit_mass_sum: float = 0.0
    digit_mass_min: float = 1.0
    pairwise_prompts: int = 0
    """Prompts whose top k were compared in pairs."""
    reordered_prompts: int = 0
    """Of those, the prompts where the pairwise order moved a reward."""
    comparisons: int = 0
    """Judge calls on a pair in one order (k (k - 1) a prompt)."""
    choice_mass_sum: float = 0.0

    @classmethod
    def total(cls, tallies: Sequence[JudgeTally]) -> JudgeTally:
        return cls(
            ratings=sum(tally.ratings for tally in tallies),
            digit_mass_sum=sum(tally.digit_mass_sum for tally in tallies),
            digit_mass_min=min((tally.digit_mass_min for tally in tallies), default=1.0),
            pairwise_prompts=sum(tally.pairwise_prompts for tally in tallies),
            reordered_prompts=sum(tally.reordered_prompts for tally in tallies),
            comparisons=sum(tally.comparisons for tally in tallies),
            choice_mass_sum=sum(tally.choice_mass_sum for tally in tallies),
        )

    def summary(self) -> dict[str, Any]:
        """The statistics: mean and minimum digit mass, the pairwise counts and the mean mass on "A" and "B"."""
        return {
            "ratings": self.ratings,
            "mean_digit_mass": self.digit_mass_sum / self.ratings if self.ratings else None,
            "min_digit_mass": self.digit_mass_min if self.ratings else None,
            "pairwise_prompts": self.pairwise_prompts,
            "reordered_prompts": self.reordered_prompts,
            "comparisons": self.comparisons,
            "mean_choice_mass": self.choice_mass_sum / self.comparisons if self.comparisons else None,
        }


class CharterJudge:
    """A reward in TRL's convention from a chat model that rates each (prompt, completion) by a charter, 1 to 9.

    See the module docstring for the rating, the pairwise re-ranking of the top `pairwise_top_k` completions of each
    prompt, and `completions_per_prompt`. `chat_template_kwargs` go to the judge's chat template (e.g.
    `{"enable_thinking": False}` for Qwen3). Every call adds to `tally`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        charter: Charter,
        *,
        batch_size: int = 8,
        pairwise_top_k: int = 5,
        completions_per_prompt: int | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
    ):
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        if batch_size < 1 or pairwise_top_k < 0 or (completions_per_prompt is not None and completions_per_prompt < 1):
            raise JudgeError(
                f"Need batch_size >= 1, pairwise_top_k >= 0 (0 or 1: no re-ranking) and completions_per_prompt >= 1 "
                f"or None; got {batch_size}, {pairwise_top_k} and {completions_per_prompt}."
            )
        if not tokenizer.chat_template:
            raise JudgeError(
                f"The tokenizer of the judge {self.name} has no chat template; the judge's questions are rendered with "
                "it. Use a chat (instruct) model as the judge."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.charter = charter
        self.batch_size = batch_size
        self.pairwise_top_k = pairwise_top_k
        self.completions_per_prompt = completions_per_prompt
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.digit_ids = single_token_ids(tokenizer, DIGITS, "the digit", self.name)
        # The comparisons' letters matter only with the re-ranking on.
        self.letter_ids = (
            single_token_ids(tokenizer, COMPARISON_LETTERS, "the letter", self.name) if pairwise_top_k >= 2 else []
        )
        self.tally = JudgeTally()
        # What TRL's GRPOTrainer logs a reward function under.
        self.__name__ = "charter_judge"

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        charter: Charter | str | Path,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        device: Any = None,
        **options: Any,
    ) -> CharterJudge:
        """A judge from a chat model folder or Hub id (loaded with AutoModelForCausalLM on `device`, by default the
        process's), with its own tokenizer unless `tokenizer` is given and a `Charter` or charter file; `options` are
        those of the constructor."""
        source = resolve_source(name_or_path, "judge_model", "Give a chat model folder or a Hub id.")
        tokenizer = tokenizer or load_chat_tokenizer(name_or_path, "judge_model")
        device = device if device is not None else PartialState().device
        model = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dtype, attn_implementation=resolve_attn_implementation(attn_implementation, device)
        ).to(device)
        charter = charter if isinstance(charter, Charter) else load_charter(charter)
        return cls(model, tokenizer, charter, name=name_or_path, **options)

    def rate(
        self, prompts: Sequence[Prompt], completions: Sequence[str | list[dict[str, Any]]]
    ) -> tuple[list[float], list[float]]:
        """(ratings from 1 to 9, digit masses) of each (prompt, completion), without the pairwise re-ranking."""
        conversations = [
            rating_messages(self.charter, prompt, completion)
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
        log_probs = self._answer_log_probs(conversations, self.digit_ids)
        ratings, masses = digit_ratings(log_probs)
        self.tally.ratings += len(conversations)
        self.tally.digit_mass_sum += float(masses.sum())
        self.tally.digit_mass_min = min([self.tally.digit_mass_min, *masses.tolist()])
        return ratings.tolist(), masses.tolist()

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[str | list[dict[str, Any]]], **kwargs: Any
    ) -> list[float]:
        """The rewards of TRL's convention: the ratings, with each prompt's top k re-ranked in pairs. Other keyword
        arguments (the dataset's columns) are accepted and not used."""
        if len(prompts) != len(completions):
            raise JudgeError(f"Got {len(prompts)} prompts for {len(completions)} completions; pass one per completion.")
        if not prompts:
            return []
        groups = self._prompt_groups(prompts)
        ratings, _ = self.rate(prompts, completions)
        if self.pairwise_top_k < 2:
            return ratings
        return self._reranked(prompts, completions, ratings, groups)

    def _prompt_groups(self, prompts: Sequence[Prompt]) -> list[range]:
        """The positions of each prompt's completions: `completions_per_prompt` at a time, else equal prompts' runs."""
        size = self.completions_per_prompt
        if size is None:
            starts = [index for index in range(len(prompts)) if index == 0 or prompts[index] != prompts[index - 1]]
            return [range(start, end) for start, end in itertools.pairwise([*starts, len(prompts)])]
        if len(prompts) % size:
            raise JudgeError(
                f"The judge got {len(prompts)} completions, not a multiple of completions_per_prompt={size}; call it "
                "with whole prompts (score_completions does)."
            )
        groups = [range(start, start + size) for start in range(0, len(prompts), size)]
        for group in groups:
            if any(prompts[index] != prompts[group.start] for index in group):
                raise JudgeError(
                    f"Completions {group.start}..{group.stop - 1} should share one prompt (completions_per_prompt="
                    f"{size}) but do not; pass each prompt's completions consecutively."
                )
        return groups

    def _reranked(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str | list[dict[str, Any]]],
        ratings: list[float],
        groups: Sequence[range],
    ) -> list[float]:
        # Every ordered pair of every group's top k, asked in one batched pass.
        pairs: list[tuple[int, int, int]] = []  # (group, first, second), positions within the group
        tops: dict[int, list[int]] = {}
        for number, group in enumerate(groups):
            if len(group) < 2:
                continue
            tops[number] = top_k_indices(ratings[group.start : group.stop], self.pairwise_top_k)
            pairs += [(number, i, j) for i, j in itertools.permutations(tops[number], 2)]
        if not pairs:
            return ratings
        conversations = [
            comparison_messages(
                self.charter,
                prompts[groups[number].start],
                completions[groups[number][first]],
                completions[groups[number][second]],
            )
            for number, first, second in pairs
        ]
        log_probs = self._answer_log_probs(conversations, self.letter_ids)
        first_wins = torch.softmax(log_probs, dim=-1)[:, 0].tolist()
        self.tally.comparisons += len(pairs)
        self.tally.choice_mass_sum += float(torch.logsumexp(log_probs, dim=-1).exp().sum())

        by_group: dict[int, dict[tuple[int, int], float]] = {number: {} for number in tops}
        for (number, first, second), probability in zip(pairs, first_wins, strict=True):
            by_group[number][(first, second)] = probability
        rewards = list(ratings)
        for number, top in tops.items():
            group = groups[number]
            before = ratings[group.start : group.stop]
            after = reranked_rewards(before, win_rates(by_group[number], top))
            rewards[group.start : group.stop] = after
            self.tally.pairwise_prompts += 1
            self.tally.reordered_prompts += after != before
        return rewards

    def _answer_log_probs(self, conversations: list[list[dict[str, str]]], answer_ids: list[int]) -> torch.Tensor:
        return answer_log_probs(
            self.model, self.tokenizer, conversations, answer_ids, self.batch_size, self.chat_template_kwargs
        )
