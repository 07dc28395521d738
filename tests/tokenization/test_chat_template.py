"""The Apertus chat templates: the SFT rendering (every tokenizer's template) and the released instruct rendering, each
checked against the public reference template it reproduces, plus reasoning, tool calls, tool outputs, tools in the
developer block, assistant masks and errors.

The references (tests/tokenization/fixtures, sources in its README) render with transformers' own Jinja environment,
the one the released template runs in. Most cases render with the small shipped tokenizer (`data/tokenizer`, fast to
load); the special-token ids are checked with the real tekken-based Apertus tokenizer.
"""

import datetime
import hashlib
import re
from pathlib import Path

import pytest
import transformers.utils.chat_template_utils
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from apertus_hf.tokenization import (
    APERTUS_CHAT_TEMPLATE,
    APERTUS_INSTRUCT_CHAT_TEMPLATE,
    NAMED_SPECIAL_TOKENS,
    apertus_default_system_prompt,
)

SHIPPED_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "tokenizer"
REFERENCES = Path(__file__).resolve().parent / "fixtures"
RELEASED_TEMPLATE = REFERENCES / "Apertus-8B-Instruct.jinja"
LLAMA_CPP_TEMPLATE = REFERENCES / "Apertus-8B-Instruct.llama-cpp-2026-03.jinja"
SFT_TEMPLATE = REFERENCES / "posttraining-sft-apertus.jinja"
REFERENCE_SHA256 = {
    RELEASED_TEMPLATE: "1fd2305317659f9795e3ac7b71a7373df53a1e90c90be768e79e9a539b326cdd",
    LLAMA_CPP_TEMPLATE: "dea688e9f24a339a0d2504f6840852adbcedb082373172a0b82ca2c55996768d",
    SFT_TEMPLATE: "fd43ce4f398ab6cc33c93e58b3b4352891dfe3ae06e5ead441b563ebdf23af2c",
}
SPECIAL_TOKEN_PATTERN = re.compile(r"(<s>|<\|[a-z_]+\|>)")
TODAY = datetime.datetime(2025, 9, 21, 12, 0)

SYSTEM, USER, ANSWER = "SYSTEM", "USER", "ANSWER"
PLAIN_CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": ANSWER},
]
TOOLS_DISABLED = "Tool Capabilities: disabled"

WEATHER_SCHEMA = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city name."},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            "days": {"type": "integer", "description": "Days to forecast.", "default": 1},
            "fields": {"type": "array", "items": {"type": "string"}},
            "stations": {"type": "array", "items": {"type": "object"}},
            "near": {
                "type": "object",
                "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                "required": ["lat", "lon"],
            },
            "metric": {"type": "boolean"},
            "label": {"type": "string", "nullable": True},
            "kind": {"type": ["string", "integer"]},
            "size": {
                "oneOf": [{"type": "string", "description": "a name"}, {"type": "integer", "default": 3}],
                "default": "M",
            },
            "extra": {"description": "Anything else."},
        },
        "required": ["city"],
    },
}
WEATHER_TOOL = {"type": "function", "function": WEATHER_SCHEMA}
# A bare JSON schema (no `{"type": "function", "function": ...}` wrapper, as the release reads tools), no parameters.
TIME_TOOL = {"name": "get_time", "description": "Get the current UTC time.", "parameters": {"type": "object"}}
# The released template's TypeScript signatures, its whitespace quirks included (nested object properties on indented
# lines, a `oneOf` default indented by 20 spaces, enum defaults without quotes).
RENDERED_TOOLS = (
    "Tool Capabilities:\n"
    "// Get the current weather in a city.\n"
    "type get_weather = (_: {\n"
    "// The city name.\n"
    "city: string,\n"
    'unit?: "celsius" | "fahrenheit", // default: celsius,\n'
    "// Days to forecast.\n"
    "days?: number, // default: 1,\n"
    "fields?: string[],\n"
    "stations?: object[],\n"
    "near?: {\nlat: \n                number, lon: \n                number},\n"
    "metric?: boolean,\n"
    "label?: string | null,\n"
    "kind?: string | integer,\n"
    "size?: string// a name | \nnumber                    // default: 3// default: M,\n"
    "// Anything else.\n"
    "extra?: any\n"
    "}) => any;\n"
    "// Get the current UTC time.\n"
    "type get_time = () => any;"
)

