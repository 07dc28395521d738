"""Multiple choice by log-likelihood: a model taught the answers scores 1.0 and 0.0 when the labels are moved; the
normalisations divide by what lm-eval divides by; bad task records fail with their file and line."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from apertus_hf import ApertusConfig, ApertusForCausalLM
from apertus_hf.evaluation.multiple_choice import (
    MultipleChoiceItem,
    TaskFormatError,
    accuracy_metrics,
    encode_context_continuation,
    evaluate_multiple_choice,
    read_task,
    score_items,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TASK = REPO_ROOT / "eval" / "tasks" / "apertus_toy_mc" / "apertus_toy_mc.jsonl"
METRICS = ("acc", "acc_norm", "acc_bytes")


def choice_predictions(loglikelihoods: list[float], choices: list[str]) -> dict[str, int]:
    """The choice each normalisation picks for one item, by the shipped metric."""
    item = MultipleChoiceItem("", tuple(choices), 0)
    return {name: picks[0] for name, picks in accuracy_metrics([item], [loglikelihoods])["predictions"].items()}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO_ROOT / "data" / "tokenizer")


# A toy task whose answers a tiny model can be taught: each context has one right continuation.
TAUGHT_ITEMS = [
    MultipleChoiceItem("Sky:", ("blue", "green", "red"), 0),
    MultipleChoiceItem("Snow:", ("black", "white", "brown"), 1),
    MultipleChoiceItem("Grass:", ("pink", "grey", "green"), 2),
    MultipleChoiceItem("Zürich:", ("Schweiz", "France", "Italia"), 0, "de"),
    MultipleChoiceItem("Lugano:", ("Deutschland", "Svizzera", "España"), 1, "it"),
    MultipleChoiceItem("Genève:", ("Österreich", "Portugal", "Suisse"), 2, "fr"),
    MultipleChoiceItem("2+2=", ("4", "five", "22"), 0),
    MultipleChoiceItem("Cat:", ("woof", "meow", "moo"), 1),
]


@pytest.fixture(scope="module")
def taught_model(tokenizer):
    """A tiny model trained on `context + " " + gold choice` until it prefers the gold continuation: the right
    answer is certain for it, and any other labelling of the same items is wrong."""
    threads = torch.get_num_threads()
    # Tiny matrices: one thread avoids thread start-up and contention costs (about 50x faster on a busy 2-core CPU).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = ApertusConfig.from_preset(
        "small",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer),
    )
    model = ApertusForCausalLM(config)
    rows, labels = [], []
    for item in TAUGHT_ITEMS:
        context_ids, continuation_ids = encode_context_continuation(
            tokenizer, item.context, " " + item.choices[item.gold]
        )
        rows.append(context_ids + continuation_ids)
        # Only the answer tokens are targets: the model learns which choice follows each context.
        labels.append([-100] * len(context_ids) + continuation_ids)
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    label_ids = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    model.train()
    for _ in range(30):
        loss = model(input_ids=input_ids, labels=label_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.2, f"the tiny model did not learn the answers (loss {loss.item():.3f})"
    yield model.eval(), TAUGHT_ITEMS
    torch.set_num_threads(threads)


def test_model_taught_the_answers_scores_one_and_zero_with_moved_labels(taught_model, tokenizer):
    model, items = taught_model
    accuracy = accuracy_metrics(items, score_items(model, tokenizer, items, batch_size=5, progress=False))
    assert {name: accuracy[name] for name in METRICS} == {name: 1.0 for name in METRICS}
    assert {name: accuracy[f"{name}_stderr"] for name in METRICS} == {name: 0.0 for name in METRICS}

    # The same questions with the label moved to a wrong choice: the model still picks the taught answer.
    moved = [replace(item, gold=(item.gold + 1) % len(item.choices)) for item in items]
    moved_accuracy = accuracy_metrics(moved, score_items(model, tokenizer, moved, batch_size=5, progress=False))
    assert {name: moved_accuracy[name] for name in METRICS} == {name: 0.0 for name in METRICS}


def test_scores_do_not_depend_on_batching(taught_model, tokenizer):
    model, items = taught_model
    one_by_one = score_items(model, tokenizer, items, batch_size=1, progress=False)
    batched = score_items(model, tokenizer, items, batch_size=16, progress=False)
    assert torch.allclose(torch.tensor(one_by_one), torch.tensor(batched), atol=1e-4)


def test_continuation_score_is_the_sum_of_its_token_log_probs(taught_model, tokenizer):
    model, items = taught_model
    item = items[0]
    scores = score_items(model, tokenizer, [item], progress=False)[0]
    for choice, score in zip(item.choices, scores, strict=True):
        context_ids, continuation_ids = encode_context_continuation(tokenizer, item.context, " " + choice)
        ids = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        expected = log_probs[torch.arange(len(targets)), targets][-len(continuation_ids) :].sum()
        assert score == pytest.approx(expected.item(), abs=1e-4)


def test_context_and_continuation_split_as_lm_eval_splits_them(tokenizer):
    # BOS from the tokenizer starts the context; the context's trailing space moves to the continuation.
    context_ids, continuation_ids = encode_context_continuation(tokenizer, "Question: 2+2?\nAnswer: ", "four")
    assert context_ids[0] == tokenizer.bos_token_id
    assert context_ids == tokenizer.encode("Question: 2+2?\nAnswer:")
    assert tokenizer.decode(continuation_ids) == " four"
    # An empty context is the BOS token alone.
    context_ids, continuation_ids = encode_context_continuation(tokenizer, "", " four")
    assert context_ids == [tokenizer.bos_token_id]
    assert continuation_ids == tokenizer.encode(" four", add_special_tokens=False)


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes(tokenizer):
    # "üüüü": 4 characters, 8 bytes; "abcdef": 6 characters, 6 bytes; both 4 tokens after a space.
    choices = ["üüüü", "abcdef"]
    token_counts = [len(tokenizer.encode(" " + choice, add_special_tokens=False)) for choice in choices]
    assert token_counts == [4, 4]
    loglikelihoods = [-3.0, -4.0]
    predictions = choice_predictions(loglikelihoods, choices)
    assert predictions["acc"] == 0
    assert predictions["acc_norm"] == 1  # -3/4 < -4/6
    assert predictions["acc_bytes"] == 0  # -3/8 > -4/6
    per_token = [score / count for score, count in zip(loglikelihoods, token_counts, strict=True)]
    assert per_token.index(max(per_token)) != predictions["acc_norm"]


def test_ties_pick_the_first_choice_as_numpy_argmax():
    assert choice_predictions([-2.0, -2.0, -5.0], ["ab", "ab", "ab"]) == {"acc": 0, "acc_norm": 0, "acc_bytes": 0}


def _write_task(path: Path, bad_line: str) -> Path:
    good = json.dumps({"context": "Q: 1+1?\nA:", "choices": ["2", "3"], "gold": 0})
    path.write_text(f"{good}\n{good}\n{bad_line}\n{good}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"context": "Q?", "choices": ["a", "b"]}', "missing field(s) gold"),
        ('{"choices": ["a", "b"], "gold": 0}', "missing field(s) context"),
        ('{"context": "Q?", "choices": ["a", "b"], "gold": 2}', "gold must be an integer in 0..1"),
        ('{"context": "Q?", "choices": ["a", "b"], "gold": -1}', "gold must be an integer in 0..1"),
        ('{"context": "Q?", "choices": ["a", "b"], "gold": true}', "gold must be an integer"),
        ('{"context": "Q?", "choices": ["a"], "gold": 0}', "at least 2 strings"),
        ('{"context": "Q?", "choices": "ab", "gold": 0}', "at least 2 strings"),
        ('{"context": "Q?", "choices": ["a", ""], "gold": 0}', "non-empty string"),
        ('{"context": 5, "choices": ["a", "b"], "gold": 0}', "context must be a string"),
        ('["Q?", ["a", "b"], 0]', "expected a JSON object"),
        ('{"context": "Q?", "choices": ["a", "b"], "gold": 0', "not valid JSON"),
    ],
)
def test_bad_record_names_file_line_and_problem(tmp_path, bad_line, problem):
    path = _write_task(tmp_path / "task.jsonl", bad_line)
    with pytest.raises(TaskFormatError) as error:
        read_task(path)
    assert f"{path}:3: " in str(error.value)
    assert problem in str(error.value)


def test_shipped_task_is_valid_and_multilingual():
    items = read_task(SHIPPED_TASK)
    assert len(items) == 48
    assert {item.language for item in items} == {"en", "de", "fr", "it", "es", "rm"}
    # The gold answers are spread over the positions, so always picking one position scores 0.25.
    assert sorted({item.gold for item in items}) == [0, 1, 2, 3]
    assert all(sum(item.gold == position for item in items) == 12 for position in range(4))


def test_evaluate_writes_a_result_with_per_language_breakdown(taught_model, tokenizer, tmp_path):
    model, items = taught_model
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    task = tmp_path / "colours.jsonl"
    records = [{"context": i.context, "choices": list(i.choices), "gold": i.gold} for i in items]
    for record, item in zip(records, items, strict=True):
        if item.language:
            record["language"] = item.language
    task.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    result = evaluate_multiple_choice(tmp_path / "model", task, device="cpu", limit=5, progress=False)
    assert result.evaluation == "multiple_choice"
    assert result.task_name == "colours"
    assert result.metrics == {name: 1.0 for name in METRICS}
    assert result.details["num_items"] == 5
    assert result.details["per_language"] == {
        "de": {"num_items": 1, "acc": 1.0, "acc_norm": 1.0, "acc_bytes": 1.0},
        "it": {"num_items": 1, "acc": 1.0, "acc_norm": 1.0, "acc_bytes": 1.0},
    }
    assert result.details["predictions"]["acc"] == [item.gold for item in items[:5]]
    written = json.loads(result.write(tmp_path / "result.json").read_text())
    assert written["metrics"] == result.metrics
