"""The QRPO data pipeline: sampling, rewards, pair selection, the saved dataset, the recipe script and bad inputs."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import load_from_disk

from apertus_hf.preference import (
    PAIRED_COLUMNS,
    STATS_FILE_NAME,
    UNPAIRED_COLUMNS,
    QRPOPrepareConfig,
    QRPOPrepareError,
    build_qrpo_rows,
    load_prompts,
    load_reward,
    prepare_qrpo_dataset,
    qrpo_dataset_layout,
    quantile_rewards,
    score_completions,
    select_pair,
)
from apertus_hf.preference.rewards import answer_similarity
from apertus_hf.preference.sampling import generate_completions, sample_completions, sampling_config
from apertus_hf.recipe_args import recipe_config_from_dict
from apertus_hf.runtime import SourceNotFoundError
from tests.trainers.tiny_policy import (
    CHAT_ROWS,
    STRING_PROMPTS,
    chat_tokenizer,
    save_policy,
    save_reward_model,
    stopping_policy,
    write_jsonl,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAT_PROMPTS = [row["messages"][:1] for row in CHAT_ROWS]  # first user turn of each conversation


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def policy():
    return stopping_policy(stop_probability=0.1)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, policy) -> Path:
    return save_policy(tmp_path_factory.mktemp("policy"), policy)


@pytest.fixture(scope="module")
def chat_prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "chat.jsonl", CHAT_ROWS)


def prepare_config(tmp_path: Path, dataset: Path, policy_dir: Path, **overrides) -> QRPOPrepareConfig:
    values = dict(
        dataset=str(dataset),
        model_name_or_path=str(policy_dir),
        num_samples=8,
        max_new_tokens=12,
        batch_size=16,
        output_dir=str(tmp_path / "qrpo-data"),
    )
    return QRPOPrepareConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_under_a_seed_and_really_samples(policy, tokenizer):
    prompts = [*CHAT_PROMPTS[:3], *STRING_PROMPTS[:2]]
    first = sample_completions(policy, tokenizer, prompts, num_samples=4, max_new_tokens=10, batch_size=6, seed=3)
    again = sample_completions(policy, tokenizer, prompts, num_samples=4, max_new_tokens=10, batch_size=6, seed=3)
    other = sample_completions(policy, tokenizer, prompts, num_samples=4, max_new_tokens=10, batch_size=6, seed=4)
    assert first == again
    assert first != other
    assert [len(samples) for samples in first] == [4] * len(prompts)
    # Temperature 1 over a nearly uniform 8192-token distribution: the samples of one prompt differ.
    assert all(len(set(samples)) >= 3 for samples in first)


def test_greedy_decoding_does_not_depend_on_batching(policy, tokenizer):
    # Prompts of different lengths: batched, they are left-padded, which must not change what the model sees.
    prompts = [*STRING_PROMPTS, *CHAT_PROMPTS[:3]]
    one_by_one = sample_completions(policy, tokenizer, prompts, 2, max_new_tokens=8, temperature=0.0, batch_size=1)
    batched = sample_completions(policy, tokenizer, prompts, 2, max_new_tokens=8, temperature=0.0, batch_size=14)
    assert one_by_one == batched
    assert all(samples[0] == samples[1] for samples in batched)


def test_completions_stop_at_the_end_tokens_and_leave_them_out(policy, tokenizer):
    samples = generate_completions(policy, tokenizer, CHAT_PROMPTS, num_samples=8, max_new_tokens=12, seed=0)
    flat = [completion for completions in samples for completion in completions]
    finished = [completion for completion in flat if completion.finished]
    cut = [completion for completion in flat if not completion.finished]
    assert finished and cut  # stop probability 0.1 a step: both happen within 12 tokens
    assert all(completion.num_tokens < 12 for completion in finished)
    assert all(completion.num_tokens == 12 for completion in cut)
    assert not any("<|assistant_end|>" in completion.text for completion in flat)


def test_reference_sampling_ignores_the_models_own_sampling_settings(policy, tokenizer):
    original = copy.deepcopy(policy.generation_config)
    policy.generation_config.update(top_k=5, top_p=0.5, temperature=0.3, repetition_penalty=2.0, do_sample=True)
    try:
        config = sampling_config(policy, tokenizer, max_new_tokens=4)
        ids = torch.tensor([tokenizer("The river")["input_ids"]])
        output = policy.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    finally:
        policy.generation_config = original
    # What is sampled from (scores) is the model's raw distribution (logits), at every step.
    for scores, logits in zip(output.scores, output.logits, strict=True):
        torch.testing.assert_close(scores, logits)
    assert config.eos_token_id == [2, 68, 72]


# ---------------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------------


def reward_from_column(prompts, completions, target, **kwargs):
    """Test reward: 1 where the completion text equals the row's `target` column."""
    return [float(completion == wanted) for completion, wanted in zip(completions, target, strict=True)]


