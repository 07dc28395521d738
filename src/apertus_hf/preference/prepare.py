"""The QRPO data pipeline: reference completions, their rewards, and the dataset the QRPO trainer (and DPO) reads.

QRPO (Apertus tech report, arXiv 2509.14233, §4.3 'Preference Alignment'; arXiv 2507.08068) needs, for every prompt,
the rewards of n completions sampled from the reference policy (the SFT model, at temperature 1): a training
completion's quantile reward is the fraction of those reference rewards at or below its own. `prepare_qrpo_dataset`
samples the n completions of each prompt (`sampling.generate_completions`), scores them with a reward model folder or
a Python reward function (`scoring.load_reward`), keeps every sample or one pair a prompt (`selection`) and saves the
rows in a layout of `schema`.

The training completions are the reference samples themselves and `ref_rewards` holds all n rewards, each
completion's own included. That is how the QRPO paper built its datasets (training completions picked among the
reference completions, whose rewards are the reference rewards) and what the Apertus tech report §4.3 describes; a
separate pool of candidates scored against the references would cost more samples for the same rows and is in
neither. A consequence: a completion counts itself, so its quantile reward is at least 1/n, and `pairs` needs
n > 1 / rejected_quantile (n >= 6 for 0.2).

Rewards follow TRL's reward-function convention, `reward(prompts, completions, **kwargs) -> list[float]`, where the
keyword arguments are the other columns of the prompt dataset and, for conversations that ended with an assistant
turn, `answer`: that turn's text, which the prompt leaves out (the toy default reward compares with it).

Two scorers, routed per prompt (Apertus §4.3): with `judge_model`, the prompts whose `route_column` is true (Apertus:
the contested ones, labelled by `recipes/label_prompts.py`) are rated by an LLM judge against a charter
(`judge.CharterJudge`, 1 to 9, the top completions re-ranked in pairs) and the others by the reward model or function.
Each route is scored on its own (the reward model and the judge are never loaded together), so the rewards of the two
routes are on different scales; QRPO does not mind, since a quantile reward compares a completion only with the
reference rewards of its own prompt, which one scorer gave. prepare_stats.json has each route's prompts, completions
and rewards under `routes`, and the judge's digit mass and re-ranking counts (docs/judge.md).

Completions cut at `max_new_tokens` are kept (dropping them would bias the reference rewards) and counted; the
trainers close them with the end-of-turn token like any other completion, so keep max_new_tokens above the length of
typical answers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM

from ..data.tables import load_dataset_splits
from ..runtime import check_attn_implementation, init_cpu_process_group, resolve_attn_implementation, resolve_source
from ..tokenization import load_chat_tokenizer, load_tokenizer
from .charter import COMPARISON_LETTERS, load_charter
from .errors import QRPOPrepareError
from .judge import DIGITS, LOW_DIGIT_MASS, CharterJudge, JudgeTally, single_token_ids
from .sampling import Completion, Prompt, generate_completions, is_chat_prompt
from .schema import PreferenceLayout
from .scoring import check_reward_choice, import_reward_function, load_reward, resolve_reward_model, score_completions
from .selection import build_qrpo_rows, stored_completion

logger = logging.getLogger(__name__)

STATS_FILE_NAME = "prepare_stats.json"
# The reward-function keyword that carries the final assistant answers dropped from conversation prompts.
ANSWER_COLUMN = "answer"


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
        default="apertus_hf.preference.rewards:answer_similarity",
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

    # Judge: contested prompts (docs/judge.md)
    judge_model: str | None = field(
        default=None,
        metadata={
            "help": (
                "An LLM judge for the prompts of route_column (Apertus: the contested ones): a chat model folder or Hub "
                "id that rates each completion from 1 to 9 by `charter`, the probability-weighted mean of the digit "
                "tokens (apertus_hf.preference.CharterJudge). Apertus used Qwen/Qwen3-32B. null: no judge."
            )
        },
    )
    charter: str | None = field(
        default=None,
        metadata={
            "help": (
                "The charter the judge rates by: a YAML file (title, preamble, principles [{id, title, text}]) or "
                "Markdown (used as written); data/charters/example_charter.yaml is an example. Needed with judge_model."
            )
        },
    )
    route_column: str | None = field(
        default=None,
        metadata={
            "help": (
                "A boolean column of the prompt dataset: true rows are scored by the judge, false ones by reward_model "
                "or reward_function (recipes/label_prompts.py writes one, `contested`). null with a judge_model: the "
                "judge scores every prompt (then set reward_function: null). The two routes' rewards are on different "
                "scales, which QRPO's per-prompt quantiles do not mind."
            )
        },
    )
    judge_batch_size: int = field(
        default=8, metadata={"help": "Judge questions (ratings or comparisons) per forward pass."}
    )
    judge_pairwise_top_k: int = field(
        default=5,
        metadata={
            "help": (
                "Re-rank each judged prompt's k best completions by comparing them in pairs, in both orders (Apertus: "
                "5): the order among them follows their pairwise win rates. k (k - 1) more judge questions a prompt; "
                "0 or 1: off."
            )
        },
    )
    judge_chat_template_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Keyword arguments for the judge's chat template, e.g. {enable_thinking: false} for Qwen3 (else "
            "it opens a thinking block instead of a digit, which the digit mass in prepare_stats.json shows)."
        },
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
        if self.judge_batch_size < 1 or self.judge_pairwise_top_k < 0:
            raise QRPOPrepareError(
                f"judge_batch_size must be >= 1 and judge_pairwise_top_k >= 0 (0 or 1: no re-ranking); got "
                f"{self.judge_batch_size} and {self.judge_pairwise_top_k}."
            )
        if self.judge_model is None:
            for name in ("charter", "route_column"):
                if getattr(self, name) is not None:
                    raise QRPOPrepareError(
                        f"{name} is for the judge, and judge_model is null. Set judge_model (a chat model) or {name}: "
                        "null."
                    )
        elif self.charter is None:
            raise QRPOPrepareError(
                "judge_model needs a charter to rate by: set charter to a YAML or Markdown file, e.g. "
                "data/charters/example_charter.yaml."
            )
        if self.judges_every_prompt:
            if self.reward_model is not None or self.reward_function is not None or self.reward_kwargs:
                raise QRPOPrepareError(
                    "With judge_model and no route_column the judge scores every prompt, so reward_model, "
                    "reward_function and reward_kwargs are unused: set reward_function: null (and reward_kwargs: {}), "
                    "or set route_column to a boolean column that sends the other prompts to the reward."
                )
        else:
            check_reward_choice(self.reward_model, self.reward_function, self.reward_kwargs)

    @property
    def judges_every_prompt(self) -> bool:
        """Whether the judge scores every prompt (a judge_model without a route_column)."""
        return self.judge_model is not None and self.route_column is None


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
    checked = [checked_prompt(value, row, prompt_column) for row, value in enumerate(rows[prompt_column])]
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


def checked_prompt(value: Any, row: int, column: str) -> tuple[Prompt, str | None]:
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
# Saving
# ---------------------------------------------------------------------------------------------------------------------


def check_output_dir(
    output_dir: str | Path, overwrite: bool, stats_file: str = STATS_FILE_NAME, writer: str = "qrpo_prepare"
) -> None:
    """Raise unless `output_dir` is free, or holds a dataset that `writer` wrote (it has `stats_file`) and
    `overwrite` is on."""
    path = Path(output_dir)
    if not path.exists():
        return
    if not overwrite:
        raise QRPOPrepareError(
            f"{path} already exists. Choose another output_dir, or set overwrite: true to replace it (the old dataset "
            "is removed only once the new one is completely written)."
        )
    if not (path / stats_file).is_file():
        raise QRPOPrepareError(
            f"{path} exists and is not a dataset written by {writer} (no {stats_file}); refusing to replace it even "
            "with overwrite. Choose another output_dir."
        )


def save_dataset_atomically(
    dataset: Dataset | DatasetDict,
    stats: dict[str, Any],
    output_dir: str | Path,
    overwrite: bool,
    stats_file: str = STATS_FILE_NAME,
    writer: str = "qrpo_prepare",
) -> Path:
    """`dataset.save_to_disk(output_dir)` plus `stats` as `stats_file`, so that output_dir is never seen half-written.

    Writes to a temporary sibling folder and renames it into place; an existing dataset (with `overwrite`, and only
    one `writer` wrote, see `check_output_dir`) is moved aside first and deleted last, so an interruption leaves
    either the old or the new dataset complete.
    """
    path = Path(output_dir)
    check_output_dir(path, overwrite, stats_file, writer)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    dataset.save_to_disk(str(staging))
    (staging / stats_file).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
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
    init_cpu_process_group()
    state = PartialState()
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
    judged = prompt_routes(config, columns, len(prompts))
    clashes = sorted(set(config.reward_kwargs) & set(columns))
    if clashes and config.reward_function is not None:
        raise QRPOPrepareError(
            f"reward_kwargs {clashes} are also columns of {config.dataset}, which are passed to the reward function "
            "under their names too. Rename the keyword or the column."
        )
    if config.reward_function is not None:
        import_reward_function(config.reward_function)  # a wrong path fails now, not after the sampling
    elif config.reward_model is not None:
        resolve_reward_model(config.reward_model)
    if config.judge_model is not None:
        # The judge's files, tokens and charter fail now, not after the sampling.
        judge_tokenizer = load_chat_tokenizer(config.judge_model, "judge_model")
        charter = load_charter(config.charter)
        single_token_ids(judge_tokenizer, DIGITS, "the digit", config.judge_model)
        if config.judge_pairwise_top_k >= 2:
            single_token_ids(judge_tokenizer, COMPARISON_LETTERS, "the letter", config.judge_model)

    policy_source = resolve_source(
        config.model_name_or_path,
        "model_name_or_path",
        "The default is the model `recipes/sft.py` writes; run it first, or set it to a model folder or Hub id.",
    )
    tokenizer_name = config.tokenizer_name_or_path or config.model_name_or_path
    tokenizer_option = "tokenizer_name_or_path" if config.tokenizer_name_or_path else "model_name_or_path"
    if is_chat_prompt(prompts[0]):
        tokenizer = load_chat_tokenizer(tokenizer_name, tokenizer_option)
    else:
        tokenizer = load_tokenizer(tokenizer_name, tokenizer_option)
    policy = AutoModelForCausalLM.from_pretrained(
        str(policy_source),
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
    _free_accelerator_memory()

    texts = [[completion.text for completion in completions] for completions in samples]
    as_scored = [
        [stored_completion(text, is_chat_prompt(prompt)) for text in completions]
        for prompt, completions in zip(prompts, texts, strict=True)
    ]
    rewards: list[list[float]] = [[] for _ in prompts]
    # One route after the other, so that the reward model and the judge are never in memory together.
    routed = [index for index, judge in enumerate(judged) if not judge]
    if routed:
        reward = load_reward(
            config.reward_model,
            config.reward_function,
            config.reward_kwargs,
            batch_size=config.reward_batch_size,
            dtype=config.dtype,
        )
        scored = _score_subset(reward, routed, prompts, as_scored, columns, config.reward_batch_size)
        for index, values in zip(routed, scored, strict=True):
            rewards[index] = values
        del reward
        _free_accelerator_memory()
    judge_tally = None
    routed = [index for index, judge in enumerate(judged) if judge]
    if routed:
        judge = CharterJudge.from_pretrained(
            config.judge_model,
            charter,
            tokenizer=judge_tokenizer,
            dtype=config.dtype,
            attn_implementation=config.attn_implementation,
            batch_size=config.judge_batch_size,
            pairwise_top_k=config.judge_pairwise_top_k,
            completions_per_prompt=config.num_samples,
            chat_template_kwargs=config.judge_chat_template_kwargs,
        )
        scored = _score_subset(judge, routed, prompts, as_scored, columns, config.judge_batch_size)
        for index, values in zip(routed, scored, strict=True):
            rewards[index] = values
        judge_tally = JudgeTally.total(gather_object([judge.tally]))
        del judge
        _free_accelerator_memory()

    rows, skipped = build_qrpo_rows(prompts, texts, rewards, config.selection, config.seed, config.rejected_quantile)
    if not rows:
        raise QRPOPrepareError(
            f"All {len(prompts)} prompts were skipped: none had a sample with quantile reward below "
            f"{config.rejected_quantile} (rewards tied). Raise num_samples, use a finer reward, or selection: all."
        )
    stats = _stats(config, prompts, samples, rewards, rows, skipped, state.num_processes)
    stats["routes"] = _route_stats(config, judged, rewards, judge_tally)
    if stats["truncated_completions"]:
        logger.warning(
            "%d of %d completions reached max_new_tokens=%d without a stop token; they are kept as cut. Raise "
            "max_new_tokens if answers are longer.",
            stats["truncated_completions"],
            stats["completions"],
            config.max_new_tokens,
        )
    mean_digit_mass = stats["routes"]["judge"].get("mean_digit_mass")
    if mean_digit_mass is not None and mean_digit_mass < LOW_DIGIT_MASS:
        logger.warning(
            "The judge put only %.3f of its next-token probability on the digits 1-9 on average: it mostly wants to "
            "answer something else, so its ratings mean little. Use a capable chat model, and check "
            "judge_chat_template_kwargs (Qwen3: {enable_thinking: false}).",
            mean_digit_mass,
        )
    if state.is_main_process:
        save_dataset_atomically(Dataset.from_list(rows), stats, config.output_dir, config.overwrite)
        logger.info(
            "Saved %d rows (%d prompts, %d skipped) to %s.", len(rows), len(prompts), len(skipped), config.output_dir
        )
    state.wait_for_everyone()
    return QRPOPrepareResult(Path(config.output_dir), stats, state.is_main_process)


def prompt_routes(config: QRPOPrepareConfig, columns: dict[str, list[Any]], num_prompts: int) -> list[bool]:
    """For each prompt, whether the judge scores it (else the reward model or function): the values of
    `route_column`, which must be booleans; every prompt without a route column but with a judge; none without one."""
    if config.judge_model is None or config.route_column is None:
        return [config.judge_model is not None] * num_prompts
    if config.route_column not in columns:
        raise QRPOPrepareError(
            f"{config.dataset} has no column {config.route_column!r} (route_column); its other columns are "
            f"{sorted(columns)}. Label the prompts first (recipes/label_prompts.py writes a boolean `contested` "
            "column), or set route_column to an existing boolean column."
        )
    values = columns[config.route_column]
    for row, value in enumerate(values):
        if not isinstance(value, bool):
            raise QRPOPrepareError(
                f"Row {row} of route_column {config.route_column!r} is {value!r}, not a boolean; the column says which "
                "prompts the judge scores (true) and which the reward (false). Write true/false values (as "
                "recipes/label_prompts.py does)."
            )
    return list(values)


def _score_subset(
    reward: Any,
    indices: Sequence[int],
    prompts: Sequence[Prompt],
    completions: Sequence[Sequence[Any]],
    columns: dict[str, Sequence[Any]],
    batch_size: int,
) -> list[list[float]]:
    """`score_completions` on the prompts at `indices` only (each with its columns' values)."""
    return score_completions(
        reward,
        [prompts[index] for index in indices],
        [completions[index] for index in indices],
        {name: [column[index] for index in indices] for name, column in columns.items()},
        batch_size=batch_size,
    )


def _free_accelerator_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
        "layout": PreferenceLayout.PAIRED if config.selection == "pairs" else PreferenceLayout.UNPAIRED,
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


def _route_stats(
    config: QRPOPrepareConfig, judged: Sequence[bool], rewards: Sequence[Sequence[float]], tally: JudgeTally | None
) -> dict[str, dict[str, Any]]:
    """Per route ("reward": the reward model or function, "judge"), its prompts, completions and rewards; for the
    judge also `JudgeTally.summary()` (digit mass, pairwise re-ranking). A route's rewards are on its own scale."""
    routes = {}
    for route, by_judge in (("reward", False), ("judge", True)):
        values = [value for scores, judge in zip(rewards, judged, strict=True) if judge == by_judge for value in scores]
        routes[route] = {
            "prompts": sum(judge == by_judge for judge in judged),
            "completions": len(values),
            "reward_mean": sum(values) / len(values) if values else None,
            "reward_min": min(values, default=None),
            "reward_max": max(values, default=None),
        }
    routes["reward"]["scorer"] = config.reward_model or config.reward_function
    routes["judge"]["scorer"] = config.judge_model
    if config.judge_model is not None:
        routes["judge"]["pairwise_top_k"] = config.judge_pairwise_top_k
        routes["judge"].update((tally or JudgeTally()).summary())
    return routes
