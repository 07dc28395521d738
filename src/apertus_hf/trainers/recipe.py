"""What the post-training recipes (SFT, QRPO, DPO) share: model, data, LoRA, optimizer and trainer options.

Each recipe's config dataclass extends `PostTrainingRecipeConfig` with its own fields, is filled by
`apertus_hf.recipe_args.parse_recipe_args` (YAML + `--key value`), and turns into the TRL/`transformers` objects
through the builders here: `training_arguments` (a TRL config such as `SFTConfig` or our `QRPOConfig`),
`peft_config` (a PEFT `LoraConfig` or None), `optimizer_cls_and_kwargs` (AdEMAMix through `Trainer`'s own hook)
and `load_post_training_dataset`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import yaml
from accelerate import PartialState
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from ..optim import AdEMAMix
from ..runtime import check_attn_implementation, resolve_attn_implementation
from ..tokenization import APERTUS_CHAT_TEMPLATE, APERTUS_TOKENIZER_NAME, NAMED_SPECIAL_TOKENS, load_tokenizer
from ..tokenization.apertus import apertus_generation_config
from ..tokenization.special_tokens import ASSISTANT_END_TOKEN_ID

logger = logging.getLogger(__name__)

TrainingArgumentsType = TypeVar("TrainingArgumentsType", bound=TrainingArguments)

LOCAL_DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class PostTrainingRecipeError(ValueError):
    """A post-training recipe option or input that cannot work, with the fix in the message."""


@dataclass
class PostTrainingRecipeConfig:
    # Run
    output_dir: str = field(
        default="outputs/post-training",
        metadata={"help": "Folder of the run: checkpoints, the final model (or LoRA adapter), logs and model card."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the data order, dropout and LoRA initialisation."})
    resume: bool = field(
        default=True, metadata={"help": "Resume from the newest checkpoint in output_dir when there is one."}
    )

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
            "help": "When there is no eval split: the fraction of the training rows held out for evaluation (0: none)."
        },
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Longest tokenized sequence (prompt + completion); longer ones are truncated."}
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

    # Optimisation
    optimizer: Literal["adamw_torch", "ademamix"] = field(
        default="adamw_torch",
        metadata={"help": "adamw_torch, or ademamix (apertus_hf.optim.AdEMAMix, the optimizer of Apertus' SFT)."},
    )
    ademamix_alpha: float = field(default=8.0, metadata={"help": "AdEMAMix alpha (weight of the slow EMA)."})
    ademamix_beta3: float = field(default=0.999, metadata={"help": "AdEMAMix beta3 (decay of the slow EMA)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of the steps spent warming up."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay (not on norms and biases)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training data."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 lets num_train_epochs decide."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Rows per device and micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward (gradient checkpointing)."}
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPU)."})

    # Logging, checkpoints, Hub
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every this many optimizer steps."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every this many optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (oldest removed first)."})
    report_to: list[str] = field(
        default_factory=list, metadata={"help": "Trackers for transformers' integrations, e.g. [tensorboard]."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Push the final model and its model card to this Hub repo (user/name)."}
    )
    hub_private_repo: bool = field(default=True, metadata={"help": "Create the Hub repo private."})
    trainer_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": (
                "Any other field of the trainer's TrainingArguments/TRL config, passed through as is, e.g. "
                "{eval_steps: 50, dataloader_num_workers: 2}."
            )
        },
    )

    def __post_init__(self):
        try:
            check_attn_implementation(self.attn_implementation)
        except ValueError as error:
            raise PostTrainingRecipeError(str(error)) from None
        if not 0.0 <= self.eval_fraction < 1.0:
            raise PostTrainingRecipeError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise PostTrainingRecipeError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.use_lora and self.lora_r < 1:
            raise PostTrainingRecipeError(f"lora_r must be >= 1 with use_lora, got {self.lora_r}.")


def training_arguments(
    recipe: PostTrainingRecipeConfig, arguments_class: type[TrainingArgumentsType], **recipe_specific: Any
) -> TrainingArgumentsType:
    """The trainer config (`SFTConfig`, `DPOConfig`, `QRPOConfig`, ...) for `recipe`; build it before the model, so
    that under ZeRO-3 `from_pretrained` loads the weights already sharded.

    The shared recipe fields map onto `TrainingArguments`; `recipe_specific` adds the trainer's own fields; then
    `recipe.trainer_args` is applied on top, so anything the trainer supports can be set from the YAML.
    """
    values: dict[str, Any] = {"dataloader_pin_memory": torch.cuda.is_available()}  # on CPU pinning only warns
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Processes on CPU talk through gloo, and the state must exist before the config, which otherwise builds its
        # own: DeepSpeed would pick a backend this torch lacks, and plain DDP would not form a group (in both cases
        # each rank trains alone). DeepSpeed needs the backend named; DDP needs the state told it runs on CPU.
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            PartialState(backend="gloo")
        else:
            PartialState(cpu=True)
        values["accelerator_config"] = {"use_configured_state": True}
    values |= {
        "output_dir": recipe.output_dir,
        "seed": recipe.seed,
        "learning_rate": recipe.learning_rate,
        "lr_scheduler_type": recipe.lr_scheduler_type,
        "warmup_steps": recipe.warmup_ratio,
        "weight_decay": recipe.weight_decay,
        "max_grad_norm": recipe.max_grad_norm,
        "num_train_epochs": recipe.num_train_epochs,
        "max_steps": recipe.max_steps,
        "per_device_train_batch_size": recipe.per_device_train_batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "activation_checkpointing": recipe.activation_checkpointing,
        "gradient_checkpointing": None,  # the deprecated alias; TRL configs default it to True
        "bf16": recipe.bf16,
        "logging_steps": recipe.logging_steps,
        "save_steps": recipe.save_steps,
        "save_total_limit": recipe.save_total_limit,
        "report_to": list(recipe.report_to) or "none",
        "push_to_hub": recipe.hub_model_id is not None,
        "hub_model_id": recipe.hub_model_id,
        "hub_private_repo": recipe.hub_private_repo,
        **recipe_specific,
    }
    known = {entry.name for entry in dataclasses.fields(arguments_class)}
    unknown = sorted(set(recipe.trainer_args) - known)
    if unknown:
        raise PostTrainingRecipeError(
            f"trainer_args has {unknown}, which {arguments_class.__name__} does not have; see its documentation for "
            "the fields it takes."
        )
    values.update(recipe.trainer_args)
    return arguments_class(**{key: value for key, value in values.items() if key in known})


def peft_config(recipe: PostTrainingRecipeConfig):
    """The PEFT `LoraConfig` of `recipe`, or None without `use_lora`."""
    if not recipe.use_lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=recipe.lora_target_modules,
    )


def optimizer_cls_and_kwargs(recipe: PostTrainingRecipeConfig) -> tuple[type, dict[str, Any]] | None:
    """`Trainer(optimizer_cls_and_kwargs=...)` for AdEMAMix, or None to keep the trainer's own optimizer.

    Through this hook `Trainer` still builds the parameter groups (no weight decay on norms and biases) after PEFT
    and DeepSpeed have wrapped the model, so AdEMAMix works in every setting the stock optimizers do.
    """
    if recipe.optimizer != "ademamix":
        return None
    # `Trainer` passes these kwargs as they are: without `lr` the optimizer would keep its own default, and the
    # scheduler would scale that instead of the recipe's learning rate.
    return AdEMAMix, {
        "lr": recipe.learning_rate,
        "alpha": recipe.ademamix_alpha,
        "betas": (0.9, 0.999, recipe.ademamix_beta3),
    }


def load_post_training_dataset(recipe: PostTrainingRecipeConfig) -> tuple[Dataset, Dataset | None]:
    """(train, eval) datasets of `recipe`: local files, a `save_to_disk` folder, or a Hub id.

    Without an eval split, `eval_fraction` of the training rows (seeded) are held out; with neither, eval is None.
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
        held_out = train.train_test_split(test_size=recipe.eval_fraction, seed=recipe.seed)
        return held_out["train"], held_out["test"]
    return train, None