def test_reward_function_by_import_path_gets_kwargs_and_columns():
    reward = load_reward(None, "apertus_hf.preference.rewards:answer_similarity", {"ignore_case": True})
    chat = [[[{"role": "assistant", "content": "BLUE."}], [{"role": "assistant", "content": "Red."}]]]
    (scores,) = score_completions(reward, [CHAT_PROMPTS[0]], chat, columns={"answer": ["Blue."]})
    assert scores[0] == 1.0 and 0 < scores[1] < 1
    frequency = load_reward(None, "apertus_hf.preference.rewards:substring_frequency", {"substring": "ab"})
    assert score_completions(frequency, ["p"], [["abab", "xxab", ""]]) == [[1.0, 0.5, 0.0]]

    by_column = load_reward(None, "tests.preference.test_prepare:reward_from_column", {})
    rewards = score_completions(
        by_column, ["a", "b"], [["x", "y"], ["y", "x"]], columns={"target": ["x", "x"]}, batch_size=2
    )
    assert rewards == [[1.0, 0.0], [0.0, 1.0]]  # each prompt's column value reaches each of its completions


def test_prompts_drop_the_final_answer_and_pass_it_on(tmp_path):
    rows = [
        {"messages": CHAT_ROWS[2]["messages"], "language": "en"},
        {"messages": CHAT_ROWS[1]["messages"][:2], "language": "de"},  # system + user: nothing to drop
    ]
    prompts, columns = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)), "train", "messages")
    assert prompts == [CHAT_ROWS[2]["messages"][:3], CHAT_ROWS[1]["messages"][:2]]
    assert columns == {"language": ["en", "de"], "answer": ["Bonjour. Un, deux, trois.", None]}

    clash = [{"messages": CHAT_ROWS[0]["messages"], "answer": "Blue."}]
    with pytest.raises(QRPOPrepareError, match="has a column 'answer'"):
        load_prompts(str(write_jsonl(tmp_path / "clash.jsonl", clash)), "train", "messages")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("apertus_hf.preference.rewards.substring_frequency", "not an import path"),
        ("apertus_hf.no_such_module:reward", "cannot import module 'apertus_hf.no_such_module'"),
        ("apertus_hf.preference.rewards:no_such_reward", "has no attribute 'no_such_reward'"),
        ("apertus_hf.preference.rewards:__doc__", "is a str, not a function"),
    ],
)
def test_bad_reward_paths_say_what_is_wrong(path, message):
    with pytest.raises(QRPOPrepareError, match=message):
        load_reward(None, path, {})


def test_reward_must_be_one_finite_number_per_completion():
    completions = [["a", "b"], ["c", "d"]]
    with pytest.raises(QRPOPrepareError, match="completion 1 of prompt 1 is nan"):
        score_completions(lambda p, c: [0.0, 1.0, 2.0, math.nan], ["p", "q"], completions)
    with pytest.raises(QRPOPrepareError, match="completion 0 of prompt 0 is None"):
        score_completions(lambda p, c: [None, 1.0, 2.0, 3.0], ["p", "q"], completions)
    with pytest.raises(QRPOPrepareError, match=r"returned 3 values for the 4 completions of prompts 0\.\.1"):
        score_completions(lambda p, c: [0.0, 1.0, 2.0], ["p", "q"], completions)


