"""The QRPO recipe behind `recipes/qrpo.py`: `QRPO_RECIPE` (our `QRPOArguments` and `QRPOConfig`) and `run_qrpo`.

It trains on the dataset `recipes/qrpo_prepare.py` writes (or any dataset with the same columns, see
`apertus_hf.preference.qrpo_dataset_layout`), with the policy that sampled its reference completions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .qrpo import QRPO_CITATION, QRPOConfig, QRPOTrainer
from .recipe import (
    POST_TRAINING_CONFIG_DEFAULTS,
    PostTrainingArguments,
    PostTrainingRecipe,
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

RECIPE_FILE_NAME = "qrpo_config.yaml"


@dataclass
class QRPOArguments(PostTrainingArguments):
    """Our options of `recipes/qrpo.py` (the rest, beta and transform among them, are `QRPOConfig`'s). The defaults
    are the embedded default run (recipes/configs/tiny/qrpo.yaml): the tiny SFT model of `make sft` on the toy-reward
    data of `recipes/qrpo_prepare.py`'s default, on CPU."""

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
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of the rows held out for evaluation (no eval split in the data)."}
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


QRPO_RECIPE = PostTrainingRecipe(
    stage="qrpo",
    arguments_class=QRPOArguments,
    config_class=QRPOConfig,
    config_defaults={
        **POST_TRAINING_CONFIG_DEFAULTS,
        "output_dir": "outputs/qrpo-tiny",
        # Apertus: 5e-7 at 8B, 1e-7 at 70B; the tiny model moves at a larger one.
        "learning_rate": 1e-3,
        "num_train_epochs": 4.0,
        "per_device_train_batch_size": 16,
        "max_length": 1024,
        "beta": 5.0,
        "transform": "identity",
        "length_normalize": True,
        "max_normalized_beta": 0.1,
        "eval_strategy": "epoch",
    },
    recipe_file_name=RECIPE_FILE_NAME,
    config_docs="the docstring of apertus_hf.trainers.qrpo.QRPOConfig",
)


@dataclass
class QRPOResult:
    output_dir: Path
    model_dir: Path
    metrics: dict[str, Any]
    is_main_process: bool


def run_qrpo(recipe: QRPOArguments, args: QRPOConfig) -> QRPOResult:
    """Train `recipe.model_name_or_path` with QRPO on `recipe.dataset`, save it with its recipe and training facts,
    and return where it is. Build `args` before calling (as `QRPO_RECIPE.configs` does): under ZeRO-3 the config
    makes `from_pretrained` load the weights already sharded. It does not publish: recipes/qrpo.py does."""
    args = without_evaluation(args, recipe.has_evaluation)
    train_dataset, eval_dataset = load_post_training_dataset(recipe, args.seed)
    tokenizer = chat_tokenizer(recipe)
    model = load_policy_model(recipe)
    ref_model = (
        load_policy_model(recipe, recipe.ref_model_name_or_path, "ref_model_name_or_path")
        if recipe.ref_model_name_or_path
        else None
    )
    trainer = QRPOTrainer(
        model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config(recipe),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(recipe, args),
    )
    train_output = trainer.train(resume_from_checkpoint=resume_checkpoint(recipe, args))
    metrics = dict(train_output.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("all", metrics)
    beta = f"beta {args.beta:g}"
    if args.length_normalize:
        beta += f" divided by the completion length (capped at {args.max_normalized_beta:g})"
    elif args.cap_unnormalized_beta and args.beta > args.max_normalized_beta:
        beta += f" capped at {args.max_normalized_beta:g}"
    method = {"QRPO": f"{beta}, transform {args.transform}"}
    model_dir = save_post_trained_model(
        trainer, QRPO_RECIPE, recipe, args, method_rows=method, citations=[QRPO_CITATION]
    )
    return QRPOResult(Path(args.output_dir), model_dir, metrics, trainer.is_world_process_zero())
