"""DPO baseline with TRL's `DPOTrainer`, on the pairs `recipes/qrpo_prepare.py` writes, to compare with QRPO.

Apertus compared QRPO against DPO on the same data (Apertus tech report, arXiv 2509.14233, §4.3 'Preference
Alignment': QRPO matched DPO at 8B and beat it at 70B). `run_dpo`
trains on the paired QRPO dataset (prompt, chosen, rejected; the reward columns are dropped, since DPO only uses
which completion won) with the shared recipe builders of `recipe.py`: the same model, tokenizer, data, LoRA,
optimizer and logging options as SFT and QRPO, so the two runs differ only in the loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from ..preference import PAIRED_COLUMNS, UNPAIRED_COLUMNS
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
from .saving import save_post_trained_model

logger = logging.getLogger(__name__)

RECIPE_FILE_NAME = "dpo_config.yaml"
DPO_COLUMNS = ("prompt", "chosen", "rejected")
# TRL's DPOTrainer carries the BibTeX entry of the DPO paper (Rafailov et al. 2023, arXiv 2305.18290).
DPO_CITATION = DPOTrainer._paper["citation"]


@dataclass
class DPOArguments(PostTrainingArguments):
    """Our options of `recipes/dpo.py` (the rest, beta and loss_type among them, are `DPOConfig`'s); the defaults are
    its embedded default run (recipes/configs/tiny/dpo.yaml)."""

    model_name_or_path: str = field(
        default="outputs/sft-tiny",
        metadata={
            "help": (
                "Model to train, also the DPO reference policy: the SFT model that sampled the pairs (a folder or a "
                "Hub id). The default is the model `recipes/sft.py` writes."
            )
        },
    )
    dataset: str = field(
        default="outputs/qrpo-data-tiny",
        metadata={
            "help": (
                "Paired QRPO data (prompt, chosen, rejected, ...) as `recipes/qrpo_prepare.py` writes it with "
                "selection: pairs (the default there), or any prompt/chosen/rejected preference data."
            )
        },
    )


DPO_RECIPE = PostTrainingRecipe(
    stage="dpo",
    arguments_class=DPOArguments,
    config_class=DPOConfig,
    config_defaults={
        **POST_TRAINING_CONFIG_DEFAULTS,
        "output_dir": "outputs/dpo-tiny",
        "learning_rate": 1e-4,
        "per_device_train_batch_size": 16,
        "save_steps": 50,
        "max_length": 256,
        "beta": 0.1,
        "loss_type": ["sigmoid"],
        "label_smoothing": 0.0,
        # True computes the reference log-probs once before training, so no reference model stays in memory.
        "precompute_ref_log_probs": False,
    },
    recipe_file_name=RECIPE_FILE_NAME,
    config_docs="https://huggingface.co/docs/trl/dpo_trainer#trl.DPOConfig",
)


@dataclass
class DPOResult:
    """What a finished DPO run produced."""

    output_dir: Path
    """The final model, or with LoRA the adapter (load it with `peft.AutoPeftModelForCausalLM`)."""
    model_dir: Path
    """The folder plain `transformers` loads: output_dir, or with LoRA and `merge_lora` output_dir/merged."""
    steps: int
    is_main_process: bool
    trainer: DPOTrainer
    """The trainer, for inspection: its model and `state.log_history` (rewards/margins, rewards/accuracies, ...)."""


def dpo_pairs(dataset: Dataset, name: str, source: str) -> Dataset:
    """`dataset` reduced to the prompt/chosen/rejected columns DPO reads; raises PostTrainingRecipeError if unpaired."""
    columns = set(dataset.column_names)
    if not set(DPO_COLUMNS) <= columns:
        unpaired = set(UNPAIRED_COLUMNS) <= columns
        hint = (
            "It is an unpaired QRPO dataset (one completion per row); prepare pairs with recipes/qrpo_prepare.py "
            "--selection pairs."
            if unpaired
            else f"Paired QRPO data has the columns {list(PAIRED_COLUMNS)}."
        )
        raise PostTrainingRecipeError(
            f"The {name} data of {source} has columns {sorted(columns)}, but DPO needs {list(DPO_COLUMNS)}. {hint}"
        )
    if len(dataset) == 0:
        raise PostTrainingRecipeError(f"The {name} data of {source} has no rows.")
    return dataset.select_columns(list(DPO_COLUMNS))


def build_dpo_trainer(recipe: DPOArguments, args: DPOConfig) -> DPOTrainer:
    """TRL's `DPOTrainer` for `recipe` and `args`: pairs loaded and checked, model loaded (with LoRA), reference set
    up. Build `args` before calling (as `DPO_RECIPE.configs` does): under ZeRO-3 the config makes `from_pretrained`
    load the weights already sharded."""
    if args.beta <= 0:
        raise PostTrainingRecipeError(f"beta must be > 0, got {args.beta}.")
    args = without_evaluation(args, recipe.has_evaluation)
    train_dataset, eval_dataset = load_post_training_dataset(recipe, args.seed)
    train_dataset = dpo_pairs(train_dataset, "training", recipe.dataset)
    if eval_dataset is not None:
        eval_dataset = dpo_pairs(eval_dataset, "evaluation", recipe.dataset)
    # Without a ref_model, DPOTrainer's reference is a fresh copy of the starting model (with LoRA: the base model
    # with the adapter disabled), which is the policy that sampled the pairs.
    trainer = DPOTrainer(
        model=load_policy_model(recipe),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=chat_tokenizer(recipe),
        peft_config=peft_config(recipe),
    )
    # DPOTrainer's __init__ does not take optimizer_cls_and_kwargs; Trainer.create_optimizer reads the attribute.
    trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(recipe, args)
    return trainer


def run_dpo(recipe: DPOArguments, args: DPOConfig) -> DPOResult:
    """Train `recipe.model_name_or_path` with DPO on the pairs in `recipe.dataset`; see `DPOArguments` and
    `DPO_RECIPE` (whose `configs`/`parse` build the two).

    Resumes from the newest checkpoint in output_dir (with `resume`). Saves like every post-training recipe
    (`save_post_trained_model`): the model (or LoRA adapter, and with `merge_lora` the merged model in
    output_dir/merged) with its tokenizer, the Apertus generation config, the recipe (`dpo_config.yaml`) and its
    training facts. It does not publish: recipes/dpo.py does, with apertus_hf's card.
    """
    trainer = build_dpo_trainer(recipe, args)
    trainer.train(resume_from_checkpoint=resume_checkpoint(recipe, trainer.args))
    args = trainer.args
    smoothing = f", label smoothing {args.label_smoothing:g}" if args.label_smoothing else ""
    reference = "precomputed once" if args.precompute_ref_log_probs else "the starting model"
    method = {"DPO": f"beta {args.beta:g}, loss {', '.join(args.loss_type)}{smoothing}; reference: {reference}"}
    model_dir = save_post_trained_model(trainer, DPO_RECIPE, recipe, args, method_rows=method, citations=[DPO_CITATION])
    logger.info("Saved the DPO model to %s.", model_dir)
    return DPOResult(
        Path(args.output_dir), model_dir, trainer.state.global_step, trainer.is_world_process_zero(), trainer
    )
