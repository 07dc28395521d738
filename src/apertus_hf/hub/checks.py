"""Checks before publishing: the model folder (`check_model_folder`) and the card's metadata (`check_model_card`).

Both run offline and list every problem at once, each with its fix, so one run of `publish --dry-run` tells the
author everything to repair.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..runtime import SourceNotFoundError, resolve_source

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tekken.json", "vocab.json")
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ADAPTER_CONFIG_FILE_NAME = "adapter_config.json"
# What stays on this machine when a run's folder is published (upload_folder's patterns): hidden files, the training
# state (Trainer's checkpoint-*/, pretraining's checkpoints/, TensorBoard's runs/) and a LoRA run's merged/ model, which
# is published on its own. Trainer's own push leaves out checkpoint-*/ the same way.
LOCAL_ONLY_PATTERNS = [".*", "*/.*", "checkpoint-*/", "checkpoints/", "runs/", "merged/"]
# Files read for absolute paths: the recipe, configs, facts, eval results and cards. Vocabularies and weight maps are
# left out: their entries are tokens and tensor names, and a token such as "/usr/lib" is no path of this machine.
PATH_CHECKED_SUFFIXES = (".yaml", ".yml", ".json", ".md")
PATH_UNCHECKED_FILES = ("tokenizer.json", "vocab.json", "tekken.json")
# A POSIX absolute path of two components or more (`/home/alice`), not inside a URL (`https://host/...`).
SYSTEM_FOLDERS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/proc", "/sys", "/dev")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~<>-])(/[\w.@+-]+(?:/[\w.@+-]+)+)")
# ISO 639-1/2/3 codes, plus the special values of the Hub's model card spec.
_LANGUAGE_CODE = re.compile(r"^([a-z]{2,3}(-[A-Za-z0-9]+)*|code|multilingual)$")
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


class ModelFolderError(ValueError):
    """A model folder that cannot be published as it is; the message lists every problem and its fix."""


class ModelCardError(ValueError):
    """Model card metadata that the Hub would reject or misread; the message lists every problem."""


@dataclass
class ModelFolderReport:
    """What `check_model_folder` found: the files to upload with their sizes in bytes, and the parsed config
    (`adapter_config.json` for a LoRA adapter folder)."""

    folder: Path
    files: dict[str, int]
    config: dict[str, Any]
    adapter: bool = False

    @property
    def weight_files(self) -> list[str]:
        return [name for name in self.files if name.endswith(".safetensors")]

    def summary(self) -> str:
        """One line per file with its size, then the total."""
        return format_files(self.files)


def format_files(files: dict[str, int]) -> str:
    """One line per file with its size, then the total."""
    width = max((len(name) for name in files), default=0)
    lines = [f"  {name:<{width}}  {human_size(size):>9}" for name, size in files.items()]
    return "\n".join([*lines, f"  {'total':<{width}}  {human_size(sum(files.values())):>9}"])


def human_size(size: float) -> str:
    """`size` bytes in decimal units ("5GB" means 5e9 bytes on the Hub and in `save_pretrained`)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def list_files(folder: Path) -> dict[str, int]:
    """Size of every file under `folder` that a publish uploads, by relative path (LOCAL_ONLY_PATTERNS left out)."""
    files = [path.relative_to(folder).as_posix() for path in sorted(folder.rglob("*")) if path.is_file()]
    return {
        relative: (folder / relative).stat().st_size
        for relative in filter_repo_objects(files, ignore_patterns=LOCAL_ONLY_PATTERNS)
    }


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The model folder


