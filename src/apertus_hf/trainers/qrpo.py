"""Quantile Reward Policy Optimization (QRPO, arXiv 2507.08068), offline, built the way TRL builds its trainers.

QRPO regresses the policy's log-ratio onto a transformed *quantile* reward. The quantile of a completion's reward
among rewards of completions sampled from the reference policy makes the partition function known in closed form, so
each completion is a least-squares target on its own: no pairs needed, no reference model in memory (reference
log-probs are computed once before training) and one forward per completion.

    loss(y) = ( f(R_q) - beta * log Z_f(beta) - beta * (log pi(y|x) - log pi_ref(y|x)) )^2

with R_q = mean_i 1[ref_reward_i <= reward(y)], log-probs summed over the completion tokens, and f one of:

- `identity`: beta log Z = beta log beta + 1 + beta log1p(-e^(-1/beta)) (exact; the reference code drops the last
  term, which is below 1e-4 only for beta < 0.1);
- `log`: f = log(max(R_q, 1/n)), Z = beta / (beta + 1);
- `normal_icdf`: f = Phi^-1(clip(R_q, 1/n, (n-1)/n)), log Z = 1 / (2 beta^2).

With `length_normalize` (what Apertus used), beta becomes beta/|y| in every term, capped at `max_normalized_beta`.
`cap_unnormalized_beta` applies the cap without `length_normalize` too, as swiss-ai/posttraining's loss does.

The file is one trainer the way TRL writes one (~700 lines): the loss as pure functions of tensors, the config, the
tokenizing and batching of QRPO rows, and the trainer, read top to bottom; splitting them would send a reader of the
trainer to four files. The dataset itself (layouts, row checks, quantile rewards, the pipeline that writes it) is
`apertus_hf.preference`'s.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.data.data_collator import DataCollatorMixin
from transformers.utils import is_peft_available, logging
from trl.trainer.utils import add_fused_lm_head, generate_model_card, selective_log_softmax

from ..data.padding import pad_token_rows
from ..preference import PreferenceLayout, QRPODatasetError, is_chat_prompt, qrpo_dataset_layout, quantile_rewards

if is_peft_available():
    from peft import PeftConfig, PeftModel, get_peft_model

logger = logging.get_logger(__name__)

QRPO_TRANSFORMS = ("identity", "log", "normal_icdf")
QRPOTransform = Literal["identity", "log", "normal_icdf"]

QRPO_CITATION = """\
@article{matrenok2025qrpo,
    title   = {{Quantile Reward Policy Optimization: Alignment with Pointwise Regression and Exact Partition Functions}},
    author  = {Simon Matrenok and Skander Moalla and Caglar Gulcehre},
    year    = 2025,
    journal = {arXiv preprint arXiv:2507.08068}
}"""


# ---------------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------------


def transform_quantile_reward(quantile: torch.Tensor, transform: QRPOTransform, num_ref_rewards: int) -> torch.Tensor:
    """f(R_q), with the clamps that keep `log` and `normal_icdf` finite (as in the QRPO reference code,
    CLAIRE-Labo/quantile-reward-policy-optimization `src/qrpo/trainers/qrpo.py`)."""
    if transform == "identity":
        return quantile
    if transform == "log":
        return torch.log(quantile.clamp(min=1.0 / num_ref_rewards))
    if transform == "normal_icdf":
        if num_ref_rewards < 2:
            raise ValueError("The normal_icdf transform needs at least 2 reference rewards per prompt to clamp to.")
        return torch.special.ndtri(quantile.clamp(1.0 / num_ref_rewards, (num_ref_rewards - 1.0) / num_ref_rewards))
    raise ValueError(f"Unknown QRPO transform {transform!r}; use one of {QRPO_TRANSFORMS}.")


def beta_log_partition(beta: torch.Tensor, transform: QRPOTransform) -> torch.Tensor:
    """beta * log Z_f(beta), exactly, for a tensor of (effective) betas."""
    if transform == "identity":
        # Z = beta (e^(1/beta) - 1), written so that large 1/beta does not overflow.
        return beta * torch.log(beta) + 1.0 + beta * torch.log1p(-torch.exp(-1.0 / beta))
    if transform == "log":
        return beta * (torch.log(beta) - torch.log1p(beta))
    if transform == "normal_icdf":
        return 1.0 / (2.0 * beta)
    raise ValueError(f"Unknown QRPO transform {transform!r}; use one of {QRPO_TRANSFORMS}.")


def effective_beta(
    beta: float,
    like: torch.Tensor,
    completion_lengths: torch.Tensor | None = None,
    length_normalize: bool = False,
    max_normalized_beta: float = 0.1,
    cap_unnormalized_beta: bool = False,
) -> torch.Tensor:
    """The beta each completion's loss uses: min(beta / |y|, max_normalized_beta) with length_normalize; otherwise
    `beta` (the QRPO paper), or min(beta, max_normalized_beta) with cap_unnormalized_beta (swiss-ai/posttraining)."""
    if not length_normalize:
        betas = torch.full_like(like, beta)
        return betas.clamp(max=max_normalized_beta) if cap_unnormalized_beta else betas
    if completion_lengths is None:
        raise ValueError("length_normalize=True needs completion_lengths (completion tokens per example).")
    lengths = completion_lengths.to(device=like.device, dtype=like.dtype)
    if bool((lengths <= 0).any()):
        raise ValueError("completion_lengths must be positive with length_normalize=True.")
    return (beta / lengths).clamp(max=max_normalized_beta)


def qrpo_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    ref_rewards: torch.Tensor,
    beta: float,
    transform: QRPOTransform = "identity",
    completion_lengths: torch.Tensor | None = None,
    length_normalize: bool = False,
    max_normalized_beta: float = 0.1,
    cap_unnormalized_beta: bool = False,
) -> torch.Tensor:
    """Per-example QRPO losses, shape (B,).

    Args:
        logps: (B,) log pi(y|x) of the policy, summed over completion tokens.
        ref_logps: (B,) the same under the reference policy.
        rewards: (B,) reward of each completion.
        ref_rewards: (B, n) rewards of the n reference completions sampled for each example's prompt.
        beta: KL regularisation strength.
        transform: `identity`, `log` or `normal_icdf`, the f applied to the quantile reward.
        completion_lengths: (B,) completion tokens |y|; needed with `length_normalize`.
        length_normalize: use beta/|y| (capped at `max_normalized_beta`) in every term, as Apertus did.
        max_normalized_beta: the cap on the length-normalised beta.
        cap_unnormalized_beta: without length_normalize, use min(beta, max_normalized_beta) as swiss-ai/posttraining
            does; False uses beta as given (the QRPO paper).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    if ref_rewards.dim() != 2 or ref_rewards.shape[0] != rewards.shape[0] or ref_rewards.shape[1] == 0:
        raise ValueError(
            f"ref_rewards must have shape (B, n>0) with B={rewards.shape[0]}, got {tuple(ref_rewards.shape)}."
        )
    # At least float32: the loss is a small difference of larger terms (bf16 log-probs would swamp it).
    dtype = torch.promote_types(logps.dtype, torch.float32)
    log_ratio = logps.to(dtype) - ref_logps.to(dtype)
    betas, _, target = regression_target(
        log_ratio,
        rewards,
        ref_rewards,
        beta,
        transform,
        completion_lengths,
        length_normalize,
        max_normalized_beta,
        cap_unnormalized_beta,
    )
    return (target - betas * log_ratio) ** 2


