"""The charter judge: its charter files, the expected-digit rating, the pairwise re-ranking, the routing of contested
prompts in qrpo_prepare, the contested-prompt labelling, and the tiny judge's training data.

The judge here is a tiny random Apertus whose LM head makes the digits (and "A", "B", "Yes", "No") likely: every
embedding has a constant in hidden dimension 0, which only those tokens' LM-head rows read with a large weight, while
every other row is small. The rest of the network is random, with weights large enough that the distribution over the
digits depends on the input. The "blind" variant zeroes every layer's output
projections: its residual stream is the embedding of the last token, the same for every question, so all its answers
are the same distribution, exactly.
"""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from datasets import load_from_disk
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from apertus_hf import ApertusForCausalLM
from apertus_hf.preference import (
    STATS_FILE_NAME,
    CharterError,
    CharterJudge,
    JudgeError,
    LabelPromptsConfig,
    LabelPromptsError,
    QRPOPrepareConfig,
    QRPOPrepareError,
    label_prompts,
    load_charter,
    load_prompts,
    prepare_qrpo_dataset,
)
from apertus_hf.preference.charter import comparison_messages, contested_messages, rating_messages
from apertus_hf.preference.judge import digit_ratings, reranked_rewards, top_k_indices, win_rates
from apertus_hf.preference.labelling import LABEL_STATS_FILE_NAME
from apertus_hf.preference.rewards import substring_frequency
from apertus_hf.recipe_args import recipe_config_from_dict
from tests.trainers.tiny_policy import CHAT_ROWS, chat_tokenizer, save_policy, stopping_policy, tiny_config, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CHARTER = REPO_ROOT / "data" / "charters" / "example_charter.yaml"
# Weights in hidden dimension 0 of the LM-head rows of the tokens the judge answers with.
BOOSTED = {**{str(digit): 5.0 + 0.25 * digit for digit in range(1, 10)}, "A": 8.0, "B": 7.0, "Yes": 7.5, "No": 7.0}
CONTESTED = [True, False, True, False, False, True]  # one flag per row of CHAT_ROWS


def tiny_judge(blind: bool = False, seed: int = 0) -> ApertusForCausalLM:
    """A tiny random Apertus that answers mostly with a digit, a letter or yes/no (see the module docstring)."""
    torch.manual_seed(seed)
    model = ApertusForCausalLM(tiny_config(initializer_range=0.2))  # weights large enough to depend on the input
    tokenizer = chat_tokenizer()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.model.embed_tokens.weight[:, 0] = 3.0
        model.lm_head.weight.normal_(0.0, 0.01)
        for token, weight in BOOSTED.items():
            row = model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)]
            row.normal_(0.0, 0.3)
            row[0] = weight / 2.5
        if blind:
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return model.eval()