# Two parallel OpenAI/transformers-style calls, their two tool messages, then the final answer.
TOOL_CALL_CHAT = [
    {"role": "user", "content": "Weather in Bern and Zurich?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zurich"}'}},
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 23}'},
    {"role": "assistant", "content": "Bern 21, Zurich 23."},
]
TOOL_CALLS = '<|tools_prefix|>[{"get_weather": {"city": "Bern"}}, {"get_weather": {"city": "Zurich"}}]<|tools_suffix|>'
TOOL_OUTPUTS = '[{"temp": 21}, {"temp": 23}]'

BLOCKS_CHAT = [
    {"role": "system", "content": {"text": SYSTEM}},
    {
        "role": "user",
        "content": {"parts": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Bern?"}]},
    },
    {
        "role": "assistant",
        "content": {
            "blocks": [
                {"type": "thoughts", "text": "I should look it up."},
                {"type": "tool_calls", "calls": [{"name": "get_weather", "arguments": '{"city": "Bern"}'}]},
                {"type": "tool_outputs", "outputs": [{"output": '{"temp": 21}'}]},
                {"type": "thoughts", "text": "It is warm."},
                {"type": "response", "text": "It is 21 degrees."},
            ]
        },
    },
]
# swiss-ai's SFT data wrote a space after a tool_outputs block that another block follows.
BLOCKS_TURN = (
    "<|inner_prefix|>I should look it up."
    '<|tools_prefix|>[{"get_weather": {"city": "Bern"}}]<|tools_suffix|>'
    '[{"temp": 21}] '
    "It is warm.<|inner_suffix|>It is 21 degrees.<|assistant_end|>"
)
# swiss-ai's answer tool: a lone display_answers call closes the reasoning, as a response block does.
DISPLAY_ANSWERS_CHAT = [
    {"role": "user", "content": "Two primes?"},
    {
        "role": "assistant",
        "content": {
            "blocks": [
                {"type": "thoughts", "text": "2 and 3."},
                {"type": "tool_calls", "calls": [{"name": "display_answers", "arguments": '{"answers": ["2", "3"]}'}]},
                {"type": "tool_outputs", "outputs": [{"output": '"Answers displayed"'}]},
                {"type": "response", "text": "2 and 3."},
            ]
        },
    },
]
MULTI_TURN_CHAT = [
    {"role": "user", "content": "Hoi"},
    {"role": "assistant", "content": "Grüezi!"},
    {"role": "user", "content": "Merci"},
    {"role": "assistant", "content": "Gern gescheh."},
]
DEVELOPER_MESSAGE = {"role": "developer", "content": {"has_thinking": True, "formatted_tools": "type f = () => any;"}}


def header(system: str = "", *, thinking: bool = False, tools: str = TOOLS_DISABLED) -> str:
    deliberation = "enabled" if thinking else "disabled"
    return (
        f"<s><|system_start|>{system}<|system_end|>"
        f"<|developer_start|>Deliberation: {deliberation}\n{tools}<|developer_end|>"
    )


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    # The shipped tokenizer carries the SFT template; if it is ever changed, it must be the current one.
    assert tokenizer.chat_template == APERTUS_CHAT_TEMPLATE  # shipped in data/tokenizer/chat_template.jinja
    return tokenizer


@pytest.fixture(scope="module")
def apertus_tokenizer():
    pytest.importorskip(
        "mistral_common", reason="the real Apertus tokenizer is built from tekken v3, shipped in mistral-common"
    )
    from apertus_hf.tokenization import load_apertus_tokenizer

    return load_apertus_tokenizer()


class FrozenClock(datetime.datetime):
    """What `datetime.now()` returns in transformers' `strftime_now` while `frozen_today` is active."""

    @classmethod
    def now(cls, tz=None):
        return cls(TODAY.year, TODAY.month, TODAY.day, TODAY.hour, TODAY.minute)


@pytest.fixture
def frozen_today(monkeypatch):
    """Today is TODAY for every template transformers renders, ours and the references alike."""
    monkeypatch.setattr(transformers.utils.chat_template_utils, "datetime", FrozenClock)


def render(tokenizer, messages, chat_template: str | None = None, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False, **kwargs)


def render_released(tokenizer, messages, reference: Path = RELEASED_TEMPLATE, **kwargs) -> str:
    return render(tokenizer, messages, reference.read_text(), **kwargs)


def render_sft_reference(tokenizer, messages, **kwargs) -> str:
    """swiss-ai's SFT rendering: its template with the `<s>` its configs prepend, its `<SPECIAL_n>` names for the chat
    tokens written as the Apertus names of the same ids."""
    rendered = render(tokenizer, messages, "{{ bos_token }}" + SFT_TEMPLATE.read_text(), **kwargs)
    return re.sub(r"<SPECIAL_(\d+)>", lambda match: NAMED_SPECIAL_TOKENS[int(match.group(1))], rendered)


def masked_spans(tokenizer, messages, **kwargs) -> list[str]:
    """The decoded runs of consecutive tokens that the assistant mask marks."""
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    spans: list[list[int]] = []
    previous = 0
    for token_id, mask in zip(rendered["input_ids"], rendered["assistant_masks"], strict=True):
        if mask and not previous:
            spans.append([])
        if mask:
            spans[-1].append(token_id)
        previous = mask
    return [tokenizer.decode(span) for span in spans]


def test_reference_templates_are_the_public_files():
    for path, sha256 in REFERENCE_SHA256.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256, path.name


# ---- The released instruct template


RELEASE_CASES = {
    "generation-prompt": ([{"role": "user", "content": USER}], {"add_generation_prompt": True}),
    "system-parts-thinking-multi-turn": (
        [
            {"role": "system", "content": {"text": SYSTEM}},
            {"role": "user", "content": {"parts": [{"type": "text", "text": "US"}, {"type": "text", "text": "ER"}]}},
            *MULTI_TURN_CHAT,
        ],
        {"enable_thinking": True},
    ),
    "last-turn-open": (PLAIN_CHAT, {}),
    "tool-calls-and-outputs": (TOOL_CALL_CHAT, {}),
    "generation-prompt-after-tool-outputs": (TOOL_CALL_CHAT[:-1], {"add_generation_prompt": True}),
    "blocks": (BLOCKS_CHAT, {}),
    "display-answers": (DISPLAY_ANSWERS_CHAT, {}),
    "bare-tools": ([{"role": "user", "content": USER}], {"tools": [WEATHER_SCHEMA, TIME_TOOL]}),
}


@pytest.mark.parametrize(("messages", "kwargs"), RELEASE_CASES.values(), ids=RELEASE_CASES.keys())
def test_instruct_template_renders_what_the_release_renders(tokenizer, frozen_today, messages, kwargs):
    expected = render_released(tokenizer, messages, **kwargs)
    assert render(tokenizer, messages, APERTUS_INSTRUCT_CHAT_TEMPLATE, **kwargs) == expected


def test_wrapped_tools_and_mapping_arguments_render_as_llama_cpp_does(tokenizer, frozen_today):
    # llama.cpp's copy reads transformers-style tools and writes mapping arguments through tojson; the release reads
    # neither, and ours reads both.
    chat = [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
        },
        {"role": "tool", "content": '{"temp": 19}'},
        {"role": "assistant", "content": "19 degrees."},
    ]
    tools = [WEATHER_TOOL, {"type": "function", "function": TIME_TOOL}]
    rendered = render(tokenizer, chat, APERTUS_INSTRUCT_CHAT_TEMPLATE, tools=tools)
    assert rendered == render_released(tokenizer, chat, LLAMA_CPP_TEMPLATE, tools=tools)
    assert rendered.endswith(
        '<|assistant_start|><|tools_prefix|>[{"get_weather": {"city": "Zürich"}}]<|tools_suffix|>[{"temp": 19}]19 degrees.'
    )
    assert render(tokenizer, chat, APERTUS_INSTRUCT_CHAT_TEMPLATE, tools=[WEATHER_SCHEMA, TIME_TOOL]) == rendered


