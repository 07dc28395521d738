"""Supervised fine-tuning (SFT) of an Apertus model with TRL's `SFTTrainer`.

`run_sft(SFTRecipeConfig(...))` is the whole recipe: it loads the data, tokenizer and model through the shared
builders of `recipe.py`, trains with the loss on assistant tokens only (the `{% generation %}` marks of the Apertus
chat template), optionally packed and optionally with LoRA or AdEMAMix, evaluates, and saves a model that
`transformers` loads and that stops generating at the end of its answer. The defaults are the embedded default run:
the model `make pretrain` exports, fine-tuned for one epoch on the chat dataset in data/chat, in a few minutes on a
CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from datasets import Dataset
from jinja2 import TemplateError
from trl import SFTConfig, SFTTrainer

from ..tokenization import APERTUS_CHAT_TEMPLATE
from .recipe import (
    PostTrainingRecipeConfig,
    PostTrainingRecipeError,
    has_apertus_special_tokens,
    load_chat_tokenizer,
    load_policy_model,
    load_post_training_dataset,
    optimizer_cls_and_kwargs,
    peft_config,
    resume_checkpoint,
    save_post_trained_model,
    training_arguments,
)

logger = logging.getLogger(__name__)

RECIPE_FILE_NAME = "sft_config.yaml"


@dataclass
class SFTRecipeConfig(PostTrainingRecipeConfig):
    """Options of `recipes/sft.py`; the defaults are its embedded default run (recipes/configs/tiny/sft.yaml)."""

    # Defaults of the shared fields for the embedded default run.
    output_dir: str = field(
        default="outputs/sft-tiny",
        metadata={"help": "Folder of the run: checkpoints, the final model (or LoRA adapter), logs and the recipe."},
    )
    dataset: str = field(
        default="data/chat",
        metadata={
            "help": (
                "Training data: a .jsonl/.json/.parquet/.csv file, a folder of them, a folder written by "
                "`Dataset.save_to_disk`, or a Hub dataset id. Rows are conversations (`messages`), prompt/completion "
                "pairs (`prompt`, `completion`) or plain text (`text`). The default is the chat dataset the repo ships."
            )
        },
    )
    eval_dataset_split: str | None = field(
        default="test", metadata={"help": "Split of `dataset` to evaluate on; None: no separate evaluation split."}
    )
    max_length: int | None = field(
        default=256,
        metadata={
            "help": (
                "Longest tokenized conversation; longer ones are truncated (and dropped if no assistant token is "
                "left). With packing, the length of a packed row."
            )
        },
    )
    optimizer: Literal["adamw_torch", "ademamix"] = field(
        default="ademamix",
        metadata={"help": "adamw_torch, or ademamix (apertus_hf.optim.AdEMAMix, the optimizer of Apertus' SFT)."},
    )
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Rows per device and micro-batch."})
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every this many optimizer steps."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every this many optimizer steps."})

    # SFT options.
    assistant_only_loss: bool = field(
        default=True,
        metadata={
            "help": (
                "Loss on the assistant answers (and their <|assistant_end|>) only, as in Apertus' SFT; needs "
                "conversational rows. false: loss on every token (prompt/completion rows: on the completion)."
            )
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": (
                "Pack several conversations into each row of max_length tokens (best-fit, no padding); attention "
                "stays within each conversation. Apertus' SFT did not pack."
            )
        },
    )
    eval_steps: int | None = field(
        default=50,
        metadata={"help": "Evaluate every this many optimizer steps; None: only at the start and the end."},
    )
    eval_on_start: bool = field(
        default=True,
        metadata={"help": "Evaluate before the first step too, so the run reports the loss it started from."},
    )
    chat_template: Literal["apertus", "tokenizer"] = field(
        default="apertus",
        metadata={
            "help": (
                "Template that renders the conversations: 'apertus' (apertus_hf's Apertus template, with the "
                "{% generation %} marks assistant_only_loss needs; for tokenizers with the Apertus special tokens) "
                "or 'tokenizer' (the tokenizer's own). The saved tokenizer carries the one used."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.packing and self.max_length is None:
            raise PostTrainingRecipeError("packing fills rows of max_length tokens; set max_length (e.g. 4096).")


@dataclass
class SFTResult:
    """What a finished SFT run produced."""

    output_dir: Path
    """The final model, or with LoRA the adapter (load it with `peft.AutoPeftModelForCausalLM`)."""
    model_dir: Path
    """The folder plain `transformers` loads: output_dir, or with LoRA and `merge_lora` output_dir/merged."""
    steps: int
    final_train_loss: float | None
    """The last logged training loss."""
    initial_eval_loss: float | None
    """The eval loss before training (with `eval_on_start`)."""
    final_eval_loss: float | None
    is_main_process: bool
    trainer: SFTTrainer
    """The trainer, for inspection: its model, optimizer and `state.log_history`."""


def sft_training_arguments(recipe: SFTRecipeConfig) -> SFTConfig:
    """The `SFTConfig` of `recipe`."""
    evaluate = recipe.eval_dataset_split is not None or recipe.eval_fraction > 0
    specific = {
        "max_length": recipe.max_length,
        "packing": recipe.packing,
        "assistant_only_loss": recipe.assistant_only_loss,
        "eval_strategy": "steps" if evaluate and recipe.eval_steps else "no",
        "eval_steps": recipe.eval_steps,
        "eval_on_start": evaluate and recipe.eval_on_start,
        # Evaluation keeps no activations for a backward pass, so the training batch size fits.
        "per_device_eval_batch_size": recipe.per_device_train_batch_size,
    }
    return training_arguments(recipe, SFTConfig, **specific)


def build_sft_trainer(recipe: SFTRecipeConfig) -> SFTTrainer:
    """TRL's `SFTTrainer` for `recipe`: data tokenized (and packed), labels masked, model loaded (with LoRA)."""
    # Before the model: under ZeRO-3 the config makes `from_pretrained` load the weights already sharded.
    args = sft_training_arguments(recipe)
    train_dataset, eval_dataset = load_post_training_dataset(recipe)
    for name, dataset in (("training", train_dataset), ("evaluation", eval_dataset)):
        if dataset is not None:
            check_sft_columns(dataset, name, recipe)
    tokenizer = load_chat_tokenizer(recipe)
    if recipe.chat_template == "apertus":
        if not has_apertus_special_tokens(tokenizer):
            raise PostTrainingRecipeError(
                f"chat_template 'apertus' needs the Apertus special tokens at their ids (those of "
                f"swiss-ai/Apertus-8B-Instruct-2509's tokenizer_config.json on the Hub), which the tokenizer "
                f"of {recipe.tokenizer_name_or_path or recipe.model_name_or_path} lacks; set chat_template: tokenizer."
            )
        tokenizer.chat_template = APERTUS_CHAT_TEMPLATE
    model = load_policy_model(recipe)
    try:
        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config(recipe),
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(recipe),
        )
    except TemplateError as error:
        raise PostTrainingRecipeError(
            f"The chat template of the tokenizer cannot render a conversation of {recipe.dataset}: {error} Fix those "
            "rows, or use a tokenizer whose template renders them (tokenizer_name_or_path)."
        ) from error


