"""Chat with a causal LM in the terminal, or answer a file of prompts: the local counterpart of the Hub's inference
widget. `python -m apertus_hf.chat MODEL [--key value ...]` (or `python recipes/chat.py MODEL ...`).

Rendering. Every turn renders the whole conversation with the tokenizer's own chat template (for Apertus models the
template of `apertus_hf.tokenization`: an optional system block, `Deliberation: enabled/disabled` from the
`enable_thinking` template variable, then the user and assistant turns) and asks for a generation prompt, so the model
sees its conversations exactly as SFT rendered them. Answers are appended to the conversation as assistant messages;
nothing is cached between turns, which keeps the history the single source of truth for /reset and /system.

Stopping. Generation ends on the model's own generation-config EOS ids, the tokenizer's EOS and, for tokenizers that
have them, Apertus' end-of-turn tokens `<|assistant_end|>` and `<|tools_suffix|>` (`preference.sampling.stop_token_ids`,
what the QRPO data's sampling stops on), since a pretrained checkpoint's config knows only `</s>`. An answer is kept without its stop token;
one cut at `max_new_tokens` is marked unfinished. Answers are decoded with special tokens kept, so a deliberating
model's `<|inner_prefix|>...<|inner_suffix|>` section shows, and re-renders as that section in the next turn.

Streaming and Ctrl-C. `generate` runs in a thread and feeds transformers' `TextIteratorStreamer`; the main thread
writes the pieces as they come. Ctrl-C raises KeyboardInterrupt in the main thread, which sets an event that a
stopping criterion checks at every step, waits for the thread, and drops the interrupted turn, so the session goes on.

Sampling. Apertus recommends temperature 0.8 and top-p 0.9 (the defaults); temperature 0 decodes greedily. Torch is
seeded with `seed` when a session starts and before each batch of a prompt file (from `seed` and the batch's index),
so a run is reproducible for a given seed (and, when sampling, batch size).

The session (`ChatSession`: conversation, generation, commands) knows nothing of the terminal; `chat_in_terminal` only
reads lines and writes text, so both the session and the file mode (`answer_prompt_file`) are testable in-process.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from .data.padding import pad_token_rows
from .preference.sampling import batch_seed, stop_token_ids
from .recipe_args import RecipeArgumentError, parse_recipe_args
from .runtime import SourceNotFoundError, check_attn_implementation, resolve_attn_implementation, resolve_source
from .tokenization import (
    APERTUS_CHAT_TEMPLATE,
    APERTUS_TOKENIZER_NAME,
    has_apertus_special_tokens,
    load_tokenizer,
)

logger = logging.getLogger(__name__)

PROMPT_MARKER = ">>> "
PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")
MODEL_HINT = "Pass a saved model folder (e.g. outputs/sft-tiny) or a Hub id: python recipes/chat.py MODEL."
Message = dict[str, Any]


class ChatInputError(ValueError):
    """A chat option or input file that cannot work, with the fix in the message."""


@dataclass
class ChatConfig:
    """The options of `recipes/chat.py` / `python -m apertus_hf.chat`."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Model to chat with: a local folder or a Hub id loadable by AutoModelForCausalLM (any "
            "architecture with a chat template). Given as the first argument (MODEL) or as --model."
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": f"Tokenizer folder or Hub id, or {APERTUS_TOKENIZER_NAME!r} for the real Apertus tokenizer built "
            "offline; default: the model's own. It must have a chat template (tokenizers with the Apertus special "
            "tokens but none get the Apertus template)."
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System prompt of every conversation (kept by /reset, changed by /system); default: none (the "
            "template's own, an empty system block for Apertus)."
        },
    )
    enable_thinking: bool = field(
        default=False,
        metadata={
            "help": "Deliberation (reasoning) switch of the Apertus template: renders 'Deliberation: enabled' instead "
            "of 'disabled'. /think on|off changes it in a chat."
        },
    )
    temperature: float = field(
        default=0.8,
        metadata={"help": "Sampling temperature (Apertus recommends 0.8); 0 decodes greedily."},
    )
    top_p: float = field(
        default=0.9,
        metadata={"help": "Nucleus sampling mass, in (0, 1] (Apertus recommends 0.9); unused when greedy."},
    )
    max_new_tokens: int = field(
        default=1024,
        metadata={"help": "Longest answer in tokens; an answer cut here is reported as unfinished."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Torch seed: set when a chat starts, and per batch of a prompt file (seed, batch index)."},
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "dtype the weights are loaded in; auto: the one in the model's config."},
    )
    device: str = field(
        default="auto",
        metadata={"help": "Torch device, e.g. cuda:0 or cpu; auto: CUDA when present, else Apple MPS, else the CPU."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention backend: auto (flash_attention_2 on CUDA when flash-attn is installed, else sdpa), sdpa, "
            "eager, flex_attention or flash_attention_2."
        },
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Answer the prompts of this file instead of chatting, each as its own conversation: a .txt with "
            'one prompt per line, or a .jsonl of {"prompt": TEXT} or {"messages": [...]} rows (the messages ending '
            "with a user message; a system message in them wins over system_prompt)."
        },
    )
    output: str | None = field(
        default=None,
        metadata={
            "help": "JSONL file the answers to `prompts` are written to, one row per prompt; default: "
            "PROMPTS_STEM.responses.jsonl next to the prompts file."
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing output file (otherwise an existing one is an error)."}
    )
    batch_size: int = field(
        default=1,
        metadata={
            "help": "Prompts of the file generated together (left-padded). Greedy answers do not depend on it; sampled "
            "ones do, as every row of a batch draws from one random stream."
        },
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ChatInputError(f"No model given. {MODEL_HINT}")
        if self.temperature < 0:
            raise ChatInputError(f"temperature={self.temperature} must be >= 0 (0 decodes greedily).")
        if not 0 < self.top_p <= 1:
            raise ChatInputError(f"top_p={self.top_p} must be in (0, 1]; 1 turns nucleus sampling off.")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ChatInputError(
                f"max_new_tokens={self.max_new_tokens} and batch_size={self.batch_size} must both be >= 1."
            )
        if self.output is not None and self.prompts is None:
            raise ChatInputError("output is only used with prompts; add --prompts FILE or drop --output.")
        try:
            check_attn_implementation(self.attn_implementation)
        except ValueError as error:
            raise ChatInputError(str(error)) from None

    def output_path(self) -> Path:
        """Where the answers to `prompts` go."""
        if self.output is not None:
            return Path(self.output)
        prompts = Path(str(self.prompts))
        return prompts.with_name(f"{prompts.stem}.responses.jsonl")

    def settings(self) -> dict[str, Any]:
        """The options that decide an answer, as recorded with each answer of a prompt file."""
        return {
            "model": self.model,
            "system_prompt": self.system_prompt,
            "enable_thinking": self.enable_thinking,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }


# Loading


def resolve_chat_device(device: str) -> torch.device:
    """`device`, or for "auto" CUDA when present, else Apple MPS, else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_chat_template_tokenizer(name_or_path: str, what: str = "tokenizer") -> PreTrainedTokenizerBase:
    """The tokenizer of `name_or_path`, which must have a chat template; tokenizers with the Apertus special tokens at
    their ids but no stored template get the Apertus one (they render it correctly)."""
    tokenizer = load_tokenizer(name_or_path, what)
    if not tokenizer.chat_template and has_apertus_special_tokens(tokenizer):
        logger.info("The tokenizer of %s has no chat template; using the Apertus one.", name_or_path)
        tokenizer.chat_template = APERTUS_CHAT_TEMPLATE
    if not tokenizer.chat_template:
        raise ChatInputError(
            f"The tokenizer of {name_or_path} has no chat template, so conversations cannot be rendered. Pass a "
            f"tokenizer that has one with --tokenizer (e.g. data/tokenizer, or {APERTUS_TOKENIZER_NAME!r} for an "
            "Apertus vocabulary), or add a chat_template.jinja to the model folder."
        )
    return tokenizer


def load_chat_model(config: ChatConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model of `config` in eval mode on its device, and its chat tokenizer (checked first: it is cheap)."""
    source = resolve_source(str(config.model), "model", MODEL_HINT)
    tokenizer = load_chat_template_tokenizer(
        config.tokenizer or str(source), "tokenizer" if config.tokenizer else "model"
    )
    device = resolve_chat_device(config.device)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=config.dtype if config.dtype == "auto" else getattr(torch, config.dtype),
        attn_implementation=resolve_attn_implementation(config.attn_implementation, device),
    )
    return model.to(device).eval(), tokenizer


# Generation


def chat_generation_config(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ChatConfig
) -> GenerationConfig:
    """The model's own generation config (its other choices, e.g. a repetition penalty, stay) with the chat's
    temperature, top-p, `max_new_tokens` and stop tokens; temperature 0 decodes greedily."""
    generation = copy.deepcopy(model.generation_config)
    sampled = config.temperature > 0
    generation.do_sample = sampled
    # Greedy gets the neutral values, not None: `generate` would fill a None from the model's config (an instruct
    # model's 0.8 / 0.9) and warn that greedy decoding ignores it.
    generation.temperature = config.temperature if sampled else 1.0
    generation.top_p = config.top_p if sampled else 1.0
    generation.max_new_tokens = config.max_new_tokens
    generation.max_length = None
    generation.eos_token_id = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ChatInputError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    generation.pad_token_id = pad
    return generation


@dataclass(frozen=True)
class Reply:
    """One answer: its text (special tokens kept, the stop token left out), its token count and whether a stop token
    ended it (False: cut at max_new_tokens)."""

    text: str
    num_tokens: int
    finished: bool

    @property
    def finish_reason(self) -> str:
        return "end_of_turn" if self.finished else "max_new_tokens"


def reply_from_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[int], stops: set[int]) -> Reply:
    """The `Reply` of the generated `tokens`: everything before the first stop token (pads after it are dropped)."""
    end = next((position for position, token in enumerate(tokens) if token in stops), None)
    kept = list(tokens if end is None else tokens[:end])
    return Reply(tokenizer.decode(kept, skip_special_tokens=False), num_tokens=len(kept), finished=end is not None)