def test_reward_model_folder_scores_like_single_forwards(tmp_path):
    folder = save_reward_model(tmp_path / "rm")
    scorer = load_reward(str(folder), None, {}, batch_size=3)
    prompts = [CHAT_PROMPTS[0], CHAT_PROMPTS[0], CHAT_PROMPTS[1], "The river", "The river"]
    completions = [
        [{"role": "assistant", "content": "Blue."}],
        [{"role": "assistant", "content": "A long and winding answer about colours."}],
        [{"role": "assistant", "content": "Tuesday."}],
        " flows to the sea.",
        " is wide",
    ]
    scores = scorer(prompts, completions)
    assert len(scores) == 5 and len(set(scores)) == 5
    tokenizer = scorer.tokenizer
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
            assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant_end|>")
        else:
            ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
        with torch.no_grad():
            alone = scorer.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(alone, abs=1e-5)  # batching and padding change nothing

    two_labels = save_reward_model(tmp_path / "classifier", num_labels=2)
    with pytest.raises(QRPOPrepareError, match="num_labels=2"):
        load_reward(str(two_labels), None, {})


# ---------------------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------------------


def quantile_reward(reward: float, ref_rewards: list[float]) -> float:
    return quantile_rewards(torch.tensor([reward]), torch.tensor([ref_rewards])).item()


def test_pairs_have_a_top_chosen_and_a_bottom_rejected_and_skip_ties():
    rng = np.random.default_rng(0)
    # Rewards with many ties (rounded) so that some prompts have no sample below the 20th percentile.
    rewards = [list(np.round(rng.normal(size=8), 0)) for _ in range(200)]
    texts = [[f"completion {sample}" for sample in range(8)] for _ in rewards]
    prompts = [f"prompt {index}" for index in range(len(rewards))]
    rows, skipped = build_qrpo_rows(prompts, texts, rewards, "pairs", seed=5)
    assert len(rows) + len(skipped) == 200 and rows and skipped
    for row in rows:
        assert quantile_reward(row["chosen_reward"], row["ref_rewards"]) == 1.0
        assert quantile_reward(row["rejected_reward"], row["ref_rewards"]) < 0.2
        index = int(row["prompt"].split()[1])
        assert row["ref_rewards"] == rewards[index]
        assert rewards[index][int(row["chosen"].split()[1])] == row["chosen_reward"]
        assert rewards[index][int(row["rejected"].split()[1])] == row["rejected_reward"]
    for index in skipped:
        assert all(quantile_reward(reward, rewards[index]) >= 0.2 for reward in rewards[index])
    again, _ = build_qrpo_rows(prompts, texts, rewards, "pairs", seed=5)
    assert again == rows  # seeded picks

    # n = 8: a unique minimum has quantile 1/8 and qualifies; two tied minima have 2/8 and do not; all tied: skipped.
    assert select_pair([0, 1, 2, 3, 4, 5, 6, 7], np.random.default_rng(0)) == (7, 0)
    assert select_pair([0, 0, 2, 3, 4, 5, 6, 7], np.random.default_rng(0)) is None
    assert select_pair([1.0] * 8, np.random.default_rng(0)) is None


