"""How a post-training run saves its model: weights (or LoRA adapter, and the merged model), tokenizer, the Apertus
generation config, the resolved recipe (which `--config` loads again) and the `TrainingFacts` the model card is built
from. The recipes in recipes/ then write the card and publish (apertus_hf.hub); the trainer itself never pushes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.integrations import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config
from transformers.trainer import TRAINING_ARGS_NAME

from ..tokenization import has_apertus_special_tokens
from ..tokenization.apertus import apertus_generation_config
from ..tokenization.special_tokens import ASSISTANT_END_TOKEN_ID
from ..training_facts import TrainingFacts, portable_path
from .recipe import PostTrainingArguments, PostTrainingRecipe, load_sequence_classifier, plain_value

MERGED_FOLDER_NAME = "merged"

# Options never written to the saved recipe: secrets, and the deprecated aliases transformers mirrors from their
# new names (activation_checkpointing*).
UNSAVED_OPTIONS = ("hub_token", "gradient_checkpointing", "gradient_checkpointing_kwargs")


def _portable(value: Any) -> Any:
    """`value` with every absolute local path replaced by `training_facts.portable_path`."""
    if isinstance(value, str):
        return portable_path(value)
    if isinstance(value, list):
        return [_portable(item) for item in value]
    if isinstance(value, dict):
        return {key: _portable(item) for key, item in value.items()}
    return value


def recipe_values(spec: PostTrainingRecipe, recipe: PostTrainingArguments, args: TrainingArguments) -> dict[str, Any]:
    """The recipe of a run as `--config` takes it again: every option of `recipe`, then the options of `args` that the
    recipe sets by default or that differ from the recipe's default config; no secrets, no absolute local paths.

    The default config is resolved on this machine, so what transformers derives from the machine (pinned memory off
    on CPU, the CPU process group, the progress bar) is the same in both and stays out of the file.
    """
    values = dataclasses.asdict(recipe)
    defaults = spec.default_config_values()
    for option in dataclasses.fields(args):
        if not option.init or option.name in UNSAVED_OPTIONS:
            continue
        value = plain_value(getattr(args, option.name))
        if option.name in spec.config_defaults or value != defaults[option.name]:
            values[option.name] = value
    return _portable(values)


def chat_generation_config(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel):
    """The generation config of a post-trained model: Apertus' (stop on `</s>`, `<|assistant_end|>`,
    `<|tools_suffix|>`; temperature 0.8, top_p 0.9) when the tokenizer has the Apertus chat tokens, else the model's
    (one from its config's token ids for a reward model, which has none)."""
    if has_apertus_special_tokens(tokenizer):
        return apertus_generation_config()
    return getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)


def _warmup(args: TrainingArguments) -> str:
    if args.warmup_steps < 1:
        return f"warmup over the first {args.warmup_steps:.0%} of the steps" if args.warmup_steps else "no warmup"
    return f"warmup over {int(args.warmup_steps)} steps"


def hyperparameter_rows(recipe: PostTrainingArguments, args: TrainingArguments, num_processes: int) -> dict[str, str]:
    """The choices of a post-training run that its card states, worded (the method's own rows are added by each
    recipe)."""
    rows = {
        "Learning rate": f"{args.learning_rate:g}, {plain_value(args.lr_scheduler_type)} schedule, {_warmup(args)}",
        "Length": f"{args.num_train_epochs:g} epoch(s)" if args.max_steps <= 0 else f"max_steps {args.max_steps}",
        "Batch": (
            f"{args.per_device_train_batch_size} rows per device x {args.gradient_accumulation_steps} accumulation "
            f"x {num_processes} process(es) = "
            f"{args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes} rows per step"
        ),
        "Optimizer": (
            f"AdEMAMix (apertus_hf.optim; betas {args.adam_beta1:g}, {args.adam_beta2:g}, {recipe.ademamix_beta3:g}; "
            f"alpha {recipe.ademamix_alpha:g})"
            if recipe.use_ademamix
            else f"{plain_value(args.optim)} (transformers)"
        )
        + f", weight decay {args.weight_decay:g}, gradient clipping at {args.max_grad_norm:g}",
        "Precision": "bf16 mixed precision" if args.bf16 else "fp16 mixed precision" if args.fp16 else recipe.dtype,
    }
    if recipe.use_lora:
        targets = recipe.lora_target_modules
        rows["LoRA"] = (
            f"r {recipe.lora_r}, alpha {recipe.lora_alpha}, dropout {recipe.lora_dropout:g}, on "
            f"{targets if isinstance(targets, str) else ', '.join(targets)}"
        )
    return rows


def last_eval_loss(trainer: Trainer) -> float | None:
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    return losses[-1] if losses else None


