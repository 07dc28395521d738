"""The QRPO dataset's layouts: read from the columns once, with the members and reward columns every reader uses."""

import json

import pytest

from apertus_hf.preference import PAIRED_COLUMNS, UNPAIRED_COLUMNS, PreferenceLayout, QRPODatasetError


def test_each_layout_names_its_members_their_rewards_and_its_columns():
    paired, unpaired = PreferenceLayout.PAIRED, PreferenceLayout.UNPAIRED
    assert paired.members == ("chosen", "rejected") and paired.reward_columns == ("chosen_reward", "rejected_reward")
    assert unpaired.members == ("completion",) and unpaired.reward_columns == ("reward",)
    assert PAIRED_COLUMNS == ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "ref_rewards")
    assert UNPAIRED_COLUMNS == ("prompt", "completion", "reward", "ref_rewards")
    # Recorded by name (prepare_stats.json) and read back as the same layout.
    assert json.loads(json.dumps({"layout": paired})) == {"layout": "paired"}
    assert PreferenceLayout("unpaired") is unpaired


def test_the_layout_is_read_from_the_columns_and_extra_columns_are_allowed():
    assert PreferenceLayout.of_columns([*PAIRED_COLUMNS, "ref_chosen_logps"]) is PreferenceLayout.PAIRED
    assert PreferenceLayout.of_columns(reversed(UNPAIRED_COLUMNS)) is PreferenceLayout.UNPAIRED


def test_a_half_paired_dataset_names_what_it_misses():
    columns = ["prompt", "chosen", "reward", "ref_rewards"]
    with pytest.raises(QRPODatasetError) as error:
        PreferenceLayout.of_columns(columns, "eval")
    message = str(error.value)
    assert "The eval dataset misses the columns ['rejected', 'chosen_reward', 'rejected_reward'] of a paired" in message
    assert "recipes/qrpo_prepare.py writes them" in message
