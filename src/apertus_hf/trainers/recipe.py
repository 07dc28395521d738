"""What the post-training recipes (SFT, DPO, QRPO, reward models) share: their own options, how a recipe is parsed,
and the builders.

A recipe is two dataclasses, as in alignment-handbook's scripts: the trainer's TRL config (`SFTConfig`, `DPOConfig`,
our `QRPOConfig`), which owns every `TrainingArguments` option (output_dir, learning_rate, warmup_steps, save_steps,
hub_model_id, ...), and a small `PostTrainingArguments` with only what TRL has no field for: the model and tokenizer
to load, the data, LoRA, AdEMAMix, resume and the license for the card. A YAML recipe and `--key value` overrides
fill both (`PostTrainingRecipe.parse`), each key going to the class that has it; the recipe's own defaults for the
TRL config (the embedded default runs) apply before the YAML.

The builders turn the two into the pieces a TRL trainer takes: `peft_config` (a PEFT `LoraConfig` or None),
`optimizer_cls_and_kwargs` (AdEMAMix through `Trainer`'s own hook), `load_post_training_dataset`,
`load_policy_model` (or `load_reward_model`, for a reward model) and `chat_tokenizer`.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint
from trl.trainer.reward_trainer import suppress_seqcls_warning

from ..data.tables import load_dataset_splits
from ..optim import AdEMAMix
from ..recipe_args import read_recipe_args, recipe_configs_from_dict, recipe_help
from ..runtime import check_attn_implementation, init_cpu_process_group, resolve_attn_implementation, resolve_source
from ..tokenization import load_chat_tokenizer

logger = logging.getLogger(__name__)

# The score head of `AutoModelForSequenceClassification` (transformers' GenericForSequenceClassification).
REWARD_HEAD_NAME = "score"
TRAINING_ARGUMENTS_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"


class PostTrainingRecipeError(ValueError):
    """A post-training recipe option or input that cannot work, with the fix in the message."""


@dataclass
class PostTrainingArguments:
    """The options of a post-training recipe that its TRL config has no field for. The TRL config owns the rest."""

    # Model
    model_name_or_path: str = field(
        default="outputs/pretrain-tiny/model",
        metadata={
            "help": (
                "Model to post-train: a local folder or a Hub id (e.g. swiss-ai/Apertus-8B-2509). The default is the "
                "model `make pretrain` exports."
            )
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or Hub id, or 'apertus' for the real Apertus tokenizer built offline; default: "
            "the model's own."
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": (
                "Attention backend: auto (flash_attention_2 on CUDA when flash-attn is installed, else sdpa), sdpa, "
                "eager, flex_attention or flash_attention_2."
            )
        },
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={"help": "dtype the weights are loaded in; with bf16 mixed precision keep float32 master weights."},
    )

    # Data
    dataset: str = field(
        default="",
        metadata={
            "help": (
                "Training data: a .jsonl/.json/.parquet/.csv file, a folder of them, a folder written by "
                "`Dataset.save_to_disk`, or a Hub dataset id."
            )
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset` to train on."})
    eval_dataset_split: str | None = field(
        default=None, metadata={"help": "Split of `dataset` to evaluate on; None: no separate evaluation split."}
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={
            "help": "When there is no eval split: the fraction of the training rows held out for evaluation (0: none). "
            "Without evaluation data the run does not evaluate, whatever eval_strategy says."
        },
    )

    # LoRA
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    merge_lora: bool = field(
        default=True,
        metadata={"help": "With use_lora: also save base + adapters merged into output_dir/merged (a plain model)."},
    )
    lora_target_modules: list[str] | str = field(
        default="all-linear",
        metadata={"help": "Modules that get adapters: 'all-linear' or names such as [q_proj, k_proj, v_proj, o_proj]."},
    )

    # Optimizer
    use_ademamix: bool = field(
        default=False,
        metadata={
            "help": (
                "Train with apertus_hf.optim.AdEMAMix (the optimizer of Apertus' SFT) instead of the `optim` of the "
                "TRL config; it takes learning_rate, adam_beta1, adam_beta2, adam_epsilon and weight_decay from there."
            )
        },
    )
    ademamix_alpha: float = field(default=8.0, metadata={"help": "AdEMAMix alpha (weight of the slow EMA)."})
    ademamix_beta3: float = field(default=0.999, metadata={"help": "AdEMAMix beta3 (decay of the slow EMA)."})

    # Run
    resume: bool = field(
        default=True,
        metadata={
            "help": "Resume from the newest checkpoint in output_dir when there is one (resume_from_checkpoint names "
            "another one)."
        },
    )
    license: str | None = field(
        default=None,
        metadata={
            "help": "Hub license id of the trained model for its card (e.g. apache-2.0); None: unknown, and the card "
            "says so. Mind the licenses of the base model and the data."
        },
    )

    def __post_init__(self):
        try:
            check_attn_implementation(self.attn_implementation)
        except ValueError as error:
            raise PostTrainingRecipeError(str(error)) from None
        if not 0.0 <= self.eval_fraction < 1.0:
            raise PostTrainingRecipeError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.use_lora and self.lora_r < 1:
            raise PostTrainingRecipeError(f"lora_r must be >= 1 with use_lora, got {self.lora_r}.")

    @property
    def has_evaluation(self) -> bool:
        """Whether the recipe's data has evaluation rows (an eval split, or a held-out fraction)."""
        return self.eval_dataset_split is not None or self.eval_fraction > 0