@contextlib.contextmanager
def _loading_whole_models(trainer: Trainer) -> Iterator[None]:
    """Inside, `from_pretrained` loads a whole model on this process alone. Under ZeRO-3 it would load it sharded
    over all processes, a step each of them must take: one process merging a LoRA model would wait forever."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        # The run's DeepSpeed config, which accelerate's plugin keeps alive for transformers' weak reference.
        set_hf_deepspeed_config(trainer.accelerator.state.deepspeed_plugin.dschf)


def save_post_trained_model(
    trainer: Trainer,
    spec: PostTrainingRecipe,
    recipe: PostTrainingArguments,
    args: TrainingArguments,
    *,
    method_rows: dict[str, str] | None = None,
    citations: list[str] | None = None,
    with_perplexity: bool = False,
    eval_results: dict[str, float] | None = None,
) -> Path:
    """Save the final model (the adapter under LoRA) with its tokenizer, chat generation config, the recipe
    (`spec.recipe_file_name`) and its `TrainingFacts` into output_dir; under LoRA with `merge_lora` also the merged
    model with the same files into output_dir/merged.

    A model trained on the Apertus chat format ends its turns with `<|assistant_end|>`, so that is its config's EOS
    (as in the released Apertus instruct models) and one of its generation stop tokens. `method_rows` and
    `citations` describe the training method on the card; `with_perplexity` adds exp(eval loss) to its results (a
    language-modelling loss, as SFT's), and `eval_results` the recipe's own held-out measurements.

    Returns the folder a plain `transformers` user loads: output_dir, or output_dir/merged under LoRA.
    """
    output_dir = Path(args.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    generation_config = chat_generation_config(trainer.processing_class, model)
    instruct = has_apertus_special_tokens(trainer.processing_class)
    model.generation_config = generation_config
    if instruct:
        model.config.eos_token_id = ASSISTANT_END_TOKEN_ID
    trainer.save_model(str(output_dir))
    eval_loss = last_eval_loss(trainer)
    measured = {} if eval_loss is None else {"loss": eval_loss}
    if eval_loss is not None and with_perplexity:
        measured["perplexity"] = math.exp(min(eval_loss, 700.0))  # exp overflows a float above ~709
    measured.update(eval_results or {})
    facts = TrainingFacts(
        stage=spec.stage,
        base_model=recipe.model_name_or_path,
        datasets=[recipe.dataset],
        context_length=args.max_length,
        steps=trainer.state.global_step,
        tokens_seen=(
            int(trainer.state.num_input_tokens_seen)
            if args.include_num_input_tokens_seen not in ("no", False)
            else None
        ),
        eval_results=measured,
        license=recipe.license,
        hyperparameters={**hyperparameter_rows(recipe, args, trainer.accelerator.num_processes), **(method_rows or {})},
        tags=[spec.stage, *(["lora"] if recipe.use_lora else [])],
        citations=list(citations or []),
        recipe_file=spec.recipe_file_name,
        adapter=recipe.use_lora,
    )
    recipe_text = yaml.safe_dump(recipe_values(spec, recipe, args), sort_keys=False, allow_unicode=True)
    plain_model_dir = output_dir
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(output_dir)
        generation_config.save_pretrained(output_dir)
        (output_dir / spec.recipe_file_name).write_text(recipe_text)
        facts.save(output_dir)
        # `Trainer.save_model` pickles the arguments next to the model; the recipe file holds them in a form that
        # loads without unpickling, and the Hub checks refuse pickles in a folder to publish.
        (output_dir / TRAINING_ARGS_NAME).unlink(missing_ok=True)
    if recipe.use_lora and recipe.merge_lora:
        plain_model_dir = output_dir / MERGED_FOLDER_NAME
        if trainer.is_world_process_zero():
            # From the files just saved rather than the live model: under ZeRO-3 the live weights are shards.
            with _loading_whole_models(trainer):
                if spec.task_type == "SEQ_CLS":
                    merged = load_sequence_classifier(recipe.model_name_or_path, recipe.dtype)
                else:
                    merged = AutoModelForCausalLM.from_pretrained(recipe.model_name_or_path, dtype=recipe.dtype)
                merged = PeftModel.from_pretrained(merged, output_dir).merge_and_unload()
            merged.generation_config = generation_config
            # As the trainer set it (a reward model's head pools at the last token that is not padding).
            merged.config.pad_token_id = model.config.pad_token_id
            if instruct:
                merged.config.eos_token_id = ASSISTANT_END_TOKEN_ID
            merged.save_pretrained(plain_model_dir)
            generation_config.save_pretrained(plain_model_dir)  # save_pretrained skips it for a reward model
            trainer.processing_class.save_pretrained(plain_model_dir)
            (plain_model_dir / spec.recipe_file_name).write_text(recipe_text)
            dataclasses.replace(facts, adapter=False).save(plain_model_dir)
    trainer.accelerator.wait_for_everyone()
    return plain_model_dir
