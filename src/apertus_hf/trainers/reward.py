"""Reward-model training with TRL's `RewardTrainer`: a model that scores an answer to a prompt, trained on pairs.

Apertus' alignment scored the completions of its QRPO data with a reward model, Skywork-Reward-V2-Llama-3.1-8B,
which it took as it was rather than training one (Apertus tech report, arXiv 2509.14233, §4.3 'Preference
Alignment'). This recipe trains one, so that `recipes/qrpo_prepare.py --reward_model FOLDER --reward_function null`
can score with a reward model of one's own: an `ApertusForSequenceClassification` with one output (num_labels 1) whose
transformer starts from a pretrained or SFT causal LM and whose score head is new, trained on (prompt, chosen,
rejected) pairs with the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected) - margin) (Ouyang et al. 2022,
InstructGPT; the `margin` column when the data has one), optionally with TRL's `center_rewards_coefficient`, which
keeps the rewards near zero (Eisenstein et al. 2023). All weights train, or LoRA adapters with the score head trained
whole beside them; the same recipe runs on a CPU, on DDP and under ZeRO-3 (only the accelerate config changes).

The rows are rendered as RewardTrainer renders them: conversational pairs (the chat template of the tokenizer, over
`prompt` + `chosen`, or over `chosen` alone when there is no `prompt` column) or plain text (prompt + answer + EOS).
`apertus_hf.preference.RewardModelScorer` renders a prompt and completion the same way when it scores with the saved
folder, which carries that tokenizer and template and a config whose `pad_token_id` is the tokenizer's: the head reads
the score at the last token that is not padding.

At the end the run measures the held-out pairwise accuracy, the fraction of evaluation pairs whose chosen answer gets
the higher reward, with its binomial standard error sqrt(p (1 - p) / n): logged, returned, written to
`reward_eval.json` and stated on the model card.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from jinja2 import TemplateError
from transformers import set_seed
from trl import RewardConfig, RewardTrainer
from trl.data_utils import is_conversational

from ..preference import UNPAIRED_COLUMNS
from .recipe import (
    POST_TRAINING_CONFIG_DEFAULTS,
    PostTrainingArguments,
    PostTrainingRecipe,
    PostTrainingRecipeError,
    chat_tokenizer,
    load_post_training_dataset,
    load_reward_model,
    optimizer_cls_and_kwargs,
    peft_config,
    resume_checkpoint,
    without_evaluation,
)
from .saving import save_post_trained_model

logger = logging.getLogger(__name__)

RECIPE_FILE_NAME = "reward_config.yaml"
EVAL_FILE_NAME = "reward_eval.json"
PAIR_COLUMNS = ("chosen", "rejected")
# What RewardTrainer reads of a row; other columns (language, task, ...) are dropped before it sees them.
READ_COLUMNS = ("prompt", "chosen", "rejected", "margin")
# InstructGPT (Ouyang et al. 2022), where the pairwise loss of reward models comes from.
REWARD_MODEL_CITATION = """@inproceedings{ouyang2022training,
  title     = {Training language models to follow instructions with human feedback},
  author    = {Ouyang, Long and Wu, Jeff and Jiang, Xu and Almeida, Diogo and Wainwright, Carroll L. and Mishkin, Pamela
               and Zhang, Chong and Agarwal, Sandhini and Slama, Katarina and Ray, Alex and others},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022},
  eprint    = {2203.02155},
  archivePrefix = {arXiv}
}"""


@dataclass
class RewardArguments(PostTrainingArguments):
    """Our options of `recipes/reward.py` (the rest, center_rewards_coefficient and max_length among them, are
    `RewardConfig`'s); the defaults are its embedded default run (recipes/configs/tiny/reward.yaml)."""

    model_name_or_path: str = field(
        default="outputs/sft-tiny",
        metadata={
            "help": (
                "Causal LM whose transformer the reward model starts from (its LM head is left out and a new score "
                "head added), or a reward model to train on: a folder or a Hub id. The default is the model "
                "`recipes/sft.py` writes."
            )
        },
    )
    dataset: str = field(
        default="data/preferences",
        metadata={
            "help": (
                "Preference pairs: `chosen` and `rejected` columns (conversations, or strings), an optional `prompt` "
                "column they answer and an optional numeric `margin` column, as a .jsonl/.json/.parquet/.csv file, a "
                "folder of them, a `save_to_disk` folder or a Hub dataset id. The default is the preference set the "
                "repo ships."
            )
        },
    )
    eval_dataset_split: str | None = field(
        default="test",
        metadata={
            "help": "Split of `dataset` whose pairs measure the held-out pairwise accuracy; None: no separate split."
        },
    )


REWARD_RECIPE = PostTrainingRecipe(
    stage="reward",
    arguments_class=RewardArguments,
    config_class=RewardConfig,
    config_defaults={
        **POST_TRAINING_CONFIG_DEFAULTS,
        "output_dir": "outputs/reward-tiny",
        # One epoch of the 2,000 pairs in 250 steps: from the tiny SFT model, batches of 8 at 3e-3 reached a held-out
        # accuracy of 0.62, batches of 4 at 3e-3 over the same epoch 0.58 (docs/reward_model.md).
        "learning_rate": 3e-3,
        "num_train_epochs": 1.0,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 32,
        # Pairs whose chosen or rejected side is longer are dropped (and counted in the log), not truncated: a
        # truncated answer is scored without its end.
        "max_length": 256,
        "center_rewards_coefficient": None,
        "save_steps": 100,
        # The run always measures the held-out pairs at the end (evaluate_pairs); evaluating before the first step
        # too reports the accuracy it started from (about 0.5).
        "eval_strategy": "no",
        "eval_on_start": True,
    },
    recipe_file_name=RECIPE_FILE_NAME,
    config_docs="https://huggingface.co/docs/trl/reward_trainer#trl.RewardConfig",
    task_type="SEQ_CLS",
)


@dataclass(frozen=True)
class PairwiseEvaluation:
    """How a reward model does on held-out pairs: how often it ranks the chosen answer above the rejected one, and its
    loss there."""

    pairs: int
    correct: int
    """Pairs with r(chosen) > r(rejected); a tie counts as wrong."""
    loss: float
    """The training loss (Bradley-Terry, with the centring term when the run has one) averaged over the pairs."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.pairs

    @property
    def standard_error(self) -> float:
        """The binomial standard error sqrt(p (1 - p) / n) of the accuracy p over n pairs."""
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.pairs)

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "accuracy": self.accuracy, "standard_error": self.standard_error}

    def __str__(self) -> str:
        return f"{self.accuracy:.4f} ± {self.standard_error:.4f} ({self.correct} of {self.pairs} pairs)"


@dataclass
class RewardResult:
    """What a finished reward-model run produced."""

    output_dir: Path
    """The final model, or with LoRA the adapter and score head (load them with
    `peft.AutoPeftModelForSequenceClassification`)."""
    model_dir: Path
    """The folder plain `transformers` (`AutoModelForSequenceClassification`) and `RewardModelScorer` load:
    output_dir, or with LoRA and `merge_lora` output_dir/merged."""
    steps: int
    evaluation: PairwiseEvaluation | None
    """The held-out pairwise accuracy and loss at the end of training; None without evaluation data."""
    is_main_process: bool
    trainer: RewardTrainer
    """The trainer, for inspection: its model and `state.log_history` (accuracy, margin, mean_reward, ...)."""


def reward_pairs(dataset: Dataset, name: str, source: str) -> Dataset:
    """`dataset` reduced to the columns RewardTrainer reads (prompt, chosen, rejected, margin); raises
    PostTrainingRecipeError, naming the fix, for data that is not preference pairs."""
    columns = set(dataset.column_names)
    if not set(PAIR_COLUMNS) <= columns:
        if set(UNPAIRED_COLUMNS) <= columns:
            hint = (
                "It is an unpaired QRPO dataset (one completion per row); prepare pairs with recipes/qrpo_prepare.py "
                "--selection pairs."
            )
        elif "messages" in columns:
            hint = "It looks like SFT data (`messages`), which has no rejected answer; give preference pairs."
        else:
            hint = "Rename the columns, or convert the rows to preference pairs."
        raise PostTrainingRecipeError(
            f"The {name} data of {source} has columns {sorted(columns)}, but a reward model trains on pairs with "
            f"`chosen` and `rejected` columns (and optionally `prompt` and `margin`). {hint}"
        )
    if len(dataset) == 0:
        raise PostTrainingRecipeError(f"The {name} data of {source} has no rows.")
    first = dataset[0]
    pair_kinds = {column: is_conversational({column: first[column]}) for column in READ_COLUMNS[:3] if column in first}
    if len(set(pair_kinds.values())) > 1:
        raise PostTrainingRecipeError(
            f"The {name} data of {source} mixes conversations and plain text: {pair_kinds} (True: a list of "
            "{role, content} messages). Give `prompt`, `chosen` and `rejected` in the same form."
        )
    return dataset.select_columns([column for column in READ_COLUMNS if column in columns])


def build_reward_trainer(recipe: RewardArguments, args: RewardConfig) -> RewardTrainer:
    """TRL's `RewardTrainer` for `recipe` and `args`: pairs loaded, checked and tokenized, the reward model loaded from
    the causal LM (with LoRA). Build `args` before calling (as `REWARD_RECIPE.configs` does): under ZeRO-3 the config
    makes `from_pretrained` load the weights already sharded."""
    args = without_evaluation(args, recipe.has_evaluation)
    train_dataset, eval_dataset = load_post_training_dataset(recipe, args.seed)
    train_dataset = reward_pairs(train_dataset, "training", recipe.dataset)
    if eval_dataset is not None:
        eval_dataset = reward_pairs(eval_dataset, "evaluation", recipe.dataset)
    tokenizer = chat_tokenizer(recipe)
    # The new score head is drawn from the global random state: seeded, it depends on `seed` alone.
    set_seed(args.seed)
    model = load_reward_model(recipe)
    try:
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config(recipe, REWARD_RECIPE.task_type),
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(recipe, args),
        )
    except TemplateError as error:
        raise PostTrainingRecipeError(
            f"The chat template of the tokenizer cannot render a pair of {recipe.dataset}: {error} Fix those rows, or "
            "use a tokenizer whose template renders them (tokenizer_name_or_path)."
        ) from error
    for name, given, kept in (
        ("training", train_dataset, trainer.train_dataset),
        ("evaluation", eval_dataset, trainer.eval_dataset),
    ):
        if given is None or len(kept) == len(given):
            continue
        if len(kept) == 0:
            raise PostTrainingRecipeError(
                f"Every {name} pair of {recipe.dataset} has a side longer than max_length={args.max_length} tokens; "
                "raise max_length."
            )
        logger.warning(
            "%d of %d %s pairs have a side longer than max_length=%d tokens and are left out.",
            len(given) - len(kept),
            len(given),
            name,
            args.max_length,
        )
    return trainer


@torch.no_grad()
def evaluate_pairs(trainer: RewardTrainer, dataset: Dataset | None = None) -> PairwiseEvaluation:
    """The trainer's model on every pair of `dataset` (tokenized as RewardTrainer does; default: its eval dataset)
    once: how many it ranks right and its mean loss. Every process scores its share (under ZeRO-3 all of them must
    call this) and all get the figures of all pairs.

    TRL's own evaluation logs the mean of per-batch accuracies, which weighs a short last batch as much as a full one
    and, on several processes, counts the pairs repeated to even out the last batch."""
    model = trainer.model_wrapped
    model.eval()
    center = trainer.args.center_rewards_coefficient
    wins, losses = [], []
    for batch in trainer.get_eval_dataloader(dataset):
        margin = batch.pop("margin", 0.0)
        with trainer.autocast_smart_context_manager():
            rewards = model(**batch, use_cache=False).logits.squeeze(-1).float()
        # The collator stacks the chosen sides of the batch, then the rejected ones.
        chosen, rejected = rewards.chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected - margin)
        if center is not None:
            loss = loss + center * (chosen + rejected) ** 2
        # Wins as integers: gloo (multi-process CPU) cannot gather booleans. gather_for_metrics drops the pairs
        # repeated to even out the last batch over the processes.
        wins.append(trainer.accelerator.gather_for_metrics((chosen > rejected).long()))
        losses.append(trainer.accelerator.gather_for_metrics(loss))
    won, lost = torch.cat(wins), torch.cat(losses)
    return PairwiseEvaluation(pairs=len(won), correct=int(won.sum()), loss=lost.mean().item())


def run_reward(recipe: RewardArguments, args: RewardConfig) -> RewardResult:
    """Train a reward model from `recipe.model_name_or_path` on the pairs in `recipe.dataset`; see `RewardArguments`
    and `REWARD_RECIPE` (whose `configs`/`parse` build the two).

    Resumes from the newest checkpoint in output_dir (with `resume`). After training: the held-out pairwise accuracy
    (logged as eval_pairwise_accuracy, and written to output_dir/reward_eval.json); then the model is saved like every
    post-training recipe's (`save_post_trained_model`): the model (or LoRA adapter with the score head, and with
    `merge_lora` the merged model in output_dir/merged) with its tokenizer and chat template, the recipe
    (`reward_config.yaml`) and its training facts. It does not publish: recipes/reward.py does, with apertus_hf's card.
    """
    trainer = build_reward_trainer(recipe, args)
    trainer.train(resume_from_checkpoint=resume_checkpoint(recipe, trainer.args))
    args = trainer.args
    evaluation = None
    if trainer.eval_dataset is not None:
        evaluation = evaluate_pairs(trainer)
        logger.info("Held-out pairwise accuracy: %s.", evaluation)
        trainer.log(
            {
                "eval_loss": evaluation.loss,
                "eval_pairwise_accuracy": evaluation.accuracy,
                "eval_pairwise_accuracy_stderr": evaluation.standard_error,
                "eval_pairs": evaluation.pairs,
            }
        )
    loss = "Bradley-Terry, -log sigmoid(r(chosen) - r(rejected)"
    loss += " - margin)" if "margin" in trainer.train_dataset.column_names else ")"
    if args.center_rewards_coefficient is not None:
        loss += f" + {args.center_rewards_coefficient:g} mean(r^2)"
    method = {"Loss": loss, "Head": "a new linear score head on the last token that is not padding (one output)"}
    results = {}
    if evaluation is not None:
        results = {"pairwise_accuracy": evaluation.accuracy, "pairwise_accuracy_stderr": evaluation.standard_error}
    model_dir = save_post_trained_model(
        trainer,
        REWARD_RECIPE,
        recipe,
        args,
        method_rows=method,
        citations=[REWARD_MODEL_CITATION],
        eval_results=results,
    )
    if evaluation is not None and trainer.is_world_process_zero():
        held_out = recipe.eval_dataset_split or f"{recipe.eval_fraction:g} of {recipe.dataset_split}, held out"
        report = {
            **evaluation.as_dict(),
            "dataset": recipe.dataset,
            "split": held_out,
            "step": trainer.state.global_step,
        }
        for folder in dict.fromkeys((Path(args.output_dir), model_dir)):
            (folder / EVAL_FILE_NAME).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("Saved the reward model to %s.", model_dir)
    return RewardResult(
        output_dir=Path(args.output_dir),
        model_dir=model_dir,
        steps=trainer.state.global_step,
        evaluation=evaluation,
        is_main_process=trainer.is_world_process_zero(),
        trainer=trainer,
    )


__all__ = [
    "EVAL_FILE_NAME",
    "RECIPE_FILE_NAME",
    "REWARD_MODEL_CITATION",
    "REWARD_RECIPE",
    "PairwiseEvaluation",
    "RewardArguments",
    "RewardResult",
    "build_reward_trainer",
    "evaluate_pairs",
    "reward_pairs",
    "run_reward",
]
