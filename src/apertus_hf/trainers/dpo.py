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

from .qrpo import PAIRED_COLUMNS, UNPAIRED_COLUMNS
from .recipe import (
    PostTrainingRecipeConfig,
    PostTrainingRecipeError,
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

RECIPE_FILE_NAME = "dpo_config.yaml"
DPO_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class DPORecipeConfig(PostTrainingRecipeConfig):
    """Options of `recipes/dpo.py`; the defaults are its embedded default run (recipes/configs/tiny/dpo.yaml)."""

    # Defaults of the shared fields for the embedded default run.
    output_dir: str = field(
        default="outputs/dpo-tiny",
        metadata={"help": "Folder of the run: checkpoints, the final model (or LoRA adapter), logs and the recipe."},
    )
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
    max_length: int | None = field(
        default=256, metadata={"help": "Longest tokenized prompt + completion; longer ones are truncated."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Pairs per device and micro-batch."})
    logging_steps: int = field(default=2, metadata={"help": "Log metrics every this many optimizer steps."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every this many optimizer steps."})

    # DPO options (fields of TRL's DPOConfig).
    beta: float = field(
        default=0.1,
        metadata={"help": "KL strength: higher keeps the policy closer to the reference (DPO's beta)."},
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": (
                "TRL DPO loss(es): sigmoid (the DPO paper), ipo, hinge, robust, ...; several are summed with "
                "trainer_args.loss_weights."
            )
        },
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label noise assumed by the robust / conservative DPO losses (0: none)."}
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": (
                "Compute the reference log-probs once before training, so no reference model stays in memory (as "
                "Apertus did for QRPO)."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise PostTrainingRecipeError(f"beta must be > 0, got {self.beta}.")


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


def dpo_training_arguments(recipe: DPORecipeConfig) -> DPOConfig:
    """The `DPOConfig` of `recipe`."""
    return training_arguments(
        recipe,
        DPOConfig,
        max_length=recipe.max_length,
        beta=recipe.beta,
        loss_type=list(recipe.loss_type),
        label_smoothing=recipe.label_smoothing,
        precompute_ref_log_probs=recipe.precompute_ref_log_probs,
    )


def build_dpo_trainer(recipe: DPORecipeConfig) -> DPOTrainer:
    """TRL's `DPOTrainer` for `recipe`: pairs loaded and checked, model loaded (with LoRA), reference set up."""
    args = dpo_training_arguments(recipe)
    train_dataset, eval_dataset = load_post_training_dataset(recipe)
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
        processing_class=load_chat_tokenizer(recipe),
        peft_config=peft_config(recipe),
    )
    # DPOTrainer's __init__ does not take optimizer_cls_and_kwargs; Trainer.create_optimizer reads the attribute.
    trainer.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(recipe)
    return trainer


def run_dpo(recipe: DPORecipeConfig) -> DPOResult:
    """Train `recipe.model_name_or_path` with DPO on the pairs in `recipe.dataset`; see `DPORecipeConfig`.

    Resumes from the newest checkpoint in output_dir (with `resume`). Saves like every post-training recipe
    (`save_post_trained_model`): the model (or LoRA adapter, and with `merge_lora` the merged model in
    output_dir/merged) with its tokenizer, the Apertus generation config and the recipe (`dpo_config.yaml`); pushes
    output_dir to the Hub with `hub_model_id`.
    """
    trainer = build_dpo_trainer(recipe)
    trainer.train(resume_from_checkpoint=resume_checkpoint(recipe))
    model_dir = save_post_trained_model(trainer, recipe, RECIPE_FILE_NAME)
    logger.info("Saved the DPO model to %s.", model_dir)
    return DPOResult(
        Path(recipe.output_dir), model_dir, trainer.state.global_step, trainer.is_world_process_zero(), trainer
    )
