"""The QRPO recipe behind `recipes/qrpo.py`: `QRPORecipeConfig` and `run_qrpo`.

It trains on the dataset `recipes/qrpo_prepare.py` writes (or any dataset with the same columns, see
`apertus_hf.trainers.qrpo.qrpo_dataset_layout`), with the policy that sampled its reference completions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .qrpo import QRPO_TRANSFORMS, QRPOConfig, QRPOTrainer
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

RECIPE_FILE_NAME = "qrpo_config.yaml"


@dataclass
class QRPORecipeConfig(PostTrainingRecipeConfig):
    """Every option of `recipes/qrpo.py`. The defaults are the embedded default run (recipes/configs/tiny/qrpo.yaml):
    the tiny SFT model of `make sft` on the toy-reward data of `recipes/qrpo_prepare.py`'s default, on CPU."""

    output_dir: str = field(default="outputs/qrpo-tiny", metadata={"help": "Folder of the run and the final model."})
    model_name_or_path: str = field(
        default="outputs/sft-tiny",
        metadata={
            "help": "The policy to train: the reference policy that sampled the dataset (default: `make sft`'s model)."
        },
    )
    dataset: str = field(
        default="outputs/qrpo-data-tiny",
        metadata={
            "help": "QRPO data: the folder recipes/qrpo_prepare.py writes, or files / a Hub id with its columns."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": (
                "Reference policy when it is not the initial policy; its log-probs are computed once before training. "
                "Ignored when the dataset has ref_logps (or ref_chosen_logps/ref_rejected_logps) columns."
            )
        },
    )
    beta: float = field(default=5.0, metadata={"help": "KL strength; Apertus: 5 with length normalisation."})
    transform: str = field(default="identity", metadata={"help": f"Quantile reward transform: {QRPO_TRANSFORMS}."})
    length_normalize: bool = field(default=True, metadata={"help": "beta/|y| in every term (Apertus' variant)."})
    max_normalized_beta: float = field(default=0.1, metadata={"help": "Cap on beta/|y|."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (Apertus: 5e-7 8B, 1e-7 70B)."})
    num_train_epochs: float = field(default=4.0, metadata={"help": "Epochs over the training data."})
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of the rows held out for evaluation (no eval split in the data)."}
    )
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Rows per device and micro-batch."})
    logging_steps: int = field(default=5, metadata={"help": "Log metrics every this many optimizer steps."})

    def __post_init__(self):
        super().__post_init__()
        if self.transform not in QRPO_TRANSFORMS:
            raise PostTrainingRecipeError(f"transform must be one of {QRPO_TRANSFORMS}, got {self.transform!r}.")


@dataclass
class QRPOResult:
    output_dir: Path
    model_dir: Path
    metrics: dict[str, Any]
    is_main_process: bool


def run_qrpo(recipe: QRPORecipeConfig) -> QRPOResult:
    """Train `recipe.model_name_or_path` with QRPO on `recipe.dataset`, save it, and return where it is."""
    # The config first: under ZeRO-3 it makes `from_pretrained` load the weights already sharded.
    args = training_arguments(
        recipe,
        QRPOConfig,
        beta=recipe.beta,
        transform=recipe.transform,
        length_normalize=recipe.length_normalize,
        max_normalized_beta=recipe.max_normalized_beta,
        max_length=recipe.max_length,
        eval_strategy="epoch" if recipe.eval_fraction > 0 or recipe.eval_dataset_split else "no",
    )
    train_dataset, eval_dataset = load_post_training_dataset(recipe)
    tokenizer = load_chat_tokenizer(recipe)
    model = load_policy_model(recipe)
    ref_model = load_policy_model(recipe, recipe.ref_model_name_or_path) if recipe.ref_model_name_or_path else None
    trainer = QRPOTrainer(
        model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config(recipe),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(recipe),
    )
    checkpoint = resume_checkpoint(recipe)
    if checkpoint is not None:
        logger.info("Resuming from %s", checkpoint)
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(train_output.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("all", metrics)
    model_dir = save_post_trained_model(trainer, recipe, RECIPE_FILE_NAME)
    return QRPOResult(Path(recipe.output_dir), model_dir, metrics, trainer.is_world_process_zero())
