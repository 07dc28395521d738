"""An ablation study: one base pretraining recipe, variants as overrides of it, several seeds, one token budget.

`AblationStudy` holds the study file's options. `resolve_runs` turns it into one `PretrainConfig` per (variant, seed),
each in its own run folder `<output_dir>/<variant>/seed-<seed>`. Every run gets the same data, held-out documents,
batch, sequence length and number of steps (the budget in tokens), so two variants of one seed read the same rows in
the same order and differ only in what their overrides change; the options that would break that are refused in a
variant. `run_study` trains what is not finished (a half-finished run resumes from its checkpoint, a finished one is
never trained again) and `study_status` says which is which; report.py turns the finished runs into a table and plots.

The nanotron/torchtitan habit is a script per study; here a study is data (a YAML file) so that one launcher, or one
cluster job per run (`recipes/ablate.py --list` / `--run NAME`), can run any of them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from accelerate import PartialState

from ..data import load_documents
from ..evaluation import evaluate_perplexity
from ..pretraining import RECIPE_FILE_NAME, PretrainConfig, pretrain, read_metrics
from ..pretraining.build import data_sources
from ..recipe_args import RecipeArgumentError, recipe_config_from_dict
from ..runtime import init_cpu_process_group

logger = logging.getLogger("apertus_hf.ablation")

STUDY_FILE_NAME = "study.yaml"
"""The resolved study, written to its output_dir: what the runs there were trained with."""

DATA_DIR_NAME = "data"
TRAIN_FILE_NAME = "train.jsonl"
HELDOUT_FILE_NAME = "heldout.jsonl"
BITS_PER_BYTE_FILE_NAME = "bits_per_byte.json"

SAME_FOR_EVERY_RUN = (
    "data",
    "stages",
    "eval_data",
    "eval_documents",
    "streaming",
    "tokenizer",
    "seq_len",
    "per_device_batch_size",
    "gradient_accumulation_steps",
    "global_batch_size",
    "batch_ramp",
    "max_steps",
    "train_samples",
    "warmup_samples",
    "decay_samples",
    "stop_at_step",
    "init_from",
    "seed",
    "output_dir",
    "resume",
    "overwrite_output_dir",
    "record_row_ids",
    "max_eval_batches",
)
"""PretrainConfig options a variant may not override: they decide which tokens a run reads and in what order, how
much of it, where it is written and how it is scored, which every run of a study shares (the study sets them)."""

VARIANT_NAME = re.compile(r"^[A-Za-z0-9+][A-Za-z0-9_.+-]*$")

RunStatus = Literal["done", "trained", "partial", "pending"]


class StudyFolderError(FileExistsError):
    """The study's output_dir holds runs or data of another study; the message names the fix."""


@dataclass
class Variant:
    name: str = field(metadata={"help": "Name of the variant, also its folder: letters, digits, and _ . + -."})
    overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": (
                "PretrainConfig options set on top of the base recipe, e.g. {optimizer: adamw} or {model_type: llama, "
                "model_overrides: {intermediate_size: 682}}; model_overrides merge key by key with the base's."
            )
        },
    )
    description: str = field(default="", metadata={"help": "What the variant changes, for the table."})