# What the post-training recipes set in their TRL config where the class's default does not suit them (written out
# as before the TRL config owned these options); each recipe adds its own on top.
POST_TRAINING_CONFIG_DEFAULTS: dict[str, Any] = {
    "seed": 42,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "linear",
    # transformers reads a warmup_steps below 1 as the fraction of the steps spent warming up.
    "warmup_steps": 0.03,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "num_train_epochs": 1.0,
    "max_steps": -1,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    # TRL's configs default to gradient checkpointing and bf16; a CPU default run wants neither.
    "activation_checkpointing": False,
    "bf16": False,
    "logging_steps": 5,
    "save_steps": 500,
    "save_total_limit": 2,
    "report_to": "none",
    "hub_model_id": None,
    "hub_private_repo": None,
}

# The recipes publish with apertus_hf's card after training (recipes/*.py); the trainer never pushes.
HUB_OPTIONS_HELP = {
    "hub_model_id": "After training, publish the final model (output_dir, or output_dir/merged under LoRA) with "
    "apertus_hf's model card to this Hub repo (ORG/NAME). The trainer itself never pushes (push_to_hub is refused).",
    "hub_private_repo": "Visibility of the Hub repo when the recipe creates it: true, false, or null for the "
    "namespace's default.",
}

# The default TRL config of each recipe, by stage, as `PostTrainingRecipe.default_config_values` returns it.
_DEFAULT_CONFIG_VALUES: dict[str, dict[str, Any]] = {}


def plain_value(value: Any) -> Any:
    """An option's value as YAML writes it: enums by value, dataclasses (AcceleratorConfig) as mappings."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {key: plain_value(item) for key, item in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(item) for item in value]
    if isinstance(value, dict):
        return {key: plain_value(item) for key, item in value.items()}
    return value


ArgumentsType = TypeVar("ArgumentsType", bound=PostTrainingArguments)
ConfigType = TypeVar("ConfigType", bound=TrainingArguments)


@dataclass(frozen=True)
class PostTrainingRecipe(Generic[ArgumentsType, ConfigType]):
    """One post-training recipe: its stage, its two option classes, its defaults for the TRL config, and where the
    docs of the TRL config are."""

    stage: Literal["sft", "dpo", "qrpo", "reward"]
    arguments_class: type[ArgumentsType]
    config_class: type[ConfigType]
    config_defaults: Mapping[str, Any]
    recipe_file_name: str
    """The file in output_dir that holds the resolved recipe; `--config` loads it again."""
    config_docs: str
    task_type: Literal["CAUSAL_LM", "SEQ_CLS"] = "CAUSAL_LM"
    """What the trained model is: a causal LM, or a reward model (a sequence classifier with one score, SEQ_CLS)."""

    def configs(
        self, values: Mapping[str, Any] | None = None, source: str | Mapping[str, str] = "the recipe"
    ) -> tuple[ArgumentsType, ConfigType]:
        """(recipe arguments, TRL config) from `values` (keys of either class) over the recipe's defaults.

        Sets up the CPU process group of a multi-process CPU run first, since the TRL config sets up the devices, and
        has the config use it.
        """
        # Before the run's config: transformers points its global DeepSpeed config at the newest TrainingArguments
        # (a weak reference), so a default config built later would take the place of the run's.
        self.default_config_values()
        return self._build(values or {}, source)

    def default_config_values(self) -> dict[str, Any]:
        """The options of the recipe's default TRL config, as this machine resolves them, in plain values."""
        if self.stage not in _DEFAULT_CONFIG_VALUES:
            _, args = self._build({}, "the recipe")
            _DEFAULT_CONFIG_VALUES[self.stage] = {
                option.name: plain_value(getattr(args, option.name))
                for option in dataclasses.fields(args)
                if option.init
            }
        return _DEFAULT_CONFIG_VALUES[self.stage]

    def _build(self, values: Mapping[str, Any], source: str | Mapping[str, str]) -> tuple[ArgumentsType, ConfigType]:
        values = dict(values)
        sources = dict.fromkeys(self.config_defaults, "the recipe's defaults")
        sources.update(dict.fromkeys(values, source) if isinstance(source, str) else source)
        runtime: dict[str, Any] = {"dataloader_pin_memory": torch.cuda.is_available()}  # on CPU pinning only warns
        if init_cpu_process_group():
            given = values.get("accelerator_config")
            values["accelerator_config"] = {**(given if isinstance(given, dict) else {}), "use_configured_state": True}
        classes = (self.arguments_class, self.config_class)
        recipe, args = recipe_configs_from_dict(classes, {**runtime, **self.config_defaults, **values}, sources)
        if args.deepspeed_plugin is not None:
            defer_deepspeed_to_training_arguments(args)
        if args.push_to_hub:
            raise PostTrainingRecipeError(
                "push_to_hub would make the trainer upload TRL's model card with every save; set hub_model_id only: "
                "the recipe publishes the final model with apertus_hf's card (apertus_hf.hub.publish)."
            )
        return recipe, args

    def parse(
        self, argv: Sequence[str] | None = None, description: str | None = None
    ) -> tuple[ArgumentsType, ConfigType]:
        """(recipe arguments, TRL config) from `--config recipe.yaml` and `--key value` (default: sys.argv[1:]).
        `--help` prints the options: ours, then those of the TRL config that the recipe sets or the class adds."""
        documentation = {self.config_class: f"{self.config_docs} (and TrainingArguments': {TRAINING_ARGUMENTS_DOCS})"}
        classes = [self.arguments_class, self.config_class]
        help_text = recipe_help(classes, self.config_defaults, documentation, description, HUB_OPTIONS_HELP)
        return self.configs(*read_recipe_args(argv, help_text))