def run_sft(recipe: SFTRecipeConfig) -> SFTResult:
    """Fine-tune `recipe.model_name_or_path` on `recipe.dataset` with TRL's `SFTTrainer`; see `SFTRecipeConfig`.

    Resumes from the newest checkpoint in output_dir (with `resume`). Writes the final model (or LoRA adapter) with
    its tokenizer, an Apertus generation config and the recipe (`sft_config.yaml`) to output_dir, the merged model to
    output_dir/merged with `merge_lora`, and pushes output_dir to the Hub with `hub_model_id`.
    """
    trainer = build_sft_trainer(recipe)
    trainer.train(resume_from_checkpoint=resume_checkpoint(recipe))
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    # The last periodic evaluation may have been at the last step already.
    if trainer.eval_dataset is not None and (not evaluations or evaluations[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()
    model_dir = save_post_trained_model(trainer, recipe, RECIPE_FILE_NAME)
    logger.info("Saved the SFT model to %s.", model_dir)
    history = trainer.state.log_history
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    return SFTResult(
        output_dir=Path(recipe.output_dir),
        model_dir=model_dir,
        steps=trainer.state.global_step,
        final_train_loss=train_losses[-1] if train_losses else None,
        initial_eval_loss=eval_losses[0] if recipe.eval_on_start and eval_losses else None,
        final_eval_loss=eval_losses[-1] if eval_losses else None,
        is_main_process=trainer.is_world_process_zero(),
        trainer=trainer,
    )


def check_sft_columns(dataset: Dataset, name: str, recipe: SFTRecipeConfig) -> None:
    """Raise a PostTrainingRecipeError unless `dataset` has rows SFTTrainer can train on with `recipe`."""
    columns = set(dataset.column_names)
    text_field = recipe.trainer_args.get("dataset_text_field", "text")
    if not ({"messages"} <= columns or {"prompt", "completion"} <= columns or {text_field} <= columns):
        raise PostTrainingRecipeError(
            f"The {name} data of {recipe.dataset} has columns {sorted(columns)}; SFT needs conversations in a "
            f"`messages` column (lists of {{role, content}}), `prompt` and `completion` columns, or a `{text_field}` "
            "column. Rename the columns or convert the rows."
        )
    if recipe.assistant_only_loss and not _is_conversational(dataset):
        raise PostTrainingRecipeError(
            f"assistant_only_loss needs conversations (rows of {{role, content}} messages), but the {name} data of "
            f"{recipe.dataset} holds plain text. Set assistant_only_loss: false (prompt/completion rows then train on "
            "the completion only)."
        )


def _is_conversational(dataset: Dataset) -> bool:
    from trl.data_utils import is_conversational

    return len(dataset) > 0 and is_conversational(dataset[0])


__all__ = [
    "RECIPE_FILE_NAME",
    "SFTRecipeConfig",
    "SFTResult",
    "build_sft_trainer",
    "check_sft_columns",
    "run_sft",
    "sft_training_arguments",
]
