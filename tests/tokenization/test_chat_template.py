"""The Apertus chat template: reasoning, tool calls and tool outputs, tools in the developer block, assistant masks.

Most cases render with the small shipped tokenizer (`data/tokenizer`, fast to load); the special-token ids are checked
with the real tekken-based Apertus tokenizer.
"""

import re
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from apertus_hf.tokenization import APERTUS_CHAT_TEMPLATE
from apertus_hf.tokenization.chat_template import APERTUS_DEFAULT_SYSTEM_PROMPT

SHIPPED_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "tokenizer"
SPECIAL_TOKEN_PATTERN = re.compile(r"(<s>|<\|[a-z_]+\|>)")

SYSTEM, USER, ANSWER = "SYSTEM", "USER", "ANSWER"
PLAIN_CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": ANSWER},
]
TOOLS_DISABLED = "Tool Capabilities: disabled"

WEATHER_TOOL = {
    "type": "function",
    "function": {
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
                "extra": {"description": "Anything else."},
            },
            "required": ["city"],
        },
    },
}
# A bare JSON schema (no `{"type": "function", "function": ...}` wrapper) and without parameters.
TIME_TOOL = {"name": "get_time", "description": "Get the current UTC time.", "parameters": {"type": "object"}}
RENDERED_TOOLS = (
    "Tool Capabilities:\n"
    "// Get the current weather in a city.\n"
    "type get_weather = (_: {\n"
    "// The city name.\n"
    "city: string,\n"
    'unit?: "celsius" | "fahrenheit", // default: "celsius",\n'
    "// Days to forecast.\n"
    "days?: number, // default: 1,\n"
    "fields?: string[],\n"
    "stations?: any[],\n"
    "near?: {lat: number, lon: number},\n"
    "metric?: boolean,\n"
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
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zurich"}}},
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
                {"type": "tool_calls", "calls": [{"name": "get_weather", "arguments": {"city": "Bern"}}]},
                {"type": "tool_outputs", "outputs": [{"output": '{"temp": 21}'}]},
                {"type": "thoughts", "text": "It is warm."},
                {"type": "response", "text": "It is 21 degrees."},
            ]
        },
    },
]
BLOCKS_TURN = (
    "<|inner_prefix|>I should look it up."
    '<|tools_prefix|>[{"get_weather": {"city": "Bern"}}]<|tools_suffix|>'
    '[{"temp": 21}]'
    "It is warm.<|inner_suffix|>It is 21 degrees.<|assistant_end|>"
)


def header(system: str = APERTUS_DEFAULT_SYSTEM_PROMPT, *, thinking: bool = False, tools: str = TOOLS_DISABLED) -> str:
    deliberation = "enabled" if thinking else "disabled"
    return (
        f"<s><|system_start|>{system}<|system_end|>"
        f"<|developer_start|>Deliberation: {deliberation}\n{tools}<|developer_end|>"
    )


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    # The shipped tokenizer stores no chat template; if one is ever stored, it must be the current template.
    assert tokenizer.chat_template == APERTUS_CHAT_TEMPLATE  # shipped in data/tokenizer/chat_template.jinja
    return tokenizer


@pytest.fixture(scope="module")
def apertus_tokenizer():
    pytest.importorskip(
        "mistral_common", reason="the real Apertus tokenizer is built from tekken v3, shipped in mistral-common"
    )
    from apertus_hf.tokenization import load_apertus_tokenizer

    return load_apertus_tokenizer()


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


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


def test_generation_prompt_and_default_system_prompt(tokenizer):
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
    bare = render(tokenizer, [{"role": "user", "content": USER}], tools=[WEATHER_TOOL["function"], TIME_TOOL])
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


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        (
            [{"role": "user", "content": USER}, {"role": "function", "content": "x"}],
            r"Unsupported message role function at position 1; .* system message, then user, assistant and tool",
        ),
        (
            [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": USER},
                {"role": "system", "content": "x"},
            ],
            r"Unsupported message role system at position 2; the Apertus template takes an optional leading system",
        ),
        (
            [{"role": "user", "content": USER}, {"role": "assistant", "content": {"blocks": [{"type": "image"}]}}],
            r"Unsupported block type image \(block 0\) in the assistant message at position 1; .* thoughts, "
            r"tool_calls, tool_outputs and response blocks",
        ),
        (
            [
                {"role": "user", "content": USER},
                {"role": "assistant", "content": ANSWER},
                {"role": "user", "content": USER},
                {"role": "assistant", "content": {"blocks": [{"type": "response", "text": ANSWER}]}},
            ],
            r"assistant message at position 3 has structured content but an earlier assistant message has string "
            r"content; the Apertus template cannot mix string and structured",
        ),
        (
            [{"role": "user", "content": USER}, {"role": "tool", "content": "x"}],
            r"tool message at position 1 is outside an assistant turn; a tool message must follow the assistant message",
        ),
        (
            [{"role": "tool", "content": "x"}],
            r"tool message at position 0 is outside an assistant turn",
        ),
        (
            [{"role": "user", "content": {"parts": [{"type": "image", "url": "x"}]}}],
            r"Unsupported part type image in the user message at position 0; .* only text parts",
        ),
        (
            [
                {"role": "user", "content": USER},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
            ],
            r"Tool call 0 of the assistant message at position 1 needs a string name and arguments given as a JSON "
            r"string or a mapping",
        ),
        (
            [
                {"role": "user", "content": USER},
                {
                    "role": "assistant",
                    "content": {"blocks": [{"type": "response", "text": "x"}]},
                    "reasoning_content": "r",
                },
            ],
            r"has both \{\"blocks\": \[\.\.\.\]\} content and reasoning_content; put the reasoning in a .*thoughts",
        ),
    ],
    ids=[
        "unknown-role",
        "late-system",
        "unknown-block",
        "mixed-assistant-formats",
        "tool-after-user",
        "tool-first",
        "non-text-part",
        "tool-call-without-arguments",
        "blocks-with-reasoning",
    ],
)
def test_errors_name_the_problem_and_the_fix(tokenizer, messages, error):
    with pytest.raises(TemplateError, match=error):
        render(tokenizer, messages)


def test_assistant_mask_of_a_plain_chat(tokenizer):
    assert masked_spans(tokenizer, PLAIN_CHAT) == ["ANSWER<|assistant_end|>"]
    reasoning_chat = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER, "thinking": "Hm."}]
    assert masked_spans(tokenizer, reasoning_chat) == ["<|inner_prefix|>Hm.<|inner_suffix|>ANSWER<|assistant_end|>"]


def test_assistant_mask_leaves_out_tool_outputs(tokenizer):
    # Tool calls are the model's; the tool outputs come from the environment, whether tool messages or blocks.
    assert masked_spans(tokenizer, TOOL_CALL_CHAT) == [TOOL_CALLS, "Bern 21, Zurich 23.<|assistant_end|>"]
    assert masked_spans(tokenizer, BLOCKS_CHAT) == [
        '<|inner_prefix|>I should look it up.<|tools_prefix|>[{"get_weather": {"city": "Bern"}}]<|tools_suffix|>',
        "It is warm.<|inner_suffix|>It is 21 degrees.<|assistant_end|>",
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
