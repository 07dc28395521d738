"""Publishing a model folder: check it, write its card, re-save oversized weights in shards, and upload.

`publish` is what recipes call after training (and `recipes/publish.py` on the command line); the training loops
never import it. Nothing in `model_dir` is modified except its README.md (our card); resharded weights go to a
temporary staging folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import transformers
from huggingface_hub import CommitInfo, HfApi, ModelCard, constants
from huggingface_hub.serialization._base import parse_size_to_int
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .card import CARD_FILE_NAME, build_model_card, readme_author, write_model_card
from .checks import (
    LOCAL_ONLY_PATTERNS,
    ModelCardError,
    ModelFolderReport,
    check_model_card,
    check_model_folder,
    list_files,
    local_paths,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class PublishResult:
    """What `publish` uploaded (or, for a dry run, would upload).

    `files` maps each path in the repo to its size in bytes; `card_generated` says the card is ours (a README.md the
    author wrote is published unchanged instead); `resharded` says the weights were (or would be) re-saved in
    shards of at most `max_shard_size`; `commit` is None for a dry run.
    """

    repo_id: str
    files: dict[str, int]
    card: ModelCard
    card_generated: bool
    resharded: bool
    commit: CommitInfo | None

    @property
    def commit_url(self) -> str | None:
        return self.commit.commit_url if self.commit is not None else None


def needs_resharding(report: ModelFolderReport, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> bool:
    """Whether a weight file of the folder is larger than `max_shard_size` ("5GB", or bytes)."""
    # The parser save_pretrained itself uses, so "5GB" means the same here and there.
    limit = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    return any(report.files[name] > limit for name in report.weight_files)


def reshard(model_dir: str | Path, staging_dir: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Fill `staging_dir` with `model_dir` re-saved in safetensors shards of at most `max_shard_size`.

    The weights are loaded into CPU memory with stock transformers' class for the model type (in their saved dtype)
    and written by `save_pretrained(max_shard_size=...)`, with `model.safetensors.index.json`; every other file
    that a publish uploads is linked from `model_dir` unchanged.
    """
    source, staging = Path(model_dir), Path(staging_dir)
    config = json.loads((source / "config.json").read_text())
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]])
    model = model_class.from_pretrained(source, dtype="auto")
    weights_dir = staging / ".resharded"
    model.save_pretrained(weights_dir, max_shard_size=max_shard_size)
    for file in sorted(weights_dir.iterdir()):
        if file.name.endswith((".safetensors", ".safetensors.index.json")):
            file.rename(staging / file.name)
    for relative in list_files(source):
        if not relative.endswith((".safetensors", ".safetensors.index.json")):
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).symlink_to((source / relative).resolve())
    shutil.rmtree(weights_dir)  # what is left is save_pretrained's copy of the config files
    return staging


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"repo_id={repo_id!r} is not a Hub repo id ({error}); use ORG/NAME, e.g. swiss-ai/my-model."
        ) from error
    if "/" not in repo_id:
        raise ValueError(f"repo_id={repo_id!r} lacks the namespace; use ORG/NAME (your user name or organization).")


def publish(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    license: str | None = None,
    language: Sequence[str] | None = None,
    base_model: str | None = None,
    commit_message: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> PublishResult:
    """Publish the model folder `model_dir` to the Hub repo `repo_id` (ORG/NAME) with its model card.

    Checks the folder (`check_model_folder`) and the card (`check_model_card`) offline first, then writes our card
    to `model_dir/README.md` (replacing an earlier apertus_hf card or a trainer's draft such as TRL's; a README.md
    the author wrote is published unchanged instead), creates the repo if needed, and uploads every file, weights
    larger than `max_shard_size` re-saved in shards. Weight files left in the repo by an earlier upload are
    deleted, so it never holds two sets of weights.

    `private` applies to a new repo only: True or False, or None for the Hub's default of the namespace. `license`
    overrides the run's (from training_facts.json); `language` and `base_model` override what the card finds.
    `dry_run` stops before any network request and writes nothing; it returns what would be uploaded. `endpoint`
    defaults to `HF_ENDPOINT` (the Hub); `token` to the logged-in token.
    """
    _check_repo_id(repo_id)
    folder = Path(model_dir)
    card_path = folder / CARD_FILE_NAME
    existing = card_path.read_text(encoding="utf-8") if card_path.is_file() else None
    card_generated = existing is None or readme_author(existing) != "user"
    # A card we replace is not published, so a local path in it is no problem of the folder.
    report = check_model_folder(folder, replaced=[CARD_FILE_NAME] if card_generated else [])
    if card_generated:
        card = build_model_card(folder, repo_id, license=license, language=language, base_model=base_model)
        paths = local_paths(str(card))
        if paths:
            raise ModelCardError(
                f"The model card names absolute paths of this machine ({', '.join(paths)}); they come from "
                f"{folder / 'training_facts.json'}: replace them with Hub ids or relative paths there."
            )
    else:
        logger.warning("%s was written by hand: publishing it unchanged as the model card.", card_path)
        card = ModelCard(existing)
    check_model_card(card)
    # Adapters are small, and `reshard` rebuilds full models; a large adapter file goes up as it is (the Hub takes
    # files up to 50 GB).
    resharded = not report.adapter and needs_resharding(report, max_shard_size)
    files = {**report.files, CARD_FILE_NAME: len(str(card).encode())} if card_generated else dict(report.files)
    if dry_run:
        return PublishResult(repo_id, dict(sorted(files.items())), card, card_generated, resharded, commit=None)
    if constants.is_offline_mode():
        raise RuntimeError("HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset it to publish.")
    if card_generated:
        card.save(card_path)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="apertus-publish-") as staging:
        upload_dir = reshard(folder, staging, max_shard_size) if resharded else folder
        files = list_files(upload_dir)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=upload_dir,
            commit_message=commit_message or f"Upload {repo_id.split('/')[-1]} with apertus_hf",
            ignore_patterns=LOCAL_ONLY_PATTERNS,  # as list_files
            delete_patterns=["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"],
        )
    logger.info("Published %s: %s", repo_id, commit.commit_url)
    return PublishResult(repo_id, files, card, card_generated, resharded, commit=commit)


def card_and_publish(
    model_dir: str | Path,
    repo_id: str | None,
    *,
    private: bool | None = None,
    token: str | None = None,
    other_folders: Sequence[str | Path] = (),
) -> PublishResult | None:
    """What a recipe does with the model its run saved: our card into `model_dir` and into `other_folders` (e.g. a
    LoRA run's adapter folder beside its merged model), then, when `repo_id` is given, `publish` of `model_dir`."""
    for folder in dict.fromkeys(Path(folder) for folder in (*other_folders, model_dir)):
        write_model_card(folder, repo_id)
    if repo_id is None:
        return None
    return publish(model_dir, repo_id, private=private, token=token)
