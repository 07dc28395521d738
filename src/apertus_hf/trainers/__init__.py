"""Post-training: SFT with TRL, QRPO (trainer and loss), a DPO baseline and reward models (TRL's RewardTrainer), with
the recipe options they share. The preference data they read (schema, sampling, rewards, the QRPO dataset pipeline)
is `apertus_hf.preference`'s."""

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
    load_reward_model,
    optimizer_cls_and_kwargs,
    peft_config,
    resume_checkpoint,
)
from .reward import (
    REWARD_RECIPE,
    PairwiseEvaluation,
    RewardArguments,
    RewardResult,
    build_reward_trainer,
    evaluate_pairs,
    reward_pairs,
    run_reward,
)
from .saving import save_post_trained_model
from .sft import SFT_RECIPE, SFTArguments, SFTResult, build_sft_trainer, check_sft_columns, run_sft

__all__ = [
    "DPO_RECIPE",
    "QRPO_RECIPE",
    "REWARD_RECIPE",
    "SFT_RECIPE",
    "DPOArguments",
    "DPOResult",
    "DataCollatorForQRPO",
    "PairwiseEvaluation",
    "PostTrainingArguments",
    "PostTrainingRecipe",
    "PostTrainingRecipeError",
    "QRPOArguments",
    "QRPOConfig",
    "QRPODatasetError",
    "QRPOResult",
    "QRPOTrainer",
    "RewardArguments",
    "RewardResult",
    "SFTArguments",
    "SFTResult",
    "build_dpo_trainer",
    "build_reward_trainer",
    "build_sft_trainer",
    "check_sft_columns",
    "dpo_pairs",
    "evaluate_pairs",
    "load_policy_model",
    "load_post_training_dataset",
    "load_reward_model",
    "optimizer_cls_and_kwargs",
    "peft_config",
    "qrpo_loss",
    "resume_checkpoint",
    "reward_pairs",
    "run_dpo",
    "run_qrpo",
    "run_reward",
    "run_sft",
    "save_post_trained_model",
]