def test_instruct_default_system_prompt_carries_an_injectable_date(tokenizer, frozen_today):
    chat = [{"role": "user", "content": "Hi"}]
    expected = (
        "<s><|system_start|>You are Apertus, a helpful assistant created by the SwissAI initiative.\n"
        "Knowledge cutoff: 2024-04\nCurrent date: 2031-12-24<|system_end|>"
        "<|developer_start|>Deliberation: disabled\nTool Capabilities: disabled<|developer_end|>"
        "<|user_start|>Hi<|user_end|><|assistant_start|>"
    )
    rendered = render(
        tokenizer, chat, APERTUS_INSTRUCT_CHAT_TEMPLATE, add_generation_prompt=True, current_date="2031-12-24"
    )
    assert rendered == expected
    # Without current_date it is today's date, from transformers' strftime_now.
    today = render(tokenizer, chat, APERTUS_INSTRUCT_CHAT_TEMPLATE, add_generation_prompt=True)
    assert today == expected.replace("2031-12-24", "2025-09-21")
    assert apertus_default_system_prompt("2025-09-21") in today
    # A system message replaces the whole default, date included.
    with_system = render(tokenizer, [{"role": "system", "content": SYSTEM}, *chat], APERTUS_INSTRUCT_CHAT_TEMPLATE)
    assert with_system == header(SYSTEM) + "<|user_start|>Hi<|user_end|>"


