"""The export of a finished run: `output_dir/model`, a plain `transformers` folder with the tokenizer, the recipe
without local paths, and the run's `TrainingFacts`, from which `apertus_hf.hub` writes the model card."""

from __future__ import annotations

import logging
from pathlib import Path

from ..training_facts import TrainingFacts
from .build import Run
from .config import RECIPE_FILE_NAME, PretrainConfig
from .logs import CONSOLE
from .metrics import last_evaluation
from .run_folder import METRICS_FILE_NAME, MODEL_DIR_NAME

logger = logging.getLogger("apertus_hf.pretraining")

GOLDFISH_CITATION = """@inproceedings{hans2024goldfish,
  title = {Be like a Goldfish, Don't Memorize! Mitigating Memorization in Generative {LLMs}},
  author = {Hans, Abhimanyu and Wen, Yuxin and Jain, Neel and Kirchenbauer, John and Kazemi, Hamid and
    Singhania, Prajwal and Singh, Siddharth and Somepalli, Gowthami and Geiping, Jonas and Bhatele, Abhinav and
    Goldstein, Tom},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2024},
  eprint = {2406.10209},
  archivePrefix = {arXiv}
}"""

ADEMAMIX_CITATION = """@article{pagliardini2024ademamix,
  title = {The {AdEMAMix} Optimizer: Better, Faster, Older},
  author = {Pagliardini, Matteo and Ablin, Pierre and Grangier, David},
  journal = {arXiv preprint arXiv:2409.03284},
  year = {2024}
}"""


def hyperparameter_rows(config: PretrainConfig, num_processes: int) -> dict[str, str]:
    """The recipe's choices as the model card's training table words them (the starting model, steps and tokens
    seen have fields of their own in TrainingFacts)."""
    plan = config.run_plan(num_processes)
    batch = (
        f"{config.per_device_batch_size} rows of {config.seq_len} tokens per device × {plan.micro_batches_at(0)} "
        f"accumulation × {num_processes} process(es)"
    )
    for segment in plan.segments[1:]:
        batch += f"; {segment.rows_per_step:,} rows per step from step {segment.start_step:,}"
    warmup, decay, total = (f"{value:,} {plan.unit}" for value in (plan.warmup, plan.decay, plan.total))
    schedule = f"warmup-stable-decay counted in {plan.unit}: linear warmup over {warmup}, " + (
        f"{config.decay_shape} cooldown over the last {decay} of {total} to {config.min_lr_ratio:g} × peak"
        if plan.decay
        else "then constant"
    )
    optimizer = (
        f"AdEMAMix (β1={config.adam_beta1}, β2={config.adam_beta2}, β3={config.ademamix_beta3}, "
        f"α={config.ademamix_alpha})"
        if config.optimizer == "ademamix"
        else f"AdamW (β1={config.adam_beta1}, β2={config.adam_beta2})"
    )
    goldfish = (
        f"on: k={config.goldfish_k} (about 1 target in {config.goldfish_k} dropped), h={config.goldfish_h} "
        "(context hashed per decision)"
        if config.goldfish
        else "off"
    )
    rows = {"Initialisation": f"fresh, preset `{config.model_preset}`"} if not config.init_from else {}
    return {
        **rows,
        "Batch": batch,
        "Optimizer": f"{optimizer}, weight decay {config.weight_decay}",
        "Peak learning rate": f"{config.learning_rate:g}",
        "Schedule": schedule,
        "Gradient clipping": f"{config.max_grad_norm:g}" if config.max_grad_norm else "off",
        "Goldfish loss": goldfish,
        "Seed": str(config.seed),
    }


def training_facts(
    config: PretrainConfig, steps: int, tokens_seen: int, num_processes: int, eval_results: dict[str, float]
) -> TrainingFacts:
    """The facts of a pretraining run for its model card; `tokens_seen` over all processes."""
    plan = config.run_plan(num_processes)
    citations = [GOLDFISH_CITATION] if config.goldfish else []
    if config.optimizer == "ademamix":
        citations.append(ADEMAMIX_CITATION)
    return TrainingFacts(
        stage="pretraining",
        base_model=config.init_from,
        datasets=list(dict.fromkeys(str(source["path"]) for stage in plan.stages for source in stage.data))
        or [str(source["path"]) for source in config.data],
        context_length=config.seq_len,
        steps=steps,
        tokens_seen=tokens_seen,
        eval_results=eval_results,
        license=config.license,
        hyperparameters=hyperparameter_rows(config, num_processes),
        tags=["goldfish-loss"] if config.goldfish else [],
        citations=citations,
        recipe_file=RECIPE_FILE_NAME,
    )


def export_model(run: Run) -> Path:
    """Save the model to output_dir/model: safetensors, config, generation config, tokenizer, the recipe and the
    training facts. Consolidated under ZeRO-3 (the accelerate config must set `zero3_save_16bit_model: true`)."""
    accelerator, model_dir = run.accelerator, run.output_dir / MODEL_DIR_NAME
    state_dict = accelerator.get_state_dict(run.model)
    accelerator.unwrap_model(run.model).save_pretrained(
        model_dir, state_dict=state_dict, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    if accelerator.is_main_process:
        run.tokenizer.save_pretrained(model_dir)
        run.config.save(model_dir, portable=True)
        facts = training_facts(
            run.config,
            steps=run.progress.step,
            tokens_seen=run.progress.tokens_seen,
            num_processes=accelerator.num_processes,
            # The metrics file, not this process's memory: a relaunch of a finished run evaluates nothing anew.
            eval_results=last_evaluation(run.output_dir / METRICS_FILE_NAME),
        )
        facts.save(model_dir)
    accelerator.wait_for_everyone()
    logger.info("Exported the model to %s.", model_dir, extra=CONSOLE)
    return model_dir