def render_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message], enable_thinking: bool) -> list[int]:
    """Token ids of `messages` with the generation prompt, as the model sees them before its answer."""
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=enable_thinking, tokenize=True, return_dict=False
        )
    )


@torch.inference_mode()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[Message]],
    config: ChatConfig,
    progress: bool = False,
) -> list[Reply]:
    """One answer to each conversation (each ending with a user message), in order, in left-padded batches of
    `config.batch_size`; torch is seeded before each batch from (seed, batch index)."""
    generation = chat_generation_config(model, tokenizer, config)
    stops = set(generation.eos_token_id)
    rows = [render_prompt_ids(tokenizer, messages, config.enable_thinking) for messages in conversations]
    starts = range(0, len(rows), config.batch_size)
    replies: list[Reply] = []
    for batch_index, start in enumerate(tqdm(starts, desc="Answering", unit="batch", disable=not progress)):
        input_ids, attention_mask = pad_token_rows(
            rows[start : start + config.batch_size], generation.pad_token_id, padding_side="left"
        )
        torch.manual_seed(batch_seed(config.seed, batch_index))
        generated = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            generation_config=generation,
        )
        replies += [reply_from_tokens(tokenizer, row, stops) for row in generated[:, input_ids.shape[1] :].tolist()]
    return replies


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next step once `event` is set (Ctrl-C in the main thread)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _AnswerStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` of one answer that leaves out its stop token and keeps the other special tokens, so
    the streamed text is exactly the answer's `Reply.text`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[int]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False)
        self.stops = torch.tensor(sorted(stops))

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            value = value.flatten()
            value = value[~torch.isin(value, self.stops)]
            if value.numel() == 0:
                return
        super().put(value)


# The session


@dataclass(frozen=True)
class CommandOutcome:
    """What a /command did: the text to show, and whether the chat ends."""

    message: str
    quit: bool = False


CHAT_HELP = """Commands:
  /reset           start a new conversation (the system prompt stays)
  /system TEXT     set the system prompt; /system alone shows it, /system none removes it
  /think on|off    switch deliberation (reasoning); /think alone shows the state
  /help            this list
  /quit            leave (also /exit, or Ctrl-D)
Ctrl-C while an answer is written stops it; that turn is dropped. Start a message with // to send one beginning
with /."""


class ChatSession:
    """A conversation with a model: the system prompt, the deliberation switch, the turns so far, and the /commands.
    It reads and writes no terminal; `reply` hands the streamed text to a callback."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ChatConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.system_prompt = config.system_prompt
        self.enable_thinking = config.enable_thinking
        self.history: list[Message] = []
        self.generation_config = chat_generation_config(model, tokenizer, config)
        torch.manual_seed(config.seed)

    def messages(self, user_text: str | None = None) -> list[Message]:
        """The conversation as chat messages: the system prompt, the turns so far and `user_text` if given."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        user = [{"role": "user", "content": user_text}] if user_text is not None else []
        return system + self.history + user

    def prompt_text(self, user_text: str) -> str:
        """The rendered prompt the model answers `user_text` from (the whole conversation and the generation prompt)."""
        return self.tokenizer.apply_chat_template(
            self.messages(user_text), add_generation_prompt=True, enable_thinking=self.enable_thinking, tokenize=False
        )

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Answer `user_text`, handing the text to `on_text` as it is generated, and add the turn to the conversation.

        A KeyboardInterrupt (Ctrl-C, or raised by `on_text`) stops the generation, drops the turn and propagates.
        """
        input_ids = torch.tensor(
            [render_prompt_ids(self.tokenizer, self.messages(user_text), self.enable_thinking)],
            device=self.model.device,
        )
        stops = self.generation_config.eos_token_id
        streamer = _AnswerStreamer(self.tokenizer, stops)
        interrupted = threading.Event()
        outcome: dict[str, Any] = {}

        def generate() -> None:
            try:
                with torch.inference_mode():
                    outcome["sequences"] = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        generation_config=self.generation_config,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_StopWhenSet(interrupted)]),
                    )
            except BaseException as error:  # handed to the main thread, which re-raises it
                outcome["error"] = error
                streamer.end()

        thread = threading.Thread(target=generate, name="chat-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if on_text is not None and piece:
                    on_text(piece)
        except BaseException:
            interrupted.set()
            raise
        finally:
            thread.join()
        if "error" in outcome:
            raise outcome["error"]
        answer = reply_from_tokens(self.tokenizer, outcome["sequences"][0, input_ids.shape[1] :].tolist(), set(stops))
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer.text}]
        return answer

    def reset(self) -> None:
        """Start a new conversation with the same system prompt and deliberation switch."""
        self.history = []

    def run_command(self, line: str) -> CommandOutcome:
        """Carry out one /command line (see CHAT_HELP)."""
        name, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        if name in ("/quit", "/exit"):
            return CommandOutcome("Bye.", quit=True)
        if name == "/help":
            return CommandOutcome(CHAT_HELP)
        if name == "/reset":
            self.reset()
            return CommandOutcome("New conversation.")
        if name == "/system":
            if not argument:
                shown = repr(self.system_prompt) if self.system_prompt else "none"
                return CommandOutcome(
                    f"System prompt: {shown} (change it with /system TEXT, remove it with /system none)."
                )
            self.system_prompt = None if argument == "none" else argument
            return CommandOutcome("System prompt removed." if self.system_prompt is None else "System prompt set.")
        if name == "/think":
            if argument in ("on", "off"):
                self.enable_thinking = argument == "on"
            elif argument:
                return CommandOutcome(f"/think takes on or off, not {argument!r}.")
            return CommandOutcome(f"Deliberation {'enabled' if self.enable_thinking else 'disabled'}.")
        return CommandOutcome(
            f"Unknown command {name}; /help lists the commands. Start a message with // to send text beginning with /."
        )


def write_to_stdout(text: str) -> None:
    """Write `text` to the terminal at once (an answer is streamed piece by piece)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def chat_in_terminal(
    session: ChatSession,
    read_line: Callable[[str], str] = input,
    write: Callable[[str], None] = write_to_stdout,
) -> None:
    """The interactive loop: read a line after the prompt marker, run it as a /command or answer it, streaming the
    answer. Ctrl-D (EOF) or /quit ends it; Ctrl-C stops an answer (or clears the line being typed)."""
    config = session.config
    sampling = f"temperature {config.temperature}, top_p {config.top_p}" if config.temperature > 0 else "greedy"
    write(
        f"Chatting with {config.model} ({sampling}, max_new_tokens {config.max_new_tokens}, deliberation "
        f"{'on' if session.enable_thinking else 'off'}). /help lists the commands; /quit or Ctrl-D leaves.\n"
    )
    while True:
        try:
            line = read_line(PROMPT_MARKER)
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(/quit or Ctrl-D leaves)\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            outcome = session.run_command(line)
            write(outcome.message + "\n")
            if outcome.quit:
                return
            continue
        try:
            answer = session.reply(line[1:] if line.startswith("//") else line, on_text=write)
        except KeyboardInterrupt:
            write("\n[stopped; this turn is dropped]\n")
            continue
        write("\n")
        if not answer.finished:
            write(f"[cut at max_new_tokens={config.max_new_tokens}]\n")


# Prompt files


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt file: a plain prompt or a conversation, and the line it came from."""

    line: int
    prompt: str | None = None
    messages: list[Message] | None = None

    def conversation(self, system_prompt: str | None) -> list[Message]:
        """The messages to answer: the prompt as a user message, after `system_prompt` unless the row has its own."""
        messages = self.messages if self.messages is not None else [{"role": "user", "content": self.prompt}]
        if system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": system_prompt}, *messages]
        return list(messages)


def _check_messages(messages: Any, where: str) -> list[Message]:
    fix = 'write {"messages": [{"role": "user", "content": "..."}]}'
    if not isinstance(messages, list) or not messages:
        raise ChatInputError(f"{where}: 'messages' must be a non-empty list of messages; {fix}.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise ChatInputError(f"{where}: message {index} is not a {{'role', 'content'}} object; {fix}.")
    if messages[-1]["role"] != "user":
        raise ChatInputError(
            f"{where}: the last message is a {messages[-1]['role']!r} message; a conversation to answer ends with a "
            "user message (drop the answer to have it generated)."
        )
    return messages


def _record_from_json(text: str, where: str, line: int) -> PromptRecord:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise ChatInputError(
            f'{where}: not valid JSON ({error.msg}); write one object per line, {{"prompt": "..."}} or '
            '{"messages": [...]}.'
        ) from None
    if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise ChatInputError(f'{where}: a row needs exactly one of "prompt" (a string) and "messages" (a list).')
    if "messages" in row:
        return PromptRecord(line, messages=_check_messages(row["messages"], where))
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise ChatInputError(f'{where}: "prompt" must be a non-empty string, got {row["prompt"]!r}.')
    return PromptRecord(line, prompt=row["prompt"])


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    """The prompts of a .txt (one per line, blank lines skipped) or .jsonl file ({"prompt"} or {"messages"} rows)."""
    path = Path(path)
    if path.suffix not in PROMPT_FILE_SUFFIXES:
        raise ChatInputError(
            f"prompts={str(path)!r}: use a .txt file (one prompt per line) or a .jsonl file "
            '({"prompt": ...} or {"messages": [...]} rows).'
        )
    if not path.is_file():
        raise ChatInputError(f"prompts={str(path)!r}: no such file ({path.absolute()}).")
    records = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        if path.suffix == ".txt":
            records.append(PromptRecord(number, prompt=text))
        else:
            records.append(_record_from_json(text, f"{path} line {number}", number))
    if not records:
        raise ChatInputError(f"{path} holds no prompts; write one prompt per line.")
    return records


def check_output_path(path: Path, overwrite: bool) -> None:
    """Raise unless answers may be written to `path`."""
    if path.is_dir():
        raise ChatInputError(f"output={str(path)!r} is a folder; give a file path such as {path / 'responses.jsonl'}.")
    if path.exists() and not overwrite:
        raise ChatInputError(f"{path} exists; pass --overwrite to replace it, or choose another --output.")


def write_jsonl_atomically(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write `rows` to a temporary file beside `path`, then move it into place: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(handle.name, path)


@dataclass(frozen=True)
class PromptFileResult:
    """What `answer_prompt_file` wrote: the output file and the answers in prompt order."""

    output: Path
    replies: list[Reply]

    @property
    def finished(self) -> int:
        return sum(reply.finished for reply in self.replies)


def answer_prompt_file(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ChatConfig, progress: bool = False
) -> PromptFileResult:
    """Answer every prompt of `config.prompts` as its own conversation and write one JSONL row per prompt to
    `config.output_path()`: the prompt or messages, the response, its token count, whether it ended its turn, and
    the settings."""
    records = read_prompt_file(str(config.prompts))
    output = config.output_path()
    check_output_path(output, config.overwrite)
    conversations = [record.conversation(config.system_prompt) for record in records]
    replies = generate_replies(model, tokenizer, conversations, config, progress=progress)
    settings = config.settings()
    rows = [
        {
            **({"prompt": record.prompt} if record.prompt is not None else {"messages": record.messages}),
            "response": reply.text,
            "num_tokens": reply.num_tokens,
            "finished": reply.finished,
            "finish_reason": reply.finish_reason,
            "settings": settings,
        }
        for record, reply in zip(records, replies, strict=True)
    ]
    write_jsonl_atomically(output, rows)
    return PromptFileResult(output, replies)


# Command line

CHAT_DESCRIPTION = (
    """Chat with a model: `python recipes/chat.py MODEL [--key value ...]` (or `python -m apertus_hf.chat