def test_instruct_template_leaves_the_last_assistant_turn_open(tokenizer):
    rendered = render(tokenizer, PLAIN_CHAT, APERTUS_INSTRUCT_CHAT_TEMPLATE)
    assert rendered == header(SYSTEM) + "<|user_start|>USER<|user_end|><|assistant_start|>ANSWER"
    # Earlier turns close at the next user message; a generation prompt is added whatever came before it.
    chat = [{"role": "system", "content": SYSTEM}, *MULTI_TURN_CHAT]
    assert render(tokenizer, chat, APERTUS_INSTRUCT_CHAT_TEMPLATE, add_generation_prompt=True) == (
        header(SYSTEM) + "<|user_start|>Hoi<|user_end|><|assistant_start|>Grüezi!<|assistant_end|>"
        "<|user_start|>Merci<|user_end|><|assistant_start|>Gern gescheh.<|assistant_start|>"
    )


def test_instruct_template_closes_tool_outputs_before_content_less_tool_calls(tokenizer):
    # The release writes the second call inside the open list of tool outputs when its message has no content
    # (`[{"temp": 21}<|tools_prefix|>...`); ours closes the list first, as it does before any other message.
    chat = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USER},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "1"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "g", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "2"},
    ]
    assert render(tokenizer, chat, APERTUS_INSTRUCT_CHAT_TEMPLATE) == (
        header(SYSTEM) + '<|user_start|>USER<|user_end|><|assistant_start|><|tools_prefix|>[{"f": {}}]<|tools_suffix|>'
        '[1]<|tools_prefix|>[{"g": {"x": 1}}]<|tools_suffix|>[2]'
    )


# ---- The SFT template (every tokenizer's)


SFT_CASES = {
    "no-system": (MULTI_TURN_CHAT, {}),
    "system-developer-blocks": ([BLOCKS_CHAT[0], DEVELOPER_MESSAGE, *BLOCKS_CHAT[1:]], {}),
    "display-answers": ([DEVELOPER_MESSAGE, *DISPLAY_ANSWERS_CHAT], {}),
    "generation-prompt": ([*MULTI_TURN_CHAT, {"role": "user", "content": "Und?"}], {"add_generation_prompt": True}),
}