def next_token_probabilities(model, tokenizer, messages) -> torch.Tensor:
    """The next-token distribution after `messages` from one unpadded forward pass: the hand computation."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1)


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def charter():
    return load_charter(EXAMPLE_CHARTER)


@pytest.fixture(scope="module")
def judge_model():
    return tiny_judge()


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, judge_model) -> Path:
    return save_policy(tmp_path_factory.mktemp("judge"), judge_model)


def test_charter_files_yaml_and_markdown(tmp_path, charter):
    assert [principle.id for principle in charter.principles] == [
        "language",
        "honesty",
        "balance",
        "respect",
        "brevity",
    ]
    assert charter.text.startswith(f"{charter.title}\n\n{charter.preamble}\n\n1. Language: Answer in the language")
    assert charter.topics == ["Language", "Honesty", "Balance", "Respect", "Brevity"]
    markdown = tmp_path / "charter.md"
    markdown.write_text("# My charter\n\n## Kindness\nBe kind.\n\n## Truth\nBe true.\n")
    loaded = load_charter(markdown)
    assert loaded.text == markdown.read_text().strip() and loaded.title == "My charter"
    assert loaded.topics == ["Kindness", "Truth"]
    assert "<charter>\n# My charter\n\n## Kindness" in rating_messages(loaded, "Hi", "Hello")[0]["content"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("title: T\n", "has no principles"),
        ("principles: [{id: a, title: A, text: x}]\n", "has no title"),
        ("title: T\nrules: []\nprinciples: [{id: a, title: A, text: x}]\n", r"unknown keys \['rules'\]"),
        ("title: T\nprinciples: [{id: a, title: A}]\n", "principle 0 has .*exactly the keys id, title and text"),
        ("title: T\nprinciples: [{id: a, title: A, text: x}, {id: a, title: B, text: y}]\n", r"ids \['a'\] occur"),
        ("title: T\nprinciples: [{id: a, title: A, text: '  '}]\n", r"no text in \['text'\]"),
        ("- just a list\n", "holds list, not a mapping"),
        ("title: [unclosed\n", "is not valid YAML"),
    ],
)
def test_bad_charters_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "charter.yaml"
    path.write_text(text)
    with pytest.raises(CharterError, match=message):
        load_charter(path)


def test_charter_file_types_and_missing_files(tmp_path):
    with pytest.raises(CharterError, match=r"unknown file type '\.txt'.*YAML .*Markdown"):
        load_charter(tmp_path / "charter.txt")
    with pytest.raises(CharterError, match="no such file"):
        load_charter(tmp_path / "missing.yaml")
    (tmp_path / "empty.md").write_text("\n")
    with pytest.raises(CharterError, match="is empty"):
        load_charter(tmp_path / "empty.md")


def test_rating_is_the_mean_digit_renormalised_over_the_digits():
    probabilities = torch.zeros(1, 9, dtype=torch.float64)
    probabilities[0, 2], probabilities[0, 6] = 0.1, 0.3  # p("3") = 0.1, p("7") = 0.3; the rest of the mass elsewhere
    ratings, masses = digit_ratings(probabilities.log())
    assert ratings.item() == pytest.approx((3 * 0.1 + 7 * 0.3) / 0.4) == 6.0
    assert masses.item() == pytest.approx(0.4)
    uniform, mass = digit_ratings(torch.full((1, 9), math.log(0.1), dtype=torch.float64))
    assert uniform.item() == pytest.approx(5.0) and mass.item() == pytest.approx(0.9)


def test_judge_ratings_are_the_expected_digit_of_one_forward_pass_whatever_the_batching(
    judge_model, tokenizer, charter
):
    prompts = [CHAT_ROWS[0]["messages"][:1], CHAT_ROWS[2]["messages"][:3], "The river", CHAT_ROWS[1]["messages"][:2]]
    completions = [[{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "Bonjour, un."}]]
    completions += [" flows to the sea, slowly and wide.", [{"role": "assistant", "content": "Tuesday."}]]
    prompts, completions = prompts * 2, completions + completions[::-1]  # 8 questions of different lengths

    one_by_one = CharterJudge(judge_model, tokenizer, charter, batch_size=1, pairwise_top_k=0)
    ratings, masses = one_by_one.rate(prompts, completions)
    digit_ids = [tokenizer.convert_tokens_to_ids(str(digit)) for digit in range(1, 10)]
    for prompt, completion, rating, mass in zip(prompts, completions, ratings, masses, strict=True):
        p = next_token_probabilities(judge_model, tokenizer, rating_messages(charter, prompt, completion))[digit_ids]
        assert rating == pytest.approx(sum(d * p[d - 1].item() for d in range(1, 10)) / p.sum().item(), abs=1e-5)
        assert mass == pytest.approx(p.sum().item(), abs=1e-5)
    assert min(masses) > 0.2 and len({round(rating, 6) for rating in ratings}) == 8  # each question its own rating

    right_padding = chat_tokenizer()
    right_padding.padding_side = "right"  # the judge pads on the left whatever the tokenizer says
    batched = CharterJudge(judge_model, right_padding, charter, batch_size=8, pairwise_top_k=0)
    first, second = batched(prompts, completions), batched(prompts, completions)
    assert first == pytest.approx(ratings, abs=1e-5)
    assert first == second  # deterministic
    assert batched.tally.ratings == 16 and batched.tally.comparisons == 0
    assert batched.tally.summary()["mean_digit_mass"] == pytest.approx(sum(masses) / len(masses), abs=1e-6)


def test_reranking_hands_the_top_values_out_by_win_rate():
    scores = [5.0, 8.0, 7.0, 2.0, 6.0]
    assert top_k_indices(scores, 3) == [1, 2, 4]
    # The pairwise pass ranks 2 first, then 4, then 1: they get 8, 7, 6; the others keep theirs.
    assert reranked_rewards(scores, {1: 0.2, 2: 0.9, 4: 0.5}) == [5.0, 6.0, 8.0, 2.0, 7.0]
    assert reranked_rewards(scores, {1: 0.5, 2: 0.5, 4: 0.5}) == scores  # ties keep the ratings' order
    # p(i beats j) averages both orders: a judge that always says "A" makes every pair even.
    always_first = {(i, j): 1.0 for i in range(3) for j in range(3) if i != j}
    assert win_rates(always_first, [0, 1, 2]) == {0: 0.5, 1: 0.5, 2: 0.5}
    # 0 beats 1 in both orders (p 0.8 shown first, 0.3 for 1 shown first), and 2 beats both: rates follow.
    first_wins = {(0, 1): 0.8, (1, 0): 0.3, (0, 2): 0.2, (2, 0): 0.9, (1, 2): 0.1, (2, 1): 0.7}
    rates = win_rates(first_wins, [0, 1, 2])
    assert rates == pytest.approx({0: (0.75 + 0.15) / 2, 1: (0.25 + 0.2) / 2, 2: (0.85 + 0.8) / 2})


def test_pairwise_pass_reorders_the_top_k_as_the_comparisons_say(judge_model, tokenizer, charter):
    prompts = [CHAT_ROWS[index]["messages"][:1] for index in (0, 3, 4)]
    texts = ["Blue.", "Red, I think.", "bleu", "Green!", "I do not know."]
    flat_prompts = [prompt for prompt in prompts for _ in texts]
    flat_completions = [[{"role": "assistant", "content": text}] for _ in prompts for text in texts]
    judge = CharterJudge(judge_model, tokenizer, charter, batch_size=8, pairwise_top_k=3, completions_per_prompt=5)
    rewards = judge(flat_prompts, flat_completions)
    ratings, _ = judge.rate(flat_prompts, flat_completions)

    letter_ids = [tokenizer.convert_tokens_to_ids(letter) for letter in "AB"]
    changed, choice_masses = 0, []
    for number, prompt in enumerate(prompts):
        own = ratings[5 * number : 5 * number + 5]
        top = top_k_indices(own, 3)
        first_wins = {}
        for i in top:
            for j in (j for j in top if j != i):
                messages = comparison_messages(charter, prompt, texts[i], texts[j])
                p = next_token_probabilities(judge_model, tokenizer, messages)[letter_ids]
                first_wins[(i, j)] = (p[0] / p.sum()).item()
                choice_masses.append(p.sum().item())
        expected = reranked_rewards(own, win_rates(first_wins, top))
        assert rewards[5 * number : 5 * number + 5] == pytest.approx(expected, abs=1e-5)
        assert sorted(expected) == sorted(own)  # values handed out again, none invented
        changed += expected != own
    assert judge.tally.pairwise_prompts == 3 and judge.tally.comparisons == 3 * 6
    assert judge.tally.reordered_prompts == changed > 0  # the comparisons disagree with the ratings here
    mean_choice_mass = sum(choice_masses) / len(choice_masses)
    assert judge.tally.summary()["mean_choice_mass"] == pytest.approx(mean_choice_mass, rel=1e-4)


def test_a_judge_that_prefers_a_position_changes_no_order(tokenizer, charter):
    blind = tiny_judge(blind=True)
    judge = CharterJudge(blind, tokenizer, charter, batch_size=32, pairwise_top_k=5)
    prompts = [CHAT_ROWS[0]["messages"][:1]] * 6
    completions = ["Blue.", "Red.", "A long answer about colours.", "bleu", "Green.", "Yes."]
    rewards = judge(prompts, completions)
    p = next_token_probabilities(blind, tokenizer, comparison_messages(charter, prompts[0], "x", "y"))
    a, b = (p[tokenizer.convert_tokens_to_ids(letter)].item() for letter in "AB")
    assert a / (a + b) > 0.6  # it prefers "A" whichever response is shown first ...
    assert len(set(rewards)) == 1 and judge.tally.comparisons == 20  # ... every pair in both orders ...
    assert judge.tally.reordered_prompts == 0  # ... so every pair is even and nothing moves


def test_judge_needs_single_token_answers_and_whole_prompts(judge_model, tokenizer, charter):
    no_seven = {"[UNK]": 0, "[PAD]": 1, **{token: number + 2 for number, token in enumerate("12345689AB")}}
    word_level = Tokenizer(models.WordLevel(no_seven, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    lacking = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", pad_token="[PAD]")
    lacking.chat_template = "{% for message in messages %}{{ message.content }}{% endfor %}"
    with pytest.raises(JudgeError, match=r"the digit '7' as the tokens \['\[UNK\]'\].*must be one"):
        CharterJudge(judge_model, lacking, charter)
    judge = CharterJudge(judge_model, tokenizer, charter, pairwise_top_k=2, completions_per_prompt=2)
    with pytest.raises(JudgeError, match="not a multiple of completions_per_prompt=2"):
        judge(["a", "a", "b"], ["x", "y", "z"])
    with pytest.raises(JudgeError, match=r"Completions 0\.\.1 should share one prompt"):
        judge(["a", "b"], ["x", "y"])


# ---------------------------------------------------------------------------------------------------------------------
# Routing in qrpo_prepare
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return save_policy(tmp_path_factory.mktemp("policy"), stopping_policy(stop_probability=0.2))


@pytest.fixture(scope="module")
def routed_prompts(tmp_path_factory) -> Path:
    rows = [{**row, "contested": flag} for row, flag in zip(CHAT_ROWS, CONTESTED, strict=True)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "routed.jsonl", rows)


def routed_config(tmp_path, dataset, policy_dir, judge_dir, **overrides) -> QRPOPrepareConfig:
    values = dict(
        dataset=str(dataset),
        model_name_or_path=str(policy_dir),
        num_samples=3,
        max_new_tokens=6,
        batch_size=18,
        selection="all",
        reward_function="apertus_hf.preference.rewards:substring_frequency",
        reward_kwargs={"substring": "e"},
        judge_model=str(judge_dir),
        charter=str(EXAMPLE_CHARTER),
        route_column="contested",
        judge_pairwise_top_k=2,
        output_dir=str(tmp_path / "qrpo-data"),
    )
    return QRPOPrepareConfig(**{**values, **overrides})


def test_contested_prompts_are_judged_and_the_others_rewarded(
    tmp_path, routed_prompts, policy_dir, judge_dir, judge_model, tokenizer, charter
):
    result = prepare_qrpo_dataset(routed_config(tmp_path, routed_prompts, policy_dir, judge_dir))
    dataset = load_from_disk(str(result.output_dir))
    stats = json.loads((result.output_dir / STATS_FILE_NAME).read_text())
    prompts, _ = load_prompts(str(routed_prompts), "train", "messages")
    judge = CharterJudge(judge_model, tokenizer, charter, pairwise_top_k=2, completions_per_prompt=3)
    masses = []
    for index, (prompt, contested) in enumerate(zip(prompts, CONTESTED, strict=True)):
        rows = dataset.select(range(3 * index, 3 * index + 3))
        assert all(row["prompt"] == prompt for row in rows)
        completions = rows["completion"]
        if contested:
            expected = judge([prompt] * 3, completions)
            masses += judge.rate([prompt] * 3, completions)[1]
            assert all(1 <= reward <= 9 for reward in rows["reward"])
        else:
            expected = substring_frequency([prompt] * 3, completions, substring="e")
        assert rows["ref_rewards"][0] == pytest.approx(expected, abs=1e-5)
        assert rows["reward"] == pytest.approx(expected, abs=1e-5)

    routes = stats["routes"]
    assert (routes["judge"]["prompts"], routes["judge"]["completions"]) == (3, 9)
    assert (routes["reward"]["prompts"], routes["reward"]["completions"]) == (3, 9)
    for route, flag in (("judge", True), ("reward", False)):
        values = [reward for row, reward in enumerate(dataset["reward"]) if CONTESTED[row // 3] == flag]
        assert routes[route]["reward_mean"] == pytest.approx(sum(values) / len(values))
        assert (routes[route]["reward_min"], routes[route]["reward_max"]) == (min(values), max(values))
    assert routes["judge"]["mean_digit_mass"] == pytest.approx(sum(masses) / len(masses), abs=1e-6)
    assert routes["judge"]["pairwise_prompts"] == 3 and routes["judge"]["comparisons"] == 3 * 2
    assert 0 <= routes["judge"]["reordered_prompts"] <= 3
    assert routes["judge"]["scorer"] == str(judge_dir) and routes["reward"]["scorer"].endswith(":substring_frequency")


def test_without_a_route_column_the_judge_scores_every_prompt(tmp_path, routed_prompts, policy_dir, judge_dir):
    config = routed_config(
        tmp_path, routed_prompts, policy_dir, judge_dir, route_column=None, reward_function=None, reward_kwargs={}
    )
    config.num_samples, config.max_new_tokens, config.judge_pairwise_top_k = 2, 3, 0
    routes = prepare_qrpo_dataset(config).stats["routes"]
    assert (routes["judge"]["prompts"], routes["judge"]["completions"], routes["judge"]["comparisons"]) == (6, 12, 0)
    assert routes["reward"] == {
        "prompts": 0, "completions": 0, "reward_mean": None, "reward_min": None, "reward_max": None, "scorer": None
    }  # fmt: skip
    assert 1 <= routes["judge"]["reward_min"] <= routes["judge"]["reward_max"] <= 9


def test_routing_inputs_fail_before_sampling_with_the_fix(tmp_path, routed_prompts, policy_dir, judge_dir):
    missing = routed_config(tmp_path, routed_prompts, policy_dir, judge_dir, route_column="controversial")
    with pytest.raises(QRPOPrepareError, match=r"no column 'controversial' \(route_column\).*label_prompts\.py"):
        prepare_qrpo_dataset(missing)
    rows = [{**row, "contested": flag} for row, flag in zip(CHAT_ROWS, ["yes", "no"] * 3, strict=True)]
    strings = write_jsonl(tmp_path / "strings.jsonl", rows)
    with pytest.raises(QRPOPrepareError, match=r"Row 0 of route_column 'contested' is 'yes', not a boolean"):
        prepare_qrpo_dataset(routed_config(tmp_path, strings, policy_dir, judge_dir))
    no_charter = routed_config(tmp_path, routed_prompts, policy_dir, judge_dir, charter=str(tmp_path / "none.yaml"))
    with pytest.raises(CharterError, match="no such file"):
        prepare_qrpo_dataset(no_charter)
    with pytest.raises(QRPOPrepareError, match="judge_model needs a charter"):
        routed_config(tmp_path, routed_prompts, policy_dir, judge_dir, charter=None)
    with pytest.raises(QRPOPrepareError, match="route_column is for the judge, and judge_model is null"):
        routed_config(tmp_path, routed_prompts, policy_dir, judge_dir, judge_model=None, charter=None)
    with pytest.raises(QRPOPrepareError, match=r"judge scores every prompt.*set reward_function: null"):
        routed_config(tmp_path, routed_prompts, policy_dir, judge_dir, route_column=None)
    assert not (tmp_path / "qrpo-data").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Labelling contested prompts
# ---------------------------------------------------------------------------------------------------------------------


def test_labelling_writes_the_routing_column_from_yes_no_probabilities(
    tmp_path, judge_dir, judge_model, tokenizer, charter
):
    rows = [{"messages": row["messages"], "id": number} for number, row in enumerate(CHAT_ROWS)]
    dataset = write_jsonl(tmp_path / "prompts.jsonl", rows)
    config = LabelPromptsConfig(
        dataset=str(dataset), model_name_or_path=str(judge_dir), batch_size=4, output_dir=str(tmp_path / "labelled")
    )
    result = label_prompts(config)
    labelled = load_from_disk(str(result.output_dir))["train"]
    assert labelled["id"] == list(range(len(CHAT_ROWS)))
    yes_no = [tokenizer.convert_tokens_to_ids(word) for word in ("Yes", "No")]
    prompts, columns = load_prompts(str(result.output_dir), "train", "messages")
    answer_masses = []
    for prompt, probability, label in zip(
        prompts, labelled["contested_probability"], labelled["contested"], strict=True
    ):
        p = next_token_probabilities(judge_model, tokenizer, contested_messages(prompt, charter))[yes_no]
        assert probability == pytest.approx((p[0] / p.sum()).item(), abs=1e-5)
        assert label is (probability > 0.5)
        answer_masses.append(p.sum().item())
    assert all(isinstance(value, bool) for value in columns["contested"])  # what qrpo_prepare's route_column reads
    stats = json.loads((result.output_dir / LABEL_STATS_FILE_NAME).read_text())
    assert stats["splits"]["train"]["contested"] == sum(labelled["contested"])
    assert stats["splits"]["train"]["mean_answer_mass"] == pytest.approx(sum(answer_masses) / len(answer_masses), 1e-4)

    with pytest.raises(LabelPromptsError, match="already exists; labels are never written over anything"):
        label_prompts(config)
    config.output_dir = str(tmp_path / "again")
    config.dataset = str(result.output_dir)
    with pytest.raises(LabelPromptsError, match=r"already has the columns \['contested', 'contested_probability'\]"):
        label_prompts(config)
    assert not (tmp_path / "again").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The tiny judge's training data
# ---------------------------------------------------------------------------------------------------------------------


def read_judge_split(split: str) -> list[dict]:
    path = REPO_ROOT / "data" / "judge" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def judge_data_builder():
    spec = importlib.util.spec_from_file_location("build_judge_data", REPO_ROOT / "data" / "build_judge_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_judge_data_asks_exactly_what_the_judge_asks_and_follows_its_rule(charter, judge_data_builder):
    rows = read_judge_split("test")
    assert {row["task"] for row in rows} == {"rating", "comparison", "contested"}
    for row in rows:
        question, (answer,) = row["messages"][:-1], row["messages"][-1:]
        assert answer == {"role": "assistant", "content": row["target"]}
        assert row["ratings"] == [judge_data_builder.rule_rating(response) for response in row["responses"]]
        if row["task"] == "rating":
            assert question == rating_messages(charter, row["conversation"], row["responses"][0])
            assert row["target"] == str(row["ratings"][0]) and row["ratings"][0] in (1, 5, 9)
        elif row["task"] == "comparison":
            assert question == comparison_messages(charter, row["conversation"], *row["responses"])
            assert row["target"] == "AB"[row["ratings"].index(max(row["ratings"]))]
        else:
            assert question == contested_messages(row["conversation"], charter)
            assert row["target"] in ("Yes", "No")


def test_build_judge_data_regenerates_the_shipped_files(tmp_path, monkeypatch, judge_data_builder):
    arguments = ["--output", str(tmp_path / "judge"), "--prompts_output", str(tmp_path / "judge_prompts")]
    monkeypatch.setattr("sys.argv", ["build_judge_data.py", *arguments])
    judge_data_builder.main()
    for folder in ("judge", "judge_prompts"):
        for name in ("train.jsonl", "test.jsonl"):
            shipped = REPO_ROOT / "data" / folder / name
            assert (tmp_path / folder / name).read_bytes() == shipped.read_bytes(), shipped
    train_questions = {json.dumps(row["conversation"]) for row in read_judge_split("train") if row["target"] == "Yes"}
    test_questions = {json.dumps(row["conversation"]) for row in read_judge_split("test") if row["target"] == "Yes"}
    assert not train_questions & test_questions  # contested test questions are on topics train never asks about


def test_routed_prompts_hold_out_their_test_split(judge_data_builder):
    """QRPO trains on data/judge_prompts train and make alignment-tiny evaluates on test: no prompt of one is in the
    other, the contested prompts are every question of the split's topics (the test ones never in the judge's
    training data), and the task prompts are data/chat's split."""

    def read(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    def questions(rows):
        return {json.dumps(row["messages"][:-1]) for row in rows}

    prompts = {split: read(REPO_ROOT / "data" / "judge_prompts" / f"{split}.jsonl") for split in ("train", "test")}
    assert not questions(prompts["train"]) & questions(prompts["test"])
    for split, rows in prompts.items():
        kinds = [row["kind"] for row in rows]
        assert kinds.count("contested") == kinds.count("task") > 0
        contested = questions(row for row in rows if row["kind"] == "contested")
        assert contested == {json.dumps(question) for question in judge_data_builder.contested_questions(split)}
        if split == "test":
            assert not contested & {json.dumps(row["conversation"]) for row in read_judge_split("train")}
        chat = {json.dumps(row["messages"]) for row in read(REPO_ROOT / "data" / "chat" / f"{split}.jsonl")}
        assert {json.dumps(row["messages"]) for row in rows if row["kind"] == "task"} <= chat


def test_judge_routed_tiny_recipe_writes_out_every_option():
    written = yaml.safe_load((REPO_ROOT / "recipes" / "configs" / "tiny" / "qrpo_prepare_judge.yaml").read_text())
    assert set(written) == {field.name for field in dataclasses.fields(QRPOPrepareConfig)}
    config = recipe_config_from_dict(QRPOPrepareConfig, written)
    assert (config.judge_model, config.route_column, config.judge_pairwise_top_k) == (
        "outputs/judge-tiny",
        "contested",
        5,
    )
    assert load_charter(REPO_ROOT / config.charter) == load_charter(EXAMPLE_CHARTER)
    assert all(field.metadata.get("help") for field in dataclasses.fields(LabelPromptsConfig))
