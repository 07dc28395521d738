"""The Apertus pretraining loop: `PretrainConfig` holds every option, `pretrain` runs it on Accelerate.

config.py (the options), build.py (`build_run`: inputs, run folder, data, model, optimizer, resume), step.py (one
optimizer step, evaluation, the cadence of log/eval/checkpoint/stop), trainer.py (`pretrain`, the loop), export.py
(the model folder and its `TrainingFacts`), run_folder.py, checkpointing.py, metrics.py, logs.py.
"""

from .build import pretraining_model_config
from .checkpointing import (
    TrainingProgress,
    UnusableCheckpointsError,
    complete_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
)
from .config import RECIPE_FILE_NAME, PretrainConfig
from .metrics import read_metrics, training_flops_per_token
from .run_folder import RunFolderError
from .step import evaluate
from .trainer import PretrainResult, pretrain

__all__ = [
    "RECIPE_FILE_NAME",
    "PretrainConfig",
    "PretrainResult",
    "RunFolderError",
    "TrainingProgress",
    "UnusableCheckpointsError",
    "complete_checkpoints",
    "evaluate",
    "load_latest_checkpoint",
    "pretrain",
    "pretraining_model_config",
    "read_metrics",
    "save_checkpoint",
    "training_flops_per_token",
]