@dataclass
class AblationStudy:
    name: str = field(default="study", metadata={"help": "Name of the study, in the table's title."})
    description: str = field(default="", metadata={"help": "What the study compares, written above the table."})
    base: str = field(
        default="recipes/configs/tiny/pretrain.yaml",
        metadata={"help": "The pretraining recipe (a PretrainConfig YAML file) every variant starts from."},
    )
    base_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": (
                "PretrainConfig options set on the base for every run (here the options a variant may not change can "
                "be set, e.g. a smaller model or batch); model_overrides merge key by key."
            )
        },
    )
    tokens: int = field(
        default=1_000_000,
        metadata={
            "help": (
                "Training tokens of every run: max_steps = tokens / (global batch rows x seq_len), which must divide "
                "it. Every variant is compared at this budget."
            )
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [1, 2, 3],
        metadata={
            "help": (
                "Seeds of the runs of each variant (model initialisation and data order). Runs of one seed read the "
                "same rows in the same order in every variant, so differences to the baseline are paired by seed."
            )
        },
    )
    baseline: str = field(default="baseline", metadata={"help": "Name of the variant the others are compared to."})
    variants: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={
            "help": (
                "The variants, each a mapping with `name`, `overrides` (PretrainConfig options on top of the base) "
                "and `description`; the baseline must be one of them."
            )
        },
    )
    output_dir: str = field(
        default="outputs/ablations/study",
        metadata={"help": "Folder of the study: study.yaml, data/, one run folder per variant and seed, the results."},
    )
    heldout_documents: int = field(
        default=32,
        metadata={
            "help": (
                "When the base has no eval_data: the documents of its data held out once, with data_seed, for every "
                "run and seed (written with the rest to output_dir/data/ as JSON Lines). 0 is refused: a study "
                "compares held-out loss."
            )
        },
    )
    data_seed: int = field(
        default=0, metadata={"help": "Seed of the held-out split and of the mixing of the base's data sources."}
    )
    bits_per_byte: bool = field(
        default=True,
        metadata={
            "help": (
                "Score each finished model on the held-out text with apertus_hf.evaluation.evaluate_perplexity "
                "(bits per byte: comparable across tokenizers; needs text files, not pre-tokenized folders)."
            )
        },
    )
    bits_per_byte_batch_size: int = field(default=8, metadata={"help": "Batch size of the bits-per-byte evaluation."})

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"tokens={self.tokens} must be >= 1.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must list at least one seed, each once.")
        if self.heldout_documents < 1:
            raise ValueError(
                f"heldout_documents={self.heldout_documents} must be >= 1: a study compares held-out loss."
            )
        self.variants = [self._variant(index, entry) for index, entry in enumerate(self.variants)]
        names = [variant.name for variant in self.variants]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"Variant names must be unique; {duplicates} appear more than once.")
        if self.baseline not in names:
            raise ValueError(f"baseline={self.baseline!r} is not a variant; the variants are {names}.")
        for overrides, where in [(self.base_overrides, "base_overrides")] + [
            (variant.overrides, f"variant {variant.name!r}") for variant in self.variants
        ]:
            unknown = set(overrides) - {option.name for option in dataclasses.fields(PretrainConfig)}
            if unknown:
                raise ValueError(
                    f"{where} sets {sorted(unknown)}, which are not PretrainConfig options (`recipes/pretrain.py "
                    "--help` lists them)."
                )
        for variant in self.variants:
            fixed = sorted(set(variant.overrides) & set(SAME_FOR_EVERY_RUN))
            if fixed:
                raise ValueError(
                    f"Variant {variant.name!r} overrides {fixed}, which every run of a study shares (the data, its "
                    "order and amount, the batch, the run folder). Set them in base_overrides for all variants, or "
                    "make a separate study."
                )

    @staticmethod
    def _variant(index: int, entry: Any) -> Variant:
        if isinstance(entry, Variant):
            return entry
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ValueError(f"variants[{index}] must be a mapping with a `name` (and `overrides`); got {entry!r}.")
        try:
            variant = recipe_config_from_dict(Variant, entry, f"variants[{index}]")
        except RecipeArgumentError as error:
            raise ValueError(str(error)) from error
        if not VARIANT_NAME.match(variant.name):
            raise ValueError(
                f"Variant name {variant.name!r} is also a folder name: use letters, digits and _ . + - only."
            )
        return variant

    @property
    def run_names(self) -> list[str]:
        """`<variant>/seed-<seed>` of every run: the variants in the study's order, each over the seeds."""
        return [run_name(variant.name, seed) for variant in self.variants for seed in self.seeds]

    def variant(self, name: str) -> Variant:
        return next(variant for variant in self.variants if variant.name == name)

    def save(self, folder: Path) -> Path:
        path = folder / STUDY_FILE_NAME
        path.write_text(yaml.safe_dump(_plain(self), sort_keys=False, allow_unicode=True))
        return path