# The DeepSpeed options that TrainingArguments also have (max_grad_norm, gradient_accumulation_steps and the batch
# sizes). accelerate_configs/zero3.yaml sets some for pretraining, whose recipe overwrites them with its own.
DEEPSPEED_OPTIONS_OF_THE_RECIPE = (
    "gradient_clipping",
    "gradient_accumulation_steps",
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
)


def defer_deepspeed_to_training_arguments(args: TrainingArguments) -> None:
    """Set the DeepSpeed options that `args` also has to "auto", which `Trainer` fills from `args`: the recipe, not the
    accelerate config, owns clipping and the batch shape (as in pretraining). Left as the config file gives them,
    `Trainer` refuses a run whose recipe differs (e.g. `ds gradient_clipping=0.1 vs hf max_grad_norm=1.0`), and only
    after the reference log-probs of QRPO were computed."""
    config = args.deepspeed_plugin.deepspeed_config
    for option in DEEPSPEED_OPTIONS_OF_THE_RECIPE:
        if config.get(option, "auto") != "auto":
            logger.info("DeepSpeed %s=%s of the accelerate config gives way to the recipe's.", option, config[option])
        config[option] = "auto"


def peft_config(recipe: PostTrainingArguments, task_type: Literal["CAUSAL_LM", "SEQ_CLS"] = "CAUSAL_LM"):
    """The PEFT `LoraConfig` of `recipe`, or None without `use_lora`. For a reward model (SEQ_CLS) the new score head
    is trained and saved whole beside the adapters (it has no pretrained weights to adapt)."""
    if not recipe.use_lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=recipe.lora_target_modules,
        modules_to_save=[REWARD_HEAD_NAME] if task_type == "SEQ_CLS" else None,
    )


def optimizer_cls_and_kwargs(recipe: PostTrainingArguments, args: TrainingArguments) -> tuple[type, dict] | None:
    """`Trainer(optimizer_cls_and_kwargs=...)` for AdEMAMix, or None to keep the optimizer `args.optim` names.

    Through this hook `Trainer` still builds the parameter groups (weight_decay, none on norms and biases) after PEFT
    and DeepSpeed have wrapped the model, so AdEMAMix works in every setting the stock optimizers do.
    """
    if not recipe.use_ademamix:
        return None
    # `Trainer` passes these kwargs as they are: without `lr` the optimizer would keep its own default, and the
    # scheduler would scale that instead of the recipe's learning rate.
    return AdEMAMix, {
        "lr": args.learning_rate,
        "alpha": recipe.ademamix_alpha,
        "betas": (args.adam_beta1, args.adam_beta2, recipe.ademamix_beta3),
        "eps": args.adam_epsilon,
    }