MODEL ...`). MODEL is a saved model folder or a Hub id; boolean options may be given bare (--enable_thinking). With
--prompts FILE it answers the prompts of a .txt or .jsonl file and writes JSONL instead of chatting.

"""
    + CHAT_HELP
)


def _boolean_options() -> set[str]:
    return {name for name, option in ChatConfig.__dataclass_fields__.items() if option.type in ("bool", bool)}


def chat_argv(argv: Sequence[str]) -> list[str]:
    """`argv` in the `--key value` form of `recipe_args`: a bare first argument becomes `--model`, and a boolean
    option given bare (last, or followed by another option) becomes `--option true`."""
    booleans = _boolean_options()
    converted: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else None
        if token in ("-h", "--help") or (token.startswith("--") and "=" in token):
            converted.append(token)
            index += 1
        elif token.startswith("--"):
            if token[2:].replace("-", "_") in booleans and (following is None or following.startswith("--")):
                converted += [token, "true"]
                index += 1
            else:
                converted += [token] if following is None else [token, following]
                index += 2
        elif "--model" not in converted:
            converted += ["--model", token]
            index += 1
        else:
            raise RecipeArgumentError(
                f"Unexpected argument {token!r}: give the model once (MODEL or --model) and every other option as "
                "--key value."
            )
    return converted


def parse_chat_args(argv: Sequence[str] | None = None) -> ChatConfig:
    """The `ChatConfig` of a command line (default: `sys.argv[1:]`): MODEL or --model, `--key value` options and an
    optional `--config chat.yaml`."""
    return parse_recipe_args(
        ChatConfig, chat_argv(sys.argv[1:] if argv is None else argv), description=CHAT_DESCRIPTION
    )


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = parse_chat_args(argv)
        if config.prompts is not None:
            # Checked before the model loads, which may take minutes.
            read_prompt_file(config.prompts)
            check_output_path(config.output_path(), config.overwrite)
        model, tokenizer = load_chat_model(config)
        if config.prompts is None:
            if sys.stdin.isatty():
                import readline  # noqa: F401  (line editing and history for input())
            chat_in_terminal(ChatSession(model, tokenizer, config))
            return
        result = answer_prompt_file(model, tokenizer, config, progress=True)
    except (ChatInputError, RecipeArgumentError, SourceNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    print(
        f"Wrote {len(result.replies)} answers to {result.output} ({result.finished} ended their turn, "
        f"{len(result.replies) - result.finished} cut at max_new_tokens={config.max_new_tokens})."
    )


if __name__ == "__main__":
    main()
