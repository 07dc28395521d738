"""Publishing to the Hugging Face Hub: folder checks, the model card, and the upload.

- `checks`: `check_model_folder` (loadable by stock transformers or PEFT, safetensors only, no absolute paths of
  this machine in the files to publish) and `check_model_card` (the card's metadata, offline);
- `card`: the model card of every training stage, built from the run's `training_facts.json`, `config.json` and
  `eval_results/*.json`; `write_model_card` writes it into the folder;
- `upload`: `publish` (check, card, reshard, upload).

Recipes call `write_model_card` and `publish` after training; the training loops never import this package.
"""

from .card import (
    CARD_FILE_NAME,
    CARD_MARKER,
    UNKNOWN_LICENSE,
    build_model_card,
    count_parameters,
    default_model_name,
    readme_author,
    write_model_card,
)
from .checks import (
    ModelCardError,
    ModelFolderError,
    ModelFolderReport,
    check_model_card,
    check_model_folder,
    format_files,
    human_size,
    local_paths,
)
from .sources import data_languages, hub_dataset_ids
from .upload import DEFAULT_MAX_SHARD_SIZE, PublishResult, card_and_publish, needs_resharding, publish, reshard

__all__ = [
    "CARD_FILE_NAME",
    "CARD_MARKER",
    "DEFAULT_MAX_SHARD_SIZE",
    "UNKNOWN_LICENSE",
    "ModelCardError",
    "ModelFolderError",
    "ModelFolderReport",
    "PublishResult",
    "build_model_card",
    "card_and_publish",
    "check_model_card",
    "check_model_folder",
    "count_parameters",
    "data_languages",
    "default_model_name",
    "format_files",
    "hub_dataset_ids",
    "human_size",
    "local_paths",
    "needs_resharding",
    "publish",
    "readme_author",
    "reshard",
    "write_model_card",
]
