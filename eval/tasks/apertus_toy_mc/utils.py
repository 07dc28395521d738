"""Loads the task's JSONL from this folder, so `lm_eval --include_path eval/tasks` works from any directory."""

from pathlib import Path

import datasets

DATA_FILE = Path(__file__).with_name("apertus_toy_mc.jsonl")


def load_toy_mc(**_task_metadata) -> datasets.DatasetDict:
    """The questions as the single split "train"; lm-eval passes the task metadata, which the loader does not need."""
    return datasets.load_dataset("json", data_files=str(DATA_FILE))
