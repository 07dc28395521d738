"""Generate data/preferences/{train,test}.jsonl: the small multilingual preference set of the default reward-model run.

Usage (stdlib only; the output is byte-identical on every run):
    python data/build_preferences.py --output data/preferences

Each row asks one of the chat tasks of data/chat (built with data/build_chat.py's word lists, templates and task
generator, in the same six languages) and pairs its correct answer (`chosen`) with a plausible wrong one
(`rejected`): a sum off by a little, a count that goes astray, the wrong weekday, a word left in small letters, a
repetition with one word swapped or dropped, the other of yes and no. Which answer is better is therefore checkable
by string comparison, and a reward model's held-out pairwise accuracy measures something real. Rows are in TRL's
conversational preference format with an explicit prompt:
`{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message], "language", "task", "error"}`;
the prompt may start with a system message and hold earlier (correctly answered) turns. No test prompt occurs in
train.
"""

import argparse
import importlib.util
import json
import random
from pathlib import Path


def _load_build_chat():
    """data/build_chat.py as a module (data/ is no package): its word lists, templates and task generator."""
    spec = importlib.util.spec_from_file_location("build_chat", Path(__file__).resolve().with_name("build_chat.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_chat = _load_build_chat()

SEED = 20250903  # the day after Apertus' release, so that the prompts differ from those of data/chat
TRAIN_ROWS = 2000
TEST_ROWS = 300
# Every task of data/chat, each asked equally often.
TASKS = tuple(build_chat.TEMPLATES)


def wrong_output(task: str, language: str, x: str, y: str, rng: random.Random) -> tuple[str, str]:
    """(a plausible wrong answer to the instance (x, y) of `task`, the name of its error); never equal to y."""
    nouns = build_chat.NOUNS[language].split()
    if task == "echo":
        words = x.split()
        position = rng.randrange(len(words))
        if len(words) > 2 and rng.random() < 0.3:
            return " ".join(words[:position] + words[position + 1 :]), "word_dropped"
        words[position] = rng.choice([noun for noun in nouns if noun not in words])
        return " ".join(words), "word_changed"
    if task == "uppercase":
        # German nouns are already capitalised, so their first-letter form is the word itself.
        if rng.random() < 0.5 and y.capitalize() != x:
            return y.capitalize(), "first_letter_only"
        return x, "not_capitalised"
    if task == "count":
        shown = [int(number) for number in x.split(", ")]
        step = shown[1] - shown[0]
        expected = [int(number) for number in y.split(", ")]
        if rng.random() < 0.5:
            # Counted on in steps of one (or two, where the step was one).
            wrong_step = 2 if step == 1 else 1
            return ", ".join(str(shown[-1] + wrong_step * i) for i in range(1, 4)), "wrong_step"
        position = rng.randrange(3)
        expected[position] += rng.choice((-1, 1)) * (1 if step == 1 else rng.randint(1, step - 1))
        return ", ".join(map(str, expected)), "wrong_number"
    if task == "add":
        total = int(y)
        offsets = [offset for offset in (-3, -2, -1, 1, 2, 3, 10, -10) if total + offset >= 0]
        return str(total + rng.choice(offsets)), "wrong_number"
    if task in ("day_after", "day_before"):
        days = build_chat.WEEKDAYS[language].split()
        index = days.index(x)
        wrong = rng.choice([days[index], days[(index - 1) % 7], days[(index + 1) % 7], days[(index + 2) % 7]])
        if wrong == y:
            wrong = days[(index + 3) % 7]
        return wrong, "wrong_weekday"
    yes, no = build_chat.YES_NO[language]
    return (no if y == yes else yes), "wrong_yes_no"


def preference_row(rng: random.Random, task: str) -> dict:
    """One row: a language, optionally a system message and earlier turns, then `task` with a right and a wrong
    answer."""
    language = rng.choice(build_chat.LANGUAGES)
    prompt = []
    if rng.random() < 0.3:
        prompt.append({"role": "system", "content": rng.choice(build_chat.SYSTEM_PROMPTS[language])})
    for earlier_task in rng.choices(TASKS, k=0 if rng.random() < 0.7 else rng.randint(1, 2)):
        questions, answer = build_chat.TEMPLATES[earlier_task][language]
        x, y = build_chat.task_input_output(earlier_task, language, rng)
        prompt.append({"role": "user", "content": rng.choice(questions).format(x=x)})
        prompt.append({"role": "assistant", "content": answer.format(x=x, y=y)})
    questions, answer = build_chat.TEMPLATES[task][language]
    x, y = build_chat.task_input_output(task, language, rng)
    prompt.append({"role": "user", "content": rng.choice(questions).format(x=x)})
    wrong, error = wrong_output(task, language, x, y, rng)
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": answer.format(x=x, y=y)}],
        "rejected": [{"role": "assistant", "content": answer.format(x=x, y=wrong)}],
        "language": language,
        "task": task,
        "error": error,
    }


def build(train_rows: int = TRAIN_ROWS, test_rows: int = TEST_ROWS, seed: int = SEED) -> tuple[list, list]:
    """(train, test) rows with distinct prompts; the tasks take turns, so each is about as frequent."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < train_rows + test_rows:
        row = preference_row(rng, TASKS[len(rows) % len(TASKS)])
        key = json.dumps(row["prompt"], ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows[:train_rows], rows[train_rows:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "preferences")
    parser.add_argument("--train-rows", type=int, default=TRAIN_ROWS)
    parser.add_argument("--test-rows", type=int, default=TEST_ROWS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    train, test = build(args.train_rows, args.test_rows, args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    build_chat.write_jsonl(args.output / "train.jsonl", train)
    build_chat.write_jsonl(args.output / "test.jsonl", test)
    print(f"Wrote {len(train)} train and {len(test)} test preference pairs to {args.output}.")


if __name__ == "__main__":
    main()
