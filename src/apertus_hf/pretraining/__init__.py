"""The Apertus pretraining loop: `PretrainConfig` holds every option, `pretrain` runs it on Accelerate."""

from .checkpointing import TrainingProgress, complete_checkpoints, load_latest_checkpoint, save_checkpoint
from .config import PretrainConfig
from .metrics import read_metrics, training_flops_per_token
from .trainer import PretrainResult, evaluate, pretrain, pretraining_model_config

__all__ = [
    "PretrainConfig",
    "PretrainResult",
    "TrainingProgress",
    "complete_checkpoints",
    "evaluate",
    "load_latest_checkpoint",
    "pretrain",
    "pretraining_model_config",
    "read_metrics",
    "save_checkpoint",
    "training_flops_per_token",
]