def load_dataset_splits(source: str) -> DatasetDict:
    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(file for file in path.iterdir() if file.suffix in LOCAL_DATA_FORMATS)
        if not files:
            raise PostTrainingRecipeError(
                f"{path} holds no {'/'.join(LOCAL_DATA_FORMATS)} files and is not a `save_to_disk` folder."
            )
    else:
        if source.startswith((".", "/")) or source.count("/") > 1:
            raise PostTrainingRecipeError(f"Dataset {source} does not exist (neither a local path nor a Hub id).")
        return load_dataset(source)
    formats = {LOCAL_DATA_FORMATS.get(file.suffix) for file in files}
    if None in formats or len(formats) != 1:
        raise PostTrainingRecipeError(
            f"Data files {[file.name for file in files]} must share one format among {sorted(LOCAL_DATA_FORMATS)}."
        )
    if path.is_dir():
        # datasets names the splits after the files (train.jsonl, test.jsonl, validation.jsonl, ...); a folder of
        # other names (a corpus split by language) is all "train".
        return load_dataset(formats.pop(), data_dir=str(path))
    return load_dataset(formats.pop(), data_files={"train": [str(path)]})


def load_policy_model(recipe: PostTrainingRecipeConfig, name_or_path: str | None = None) -> PreTrainedModel:
    """The causal LM `recipe` trains (or `name_or_path`), through the Auto classes (so ours for `apertus`)."""
    source = name_or_path or recipe.model_name_or_path
    check_model_source(source)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return AutoModelForCausalLM.from_pretrained(
        source, dtype=recipe.dtype, attn_implementation=resolve_attn_implementation(recipe.attn_implementation, device)
    )