def test_all_selection_keeps_every_sample_with_its_reward():
    rewards = [[0.1, 0.5, 0.3], [2.0, 1.0, 0.0]]
    texts = [["a", "b", "c"], ["d", "e", "f"]]
    rows, skipped = build_qrpo_rows([CHAT_PROMPTS[0], "text prompt"], texts, rewards, "all")
    assert skipped == [] and len(rows) == 6
    assert [row["reward"] for row in rows] == [0.1, 0.5, 0.3, 2.0, 1.0, 0.0]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "b"}]
    assert rows[4]["completion"] == "e" and rows[4]["ref_rewards"] == [2.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------------


def test_prepared_pairs_have_exactly_the_trainer_columns(tmp_path, policy_dir, chat_prompts_file):
    result = prepare_qrpo_dataset(prepare_config(tmp_path, chat_prompts_file, policy_dir))
    dataset = load_from_disk(str(result.output_dir))
    assert dataset.column_names == list(PAIRED_COLUMNS)
    assert qrpo_dataset_layout(dataset) == "paired"
    stats = json.loads((result.output_dir / STATS_FILE_NAME).read_text())
    assert stats["prompts"] == len(CHAT_ROWS) and stats["rows"] + stats["skipped_prompts"] == len(CHAT_ROWS)
    assert stats["rows"] == len(dataset) > 0 and stats["num_samples"] == 8
    # A trailing assistant answer is dropped: the prompt ends with the user turn the samples answer.
    conversations = [row["messages"] for row in CHAT_ROWS]
    expected_prompts = [turns[:-1] if turns[-1]["role"] == "assistant" else turns for turns in conversations]
    for row in dataset:
        assert row["prompt"] in expected_prompts
        assert len(row["ref_rewards"]) == 8 and all(isinstance(value, float) for value in row["ref_rewards"])
        answer = CHAT_ROWS[expected_prompts.index(row["prompt"])]["messages"][-1]["content"]
        for member in ("chosen", "rejected"):
            (message,) = row[member]
            assert message["role"] == "assistant"
            # The stored reward is the reward of the stored completion, against the answer dropped from the prompt.
            assert answer_similarity(None, [row[member]], [answer])[0] == row[f"{member}_reward"]
        assert row["chosen_reward"] == max(row["ref_rewards"])
        assert quantile_reward(row["rejected_reward"], row["ref_rewards"]) < 0.2


def test_prepared_unpaired_rows_from_string_prompts(tmp_path, policy_dir):
    rows = [{"text": prompt, "answer": " and the sea."} for prompt in STRING_PROMPTS]
    prompts = write_jsonl(tmp_path / "text.jsonl", rows)  # `answer`: a column of the dataset, for the reward
    config = prepare_config(
        tmp_path, prompts, policy_dir, prompt_column="text", selection="all", num_samples=3, attn_implementation="auto"
    )
    dataset = load_from_disk(str(prepare_qrpo_dataset(config).output_dir))
    assert dataset.column_names == list(UNPAIRED_COLUMNS)
    assert len(dataset) == 3 * len(STRING_PROMPTS)
    assert dataset["prompt"] == [prompt for prompt in STRING_PROMPTS for _ in range(3)]
    for start in range(0, len(dataset), 3):
        rows = dataset[start : start + 3]
        assert all(isinstance(completion, str) for completion in rows["completion"])
        assert all(ref == rows["reward"] for ref in rows["ref_rewards"])  # every row: the rewards of all 3 samples


def test_bad_inputs_fail_before_sampling_with_the_fix(tmp_path, policy_dir, chat_prompts_file):
    with pytest.raises(QRPOPrepareError, match=r"no column 'prompt'; its columns are \['messages'\]"):
        prepare_qrpo_dataset(prepare_config(tmp_path, chat_prompts_file, policy_dir, prompt_column="prompt"))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "fine"}, {"prompt": "  "}])
    with pytest.raises(QRPOPrepareError, match="Row 1 of column 'prompt' is an empty prompt"):
        prepare_qrpo_dataset(prepare_config(tmp_path, empty, policy_dir, prompt_column="prompt"))
    assistant_only = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "assistant", "content": "Hi"}]}])
    with pytest.raises(QRPOPrepareError, match="Row 0 of column 'messages' does not end with a non-empty user turn"):
        prepare_qrpo_dataset(prepare_config(tmp_path, assistant_only, policy_dir))
    with pytest.raises(QRPOPrepareError, match="cannot import module"):
        prepare_qrpo_dataset(prepare_config(tmp_path, chat_prompts_file, policy_dir, reward_function="nope:reward"))
    with pytest.raises(QRPOPrepareError, match="Set exactly one of reward_model"):
        prepare_config(tmp_path, chat_prompts_file, policy_dir, reward_model=str(policy_dir))
    with pytest.raises(QRPOPrepareError, match=r"never below rejected_quantile=0\.2"):
        prepare_config(tmp_path, chat_prompts_file, policy_dir, num_samples=5)
    with pytest.raises(QRPOPrepareError, match=r"attn_implementation='flash' is not one of \('auto', 'sdpa'"):
        prepare_config(tmp_path, chat_prompts_file, policy_dir, attn_implementation="flash")
    assert not (tmp_path / "qrpo-data").exists()


