"""The chat: rendering the conversation with the Apertus template, streaming, stopping, the /commands, prompt files,
and one real terminal session through a pseudo-terminal. A tiny random Apertus (gibberish answers) saved with the
shipped tokenizer; greedy decoding and a few new tokens keep every test deterministic and fast."""

import dataclasses
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from apertus_hf import ApertusForCausalLM
from apertus_hf.chat import (
    PROMPT_MARKER,
    ChatConfig,
    ChatInputError,
    ChatSession,
    answer_prompt_file,
    chat_argv,
    chat_in_terminal,
    generate_replies,
    load_chat_model,
    load_chat_template_tokenizer,
    main,
    read_prompt_file,
)
from apertus_hf.tokenization.special_tokens import ASSISTANT_END_TOKEN_ID, EOS_TOKEN_ID, TOOLS_SUFFIX_TOKEN_ID
from tests.pretraining.conftest import REPO_ROOT, SHIPPED_TOKENIZER
from tests.trainers.tiny_policy import save_policy, stopping_policy, tiny_config, write_jsonl

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Apertus with the shipped tokenizer and the Apertus chat template."""
    torch.manual_seed(0)
    return save_policy(tmp_path_factory.mktemp("chat_model"), ApertusForCausalLM(tiny_config()))


@pytest.fixture(scope="module")
def greedy(model_dir) -> ChatConfig:
    return ChatConfig(model=str(model_dir), temperature=0, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def loaded(greedy):
    return load_chat_model(greedy)


def session_of(loaded, config: ChatConfig) -> ChatSession:
    return ChatSession(*loaded, config)


def test_the_streamed_answer_is_the_non_streamed_greedy_answer_cut_at_max_new_tokens(loaded, greedy):
    pieces = []
    answer = session_of(loaded, greedy).reply("Hello there", on_text=pieces.append)

    assert len(pieces) > 1 and "".join(pieces) == answer.text
    assert generate_replies(*loaded, [[{"role": "user", "content": "Hello there"}]], greedy) == [answer]
    # A random model does not end its turn: the answer runs to max_new_tokens and is reported unfinished.
    assert answer.num_tokens == MAX_NEW_TOKENS and not answer.finished
    assert answer.finish_reason == "max_new_tokens"


def test_the_next_turn_renders_the_answer_and_reset_drops_it(loaded, greedy):
    session = session_of(loaded, greedy)
    first = session.reply("First question")

    prompt = session.prompt_text("Second")
    assert prompt.endswith(
        f"<|user_start|>First question<|user_end|><|assistant_start|>{first.text}<|assistant_end|>"
        "<|user_start|>Second<|user_end|><|assistant_start|>"
    )
    assert session.run_command("/reset").message == "New conversation."
    assert "First question" not in session.prompt_text("Second")
    assert session.prompt_text("Second").endswith(
        "<|developer_end|><|user_start|>Second<|user_end|><|assistant_start|>"
    )


def test_system_prompt_and_deliberation_are_rendered_and_switched_by_commands(loaded, greedy):
    session = session_of(loaded, dataclasses.replace(greedy, system_prompt="Answer briefly."))
    assert session.prompt_text("Hi").startswith(
        "<s><|system_start|>Answer briefly.<|system_end|><|developer_start|>Deliberation: disabled\n"
    )
    session.run_command("/think on")
    assert "Deliberation: enabled\n" in session.prompt_text("Hi")
    assert session.run_command("/think").message == "Deliberation enabled."
    assert "not 'maybe'" in session.run_command("/think maybe").message
    session.run_command("/think off")
    assert "Deliberation: disabled\n" in session.prompt_text("Hi")

    session.run_command("/system Talk like a pirate.")
    session.run_command("/reset")  # a new conversation keeps the system prompt
    assert session.prompt_text("Hi").startswith("<s><|system_start|>Talk like a pirate.<|system_end|>")
    assert "'Talk like a pirate.'" in session.run_command("/system").message
    session.run_command("/system none")
    assert session.prompt_text("Hi").startswith("<s><|system_start|><|system_end|>")

    assert "/reset" in session.run_command("/help").message
    assert "Unknown command /nope" in session.run_command("/nope now").message
    assert session.run_command("/quit").quit and session.run_command("/exit").quit


def test_sampled_answers_are_reproducible_with_their_seed(loaded, greedy):
    def sampled(seed: int) -> str:
        config = dataclasses.replace(greedy, temperature=0.8, top_p=0.9, seed=seed)
        return session_of(loaded, config).reply("Tell me a story").text

    assert sampled(seed=3) == sampled(seed=3)
    assert sampled(seed=3) != sampled(seed=4)


def test_a_model_that_ends_its_turn_gives_finished_empty_answers(tmp_path):
    folder = save_policy(tmp_path / "stopper", stopping_policy(stop_probability=0.999))
    config = ChatConfig(model=str(folder), temperature=0, max_new_tokens=MAX_NEW_TOKENS)
    model, tokenizer = load_chat_model(config)
    assert model.generation_config.eos_token_id == EOS_TOKEN_ID  # a pretrained config knows only </s>

    session = ChatSession(model, tokenizer, config)
    assert sorted(session.generation_config.eos_token_id) == [
        EOS_TOKEN_ID,
        ASSISTANT_END_TOKEN_ID,
        TOOLS_SUFFIX_TOKEN_ID,
    ]
    answer = session.reply("Hi")
    assert answer.finished and answer.finish_reason == "end_of_turn"
    assert answer.num_tokens == 0 and answer.text == ""
    assert session.prompt_text("Again").endswith(
        "<|assistant_start|><|assistant_end|><|user_start|>Again<|user_end|><|assistant_start|>"
    )


def test_an_interrupted_answer_stops_and_leaves_the_conversation_as_it_was(loaded, greedy):
    session = session_of(loaded, greedy)
    session.reply("Kept")
    history = list(session.history)
    session.generation_config.max_new_tokens = 1000
    model = loaded[0]
    forward_calls = []
    hook = model.register_forward_hook(lambda module, args, output: forward_calls.append(1))

    def press_ctrl_c(piece: str) -> None:
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            session.reply("Dropped", on_text=press_ctrl_c)
    finally:
        hook.remove()
    # Generation stopped long before max_new_tokens, its thread is gone, and the turn left no trace.
    assert 0 < len(forward_calls) < 500
    assert not [thread for thread in threading.enumerate() if thread.name == "chat-generate"]
    assert session.history == history


def test_the_terminal_loop_streams_answers_runs_commands_and_ends_on_eof(loaded, greedy):
    lines = iter(["Hello there", "", "/think on", "//reset is not a command", "/quit", "never read"])
    shown: list[str] = []
    session = session_of(loaded, greedy)

    def read_line(marker: str) -> str:
        shown.append(marker)
        return next(lines)

    chat_in_terminal(session, read_line, shown.append)
    transcript = "".join(shown)
    expected = generate_replies(*loaded, [[{"role": "user", "content": "Hello there"}]], greedy)[0].text
    assert f"{PROMPT_MARKER}{expected}\n[cut at max_new_tokens={MAX_NEW_TOKENS}]\n" in transcript
    assert "Deliberation enabled.\n" in transcript and transcript.endswith("Bye.\n")
    assert [message["content"] for message in session.history if message["role"] == "user"] == [
        "Hello there",
        "/reset is not a command",
    ]

    def end_of_input(marker: str) -> str:
        raise EOFError

    chat_in_terminal(session_of(loaded, greedy), end_of_input, shown.append)
    assert shown[-1] == "\n"


def test_a_prompt_file_is_answered_one_conversation_per_prompt(loaded, greedy, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nName a colour.\nCount to three.\n")
    config = dataclasses.replace(greedy, prompts=str(prompts), system_prompt="Be kind.")

    result = answer_prompt_file(*loaded, config)
    assert result.output == tmp_path / "prompts.responses.jsonl"
    rows = [json.loads(line) for line in result.output.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["Hello there", "Name a colour.", "Count to three."]
    session = session_of(loaded, config)
    for row in rows:
        answer = session.reply(row["prompt"])
        session.reset()
        assert (row["response"], row["num_tokens"], row["finished"]) == (answer.text, answer.num_tokens, False)
        assert row["finish_reason"] == "max_new_tokens"
        assert row["settings"] == config.settings() and row["settings"]["system_prompt"] == "Be kind."

    # Greedy answers do not depend on the batching; an existing output needs --overwrite.
    with pytest.raises(ChatInputError, match="exists; pass --overwrite"):
        answer_prompt_file(*loaded, dataclasses.replace(config, batch_size=2))
    batched = answer_prompt_file(*loaded, dataclasses.replace(config, batch_size=2, overwrite=True))
    assert batched.replies == result.replies
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves no temporary file


def test_a_jsonl_prompt_file_takes_prompts_and_conversations(loaded, greedy, tmp_path):
    conversation = [
        {"role": "system", "content": "Its own system prompt."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello there"}, {"messages": conversation}])
    config = dataclasses.replace(greedy, prompts=str(prompts), output=str(tmp_path / "out" / "answers.jsonl"))

    result = answer_prompt_file(*loaded, config)
    rows = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == "Hello there" and rows[1]["messages"] == conversation
    assert [row["response"] for row in rows] == [reply.text for reply in result.replies]
    # The row's own system message wins over none given; the conversation is answered as a whole.
    assert result.replies[1] == generate_replies(*loaded, [conversation], greedy)[0]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "no such file"),
        ("prompts.csv", "a,b\n", r"use a \.txt file .* or a \.jsonl file"),
        ("empty.txt", "\n\n", "holds no prompts"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "unclosed\n', r"bad\.jsonl line 2: not valid JSON"),
        ("both.jsonl", '{"prompt": "a", "messages": []}\n', 'exactly one of "prompt"'),
        ("blank.jsonl", '{"prompt": " "}\n', "non-empty string"),
        ("answered.jsonl", json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), "ends with a user"),
        ("not_messages.jsonl", json.dumps({"messages": [{"text": "x"}]}), "message 0 is not a"),
    ],
)
def test_bad_prompt_files_name_the_line_and_the_fix(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ChatInputError, match=message):
        read_prompt_file(tmp_path / name)


def test_a_tokenizer_without_a_chat_template_is_refused_unless_it_is_apertus(tmp_path):
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), eos_token="<unk>"
    )
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ChatInputError, match=r"has no chat template.*--tokenizer"):
        load_chat_template_tokenizer(str(tmp_path / "plain"))

    apertus = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    apertus.chat_template = None
    apertus.save_pretrained(tmp_path / "apertus")
    (tmp_path / "apertus" / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = load_chat_template_tokenizer(str(tmp_path / "apertus"))
    assert "Deliberation: disabled" in tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": None}, "No model given"),
        ({"temperature": -1.0}, "temperature=-1.0 must be >= 0"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"output": "x.jsonl"}, "only used with prompts"),
        ({"attn_implementation": "fast"}, "attn_implementation='fast' is not one of"),
    ],
)
def test_bad_options_are_refused_with_the_fix(options, message):
    with pytest.raises(ChatInputError, match=message):
        ChatConfig(**{"model": "outputs/x", **options})


def test_the_command_line_takes_a_positional_model_and_bare_switches():
    assert chat_argv(["outputs/m", "--enable_thinking", "--temperature", "0", "--overwrite"]) == [
        "--model",
        "outputs/m",
        "--enable_thinking",
        "true",
        "--temperature",
        "0",
        "--overwrite",
        "true",
    ]
    assert chat_argv(["--model=outputs/m", "--enable_thinking", "false"]) == [
        "--model=outputs/m",
        "--enable_thinking",
        "false",
    ]


def test_main_answers_a_prompt_file_and_refuses_to_overwrite(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n")
    command = [str(model_dir), "--prompts", str(prompts), "--temperature", "0", "--max_new_tokens", "3"]

    main(command)
    assert "Wrote 1 answers to" in capsys.readouterr().out
    assert json.loads((tmp_path / "prompts.responses.jsonl").read_text())["num_tokens"] == 3
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(command)
    main([*command, "--overwrite"])
    with pytest.raises(SystemExit, match=r"error: model='\./nothing-here': no such file or folder"):
        main(["./nothing-here"])
    with pytest.raises(SystemExit, match=r"line 1: not valid JSON"):
        (tmp_path / "bad.jsonl").write_text("{oops\n")
        main([str(model_dir), "--prompts", str(tmp_path / "bad.jsonl")])


def read_until(fd: int, pattern: str, deadline: float, seen: bytearray) -> str:
    """The pty output so far once `pattern` (a regex) appears in it; fails at `deadline` (never hangs)."""
    while not re.search(pattern, seen.decode(errors="replace")):
        remaining = deadline - time.monotonic()
        assert remaining > 0, (
            f"timed out waiting for {pattern!r}; the terminal showed:\n{seen.decode(errors='replace')}"
        )
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"the chat exited before {pattern!r}; it showed:\n{seen.decode(errors='replace')}"
            seen += chunk
    return seen.decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.slow
def test_a_chat_in_a_terminal_streams_the_answer_and_takes_commands(model_dir, loaded, greedy):
    expected = generate_replies(*loaded, [[{"role": "user", "content": "Hello there"}]], greedy)[0].text
    controller, terminal = os.openpty()
    environment = {**os.environ, "TERM": "dumb", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    command = [sys.executable, "-m", "apertus_hf.chat", str(model_dir), "--temperature", "0", "--max_new_tokens"]
    process = subprocess.Popen(
        [*command, str(MAX_NEW_TOKENS)], stdin=terminal, stdout=terminal, stderr=terminal, env=environment
    )
    os.close(terminal)
    seen = bytearray()
    deadline = time.monotonic() + 120
    try:
        read_until(controller, re.escape(PROMPT_MARKER), deadline, seen)
        os.write(controller, b"Hello there\n")
        shown = read_until(controller, "(?s)Hello there.*" + re.escape(PROMPT_MARKER), deadline, seen)
        assert f"{expected}\n[cut at max_new_tokens={MAX_NEW_TOKENS}]" in shown
        os.write(controller, b"/reset\n")
        read_until(controller, "New conversation.", deadline, seen)
        os.write(controller, b"/quit\n")
        read_until(controller, "Bye.", deadline, seen)
        assert process.wait(timeout=max(deadline - time.monotonic(), 1)) == 0
    finally:
        process.kill()
        process.wait()
        os.close(controller)