def load_chat_tokenizer(recipe: PostTrainingRecipeConfig) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer; it must have a chat template and a pad token."""
    source = recipe.tokenizer_name_or_path or recipe.model_name_or_path
    if source != APERTUS_TOKENIZER_NAME:
        check_model_source(source)
    tokenizer = load_tokenizer(source)
    if not tokenizer.chat_template and has_apertus_special_tokens(tokenizer):
        # Tokenizers saved before the template existed have the Apertus chat tokens at the Apertus ids, so the
        # Apertus template renders correctly with them.
        logger.info("The tokenizer of %s has no chat template; using the Apertus one.", source)
        tokenizer.chat_template = APERTUS_CHAT_TEMPLATE
    if not tokenizer.chat_template:
        raise PostTrainingRecipeError(
            f"The tokenizer of {source} has no chat template. Use a tokenizer saved by apertus_hf (data/tokenizer or "
            "apertus_hf.tokenization.load_apertus_tokenizer()), or set tokenizer_name_or_path to one."
        )
    if tokenizer.pad_token_id is None:
        raise PostTrainingRecipeError(f"The tokenizer of {source} has no pad token; set tokenizer.pad_token.")
    return tokenizer


def has_apertus_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` has every named Apertus special token at its Apertus id (the ids of the Hub's
    swiss-ai/Apertus-8B-Instruct-2509 tokenizer_config.json)."""
    vocab = tokenizer.get_vocab()
    return all(vocab.get(token) == token_id for token_id, token in NAMED_SPECIAL_TOKENS.items())


def resume_checkpoint(recipe: PostTrainingRecipeConfig) -> str | None:
    """The checkpoint to resume from: the newest in output_dir when `resume` is on, else None."""
    if not recipe.resume or not Path(recipe.output_dir).is_dir():
        return None
    return get_last_checkpoint(recipe.output_dir)


def check_model_source(source: str) -> None:
    looks_local = source.startswith((".", "/")) or source.count("/") != 1 or Path(source).parts[0] == "outputs"
    if looks_local and not Path(source).is_dir():
        raise PostTrainingRecipeError(
            f"Model folder {source} does not exist. The default is the model `make pretrain` exports; run it first, "
            "or set model_name_or_path to a model folder or Hub id."
        )


MERGED_FOLDER_NAME = "merged"


def chat_generation_config(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel):
    """The generation config of a post-trained model: Apertus' (stop on `</s>`, `<|assistant_end|>`,
    `<|tools_suffix|>`; temperature 0.8, top_p 0.9) when the tokenizer has the Apertus chat tokens, else the model's."""
    if has_apertus_special_tokens(tokenizer):
        return apertus_generation_config()
    return model.generation_config


def save_post_trained_model(trainer, recipe: PostTrainingRecipeConfig, recipe_file_name: str) -> Path:
    """Save the final model (the adapter under LoRA) with its tokenizer, chat generation config and the recipe into
    output_dir; under LoRA with `merge_lora` also the merged model into output_dir/merged; push when `hub_model_id`.

    A model trained on the Apertus chat format ends its turns with `<|assistant_end|>`, so that is its config's EOS
    (as in the released Apertus instruct models) and one of its generation stop tokens.

    Returns the folder a plain `transformers` user loads: output_dir, or output_dir/merged under LoRA.
    """
    output_dir = Path(recipe.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    generation_config = chat_generation_config(trainer.processing_class, model)
    instruct = has_apertus_special_tokens(trainer.processing_class)
    model.generation_config = generation_config
    if instruct:
        model.config.eos_token_id = ASSISTANT_END_TOKEN_ID
    trainer.save_model(str(output_dir))
    plain_model_dir = output_dir
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(output_dir)
        generation_config.save_pretrained(output_dir)
        (output_dir / recipe_file_name).write_text(
            yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False, allow_unicode=True)
        )
    if recipe.use_lora and recipe.merge_lora:
        plain_model_dir = output_dir / MERGED_FOLDER_NAME
        if trainer.is_world_process_zero():
            # From the files just saved rather than the live model: under ZeRO-3 the live weights are shards.
            merged = AutoModelForCausalLM.from_pretrained(recipe.model_name_or_path, dtype=recipe.dtype)
            merged = PeftModel.from_pretrained(merged, output_dir).merge_and_unload()
            merged.generation_config = generation_config
            if instruct:
                merged.config.eos_token_id = ASSISTANT_END_TOKEN_ID
            merged.save_pretrained(plain_model_dir)
            trainer.processing_class.save_pretrained(plain_model_dir)
    if recipe.hub_model_id is not None:
        trainer.push_to_hub()
    trainer.accelerator.wait_for_everyone()
    return plain_model_dir