@pytest.mark.parametrize(("messages", "kwargs"), SFT_CASES.values(), ids=SFT_CASES.keys())
def test_sft_template_renders_what_swiss_ai_sft_rendered(tokenizer, messages, kwargs):
    assert render(tokenizer, messages, **kwargs) == render_sft_reference(tokenizer, messages, **kwargs)


def test_sft_template_without_system_message_renders_an_empty_system_block(tokenizer):
    assert render(tokenizer, MULTI_TURN_CHAT) == (
        "<s><|system_start|><|system_end|><|developer_start|>Deliberation: disabled\nTool Capabilities: disabled"
        "<|developer_end|><|user_start|>Hoi<|user_end|><|assistant_start|>Grüezi!<|assistant_end|>"
        "<|user_start|>Merci<|user_end|><|assistant_start|>Gern gescheh.<|assistant_end|>"
    )


def test_developer_message_gives_the_developer_block(tokenizer):
    chat = [DEVELOPER_MESSAGE, {"role": "user", "content": USER}]
    expected = header(thinking=True, tools="Tool Capabilities:\ntype f = () => any;") + "<|user_start|>USER<|user_end|>"
    assert render(tokenizer, chat) == expected
    after_system = render(tokenizer, [{"role": "system", "content": SYSTEM}, *chat], APERTUS_INSTRUCT_CHAT_TEMPLATE)
    assert after_system == expected.replace("<|system_start|>", f"<|system_start|>{SYSTEM}")
    # Both fields are optional; matching template variables are allowed.
    empty = [{"role": "developer", "content": {}}, {"role": "user", "content": USER}]
    assert render(tokenizer, empty, enable_thinking=False) == header() + "<|user_start|>USER<|user_end|>"
    assert render(tokenizer, chat, enable_thinking=True) == expected


def test_tools_variable_renders_the_formatted_tools_of_sft_data(tokenizer, frozen_today):
    # swiss-ai's SFT data carried the signatures in the developer message, rendered by the macro the release has; the
    # `tools` variable renders the same signatures.
    released = render_released(tokenizer, [{"role": "user", "content": USER}], tools=[WEATHER_SCHEMA, TIME_TOOL])
    formatted_tools = released.split("Tool Capabilities:\n")[1].split("<|developer_end|>")[0]
    assert "Tool Capabilities:\n" + formatted_tools == RENDERED_TOOLS
    developer = {"role": "developer", "content": {"has_thinking": False, "formatted_tools": formatted_tools}}
    sft_data = [developer, *MULTI_TURN_CHAT]
    assert render(tokenizer, MULTI_TURN_CHAT, tools=[WEATHER_TOOL, TIME_TOOL]) == render_sft_reference(
        tokenizer, sft_data
    )
    assert render(tokenizer, sft_data) == render(tokenizer, MULTI_TURN_CHAT, tools=[WEATHER_TOOL, TIME_TOOL])


def test_plain_chat_matches_spec(tokenizer):
    expected = (
        "<s><|system_start|>SYSTEM<|system_end|><|developer_start|>Deliberation: disabled\nTool Capabilities: "
        "disabled<|developer_end|><|user_start|>USER<|user_end|><|assistant_start|>ANSWER<|assistant_end|>"
    )
    assert render(tokenizer, PLAIN_CHAT) == expected
    # A mapping system message and a user message in parts render the same.
    mapping_chat = [
        {"role": "system", "content": {"text": SYSTEM}},
        {"role": "user", "content": {"parts": [{"type": "text", "text": "US"}, {"type": "text", "text": "ER"}]}},
        {"role": "assistant", "content": ANSWER},
    ]
    assert render(tokenizer, mapping_chat) == expected


def test_generation_prompt(tokenizer):
    rendered = render(tokenizer, [{"role": "user", "content": USER}], add_generation_prompt=True)
    assert rendered == header() + "<|user_start|>USER<|user_end|><|assistant_start|>"
    system_only = [{"role": "system", "content": SYSTEM}]
    assert render(tokenizer, system_only, add_generation_prompt=True) == header(SYSTEM) + "<|assistant_start|>"


