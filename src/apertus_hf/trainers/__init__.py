"""Post-training: SFT with TRL, QRPO (trainer and loss) and a DPO baseline, with the recipe options they share. The
preference data they read (schema, sampling, rewards, the QRPO dataset pipeline) is `apertus_hf.preference`'s."""

from ..preference import QRPODatasetError
from .dpo import DPO_RECIPE, DPOArguments, DPOResult, build_dpo_trainer, dpo_pairs, run_dpo
from .qrpo import DataCollatorForQRPO, QRPOConfig, QRPOTrainer, qrpo_loss
from .qrpo_recipe import QRPO_RECIPE, QRPOArguments, QRPOResult, run_qrpo
from .recipe import (
    PostTrainingArguments,
    PostTrainingRecipe,
    PostTrainingRecipeError,
    load_policy_model,
    load_post_training_dataset,
    optimizer_cls_and_kwargs,
    peft_config,
    resume_checkpoint,
)
from .saving import save_post_trained_model
from .sft import SFT_RECIPE, SFTArguments, SFTResult, build_sft_trainer, check_sft_columns, run_sft

__all__ = [
    "DPO_RECIPE",
    "QRPO_RECIPE",
    "SFT_RECIPE",
    "DPOArguments",
    "DPOResult",
    "DataCollatorForQRPO",
    "PostTrainingArguments",
    "PostTrainingRecipe",
    "PostTrainingRecipeError",
    "QRPOArguments",
    "QRPOConfig",
    "QRPODatasetError",
    "QRPOResult",
    "QRPOTrainer",
    "SFTArguments",
    "SFTResult",
    "build_dpo_trainer",
    "build_sft_trainer",
    "check_sft_columns",
    "dpo_pairs",
    "load_policy_model",
    "load_post_training_dataset",
    "optimizer_cls_and_kwargs",
    "peft_config",
    "qrpo_loss",
    "resume_checkpoint",
    "run_dpo",
    "run_qrpo",
    "run_sft",
    "save_post_trained_model",
]