def run_name(variant: str, seed: int) -> str:
    return f"{variant}/seed-{seed}"


def load_study(path: str | Path, overrides: Mapping[str, Any] | None = None) -> AblationStudy:
    """The study of a YAML file, with `overrides` (e.g. from the command line) on top."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{path} must hold a mapping of AblationStudy options; got {type(values).__name__}.")
    return recipe_config_from_dict(AblationStudy, {**values, **(overrides or {})}, str(path))


def _plain(value: Any) -> Any:
    """Dataclasses as dicts and tuples as lists: what YAML writes and reads back unchanged."""
    if dataclasses.is_dataclass(value):
        return {option.name: _plain(getattr(value, option.name)) for option in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`overrides` on `base`; model_overrides merge key by key, so a variant changes one shape and keeps the rest."""
    merged = {**base, **copy.deepcopy(dict(overrides))}
    if "model_overrides" in overrides:
        merged["model_overrides"] = {**base.get("model_overrides", {}), **overrides["model_overrides"]}
    return merged


def base_recipe(study: AblationStudy) -> dict[str, Any]:
    """Every option of the base recipe (PretrainConfig's defaults, the file, base_overrides on top), before the study
    sets its shared ones."""
    path = Path(study.base)
    if not path.is_file():
        raise FileNotFoundError(
            f"base={study.base} is not a file; give a pretraining recipe such as {AblationStudy.base}."
        )
    values = _merge(_plain(PretrainConfig()), yaml.safe_load(path.read_text()) or {})
    values = _merge(values, study.base_overrides)
    if values.get("stages"):
        raise ValueError(
            f"The base recipe {study.base} (with base_overrides) has data stages; a study trains one stage of `data`."
        )
    return values


def heldout_source(study: AblationStudy, base: Mapping[str, Any]) -> Literal["eval_data", "split", "stream"]:
    """Where the study's held-out documents come from: the base's eval_data (every run scores the same documents), a
    split of its in-memory data written once to output_dir/data/ (likewise), or, for streamed data without eval_data,
    the first eval_documents of each run's stream (the same for every variant of a seed, other ones for each seed)."""
    if base.get("eval_data"):
        return "eval_data"
    if not base.get("streaming"):
        return "split"
    if not base["eval_documents"]:
        raise ValueError(
            f"The base recipe {study.base} streams its data without eval_data or eval_documents; a study "
            "compares held-out loss: give eval_data (or eval_documents) in base_overrides."
        )
    if study.bits_per_byte:
        raise ValueError(
            f"The base recipe {study.base} streams its data and has no eval_data, so there is no held-out text file to "
            "score bits per byte on: give eval_data (text files) in base_overrides, or set bits_per_byte: false."
        )
    return "stream"