def test_enable_thinking_enables_deliberation(tokenizer):
    rendered = render(tokenizer, PLAIN_CHAT, enable_thinking=True)
    assert rendered == render(tokenizer, PLAIN_CHAT).replace("Deliberation: disabled", "Deliberation: enabled")
    assert rendered.startswith(header(SYSTEM, thinking=True))
    assert render(tokenizer, PLAIN_CHAT, enable_thinking=False) == render(tokenizer, PLAIN_CHAT)


@pytest.mark.parametrize("key", ["reasoning_content", "thinking"])
def test_reasoning_renders_in_the_inner_section(tokenizer, key):
    chat = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER, key: "Think first."}]
    assert render(tokenizer, chat, enable_thinking=True) == (
        header(thinking=True) + "<|user_start|>USER<|user_end|>"
        "<|assistant_start|><|inner_prefix|>Think first.<|inner_suffix|>ANSWER<|assistant_end|>"
    )


def test_structured_blocks(tokenizer):
    assert render(tokenizer, BLOCKS_CHAT) == (
        header(SYSTEM) + "<|user_start|>Weather in Bern?<|user_end|><|assistant_start|>" + BLOCKS_TURN
    )
    assert render(tokenizer, DISPLAY_ANSWERS_CHAT).endswith(
        '<|inner_prefix|>2 and 3.<|inner_suffix|><|tools_prefix|>[{"display_answers": {"answers": ["2", "3"]}}]'
        '<|tools_suffix|>["Answers displayed"] 2 and 3.<|assistant_end|>'
    )


def test_openai_tool_calls_and_tool_messages_form_one_turn(tokenizer):
    assert render(tokenizer, TOOL_CALL_CHAT) == (
        header() + "<|user_start|>Weather in Bern and Zurich?<|user_end|>"
        "<|assistant_start|>" + TOOL_CALLS + TOOL_OUTPUTS + "Bern 21, Zurich 23.<|assistant_end|>"
    )


def test_turn_stays_open_after_a_tool_message(tokenizer):
    rendered = render(tokenizer, TOOL_CALL_CHAT[:-1])
    assert rendered == (
        header()
        + "<|user_start|>Weather in Bern and Zurich?<|user_end|><|assistant_start|>"
        + TOOL_CALLS
        + TOOL_OUTPUTS
    )
    # The model continues the open turn, so no second `<|assistant_start|>` is added.
    assert render(tokenizer, TOOL_CALL_CHAT[:-1], add_generation_prompt=True) == rendered
    # Structured tool calls answered by a tool message behave the same.
    chat = [
        {"role": "user", "content": USER},
        {
            "role": "assistant",
            "content": {"blocks": [{"type": "tool_calls", "calls": [{"name": "f", "arguments": "{}"}]}]},
        },
        {"role": "tool", "content": "done"},
    ]
    assert render(tokenizer, chat, add_generation_prompt=True) == (
        header() + '<|user_start|>USER<|user_end|><|assistant_start|><|tools_prefix|>[{"f": {}}]<|tools_suffix|>[done]'
    )


def test_tools_in_the_developer_block(tokenizer):
    rendered = render(tokenizer, [{"role": "user", "content": USER}], tools=[WEATHER_TOOL, TIME_TOOL])
    assert rendered == header(tools=RENDERED_TOOLS) + "<|user_start|>USER<|user_end|>"
    # Wrapped (`{"type": "function", "function": ...}`) and bare schemas render the same.
    bare = render(tokenizer, [{"role": "user", "content": USER}], tools=[WEATHER_SCHEMA, TIME_TOOL])
    assert bare == rendered
    assert (
        render(tokenizer, [{"role": "user", "content": USER}], tools=[]) == header() + "<|user_start|>USER<|user_end|>"
    )


