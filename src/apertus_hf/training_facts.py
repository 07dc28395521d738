"""What a training run knows about the model it saved, written next to the weights for the model card.

Every run that saves a model (pretraining's export, SFT, DPO and QRPO) fills one `TrainingFacts` and saves it as
`training_facts.json` in the model folder; `apertus_hf.hub` builds the card from it and the folder's config, so the
card never re-derives what the run measured (tokens seen over all processes, the trained context length, the final
evaluation) and never guesses from a recipe file. Paths are stored portably: a published file must not carry the
absolute paths of the machine that trained it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

TRAINING_FACTS_FILE_NAME = "training_facts.json"

Stage = Literal["pretraining", "sft", "dpo", "qrpo", "reward"]


class TrainingFactsError(ValueError):
    """A training_facts.json that cannot be read, with the fix in the message."""


def portable_path(value: str) -> str:
    """`value` without this machine's absolute paths, and never mistakable for a Hub id.

    A path below the working directory becomes `./<relative path>`, another absolute path `<local>/<name>`; an
    existing relative path gets a leading `./` (so `data/corpus` does not read as the Hub id data/corpus once the
    facts are read elsewhere). Hub ids and names that are not paths here are returned unchanged.
    """
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        absolute = Path(expanded).resolve()
        try:
            relative = absolute.relative_to(Path.cwd().resolve()).as_posix()
            return "." if relative == "." else f"./{relative}"
        except ValueError:
            return f"<local>/{absolute.name}"
    if os.path.exists(expanded) and not value.startswith("."):
        return f"./{value}"
    return value


@dataclass
class TrainingFacts:
    """The facts of one run, as the model card states them."""

    stage: Stage
    """Which training made the model: pretraining, or post-training by sft, dpo, qrpo or reward (a reward model)."""
    base_model: str | None
    """The model it started from (init_from / model_name_or_path): a Hub id or a portable path; None when fresh."""
    datasets: list[str]
    """Its training data sources: Hub dataset ids or portable paths."""
    context_length: int | None
    """The longest sequence it was trained on (seq_len of the packed rows, or the post-training max_length)."""
    steps: int
    """Optimizer steps taken."""
    tokens_seen: int | None = None
    """Training tokens over all processes (None where the trainer does not count them)."""
    eval_results: dict[str, float] = field(default_factory=dict)
    """The run's last held-out evaluation, e.g. {"loss": 3.2, "perplexity": 24.5}."""
    license: str | None = None
    """Hub license id chosen in the recipe; None when the run did not say (the card then warns)."""
    hyperparameters: dict[str, str] = field(default_factory=dict)
    """The recipe's choices worth a line of the card, already worded (e.g. {"Optimizer": "AdEMAMix (...)"})."""
    tags: list[str] = field(default_factory=list)
    """Hub tags of the methods used, e.g. goldfish-loss, sft, qrpo, lora."""
    citations: list[str] = field(default_factory=list)
    """BibTeX entries of the methods used."""
    recipe_file: str | None = None
    """Name of the resolved recipe saved in the folder (e.g. pretrain_config.yaml), which runs it again."""
    adapter: bool = False
    """True when the folder holds a LoRA adapter rather than full weights."""

    def __post_init__(self):
        self.base_model = portable_path(self.base_model) if self.base_model else None
        self.datasets = [portable_path(dataset) for dataset in self.datasets]

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TRAINING_FACTS_FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> TrainingFacts | None:
        """The facts saved in `folder`, or None when it has none (a model not trained by apertus_hf)."""
        path = Path(folder) / TRAINING_FACTS_FILE_NAME
        if not path.is_file():
            return None
        try:
            values: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            known = {entry.name for entry in fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise TypeError(f"unknown keys {unknown}")
            return cls(**values)
        except (json.JSONDecodeError, TypeError) as error:
            raise TrainingFactsError(
                f"{path} is not a valid {TRAINING_FACTS_FILE_NAME} ({error}); delete it (the card then omits the "
                "training facts) or re-export the model."
            ) from error