def resolve_runs(study: AblationStudy) -> dict[str, PretrainConfig]:
    """The PretrainConfig of every run, by run name. Raises ValueError naming the variant whose options are invalid."""
    base = base_recipe(study)
    output_dir = Path(study.output_dir)
    held_out = heldout_source(study, base)
    if held_out == "split":
        data_dir = output_dir / DATA_DIR_NAME
        base["data"] = [{"path": str(data_dir / TRAIN_FILE_NAME)}]
        base["eval_data"] = [{"path": str(data_dir / HELDOUT_FILE_NAME)}]
    if held_out != "stream":
        base["eval_documents"] = 0
    if base["train_samples"] is not None:
        raise ValueError(
            f"The base recipe {study.base} counts its schedule in samples (train_samples); a study counts steps from "
            "its token budget: set train_samples, warmup_samples and decay_samples to null in base_overrides (and "
            "warmup_steps, decay_fraction)."
        )
    if base.get("batch_ramp"):
        raise ValueError(
            f"The base recipe {study.base} ramps its batch (batch_ramp={base['batch_ramp']}); a study counts its budget "
            "in steps of one batch size: set batch_ramp: [] in base_overrides."
        )
    # The report checks from these that the variants of a seed read the same rows; a stream has no row indices.
    base["record_row_ids"] = not base["streaming"]
    base["resume"] = True
    base["overwrite_output_dir"] = False
    base["stop_at_step"] = None
    base.pop("max_steps", None)
    rows_per_step = base["global_batch_size"] or base["per_device_batch_size"] * base["gradient_accumulation_steps"]
    seq_len = base["seq_len"]
    tokens_per_step = rows_per_step * seq_len
    if study.tokens % tokens_per_step:
        steps = max(1, study.tokens // tokens_per_step)
        raise ValueError(
            f"tokens={study.tokens:,} is not a whole number of steps of {tokens_per_step:,} tokens ({rows_per_step} "
            f"rows of {seq_len}); use e.g. tokens: {steps * tokens_per_step}."
        )
    # The global batch, not the per-device one, is fixed: on more processes the run takes fewer accumulation steps and
    # reads the same rows per optimizer step, so the budget holds on any cluster.
    base["global_batch_size"] = rows_per_step
    base["max_steps"] = study.tokens // tokens_per_step
    runs = {}
    for variant in study.variants:
        for seed in study.seeds:
            values = _merge(base, variant.overrides)
            values["seed"] = seed
            values["output_dir"] = str(output_dir / variant.name / f"seed-{seed}")
            name = run_name(variant.name, seed)
            try:
                runs[name] = recipe_config_from_dict(PretrainConfig, values, f"variant {variant.name!r}")
            except (ValueError, TypeError) as error:
                raise ValueError(f"Variant {variant.name!r} of study {study.name!r}: {error}") from error
    return runs


def prepare_study_folder(study: AblationStudy) -> None:
    """Write study.yaml and, when the base has no eval_data, the training and held-out documents, once; refuse a
    folder that holds another study's or other data (StudyFolderError)."""
    output_dir = Path(study.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    study_file = output_dir / STUDY_FILE_NAME
    if study_file.is_file():
        saved = yaml.safe_load(study_file.read_text())
        changed = sorted(key for key in _SHARED_STUDY_KEYS if saved.get(key) != _plain(getattr(study, key)))
        if changed:
            raise StudyFolderError(
                f"{output_dir} holds a study whose {changed} differ from this one's, so its runs are not comparable "
                "with this study's. Choose another output_dir (or restore the study file's values). Adding variants "
                "or seeds to a study is allowed."
            )
    study.save(output_dir)
    base = base_recipe(study)
    if heldout_source(study, base) != "split":
        return
    data_dir = output_dir / DATA_DIR_NAME
    train_path, heldout_path = data_dir / TRAIN_FILE_NAME, data_dir / HELDOUT_FILE_NAME
    if train_path.is_file() and heldout_path.is_file():
        return
    documents = load_documents(
        data_sources(base["data"], "data"), seed=study.data_seed, on_bad_record=base["on_bad_record"]
    )
    if study.heldout_documents >= len(documents):
        raise ValueError(
            f"heldout_documents={study.heldout_documents} would hold out all {len(documents)} documents of the base's "
            "data; lower it."
        )
    split = documents.train_test_split(test_size=study.heldout_documents, seed=study.data_seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    for path, part in ((train_path, split["train"]), (heldout_path, split["test"])):
        temporary = path.with_suffix(".partial")
        with temporary.open("w", encoding="utf-8") as file:
            for text in part["text"]:
                file.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        temporary.replace(path)
    logger.info(
        "Study data: %d training and %d held-out documents in %s (the same for every run).",
        len(split["train"]),
        len(split["test"]),
        data_dir,
    )


_SHARED_STUDY_KEYS = ("base", "base_overrides", "tokens", "heldout_documents", "data_seed")
"""The study options every run depends on: a folder trained with other values holds another study."""


RUN_NEUTRAL_OPTIONS = (
    "stop_at_step",
    "resume",
    "overwrite_output_dir",
    "cpu_threads",
    "progress_bar",
    "report_to",
    "hub_model_id",
    "hub_private_repo",
)
"""Options a run may have been launched with differently without changing what it trains (e.g. a cluster job that
stopped at a step to fit its time slot)."""


def check_run_folder(config: PretrainConfig) -> None:
    """Refuse a run folder whose saved options differ from the run's: another study or an edited variant trained it,
    and resuming would mix two runs (StudyFolderError)."""
    saved_file = Path(config.output_dir) / RECIPE_FILE_NAME
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text())
    wanted = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config)))
    keys = (wanted.keys() | saved.keys()) - set(RUN_NEUTRAL_OPTIONS)
    changed = sorted(key for key in keys if saved.get(key) != wanted.get(key))
    if changed:
        raise StudyFolderError(
            f"{config.output_dir} holds a run trained with other values of {changed} than this study's variant. "
            "Move that folder away (it is kept, not replaced) or choose another output_dir for the study."
        )