def test_missing_model_folders_name_their_option_before_sampling(tmp_path, policy_dir, chat_prompts_file):
    missing = str(tmp_path / "outputs" / "no-such-model")
    with pytest.raises(SourceNotFoundError, match=r"model_name_or_path='.*no-such-model': no such file or folder"):
        prepare_qrpo_dataset(prepare_config(tmp_path, chat_prompts_file, missing))
    reward_model = dict(reward_model=missing, reward_function=None)
    with pytest.raises(SourceNotFoundError, match=r"reward_model='.*no-such-model': no such file or folder"):
        prepare_qrpo_dataset(prepare_config(tmp_path, chat_prompts_file, policy_dir, **reward_model))
    assert not (tmp_path / "qrpo-data").exists()


def test_nan_rewards_name_the_prompt(tmp_path, policy_dir, chat_prompts_file):
    reward = "tests.preference.test_prepare:nan_for_third_prompt"
    config = prepare_config(
        tmp_path, chat_prompts_file, policy_dir, reward_function=reward, reward_kwargs={}, max_new_tokens=2
    )
    with pytest.raises(QRPOPrepareError, match="of prompt 2 is nan"):
        prepare_qrpo_dataset(config)
    assert not Path(config.output_dir).exists()


def nan_for_third_prompt(prompts, completions, **kwargs):
    third = CHAT_ROWS[2]["messages"][:-1]  # the prompt: the conversation without its final answer
    return [math.nan if prompt == third else 0.0 for prompt in prompts]


def test_existing_output_is_never_replaced_silently(tmp_path, policy_dir, chat_prompts_file):
    config = prepare_config(tmp_path, chat_prompts_file, policy_dir, max_new_tokens=4, selection="all")
    first = prepare_qrpo_dataset(config)
    with pytest.raises(QRPOPrepareError, match=r"already exists.*overwrite: true"):
        prepare_qrpo_dataset(config)
    config.overwrite, config.seed = True, 7
    second = prepare_qrpo_dataset(config)
    assert second.stats["config"]["seed"] == 7
    assert json.loads((second.output_dir / STATS_FILE_NAME).read_text())["config"]["seed"] == 7
    assert first.output_dir == second.output_dir
    assert sorted(path.name for path in tmp_path.iterdir()) == ["qrpo-data"]  # no staging folders left behind

    not_ours = tmp_path / "notes"
    not_ours.mkdir()
    (not_ours / "important.txt").write_text("keep me")
    config.output_dir = str(not_ours)
    with pytest.raises(QRPOPrepareError, match="not a dataset written by qrpo_prepare"):
        prepare_qrpo_dataset(config)
    assert (not_ours / "important.txt").read_text() == "keep me"


def run_recipe(launcher: list[str], args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    command = [*launcher, str(REPO_ROOT / "recipes" / "qrpo_prepare.py"), *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_recipe_script_end_to_end_on_one_and_two_processes(tmp_path, policy_dir, chat_prompts_file):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    args = [
        "--config",
        str(REPO_ROOT / "recipes" / "configs" / "tiny" / "qrpo_prepare.yaml"),
        "--dataset",
        str(chat_prompts_file),
        "--model_name_or_path",
        str(policy_dir),
        "--max_new_tokens",
        "10",
        "--batch_size",
        "12",
    ]
    single = run_recipe(
        [accelerate, "launch", "--config_file", "accelerate_configs/cpu.yaml"],
        [*args, "--output_dir", str(tmp_path / "one")],
    )
    assert single.returncode == 0, single.stdout + single.stderr
    assert "Done:" in single.stdout and "paired rows from 6 prompts" in single.stdout
    double = run_recipe(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"],
        [*args, "--output_dir", str(tmp_path / "two")],
        env={"ACCELERATE_USE_CPU": "1"},
    )
    assert double.returncode == 0, double.stdout + double.stderr
    assert json.loads((tmp_path / "two" / STATS_FILE_NAME).read_text())["processes"] == 2
    one, two = (load_from_disk(str(tmp_path / name)) for name in ("one", "two"))
    # Each process sampled and scored half of the batches; gathered, they are the single-process rows exactly.
    assert one.to_list() == two.to_list() and len(one) > 0


def test_tiny_recipe_writes_out_the_defaults():
    path = REPO_ROOT / "recipes" / "configs" / "tiny" / "qrpo_prepare.yaml"
    assert recipe_config_from_dict(QRPOPrepareConfig, yaml.safe_load(path.read_text())) == QRPOPrepareConfig()
