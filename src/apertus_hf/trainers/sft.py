"""Supervised fine-tuning (SFT) of an Apertus model with TRL's `SFTTrainer`.

`run_sft(*SFT_RECIPE.configs({...}))` is the whole recipe (`SFT_RECIPE.parse()` reads a YAML recipe and the command
line into our `SFTArguments` and TRL's `SFTConfig`): it loads the data, tokenizer and model through the shared
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

from ..tokenization import APERTUS_CHAT_TEMPLATE, has_apertus_special_tokens
from .recipe import (
    POST_TRAINING_CONFIG_DEFAULTS,
    PostTrainingArguments,
    PostTrainingRecipe,
    PostTrainingRecipeError,
    chat_tokenizer,
    load_policy_model,
    load_post_training_dataset,
    optimizer_cls_and_kwargs,
    peft_config,
    resume_checkpoint,
    without_evaluation,
)
from .saving import last_eval_loss, save_post_trained_model

logger = logging.getLogger(__name__)

RECIPE_FILE_NAME = "sft_config.yaml"


@dataclass
class SFTArguments(PostTrainingArguments):
    """Our options of `recipes/sft.py` (the rest are `SFTConfig`'s); the defaults are its embedded default run
    (recipes/configs/tiny/sft.yaml)."""

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
    use_ademamix: bool = field(
        default=True,
        metadata={
            "help": (
                "Train with apertus_hf.optim.AdEMAMix (the optimizer of Apertus' SFT) instead of the `optim` of "
                "SFTConfig; it takes learning_rate, adam_beta1, adam_beta2, adam_epsilon and weight_decay from there."
            )
        },
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


SFT_RECIPE = PostTrainingRecipe(
    stage="sft",
    arguments_class=SFTArguments,
    config_class=SFTConfig,
    config_defaults={
        **POST_TRAINING_CONFIG_DEFAULTS,
        "output_dir": "outputs/sft-tiny",
        "learning_rate": 3e-3,
        "per_device_train_batch_size": 16,
        # Evaluation keeps no activations for a backward pass, so the training batch size fits.
        "per_device_eval_batch_size": 16,
        "save_steps": 50,
        # Longer conversations are truncated (and dropped if no assistant token is left); with packing, the length of
        # a packed row.
        "max_length": 256,
        # Loss on the assistant answers (and their <|assistant_end|>) only, as in Apertus' SFT; Apertus' SFT did not
        # pack.
        "assistant_only_loss": True,
        "packing": False,
        "eval_strategy": "steps",
        "eval_steps": 50,
        # Evaluate before the first step too, so the run reports the loss it started from.
        "eval_on_start": True,
    },
    recipe_file_name=RECIPE_FILE_NAME,
    config_docs="https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig",
)


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


def build_sft_trainer(recipe: SFTArguments, args: SFTConfig) -> SFTTrainer:
    """TRL's `SFTTrainer` for `recipe` and `args`: data tokenized (and packed), labels masked, model loaded (with
    LoRA). Build `args` before calling (as `SFT_RECIPE.configs` does): under ZeRO-3 the config makes
    `from_pretrained` load the weights already sharded."""
    if args.packing and args.max_length is None:
        raise PostTrainingRecipeError("packing fills rows of max_length tokens; set max_length (e.g. 4096).")
    args = without_evaluation(args, recipe.has_evaluation)
    train_dataset, eval_dataset = load_post_training_dataset(recipe, args.seed)
    for name, dataset in (("training", train_dataset), ("evaluation", eval_dataset)):
        if dataset is not None:
            check_sft_columns(dataset, name, recipe, args)
    tokenizer = chat_tokenizer(recipe)
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
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(recipe, args),
        )
    except TemplateError as error:
        raise PostTrainingRecipeError(
            f"The chat template of the tokenizer cannot render a conversation of {recipe.dataset}: {error} Fix those "
            "rows, or use a tokenizer whose template renders them (tokenizer_name_or_path)."
        ) from error


def run_sft(recipe: SFTArguments, args: SFTConfig) -> SFTResult:
    """Fine-tune `recipe.model_name_or_path` on `recipe.dataset` with TRL's `SFTTrainer`; see `SFTArguments` and
    `SFT_RECIPE` (whose `configs`/`parse` build the two).

    Resumes from the newest checkpoint in output_dir (with `resume`). Writes the final model (or LoRA adapter) with
    its tokenizer, an Apertus generation config, the recipe (`sft_config.yaml`) and its training facts to output_dir,
    and the merged model to output_dir/merged with `merge_lora`. It does not publish: recipes/sft.py does, with
    apertus_hf's card.
    """
    trainer = build_sft_trainer(recipe, args)
    trainer.train(resume_from_checkpoint=resume_checkpoint(recipe, trainer.args))
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    # The last periodic evaluation may have been at the last step already.
    if trainer.eval_dataset is not None and (not evaluations or evaluations[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()
    method = {
        "Loss": "on the assistant answers only" if trainer.args.assistant_only_loss else "on every token",
        "Packing": f"rows of {trainer.args.max_length} tokens" if trainer.args.packing else "none",
    }
    model_dir = save_post_trained_model(
        trainer, SFT_RECIPE, recipe, trainer.args, method_rows=method, with_perplexity=True
    )
    logger.info("Saved the SFT model to %s.", model_dir)
    history = trainer.state.log_history
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    return SFTResult(
        output_dir=Path(trainer.args.output_dir),
        model_dir=model_dir,
        steps=trainer.state.global_step,
        final_train_loss=train_losses[-1] if train_losses else None,
        initial_eval_loss=eval_losses[0] if trainer.args.eval_on_start and eval_losses else None,
        final_eval_loss=last_eval_loss(trainer),
        is_main_process=trainer.is_world_process_zero(),
        trainer=trainer,
    )


def check_sft_columns(dataset: Dataset, name: str, recipe: SFTArguments, args: SFTConfig) -> None:
    """Raise a PostTrainingRecipeError unless `dataset` has rows SFTTrainer can train on with `recipe` and `args`."""
    columns = set(dataset.column_names)
    text_field = args.dataset_text_field
    if not ({"messages"} <= columns or {"prompt", "completion"} <= columns or {text_field} <= columns):
        raise PostTrainingRecipeError(
            f"The {name} data of {recipe.dataset} has columns {sorted(columns)}; SFT needs conversations in a "
            f"`messages` column (lists of {{role, content}}), `prompt` and `completion` columns, or a `{text_field}` "
            "column. Rename the columns or convert the rows."
        )
    if args.assistant_only_loss and not _is_conversational(dataset):
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
    "SFT_RECIPE",
    "SFTArguments",
    "SFTResult",
    "build_sft_trainer",
    "check_sft_columns",
    "run_sft",
]