def test_multi_turn_closes_each_assistant_turn(tokenizer):
    chat = [
        {"role": "user", "content": "Hoi"},
        {"role": "assistant", "content": {"blocks": [{"type": "thoughts", "text": "Greet back."}]}},
        {"role": "user", "content": "Merci"},
        {"role": "assistant", "content": {"blocks": [{"type": "response", "text": "Gern."}]}},
    ]
    # The inner section left open by the first turn closes with the turn (no `<|inner_suffix|>`), so the second
    # turn's response does not emit one either.
    assert render(tokenizer, chat) == (
        header() + "<|user_start|>Hoi<|user_end|><|assistant_start|><|inner_prefix|>Greet back.<|assistant_end|>"
        "<|user_start|>Merci<|user_end|><|assistant_start|>Gern.<|assistant_end|>"
    )
    string_chat = [*TOOL_CALL_CHAT, {"role": "user", "content": "Thanks"}]
    assert render(tokenizer, string_chat, add_generation_prompt=True) == (
        render(tokenizer, TOOL_CALL_CHAT) + "<|user_start|>Thanks<|user_end|><|assistant_start|>"
    )


ERROR_CASES = {
    "unknown-role": (
        [{"role": "user", "content": USER}, {"role": "function", "content": "x"}],
        {},
        r"Unsupported message role function at position 1; .* system message, an optional developer message after "
        r"it, then user, assistant and tool",
    ),
    "late-system": (
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}, {"role": "system", "content": "x"}],
        {},
        r"The system message at position 2 must be the first message",
    ),
    "late-developer": (
        [{"role": "user", "content": USER}, DEVELOPER_MESSAGE],
        {},
        r"The developer message at position 1 must come first, or right after a leading system message",
    ),
    "developer-string": (
        [{"role": "system", "content": SYSTEM}, {"role": "developer", "content": "Be brief."}],
        {},
        r"The developer message at position 1 has content of an unsupported form; .*has_thinking.*formatted_tools",
    ),
    "developer-and-tools": (
        [DEVELOPER_MESSAGE, {"role": "user", "content": USER}],
        {"tools": [TIME_TOOL]},
        r"The developer message at position 0 sets the developer block, and so do the tools or enable_thinking",
    ),
    "developer-and-enable-thinking": (
        [DEVELOPER_MESSAGE, {"role": "user", "content": USER}],
        {"enable_thinking": False},
        r"sets the developer block, and so do the tools or enable_thinking passed to the template, differently",
    ),
    "unknown-block": (
        [{"role": "user", "content": USER}, {"role": "assistant", "content": {"blocks": [{"type": "image"}]}}],
        {},
        r"Unsupported block type image \(block 0\) in the assistant message at position 1; .* thoughts, "
        r"tool_calls, tool_outputs and response blocks",
    ),
    "mixed-assistant-formats": (
        [
            {"role": "user", "content": USER},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": USER},
            {"role": "assistant", "content": {"blocks": [{"type": "response", "text": ANSWER}]}},
        ],
        {},
        r"assistant message at position 3 has structured content but an earlier assistant message has string "
        r"content; the Apertus template cannot mix string and structured",
    ),
    "empty-assistant": (
        [{"role": "user", "content": USER}, {"role": "assistant", "content": None}],
        {},
        r"The assistant message at position 1 has neither content nor tool_calls",
    ),
    "tool-after-user": (
        [{"role": "user", "content": USER}, {"role": "tool", "content": "x"}],
        {},
        r"tool message at position 1 is outside an assistant turn; a tool message must follow the assistant message",
    ),
    "tool-first": ([{"role": "tool", "content": "x"}], {}, r"tool message at position 0 is outside an assistant turn"),
    "non-text-part": (
        [{"role": "user", "content": {"parts": [{"type": "image", "url": "x"}]}}],
        {},
        r"Unsupported part type image in the user message at position 0; .* only text parts",
    ),
    "tool-call-without-arguments": (
        [
            {"role": "user", "content": USER},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
        ],
        {},
        r"Tool call 0 of the assistant message at position 1 needs a string name and arguments given as a JSON "
        r"string or a mapping",
    ),
    "blocks-with-reasoning": (
        [
            {"role": "user", "content": USER},
            {"role": "assistant", "content": {"blocks": [{"type": "response", "text": "x"}]}, "reasoning_content": "r"},
        ],
        {},
        r"has both \{\"blocks\": \[\.\.\.\]\} content and reasoning_content; put the reasoning in a .*thoughts",
    ),
}