def run_status(config: PretrainConfig, bits_per_byte: bool) -> RunStatus:
    """done: trained to the budget (and scored, with bits_per_byte); trained: trained but not yet scored; partial: a
    run folder with records or checkpoints to resume; pending: nothing yet."""
    run_dir = Path(config.output_dir)
    metrics = run_dir / "metrics.jsonl"
    trained = (run_dir / "model" / "config.json").is_file() and metrics.is_file()
    if trained:
        records = read_metrics(metrics)
        trained = bool(records) and records[-1]["step"] == config.max_steps
    if trained:
        return "done" if not bits_per_byte or (run_dir / BITS_PER_BYTE_FILE_NAME).is_file() else "trained"
    return "partial" if run_dir.exists() and any(run_dir.iterdir()) else "pending"


def study_status(study: AblationStudy) -> dict[str, RunStatus]:
    runs = resolve_runs(study)
    return {name: run_status(config, study.bits_per_byte) for name, config in runs.items()}


def run_one(study: AblationStudy, name: str) -> RunStatus:
    """Train (or resume) the run `name` (`<variant>/seed-<seed>`) and score it; a finished run is left as it is. Call
    it on every process of an `accelerate launch`."""
    runs = resolve_runs(study)
    if name not in runs:
        raise KeyError(f"No run {name!r} in study {study.name!r}; `--list` shows its runs: {list(runs)}.")
    config = runs[name]
    # Every process of the launch reads the study folder; one writes it (on a cluster all share one file system).
    init_cpu_process_group()
    state = PartialState()
    if state.is_main_process:
        prepare_study_folder(study)
    state.wait_for_everyone()
    check_run_folder(config)
    status = run_status(config, study.bits_per_byte)
    if status == "done":
        logger.info("%s is finished; not trained again.", name)
        return status
    if status in ("partial", "pending"):
        result = pretrain(config)
        if not result.is_main_process:
            return "trained"
        if result.interrupted:
            return "partial"
    if study.bits_per_byte:
        score_bits_per_byte(study, config)
    return run_status(config, study.bits_per_byte)


def score_bits_per_byte(study: AblationStudy, config: PretrainConfig) -> Path:
    """Bits per byte of the run's exported model on the held-out text, written to the run folder."""
    run_dir = Path(config.output_dir)
    output = run_dir / BITS_PER_BYTE_FILE_NAME
    evaluate_perplexity(
        run_dir / "model",
        [str(source["path"]) for source in config.eval_data],
        group_by="file",
        max_length=config.seq_len,
        batch_size=study.bits_per_byte_batch_size,
        output=output,
    )
    return output


def run_study(study: AblationStudy, launch: Callable[[str], None]) -> dict[str, RunStatus]:
    """Run every run that is not done, in the study's order, each by `launch(name)` (e.g. a fresh
    `accelerate launch recipes/ablate.py --run NAME` process, or `run_one` in this process); return the statuses."""
    prepare_study_folder(study)
    runs = resolve_runs(study)
    for config in runs.values():
        check_run_folder(config)
    for name, config in runs.items():
        status = run_status(config, study.bits_per_byte)
        if status == "done":
            logger.info("%s: finished before; skipped.", name)
            continue
        if status == "partial":
            logger.info("%s: resuming.", name)
        launch(name)
    return {name: run_status(config, study.bits_per_byte) for name, config in runs.items()}
