"""The QRPO dataset: its two layouts, the checks every row passes, and the quantile reward its rows define.

A row is a prompt with either one completion (`unpaired`: prompt, completion, reward, ref_rewards) or a chosen and a
rejected one (`paired`: prompt, chosen, rejected, chosen_reward, rejected_reward, ref_rewards), where `ref_rewards`
are the rewards of n completions sampled from the reference policy for that prompt. `recipes/qrpo_prepare.py`
writes either layout; the QRPO trainer reads both, the DPO recipe the paired one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import StrEnum

import torch
from datasets import Dataset

from .errors import QRPODatasetError


class PreferenceLayout(StrEnum):
    """How a QRPO dataset lays out its completions: one a row (`UNPAIRED`) or a chosen and a rejected one (`PAIRED`).

    `members` are a row's completion columns, in the order a batch stacks them (every row's first member, then every
    row's second one); `reward_columns` are their rewards, member for member. A layout compares equal to its name
    ("unpaired", "paired"), which is how prepare_stats.json records it.
    """

    members: tuple[str, ...]
    reward_columns: tuple[str, ...]

    UNPAIRED = "unpaired", ("completion",), ("reward",)
    PAIRED = "paired", ("chosen", "rejected"), ("chosen_reward", "rejected_reward")

    def __new__(cls, name: str, members: tuple[str, ...], reward_columns: tuple[str, ...]) -> PreferenceLayout:
        layout = str.__new__(cls, name)
        layout._value_ = name
        layout.members = members
        layout.reward_columns = reward_columns
        return layout

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column of a row of this layout, in the order `recipes/qrpo_prepare.py` writes them."""
        return ("prompt", *self.members, *self.reward_columns, "ref_rewards")

    @classmethod
    def of_columns(cls, column_names: Iterable[str], name: str = "train") -> PreferenceLayout:
        """The layout of a dataset with these columns: paired when it has `chosen`, else unpaired. Extra columns are
        allowed; a missing one raises QRPODatasetError naming it and the `name` of the dataset."""
        columns = set(column_names)
        layout = cls.PAIRED if "chosen" in columns else cls.UNPAIRED
        missing = [column for column in layout.columns if column not in columns]
        if missing:
            raise QRPODatasetError(
                f"The {name} dataset misses the columns {missing} of a {layout} QRPO dataset (it has "
                f"{sorted(columns)}). Rows are either {{{', '.join(UNPAIRED_COLUMNS)}}} or "
                f"{{{', '.join(PAIRED_COLUMNS)}}}; recipes/qrpo_prepare.py writes them."
            )
        return layout


UNPAIRED_COLUMNS = PreferenceLayout.UNPAIRED.columns
PAIRED_COLUMNS = PreferenceLayout.PAIRED.columns


def quantile_rewards(rewards: torch.Tensor, ref_rewards: torch.Tensor) -> torch.Tensor:
    """R_q: for each completion, the fraction of its reference rewards that are <= its reward (ties count as below).

    Args:
        rewards: (B,) rewards of the completions.
        ref_rewards: (B, n) rewards of the n reference completions of each prompt.
    """
    return (ref_rewards <= rewards.unsqueeze(-1)).to(torch.float64).mean(dim=-1)


def qrpo_dataset_layout(dataset: Dataset, name: str = "train") -> PreferenceLayout:
    """Check every row of a QRPO dataset and say which layout it has. Raises QRPODatasetError naming the row."""
    layout = PreferenceLayout.of_columns(dataset.column_names, name)
    if len(dataset) == 0:
        raise QRPODatasetError(f"The {name} dataset has no rows.")

    for row, value in enumerate(dataset["prompt"]):
        if not value:
            raise QRPODatasetError(f"Row {row} of the {name} dataset has an empty prompt; fill it in or drop the row.")
    # An empty completion is a real sample (the policy stopped at once): it is scored on its end token.
    for column in layout.members:
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, (str, list)):
                raise QRPODatasetError(
                    f"Row {row} of the {name} dataset has {column}={value!r}; it must be a string, or a list of "
                    "assistant messages for chat prompts."
                )
    for column in layout.reward_columns:
        for row, value in enumerate(dataset[column]):
            if not _is_finite_number(value):
                raise QRPODatasetError(
                    f"Row {row} of the {name} dataset has {column}={value!r}; rewards must be finite numbers. Re-score "
                    "or drop the row."
                )
    expected_count = None
    for row, values in enumerate(dataset["ref_rewards"]):
        if not isinstance(values, (list, tuple)) or len(values) == 0:
            raise QRPODatasetError(
                f"Row {row} of the {name} dataset has ref_rewards={values!r}; it must be a non-empty list of the "
                "rewards of the reference completions sampled for its prompt."
            )
        if expected_count is None:
            expected_count = len(values)
        elif len(values) != expected_count:
            raise QRPODatasetError(
                f"Row {row} of the {name} dataset has {len(values)} ref_rewards, but row 0 has {expected_count}; every "
                "prompt needs the same number n of reference rewards (sample n completions per prompt)."
            )
        for value in values:
            if not _is_finite_number(value):
                raise QRPODatasetError(
                    f"Row {row} of the {name} dataset has a ref_rewards entry {value!r}; rewards must be finite "
                    "numbers. Re-score or drop the row."
                )
    return layout


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