@pytest.mark.parametrize(
    "chat_template", [APERTUS_CHAT_TEMPLATE, APERTUS_INSTRUCT_CHAT_TEMPLATE], ids=["sft", "instruct"]
)
@pytest.mark.parametrize(("messages", "kwargs", "error"), ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_errors_name_the_problem_and_the_fix(tokenizer, chat_template, messages, kwargs, error):
    with pytest.raises(TemplateError, match=error):
        render(tokenizer, messages, chat_template, current_date="2025-09-21", **kwargs)


def test_assistant_mask_of_a_plain_chat(tokenizer):
    assert masked_spans(tokenizer, PLAIN_CHAT) == ["ANSWER<|assistant_end|>"]
    reasoning_chat = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER, "thinking": "Hm."}]
    assert masked_spans(tokenizer, reasoning_chat) == ["<|inner_prefix|>Hm.<|inner_suffix|>ANSWER<|assistant_end|>"]


def test_assistant_mask_leaves_out_tool_outputs(tokenizer):
    # Tool calls are the model's; the tool outputs come from the environment, whether tool messages or blocks.
    assert masked_spans(tokenizer, TOOL_CALL_CHAT) == [TOOL_CALLS, "Bern 21, Zurich 23.<|assistant_end|>"]
    # The space SFT data wrote after the outputs merges into the next token, which the model produces.
    assert masked_spans(tokenizer, BLOCKS_CHAT) == [
        '<|inner_prefix|>I should look it up.<|tools_prefix|>[{"get_weather": {"city": "Bern"}}]<|tools_suffix|>',
        " It is warm.<|inner_suffix|>It is 21 degrees.<|assistant_end|>",
    ]


def test_continue_final_message(tokenizer):
    chat = [{"role": "user", "content": USER}, {"role": "assistant", "content": "The answer is"}]
    rendered = render(tokenizer, chat, continue_final_message=True)
    assert rendered == header() + "<|user_start|>USER<|user_end|><|assistant_start|>The answer is"
    thinking_chat = [{"role": "user", "content": USER}, {"role": "assistant", "content": "", "reasoning_content": "Hm"}]
    rendered = render(tokenizer, thinking_chat, continue_final_message="reasoning_content")
    assert rendered == header() + "<|user_start|>USER<|user_end|><|assistant_start|><|inner_prefix|>Hm"


def test_special_token_ids_in_the_real_tokenizer(apertus_tokenizer):
    assert apertus_tokenizer.chat_template == APERTUS_CHAT_TEMPLATE
    rendered = render(apertus_tokenizer, BLOCKS_CHAT, tools=[TIME_TOOL], enable_thinking=True)
    ids = apertus_tokenizer.apply_chat_template(BLOCKS_CHAT, tools=[TIME_TOOL], enable_thinking=True, return_dict=True)[
        "input_ids"
    ]
    # <s>, system, developer, user, assistant, inner prefix, tools prefix/suffix, inner suffix, assistant end.
    assert [token_id for token_id in ids if token_id < 1000] == [1, 61, 62, 63, 64, 65, 66, 67, 69, 71, 72, 70, 68]
    # Every special token is one id and the text between them encodes on its own.
    expected: list[int] = []
    for piece in SPECIAL_TOKEN_PATTERN.split(rendered):
        if SPECIAL_TOKEN_PATTERN.fullmatch(piece):
            expected.append(apertus_tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            expected.extend(apertus_tokenizer(piece, add_special_tokens=False).input_ids)
    assert ids == expected
    assert apertus_tokenizer.decode(ids) == rendered