def regression_target(
    log_ratio: torch.Tensor,
    rewards: torch.Tensor,
    ref_rewards: torch.Tensor,
    beta: float,
    transform: QRPOTransform,
    completion_lengths: torch.Tensor | None,
    length_normalize: bool,
    max_normalized_beta: float,
    cap_unnormalized_beta: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(effective betas, quantile rewards, target f(R_q) - beta log Z) of each completion, in `log_ratio`'s dtype:
    what `qrpo_loss` regresses beta * log_ratio onto, and what the trainer logs."""
    betas = effective_beta(
        beta, log_ratio, completion_lengths, length_normalize, max_normalized_beta, cap_unnormalized_beta
    )
    quantile = quantile_rewards(rewards, ref_rewards).to(log_ratio.dtype)
    target = transform_quantile_reward(quantile, transform, ref_rewards.shape[1]) - beta_log_partition(betas, transform)
    return betas, quantile, target


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class QRPOConfig(TrainingArguments):
    r"""Configuration of [`QRPOTrainer`]: the QRPO fields below plus every [`~transformers.TrainingArguments`] field.

    The defaults of the QRPO fields are Apertus' (Apertus tech report, arXiv 2509.14233, §4.3 'Preference Alignment';
    swiss-ai/posttraining `src/post_training/trainers/preference.py`): identity transform, beta 5, length-normalised
    beta capped at 0.1, reference log-probs computed once before training. `cap_unnormalized_beta` defaults to the
    QRPO paper's loss: it only matters without length normalisation, which the released runs did not use.
    """

    beta: float = field(
        default=5.0,
        metadata={"help": "KL regularisation strength; with length_normalize it is divided by the completion length."},
    )
    transform: str = field(
        default="identity",
        metadata={"help": f"Transform f of the quantile reward, one of {QRPO_TRANSFORMS}."},
    )
    length_normalize: bool = field(
        default=True, metadata={"help": "Use beta/|y| in every term of the loss (Apertus' variant)."}
    )
    max_normalized_beta: float = field(
        default=0.1,
        metadata={"help": "Cap on beta/|y| when length_normalize is on (and on beta with cap_unnormalized_beta)."},
    )
    cap_unnormalized_beta: bool = field(
        default=False,
        metadata={
            "help": "Without length_normalize, use min(beta, max_normalized_beta) as swiss-ai/posttraining's QRPO loss "
            "does (src/post_training/trainers/preference.py caps every beta at 0.1 to keep the gradient norm down); "
            "false uses beta as given, as the QRPO paper does. No effect with length_normalize, which the released "
            "Apertus runs used."
        },
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Longest prompt + completion in tokens; longer ones lose their end (rows whose prompt alone "
            "fills it are dropped, with a warning that counts them)."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of the reference log-prob pass; default: the per-device train (eval) batch size."
        },
    )
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Keyword arguments of `from_pretrained` when `model` (or `ref_model`) is given as a path."},
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes used to tokenize the datasets."})
    # Our columns are not model inputs; the trainer selects what it needs itself.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the trainer keeps only the columns it reads."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every this many optimizer steps."})

    def __post_init__(self):
        super().__post_init__()
        if self.transform not in QRPO_TRANSFORMS:
            raise ValueError(f"transform must be one of {QRPO_TRANSFORMS}, got {self.transform!r}.")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")
        if not self.max_normalized_beta > 0:
            raise ValueError(f"max_normalized_beta must be > 0, got {self.max_normalized_beta}.")


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def reference_logps_column(member: str) -> str:
    """The dataset column of the reference log-probs of `member` (completion, chosen or rejected)."""
    return "ref_logps" if member == "completion" else f"ref_{member}_logps"


def _common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def tokenize_qrpo_row(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, completion_columns: Sequence[str]
) -> dict[str, list[int]]:
    """`prompt_ids` and `<column>_ids` for each completion column of one row.

    Chat prompts go through the chat template (the prompt with the generation prompt, prompt + completion in full, so
    the completion ends with the template's end-of-turn token); text completions get the EOS token appended. The
    completion starts where the two tokenizations diverge, so a merge across the boundary is never double-counted.
    """
    prompt = row["prompt"]
    if is_chat_prompt(prompt):
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        full_ids = {
            column: tokenizer.apply_chat_template(prompt + row[column], tokenize=True, return_dict=False)
            for column in completion_columns
        }
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = {}
        for column in completion_columns:
            completion = row[column]
            if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
                completion += tokenizer.eos_token
            full_ids[column] = tokenizer(prompt + completion)["input_ids"]
    prompt_length = min(_common_prefix_length(prompt_ids, ids) for ids in full_ids.values())
    output = {"prompt_ids": list(prompt_ids[:prompt_length])}
    for column, ids in full_ids.items():
        output[f"{column}_ids"] = list(ids[prompt_length:])
    return output


@dataclass
class DataCollatorForQRPO(DataCollatorMixin):
    """Pads tokenized QRPO rows of one `layout` into one batch of completions, member by member: every row's first
    member (completion or chosen), then, for paired rows, every row's rejected one (`rows_of_batch` undoes this).

    Returns `input_ids`, `attention_mask`, `completion_mask` (k*B, L), `rewards` (k*B,), `ref_rewards` (k*B, n),
    `member` (k*B,: the member's index in `layout.members`) and, when the rows carry them, `ref_logps` (k*B,).
    Sequences longer than `max_length` keep their start.
    """

    pad_token_id: int
    layout: PreferenceLayout
    max_length: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, completion_masks, rewards, ref_rewards, ref_logps = [], [], [], [], []
        for member, reward_column in zip(self.layout.members, self.layout.reward_columns, strict=True):
            for example in examples:
                prompt_ids, completion_ids = example["prompt_ids"], example[f"{member}_ids"]
                ids = list(prompt_ids) + list(completion_ids)
                mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
                if self.max_length is not None:
                    ids, mask = ids[: self.max_length], mask[: self.max_length]
                sequences.append(ids)
                completion_masks.append(mask)
                rewards.append(example[reward_column])
                ref_rewards.append(example["ref_rewards"])
                if reference_logps_column(member) in example:
                    ref_logps.append(example[reference_logps_column(member)])
        input_ids, attention_mask = pad_token_rows(sequences, self.pad_token_id)
        completion_mask, _ = pad_token_rows(completion_masks, 0)  # 0 on the padding, like the prompt
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "rewards": torch.tensor(rewards, dtype=torch.float32),
            "ref_rewards": torch.tensor(ref_rewards, dtype=torch.float32),
            "member": torch.arange(len(self.layout.members)).repeat_interleave(len(examples)),
        }
        if ref_logps:
            batch["ref_logps"] = torch.tensor(ref_logps, dtype=torch.float32)
        return batch


def rows_of_batch(values: torch.Tensor, layout: PreferenceLayout) -> torch.Tensor:
    """Per-sequence values of a `DataCollatorForQRPO` batch, (k*B, ...), regrouped as (B, k, ...): one entry per
    dataset row with its k members in `layout` order. `gather_for_metrics` trims the last batch by dataset rows, so
    what it gathers must hold rows whole."""
    return values.view(len(layout.members), -1, *values.shape[1:]).transpose(0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------


class QRPOTrainer(Trainer):
    """Offline QRPO on a dataset of completions with rewards and reference rewards (see `qrpo_dataset_layout`).

    Args:
        model: the policy, a model or a path / Hub id loaded with `AutoModelForCausalLM` and `args.model_init_kwargs`.
        ref_model: the reference policy, when it is not the initial `model` (a model or a path). Its log-probs are
            computed once before training and it is then released; without it the initial `model` (adapters disabled
            under PEFT) is the reference. Skipped entirely when the dataset has `ref_logps` (unpaired) or
            `ref_chosen_logps`/`ref_rejected_logps` (paired) columns.
        args: a `QRPOConfig`.
        data_collator: default `DataCollatorForQRPO`.
        train_dataset, eval_dataset: QRPO datasets (eval may be a dict of them).
        processing_class: the tokenizer (with a chat template for chat prompts); default: the model's.
        peft_config: a PEFT config; the model is wrapped with it and only the adapters train.
        callbacks, optimizers, optimizer_cls_and_kwargs: as in `transformers.Trainer`.
    """

    _tag_names = ["trl", "qrpo", "apertus_hf"]
    # compute_loss returns a per-micro-batch mean; Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: str | PreTrainedModel | None = None,
        args: QRPOConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        peft_config: PeftConfig | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = QRPOConfig(f"{Path(str(name)).name or 'model'}-QRPO")
        if not isinstance(args, QRPOConfig):
            raise TypeError(f"args must be a QRPOConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("QRPOTrainer needs a train_dataset.")
        if ref_model is not None and ref_model is model:
            raise ValueError("ref_model must not be the policy itself; omit it to use the initial policy.")

        # PEFT initialises the adapters at random: seeded, as TRL's trainers do, they depend on `seed` alone, not on
        # what the process drew before (loading a model under ZeRO-3 draws differently than without it).
        set_seed(args.seed)
        model_init_kwargs = dict(args.model_init_kwargs or {})
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, **model_init_kwargs)
        if isinstance(ref_model, str):
            ref_model = AutoModelForCausalLM.from_pretrained(ref_model, **model_init_kwargs)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        if processing_class.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token before building the trainer.")

        # Per-token log-probs without materialising (batch, length, vocabulary) logits; before PEFT wraps the model.
        add_fused_lm_head(model.get_base_model() if _is_peft_model(model) else model)
        if ref_model is not None:
            add_fused_lm_head(ref_model)
        if peft_config is not None:
            if not is_peft_available():
                raise ImportError("peft_config needs PEFT: pip install peft.")
            if _is_peft_model(model):
                raise ValueError("model is already a PeftModel; pass it without peft_config, or merge it first.")
            model = get_peft_model(model, peft_config)
        if _is_peft_model(model) and args.activation_checkpointing:
            model.enable_input_require_grads()

        self.ref_model = ref_model
        self._reference: torch.nn.Module | None = None  # what scores the reference log-probs, built on first use
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        # One layout for the whole run, from the train dataset's columns: the collator stacks its members, the metrics
        # regroup them, and every eval dataset must have it too.
        self.layout = PreferenceLayout.of_columns(train_dataset.column_names, "train")
        train_dataset = self._prepare_dataset(train_dataset, processing_class, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                key: self._prepare_dataset(value, processing_class, args, f"eval {key}")
                for key, value in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, "eval")

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator
            or DataCollatorForQRPO(processing_class.pad_token_id, self.layout, args.max_length),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )

        self.train_dataset = self._with_reference_logps(self.train_dataset, "train")
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                key: self._with_reference_logps(value, f"eval {key}") for key, value in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = self._with_reference_logps(self.eval_dataset, "eval")
        # The reference policy is only needed for those log-probs: QRPO trains without it in memory. A DeepSpeed engine
        # also takes its ZeRO-3 hooks off the modules, which for the initial policy are the ones `train` prepares.
        if self.is_deepspeed_enabled and self._reference is not None:
            self._reference.destroy()
        self.ref_model = self._reference = None

    # -- data -------------------------------------------------------------------------------------------------------

    def _prepare_dataset(
        self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, args: QRPOConfig, name: str
    ) -> Dataset:
        layout = qrpo_dataset_layout(dataset, name)
        if layout is not self.layout:
            raise QRPODatasetError(
                f"The {name} dataset is {layout} but the train dataset is {self.layout}; a trainer batches and logs one "
                "layout. Give both the same one (recipes/qrpo_prepare.py writes paired rows with `selection: pairs`, "
                "unpaired ones with `selection: all`)."
            )
        ref_logp_columns = [reference_logps_column(member) for member in layout.members]
        keep = [
            *layout.reward_columns,
            "ref_rewards",
            *(column for column in ref_logp_columns if column in dataset.column_names),
        ]
        tokenized = dataset.map(
            tokenize_qrpo_row,
            fn_kwargs={"tokenizer": tokenizer, "completion_columns": layout.members},
            remove_columns=[column for column in dataset.column_names if column not in keep],
            num_proc=args.dataset_num_proc,
            desc=f"Tokenizing the {name} dataset",
        )
        for column in layout.members:
            empty = [row for row, ids in enumerate(tokenized[f"{column}_ids"]) if not ids]
            if empty:
                raise QRPODatasetError(
                    f"Row {empty[0]} of the {name} dataset has a {column} that adds no token after its prompt "
                    f"({len(empty)} rows in all); give every row a non-empty completion."
                )
        if args.max_length is not None:
            too_long = [row for row, ids in enumerate(tokenized["prompt_ids"]) if len(ids) >= args.max_length]
            if too_long:
                logger.warning(
                    f"{len(too_long)} rows of the {name} dataset (first: row {too_long[0]}) have a prompt of at least "
                    f"max_length={args.max_length} tokens, leaving no completion token to train on; they are left out. "
                    "Raise max_length to keep them."
                )
                tokenized = tokenized.select(sorted(set(range(len(tokenized))) - set(too_long)))
        return tokenized

    def _with_reference_logps(self, dataset: Dataset, name: str) -> Dataset:
        """`dataset` with `ref_<member>_logps` columns, computed once by the reference policy when they are absent."""
        columns = [reference_logps_column(member) for member in self.layout.members]
        if all(column in dataset.column_names for column in columns):
            return dataset
        default_batch_size = (
            self.args.per_device_train_batch_size if name == "train" else self.args.per_device_eval_batch_size
        )
        loader = DataLoader(
            dataset,
            batch_size=self.args.precompute_ref_batch_size or default_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        loader = self.accelerator.prepare(loader)
        reference = self._reference_policy()
        values = []
        was_training = reference.training
        reference.eval()
        # Under the same autocast as training, so that the log-ratio starts at exactly 0 under mixed precision.
        with torch.no_grad(), self._reference_context(reference), self.accelerator.autocast():
            for batch in tqdm(
                loader,
                desc=f"Reference log-probs of the {name} dataset",
                disable=self.args.disable_tqdm or not self.accelerator.is_local_main_process,
            ):
                logps = self._sequence_logps(reference, batch)
                values.append(self.accelerator.gather_for_metrics(rows_of_batch(logps, self.layout)).cpu())
        reference.train(was_training)
        stacked = torch.cat(values)
        for index, column in enumerate(columns):
            dataset = dataset.add_column(column, stacked[:, index].tolist())
        return dataset

    def _reference_policy(self) -> torch.nn.Module:
        """`ref_model`, else the initial policy, ready to score on this process; built once for every dataset."""
        if self._reference is None:
            model = self.ref_model if self.ref_model is not None else self.model
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                # Under ZeRO-3 both are loaded sharded, and nothing gathers the shards before `train` prepares the
                # policy (or ever, for `ref_model`): an inference engine does, as TRL's DPOTrainer scores its reference.
                self._reference = prepare_deepspeed(model, self.accelerator)
            else:
                self._reference = model.to(self.accelerator.device)
        return self._reference

    def _reference_context(self, reference: torch.nn.Module):
        if self.ref_model is None and _is_peft_model(self.accelerator.unwrap_model(reference)):
            return self.accelerator.unwrap_model(reference).disable_adapter()
        return contextlib.nullcontext()

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids",
                *(f"{member}_ids" for member in self.layout.members),
                *self.layout.reward_columns,
                "ref_rewards",
                *(reference_logps_column(member) for member in self.layout.members),
            ]

    # -- loss -------------------------------------------------------------------------------------------------------

    @staticmethod
    def _sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log pi(y|x) summed over each sequence's completion tokens, shape (B,)."""
        completion_mask = batch["completion_mask"]
        if _adapts_lm_head(model):
            # TRL's fused head multiplies by `lm_head.weight`, the base weight, so a LoRA on the LM head would be
            # silently left out: score from the logits instead.
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            token_logps = selective_log_softmax(logits[:, :-1], batch["input_ids"][:, 1:])
            return (token_logps * completion_mask[:, 1:]).sum(dim=-1)
        labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True
        )
        return outputs.log_probs.sum(dim=-1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if "ref_logps" not in inputs:
            raise RuntimeError("The batch has no reference log-probs; the dataset lost its ref_*_logps columns.")
        logps = self._sequence_logps(model, inputs)
        completion_lengths = inputs["completion_mask"].sum(dim=-1)
        losses = qrpo_loss(
            logps,
            inputs["ref_logps"],
            inputs["rewards"],
            inputs["ref_rewards"],
            beta=self.args.beta,
            transform=self.args.transform,
            completion_lengths=completion_lengths,
            length_normalize=self.args.length_normalize,
            max_normalized_beta=self.args.max_normalized_beta,
            cap_unnormalized_beta=self.args.cap_unnormalized_beta,
        )
        loss = losses.mean()
        self._record_metrics(mode, inputs, logps.detach(), completion_lengths)
        return (loss, {"losses": losses.detach()}) if return_outputs else loss

    def _record_metrics(
        self, mode: str, inputs: dict[str, torch.Tensor], logps: torch.Tensor, completion_lengths: torch.Tensor
    ) -> None:
        log_ratio = logps.float() - inputs["ref_logps"].float()
        betas, quantile, target = regression_target(
            log_ratio,
            inputs["rewards"],
            inputs["ref_rewards"],
            self.args.beta,
            self.args.transform,
            completion_lengths,
            self.args.length_normalize,
            self.args.max_normalized_beta,
            self.args.cap_unnormalized_beta,
        )
        implied = betas * log_ratio
        per_sequence = torch.stack(
            [quantile, log_ratio, implied, target, betas, logps.float(), completion_lengths.float()], dim=-1
        )
        gathered = self.accelerator.gather_for_metrics(rows_of_batch(per_sequence, self.layout))  # (B, k, m)
        names = ["quantile_reward", "log_ratio", "implied_reward", "target", "beta", "logps", "completion_length"]
        metrics = dict(zip(names, gathered.mean(dim=(0, 1)).unbind(), strict=True))
        if self.layout is PreferenceLayout.PAIRED:
            chosen, rejected = gathered[..., names.index("implied_reward")].unbind(dim=1)
            metrics |= {
                "implied_reward/chosen": chosen.mean(),
                "implied_reward/rejected": rejected.mean(),
                "implied_reward/margin": (chosen - rejected).mean(),
                "implied_reward/accuracy": (chosen > rejected).float().mean(),
            }
        values = torch.stack(list(metrics.values())).tolist()  # one device sync for all of them
        for name, value in zip(metrics, values, strict=True):
            self._metrics[mode][name].append(value)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # -- model card -------------------------------------------------------------------------------------------------

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """Write a TRL-style README.md (base model, how to use, QRPO citation) into output_dir."""
        if not self.is_world_process_zero():
            return
        base = self.model.config._name_or_path
        tag_set = set([tags] if isinstance(tags, str) else tags or []) | set(self._tag_names)
        card = generate_model_card(
            base_model=base if base and not os.path.isdir(base) else None,
            model_name=model_name or Path(self.args.output_dir).name,
            hub_model_id=self.hub_model_id,
            dataset_name=dataset_name,
            tags=sorted(tag_set),
            wandb_url=None,
            trackio_url=None,
            trainer_name="QRPO",
            trainer_citation=QRPO_CITATION,
            paper_title="Quantile Reward Policy Optimization: Alignment with Pointwise Regression and Exact Partition "
            "Functions",
            paper_id="2507.08068",
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def _save_checkpoint(self, model, trial):
        self.create_model_card()
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call and (output_dir is None or Path(output_dir) == Path(self.args.output_dir)):
            self.create_model_card()


def _is_peft_model(model: torch.nn.Module) -> bool:
    return is_peft_available() and isinstance(model, PeftModel)


def _adapts_lm_head(model: torch.nn.Module) -> bool:
    """Whether a PEFT adapter sits on the model's output projection."""
    if not is_peft_available():
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    unwrapped = getattr(model, "module", model)  # DDP and DeepSpeed wrap the model in `.module`
    return isinstance(unwrapped.get_output_embeddings(), BaseTunerLayer)


__all__ = [
    "QRPO_TRANSFORMS",
    "DataCollatorForQRPO",
    "QRPOConfig",
    "QRPOTrainer",
    "beta_log_partition",
    "effective_beta",
    "qrpo_loss",
    "reference_logps_column",
    "regression_target",
    "rows_of_batch",
    "tokenize_qrpo_row",
    "transform_quantile_reward",
]