def without_evaluation(args: ConfigType, has_evaluation: bool) -> ConfigType:
    """`args`, with evaluation turned off when there are no evaluation rows (the recipes' defaults evaluate, and
    `Trainer` refuses an eval_strategy without an eval dataset)."""
    if has_evaluation or (args.eval_strategy == "no" and not args.eval_on_start):
        return args
    logger.info("No evaluation data (eval_dataset_split, eval_fraction): the run does not evaluate.")
    return dataclasses.replace(args, eval_strategy="no", eval_on_start=False)


def load_post_training_dataset(recipe: PostTrainingArguments, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, eval) datasets of `recipe`: local files, a `save_to_disk` folder, or a Hub id.

    Without an eval split, `eval_fraction` of the training rows (shuffled with `seed`) are held out; with neither, eval
    is None.
    """
    if not recipe.dataset:
        raise PostTrainingRecipeError("No dataset: set `dataset` to a data file, a folder or a Hub dataset id.")
    splits = load_dataset_splits(recipe.dataset)
    if recipe.dataset_split not in splits:
        raise PostTrainingRecipeError(
            f"{recipe.dataset} has no split {recipe.dataset_split!r}; it has {sorted(splits)}. Set dataset_split."
        )
    train = splits[recipe.dataset_split]
    if recipe.eval_dataset_split is not None:
        if recipe.eval_dataset_split not in splits:
            raise PostTrainingRecipeError(
                f"{recipe.dataset} has no split {recipe.eval_dataset_split!r}; it has {sorted(splits)}. Set "
                "eval_dataset_split (or null for none)."
            )
        return train, splits[recipe.eval_dataset_split]
    if recipe.eval_fraction > 0:
        if len(train) < 2:
            raise PostTrainingRecipeError(
                f"{recipe.dataset} has {len(train)} row(s), too few to hold out eval_fraction={recipe.eval_fraction} "
                "for evaluation; set eval_fraction: 0 or give more rows."
            )
        held_out = train.train_test_split(test_size=recipe.eval_fraction, seed=seed)
        return held_out["train"], held_out["test"]
    return train, None


def check_model_source(source: str, what: str = "model_name_or_path") -> str:
    """`source` as `from_pretrained` takes it, checked by `runtime.resolve_source` with the post-training hint."""
    return str(
        resolve_source(
            source,
            what,
            "The default is the model `make pretrain` exports; run it first, or set it to a model folder or Hub id.",
        )
    )


def load_policy_model(
    recipe: PostTrainingArguments, name_or_path: str | None = None, what: str = "model_name_or_path"
) -> PreTrainedModel:
    """The causal LM `recipe` trains (or `name_or_path`, the option `what`), through the Auto classes (so ours for
    `apertus`)."""
    source = check_model_source(name_or_path or recipe.model_name_or_path, what)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return AutoModelForCausalLM.from_pretrained(
        source, dtype=recipe.dtype, attn_implementation=resolve_attn_implementation(recipe.attn_implementation, device)
    )


def load_sequence_classifier(source: str, dtype: str, attn_implementation: str | None = None) -> PreTrainedModel:
    """A reward model (`AutoModelForSequenceClassification`, one score) from `source`. From a causal LM's folder it
    takes the transformer's weights and leaves the LM head out; its score head is new, initialised from the global
    random state (seed it first), and the load does not warn about either."""
    with suppress_seqcls_warning():
        return AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=dtype, attn_implementation=attn_implementation
        )


def load_reward_model(recipe: PostTrainingArguments) -> PreTrainedModel:
    """The reward model `recipe` trains, from the causal LM (or reward model) `recipe.model_name_or_path`, through
    the Auto classes (so ours for `apertus`); see `load_sequence_classifier`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return load_sequence_classifier(
        check_model_source(recipe.model_name_or_path),
        recipe.dtype,
        resolve_attn_implementation(recipe.attn_implementation, device),
    )


def chat_tokenizer(recipe: PostTrainingArguments) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer (tokenizer_name_or_path, else the model's); it must have a chat template and a pad
    token."""
    if recipe.tokenizer_name_or_path:
        return load_chat_tokenizer(recipe.tokenizer_name_or_path, "tokenizer_name_or_path")
    return load_chat_tokenizer(check_model_source(recipe.model_name_or_path), "model_name_or_path")


def resume_checkpoint(recipe: PostTrainingArguments, args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: `resume_from_checkpoint` when set, else the newest in output_dir when `resume`
    is on, else None."""
    if args.resume_from_checkpoint:
        return args.resume_from_checkpoint
    if not recipe.resume or not Path(args.output_dir).is_dir():
        return None
    checkpoint = get_last_checkpoint(args.output_dir)
    if checkpoint is not None:
        logger.info("Resuming from %s", checkpoint)
    return checkpoint