def check_model_folder(model_dir: str | Path, replaced: Collection[str] = ()) -> ModelFolderReport:
    """Check that `model_dir` is a folder stock `transformers` (or PEFT, for a LoRA adapter) loads, and list its
    files with their sizes.

    Checked: weights in safetensors (no pickled `.bin`/`.pt` files, every shard of an index present); `config.json`
    loads with the config class that stock transformers maps its `model_type` to (our registration with the Auto
    classes is bypassed, so the check holds for users without apertus_hf) and names architectures that
    transformers has, without `auto_map` remote code, or, in an adapter folder, `adapter_config.json` loads with
    PEFT; `generation_config.json` loads; the tokenizer loads and fits the vocabulary; and no text file to publish
    holds an absolute path of this machine (except the files in `replaced`, which publishing overwrites, such as a
    trainer's README.md). Raises `ModelFolderError` listing every problem with its fix.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a folder; pass the exported model folder (e.g. <output_dir>/model).")
    files = list_files(folder)
    adapter = ADAPTER_CONFIG_FILE_NAME in files and "config.json" not in files
    problems = _weight_problems(folder, files)
    config, config_problems = _adapter_config_problems(folder) if adapter else _config_problems(folder)
    problems += config_problems
    problems += _generation_config_problems(folder)
    problems += _tokenizer_problems(folder, files, config)
    problems += local_path_problems(folder, [name for name in files if name not in replaced])
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise ModelFolderError(f"{folder} cannot be published as it is:\n{listed}")
    return ModelFolderReport(folder=folder, files=files, config=config, adapter=adapter)


def _weight_problems(folder: Path, files: dict[str, int]) -> list[str]:
    problems = []
    pickled = [name for name in files if name.endswith(UNSAFE_WEIGHT_SUFFIXES)]
    if pickled:
        problems.append(
            f"pickled weights {pickled}: the Hub and transformers expect safetensors. Convert with "
            f"`AutoModelForCausalLM.from_pretrained('{folder}').save_pretrained('{folder}')`, then delete "
            f"{', '.join(pickled)}."
        )
    if not any(name.endswith(".safetensors") for name in files):
        problems.append(
            "no *.safetensors weights: export the model with `model.save_pretrained(folder)` (it writes "
            "model.safetensors)."
        )
    for index_name in (name for name in files if name.endswith(".safetensors.index.json")):
        try:
            shards = set(json.loads((folder / index_name).read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError) as error:
            problems.append(f"{index_name} is not a safetensors index ({error}); re-save the model.")
            continue
        missing = sorted(shards - set(files))
        if missing:
            problems.append(f"{index_name} names shards that are missing: {missing}; copy them into {folder}.")
    return problems


def _config_problems(folder: Path) -> tuple[dict[str, Any], list[str]]:
    path = folder / "config.json"
    if not path.is_file():
        return {}, [f"no config.json: save the model with `model.save_pretrained('{folder}')`."]
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        return {}, [f"{path} is not valid JSON ({error}); re-save the model."]
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        return config, [
            f"{path}: model_type={model_type!r} is not a model type of stock transformers "
            f"{transformers.__version__}; Apertus folders have model_type 'apertus'."
        ]
    problems = []
    stock_config_class = getattr(transformers, CONFIG_MAPPING_NAMES[model_type])
    try:
        stock_config_class.from_pretrained(folder)
    except Exception as error:  # any failure means users of stock transformers cannot load it
        problems.append(f"{path} does not load in stock transformers' {stock_config_class.__name__}: {error}")
    unknown = [name for name in config.get("architectures") or [] if not hasattr(transformers, name)]
    if unknown or not config.get("architectures"):
        problems.append(
            f"{path}: architectures={config.get('architectures')} must name transformers classes, e.g. "
            f"['{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, 'ApertusForCausalLM')}']."
        )
    if "auto_map" in config:
        problems.append(
            f"{path} has auto_map (remote code), which stock transformers only runs with trust_remote_code=True; "
            "delete the auto_map entry (Apertus is built into transformers)."
        )
    return config, problems


def _adapter_config_problems(folder: Path) -> tuple[dict[str, Any], list[str]]:
    from peft import PeftConfig  # PEFT is needed only for adapter folders

    path = folder / ADAPTER_CONFIG_FILE_NAME
    try:
        config = json.loads(path.read_text())
        PeftConfig.from_pretrained(folder)
    except Exception as error:  # any failure means PEFT users cannot load it
        return {}, [f"{path} does not load with PEFT ({error}); re-save the adapter with `model.save_pretrained`."]
    if not config.get("base_model_name_or_path"):
        return config, [f"{path} names no base_model_name_or_path; set it to the Hub id of the base model."]
    return config, []


def _generation_config_problems(folder: Path) -> list[str]:
    if not (folder / "generation_config.json").is_file():
        return [
            "no generation_config.json (the Hub widget and `generate` read it): write one with "
            f"`GenerationConfig.from_model_config(AutoConfig.from_pretrained('{folder}')).save_pretrained('{folder}')`."
        ]
    try:
        transformers.GenerationConfig.from_pretrained(folder)
    except Exception as error:  # any failure means `generate` cannot read it
        return [f"{folder / 'generation_config.json'} does not load: {error}"]
    return []


def _tokenizer_problems(folder: Path, files: dict[str, int], config: dict[str, Any]) -> list[str]:
    fix = (
        f"save the tokenizer with the model: `AutoTokenizer.from_pretrained(<tokenizer>).save_pretrained('{folder}')`."
    )
    if "tokenizer_config.json" not in files or not any(name in files for name in TOKENIZER_FILES):
        return [f"no tokenizer (tokenizer_config.json and one of {', '.join(TOKENIZER_FILES)}): {fix}"]
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # any failure means users cannot load it
        return [f"the tokenizer in {folder} does not load ({error}): {fix}"]
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        return [
            f"the tokenizer has {len(tokenizer)} tokens but config.json has vocab_size={vocab_size}: ids past "
            "the embedding would crash; publish the tokenizer the model was trained with."
        ]
    return []


def local_paths(text: str) -> list[str]:
    """The absolute paths of this machine named in `text`: paths whose first two components are a folder here
    (`/home/alice/...`, `/tmp/pytest-of-bob/...`, `/scratch/run/...`), outside the system folders that every
    machine has (`/usr/lib/...` names no one's files); URLs are not paths."""
    found = []
    for match in _ABSOLUTE_PATH.finditer(text):
        path = match.group(1).rstrip(".")
        top = Path(*Path(path).parts[:3])  # the regex guarantees two components below the root
        if path not in found and str(top.parent) not in SYSTEM_FOLDERS and top.is_dir():
            found.append(path)
    return found


def local_path_problems(folder: Path, files: Iterable[str]) -> list[str]:
    """One problem per text file to publish that names absolute paths of this machine: they tell the world the
    trainer's user name and folders, and they point nowhere on anyone else's machine."""
    problems = []
    for name in files:
        if not name.endswith(PATH_CHECKED_SUFFIXES) or name.endswith(".index.json"):
            continue
        if Path(name).name in PATH_UNCHECKED_FILES:
            continue
        paths = local_paths((folder / name).read_text(encoding="utf-8", errors="replace"))
        if paths:
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            problems.append(
                f"{name} names absolute paths of this machine ({shown}): replace each with a Hub id or a path "
                f"relative to the run (e.g. with apertus_hf.training_facts.portable_path), or move {name} out of "
                "the folder, then publish again."
            )
    return problems


# The card's metadata


def check_model_card(card: ModelCard) -> None:
    """Check the card's metadata offline, as far as the Hub's rules can be checked without the network.

    The Hub's own validation (`ModelCard.validate()`, and `upload_folder`, which sends README.md to
    `/api/validate-yaml` before uploading anything) needs the network. Offline we check: the card parses back
    (`ModelCard(str(card))` with metadata errors raised) to the same metadata; its `model-index` survives
    `model_index_to_eval_results` / `eval_results_to_model_index` unchanged and every metric value is a finite
    number; and the fields of the model card spec have their documented types (license id and ISO language
    codes, Hub ids in `base_model` and `datasets`, `widget` entries with a `text`, strings in `tags`,
    `library_name` and `pipeline_tag`). Raises `ModelCardError` listing every problem.
    """
    problems = []
    try:
        reparsed = ModelCard(str(card), ignore_metadata_errors=False)
    except (ValueError, yaml.YAMLError) as error:
        raise ModelCardError(f"The model card's metadata does not parse: {error}") from error
    data = card.data.to_dict()
    if reparsed.data.to_dict() != data:
        problems.append("the metadata changes when the card is parsed again (a value YAML cannot represent?)")
    if "model-index" in data:
        try:
            name, results = model_index_to_eval_results(data["model-index"])
            if eval_results_to_model_index(name, results) != data["model-index"]:
                problems.append("model-index does not survive a round trip through huggingface_hub's EvalResult")
            problems += [
                f"model-index metric {result.metric_type!r} of {result.dataset_name!r} has value "
                f"{result.metric_value!r}, not a finite number"
                for result in results
                if not is_finite_number(result.metric_value)
            ]
        except (KeyError, TypeError, ValueError) as error:
            problems.append(f"model-index is malformed: {error!r}")
    if "license" in data and not (isinstance(data["license"], str) and _LICENSE_ID.match(data["license"])):
        problems.append(f"license={data['license']!r} is not a Hub license id such as 'apache-2.0' (or 'other')")
    languages = data.get("language", [])
    for language in [languages] if isinstance(languages, str) else languages:
        if not (isinstance(language, str) and _LANGUAGE_CODE.match(language)):
            problems.append(f"language {language!r} is not an ISO 639-1/2/3 code")
    for key in ("base_model", "datasets"):
        values = data.get(key, [])
        for value in [values] if isinstance(values, str) else values:
            try:
                validate_repo_id(value)
            except (HFValidationError, TypeError) as error:
                problems.append(f"{key} entry {value!r} is not a Hub id: {error}")
    for key in ("tags", "library_name", "pipeline_tag"):
        value = data.get(key)
        if value is not None and not (
            isinstance(value, str) or (key == "tags" and all(isinstance(tag, str) for tag in value))
        ):
            problems.append(f"{key}={value!r} must be {'a list of strings' if key == 'tags' else 'a string'}")
    for example in data.get("widget", []):
        if not (isinstance(example, dict) and isinstance(example.get("text"), str)):
            problems.append(f"widget entry {example!r} needs a `text` string")
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise ModelCardError(f"The model card's metadata would not validate on the Hub:\n{listed}")


def is_hub_id(value: str) -> bool:
    """Whether `value` names a Hub repo rather than a path, by the rule every run loads with
    (`runtime.resolve_source`): so the card calls a model or dataset a Hub one exactly when training did."""
    try:
        return isinstance(resolve_source(value, "source"), str)
    except SourceNotFoundError:
        return False
