"""The reward evaluation (`apertus_hf.evaluation.reward`): policies answer the same prompts, rewards score them, and
the figures are means with standard errors and paired differences to the first policy."""

import json
import math
import runpy
import statistics
from pathlib import Path

import pytest

from apertus_hf.evaluation.reward import evaluate_rewards, mean_and_stderr
from apertus_hf.preference import load_prompts
from apertus_hf.preference.rewards import completion_text
from tests.trainers.conftest import one_thread
from tests.trainers.tiny_policy import CHAT_ROWS, save_policy, stopping_policy, write_jsonl

__all__ = ["one_thread"]  # the post-training tests' one-thread rule (tiny models, see there)


def completion_length(prompts, completions, **kwargs) -> list[float]:
    """A reward that two stopping policies differ in: the length of the answer, in characters."""
    return [float(len(completion_text(completion))) for completion in completions]


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> tuple[Path, Path]:
    """A policy that mostly stops at once and one that mostly runs on: short and long answers."""
    folder = tmp_path_factory.mktemp("policies")
    short = save_policy(folder / "short", stopping_policy(stop_probability=0.7))
    long = save_policy(folder / "long", stopping_policy(stop_probability=0.05))
    return short, long


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("prompts") / "train.jsonl", CHAT_ROWS * 3)
    return load_prompts(str(path), "train", "messages")


def test_mean_and_stderr_match_the_textbook_formulas():
    values = [0.5, 1.5, 2.0, 4.0, -1.0]
    mean, stderr = mean_and_stderr(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert stderr == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert mean_and_stderr([3.0]) == (3.0, None)
    with pytest.raises(ValueError, match="no prompts"):
        mean_and_stderr([])


def test_paired_difference_of_two_policies_and_groups(policies, prompts):
    short, long = policies
    texts, columns = prompts
    groups = ["judge" if index % 3 == 0 else "reward_model" for index in range(len(texts))]
    rewards = {"length": completion_length}
    settings = {"max_new_tokens": 12, "temperature": 1.0, "seed": 3, "batch_size": 4}
    baseline, trained = evaluate_rewards([short, long], texts, rewards, columns=columns, groups=groups, **settings)

    base_entry, entry = baseline.details["rewards"]["length"], trained.details["rewards"]["length"]
    assert "paired_difference" not in base_entry
    assert entry["mean"] > base_entry["mean"] + 3 * entry["stderr"]
    difference = entry["paired_difference"]
    assert difference["baseline"] == str(short)
    assert difference["mean"] == pytest.approx(entry["mean"] - base_entry["mean"])
    assert difference["num_prompts"] == len(texts)
    per_prompt = [example["length"] for example in trained.details["examples"]]
    assert per_prompt == [float(len(example["completion"])) for example in trained.details["examples"]]
    assert set(entry["per_group"]) == {"judge", "reward_model"}
    assert sum(group["num_prompts"] for group in entry["per_group"].values()) == len(texts)
    weighted = sum(group["mean"] * group["num_prompts"] for group in entry["per_group"].values()) / len(texts)
    assert weighted == pytest.approx(entry["mean"])
    assert trained.metrics == {"length_mean": entry["mean"]}
    assert trained.settings["baseline"] == str(short)

    again = evaluate_rewards([long], texts, rewards, columns=columns, **settings)[0]
    assert again.details["rewards"]["length"]["mean"] == entry["mean"]


def test_bad_arguments_are_refused(policies, prompts):
    texts, _ = prompts
    with pytest.raises(ValueError, match="at least one model"):
        evaluate_rewards([], texts, {"length": completion_length})
    with pytest.raises(ValueError, match="at least one reward"):
        evaluate_rewards([policies[0]], texts, {})
    with pytest.raises(ValueError, match="one per prompt"):
        evaluate_rewards([policies[0]], texts, {"length": completion_length}, groups=["judge"])


def test_the_script_prints_and_writes_the_figures_per_route(policies, tmp_path, monkeypatch, capsys):
    rows = [{**row, "contested": index % 2 == 0} for index, row in enumerate(CHAT_ROWS)]
    write_jsonl(tmp_path / "test.jsonl", rows)
    script = Path(__file__).resolve().parents[2] / "eval" / "reward.py"
    argv = [
        str(script), "--model", str(policies[0]), str(policies[1]), "--dataset", str(tmp_path / "test.jsonl"),
        "--split", "train", "--reward_function", "apertus_hf.preference.rewards:answer_similarity",
        "--route_column", "contested", "--answer_similarity", "--max_new_tokens", "8", "--output_dir",
        str(tmp_path / "results"),
    ]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "results" / f"{policies[1].name}.json").read_text())
    entry = written["details"]["rewards"]["reward"]
    assert set(entry["per_group"]) == {"judge", "reward"}
    assert entry["paired_difference"]["baseline"] == str(policies[0])
    assert written["details"]["rewards"]["answer_similarity"]["mean"] == entry["mean"]  # the same function twice
    assert "vs baseline" in printed and f"{entry['mean']:.4f}" in printed
