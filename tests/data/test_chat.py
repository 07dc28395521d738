"""The chat dataset shipped under data/chat is what the default SFT run trains and evaluates on."""

import importlib.util
import json
import re
from pathlib import Path

from transformers import AutoTokenizer

from apertus_hf.tokenization import APERTUS_CHAT_TEMPLATE

DATA = Path(__file__).resolve().parents[2] / "data"


def read_split(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / "chat" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def build_chat_module():
    spec = importlib.util.spec_from_file_location("build_chat", DATA / "build_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_chat_regenerates_the_shipped_files_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["build_chat.py", "--output", str(tmp_path)])
    build_chat_module().main()
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DATA / "chat" / f"{split}.jsonl").read_bytes(), split


def test_splits_are_disjoint_multilingual_and_small():
    train, test = read_split("train"), read_split("test")
    assert (len(train), len(test)) == (2400, 300)
    assert not {json.dumps(row["messages"]) for row in train} & {json.dumps(row["messages"]) for row in test}
    assert (
        {row["language"] for row in test} == {row["language"] for row in train} == {"en", "fr", "it", "es", "de", "rm"}
    )
    assert sum(path.stat().st_size for path in (DATA / "chat").glob("*.jsonl")) < 1_000_000
    assert any(row["messages"][0]["role"] == "system" for row in train)
    assert any(len(row["tasks"]) > 1 for row in train)


def expected_answer(builder, language: str, task: str, question: str) -> str:
    """The answer to `question`, worked out from the question alone."""
    yes, no = builder.YES_NO[language]
    numbers = [int(number) for number in re.findall(r"\d+", question)]
    if task == "add":
        return f"{numbers[0]} + {numbers[1]} = {numbers[0] + numbers[1]}."
    if task == "greater":
        return yes if numbers[0] > numbers[1] else no
    if task == "count":
        step = numbers[1] - numbers[0]
        return ", ".join(str(numbers[2] + step * i) for i in range(1, 4))
    if task == "is_animal":
        word = re.search(r"«\s?(.+?)\s?»", question).group(1)
        return yes if word in builder.NOUNS[language].split()[: builder.NUM_ANIMALS] else no
    if task == "uppercase":
        return question.rsplit(" ", 1)[-1].upper()
    if task == "echo":
        return question.split(": ", 1)[1]
    days = builder.WEEKDAYS[language].split()
    asked = next(day for day in days if re.search(rf"\b{day}\b", question))
    return days[(days.index(asked) + (1 if task == "day_after" else -1)) % 7]


def test_every_answer_follows_from_its_question():
    builder = build_chat_module()
    for row in read_split("train") + read_split("test"):
        turns = [message["content"] for message in row["messages"] if message["role"] != "system"]
        for task, question, answer in zip(row["tasks"], turns[::2], turns[1::2], strict=True):
            expected = expected_answer(builder, row["language"], task, question)
            # Weekday answers are sentences ("After Monday comes Tuesday."): the day ends them.
            assert answer == expected or answer.endswith(f" {expected}."), (row, expected)


def test_every_conversation_renders_with_the_apertus_template():
    tokenizer = AutoTokenizer.from_pretrained(DATA / "tokenizer")
    tokenizer.chat_template = APERTUS_CHAT_TEMPLATE
    for row in read_split("test"):
        rendered = tokenizer.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        assert len(rendered["input_ids"]) <= 256  # the default max_length: nothing is truncated
        assert sum(rendered["assistant_masks"]) > 0
