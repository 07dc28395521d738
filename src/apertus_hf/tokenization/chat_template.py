"""The Apertus chat templates (Apertus tech report, arXiv 2509.14233, §4.2.1 'Format and Chat Template'): the instruct
format with reasoning and tool calls, as Jinja strings, in the two renderings Apertus used.

- `APERTUS_CHAT_TEMPLATE` renders what swiss-ai's SFT trained on (swiss-ai/posttraining
  `src/post_training/data_sft/tokenization.py`, template `apertus`, with `add_bos_to_chat_template`): an empty system
  block when a conversation has no system message, and every assistant turn closed by `<|assistant_end|>`, so the
  model learns to stop. It is the template of every tokenizer apertus_hf builds or saves (`load_apertus_tokenizer`,
  `train_bpe_tokenizer`, data/tokenizer), so SFT, QRPO, sampling and scoring render the conversations of a model the
  way it was trained on them.
- `APERTUS_INSTRUCT_CHAT_TEMPLATE` renders what the released instruct model ships for inference
  (swiss-ai/Apertus-8B-Instruct-2509's `chat_template.jinja`): a default system prompt with the assistant's identity,
  its knowledge cutoff and today's date when a conversation has no system message, and the last assistant turn left
  open. Set it on a tokenizer to prompt a model exactly as the release does.

Both accept a leading `developer` message (after the system message, as swiss-ai's SFT data has it), `tools` and
`enable_thinking`, transformers/OpenAI `tool_calls` and `tool` messages, and swiss-ai's structured content
(`{"parts": [...]}` user messages, `{"blocks": [...]}` assistant messages).
"""

APERTUS_IDENTITY = "You are Apertus, a helpful assistant created by the SwissAI initiative."
APERTUS_KNOWLEDGE_CUTOFF = "2024-04"


def apertus_default_system_prompt(current_date: str) -> str:
    """The system prompt `APERTUS_INSTRUCT_CHAT_TEMPLATE` renders for a conversation without one, on `current_date`
    (YYYY-MM-DD): the identity, the knowledge cutoff and the date, one per line, as the released template has them."""
    return f"{APERTUS_IDENTITY}\nKnowledge cutoff: {APERTUS_KNOWLEDGE_CUTOFF}\nCurrent date: {current_date}"


# The format (both templates), written as small Jinja pieces joined below.
#
# Conversation: `<s><|system_start|>SYSTEM<|system_end|><|developer_start|>DEVELOPER<|developer_end|>` then the turns.
# User turn: `<|user_start|>TEXT<|user_end|>`. Assistant turn: `<|assistant_start|>` ... `<|assistant_end|>`, where one
# turn holds every assistant and tool message up to the next user message, in order: reasoning
# `<|inner_prefix|>..<|inner_suffix|>`, text, tool calls `<|tools_prefix|>[{"NAME": ARGS}, ...]<|tools_suffix|>` and tool
# outputs `[OUT1, OUT2]`.
#
# Where the released template and swiss-ai's SFT template differ, each of ours follows its own reference: the default
# system block, whether the last assistant turn is closed, whether a generation prompt follows an open turn, and the
# space SFT wrote after a `tool_outputs` block that is not the last block of its message. Where the released template
# fails or drops input, both of ours go further: tools may be bare JSON schemas (what the release reads) or wrapped as
# `{"type": "function", "function": SCHEMA}` (what transformers passes); tool-call arguments given as a JSON string are
# written as they are (what the release and SFT did) and a mapping through `tojson`; `reasoning_content` renders in the
# inner section (the release drops it); an open list of tool outputs is closed before an assistant message's tool
# calls (the release writes the calls inside the list when that message has no content).
#
# Jinja notes. Every tag trims the whitespace around it (`{%- -%}`), so text that starts or ends with a space or a
# newline is written as a string expression. Dict keys are read as `x['key']`, since `x.items` would be the dict method.
# `{% generation %}` spans (what `apply_chat_template(..., return_assistant_tokens_mask=True)` marks) cover exactly what
# the model produces: reasoning, text and tool calls with their special tokens, and `<|assistant_end|>`; not
# `<|assistant_start|>` and not tool outputs, which come from the environment. They must sit in the top-level loop,
# never inside a macro: transformers places a span by the length of the output streamed before it.

_TYPESCRIPT_TYPE_MACRO = (
    # The TypeScript type of one JSON-schema parameter, character for character as the released template (and the
    # `formatted_tools` of swiss-ai's SFT data) writes it under transformers' Jinja settings, quirks included: the
    # properties of a nested object each start on a new line indented by 16 spaces, a `oneOf` default is indented by
    # 20, `oneOf` variants are separated by ' | ' and a newline, and an array of items longer than 50 characters is
    # `any[]`. (The release means to turn a `oneOf` with object variants into `any`, but its flag is set inside a
    # loop, where Jinja forgets it, so it never does; neither do we.)
    "{%- macro typescript_type(spec) -%}"
    "{%- if spec['type'] == 'array' -%}"
    "{%- if spec['items'] -%}"
    "{%- set item_kind = spec['items']['type'] -%}"
    "{%- if item_kind == 'string' or item_kind == 'boolean' -%}{{ item_kind }}[]"
    "{%- elif item_kind == 'number' or item_kind == 'integer' -%}number[]"
    "{%- else -%}"
    "{%- set item_type = typescript_type(spec['items']) -%}"
    "{{- 'any[]' if item_type == 'object | object' or item_type | length > 50 else item_type ~ '[]' -}}"
    "{%- endif -%}"
    "{%- else -%}any[]"
    "{%- endif -%}"
    "{{- ' | null' if spec['nullable'] else '' -}}"
    "{%- elif spec['type'] is defined and spec['type'] is iterable and spec['type'] is not string "
    "and spec['type'] is not mapping and spec['type'][0] is defined -%}"
    "{{- spec['type'] | join(' | ') -}}"
    "{%- elif spec['oneOf'] -%}"
    "{%- for variant in spec['oneOf'] -%}"
    "{{- typescript_type(variant) -}}"
    "{{- '// ' ~ variant['description'] if variant['description'] else '' -}}"
    "{{- '                    // default: ' ~ variant['default'] | tojson if variant['default'] is defined else '' -}}"
    "{{- ' | \\n' if not loop.last else '' -}}"
    "{%- endfor -%}"
    "{%- elif spec['type'] == 'string' -%}"
    "{%- if spec['enum'] -%}{{ '\"' ~ spec['enum'] | join('\" | \"') ~ '\"' }}"
    "{%- else -%}string{{ ' | null' if spec['nullable'] else '' }}"
    "{%- endif -%}"
    "{%- elif spec['type'] == 'number' or spec['type'] == 'integer' -%}number"
    "{%- elif spec['type'] == 'boolean' -%}boolean"
    "{%- elif spec['type'] == 'object' and spec['properties'] -%}"
    "{{- '{\\n' -}}"
    "{%- for name, field in spec['properties'].items() -%}"
    "{{- name ~ ('' if name in (spec['required'] or []) else '?') ~ ': \\n                ' ~ typescript_type(field) -}}"
    "{{- ', ' if not loop.last else '' -}}"
    "{%- endfor -%}"
    "{{- '}' -}}"
    "{%- elif spec['type'] == 'object' -%}object"
    "{%- else -%}any"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

_TOOLS_MACRO = (
    # The tool signatures of the developer block, separated by newlines:
    # `// DESCRIPTION\ntype NAME = (_: {\n// PARAM DESCRIPTION\nparam?: TYPE, // default: JSON,\n...\n}) => any;`,
    # or `type NAME = () => any;` without parameters. A default is written as JSON, except that of an enum parameter
    # (as is, after a comma) and of a `oneOf` parameter (as is, without the comma), as the release does. A tool is
    # the bare SCHEMA `{"name", "description", "parameters"}` (what the release reads) or
    # `{"type": "function", "function": SCHEMA}` (what transformers passes).
    "{%- macro render_tools(tools) -%}"
    "{%- for tool in tools -%}"
    "{%- set schema = tool['function'] if tool['function'] is mapping else tool -%}"
    "{%- set parameters = schema['parameters'] if schema['parameters'] is mapping else {} -%}"
    "{%- set required = parameters['required'] or [] -%}"
    "{%- if schema['description'] is string -%}{{ '// ' ~ schema['description'] ~ '\\n' }}{%- endif -%}"
    "{{- 'type ' ~ schema['name'] ~ ' = ' -}}"
    "{%- if parameters['properties'] -%}"
    "{{- '(_: {\\n' -}}"
    "{%- for name, parameter in parameters['properties'].items() -%}"
    "{%- if parameter['description'] -%}{{ '// ' ~ parameter['description'] ~ '\\n' }}{%- endif -%}"
    "{{- name ~ ('' if name in required else '?') ~ ': ' ~ typescript_type(parameter) -}}"
    "{%- if parameter['default'] is defined -%}"
    "{%- if parameter['enum'] -%}{{ ', // default: ' ~ parameter['default'] }}"
    "{%- elif parameter['oneOf'] -%}{{ '// default: ' ~ parameter['default'] }}"
    "{%- else -%}{{ ', // default: ' ~ parameter['default'] | tojson }}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{{- ',\\n' if not loop.last else '\\n' -}}"
    "{%- endfor -%}"
    "{{- '}) => any;' -}}"
    "{%- else -%}() => any;"
    "{%- endif -%}"
    "{{- '\\n' if not loop.last else '' -}}"
    "{%- endfor -%}"
    "{%- endmacro -%}"
)

_TOOL_CALLS_MACRO = (
    # `<|tools_prefix|>[{"NAME": ARGS}, ...]<|tools_suffix|>`, ARGS as given (a JSON string) or as JSON (a mapping).
    # A call is `{"name", "arguments"}` (a `tool_calls` block) or `{"type": "function", "function": {"name",
    # "arguments"}}` (transformers/OpenAI `tool_calls` on an assistant message).
    "{%- macro render_tool_calls(calls, position) -%}"
    "{{- '<|tools_prefix|>[' -}}"
    "{%- for call in calls -%}"
    "{%- if call['type'] is defined and call['type'] != 'function' -%}"
    "{{- raise_exception('Tool call ' ~ loop.index0 ~ ' of the assistant message at position ' ~ position ~ "
    "' has type ' ~ call['type'] ~ '; the Apertus template renders only function calls: "
    '{"type": "function", "function": {"name": ..., "arguments": ...}} '
    "or, in a tool_calls block, "
    '{"name": ..., "arguments": ...}.'
    "') -}}"
    "{%- endif -%}"
    "{%- set schema = call['function'] if call['function'] is mapping else call -%}"
    "{%- set arguments = schema['arguments'] -%}"
    "{%- if schema['name'] is not string or not (arguments is string or arguments is mapping) -%}"
    "{{- raise_exception('Tool call ' ~ loop.index0 ~ ' of the assistant message at position ' ~ position ~ "
    "' needs a string name and arguments given as a JSON string or a mapping ({} for a call without arguments).') -}}"
    "{%- endif -%}"
    "{{- '{\"' ~ schema['name'] ~ '\": ' ~ (arguments if arguments is string else arguments | tojson) ~ '}' -}}"
    "{{- ', ' if not loop.last else '' -}}"
    "{%- endfor -%}"
    "{{- ']<|tools_suffix|>' -}}"
    "{%- endmacro -%}"
)

_TOOL_OUTPUTS_MACRO = (
    # The outputs of a `tool_outputs` block, `[OUT1, OUT2]`: each `{"output": ...}` as given (a string) or as JSON.
    "{%- macro render_tool_outputs(outputs) -%}"
    "{{- '[' -}}"
    "{%- for item in outputs -%}"
    "{%- set output = item['output'] if item is mapping else item -%}"
    "{{- output if output is string else output | tojson -}}"
    "{{- ', ' if not loop.last else '' -}}"
    "{%- endfor -%}"
    "{{- ']' -}}"
    "{%- endmacro -%}"
)

_USER_CONTENT_MACRO = (
    # User content: a string, or `{"parts": [{"type": "text", "text": ...}, ...]}` with its text parts concatenated.
    "{%- macro render_user_content(content, position) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is mapping and content['parts'] is defined -%}"
    "{%- for part in content['parts'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- else -%}"
    "{{- raise_exception('Unsupported part type ' ~ part['type'] ~ ' in the user message at position ' ~ position ~ "
    "'; the Apertus template renders only text parts: "
    '{"type": "text", "text": ...}.'
    "') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{- raise_exception('The user message at position ' ~ position ~ ' has content of an unsupported form; the "
    "Apertus template takes a string or "
    '{"parts": [{"type": "text", "text": ...}, ...]}.'
    "') -}}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

_SYSTEM_MESSAGE = (
    # A leading system message (a string or `{"text": ...}`) gives the system block; `first_position` turns loop
    # indices back into positions in `messages` for errors. Without one, `system_content` stays the template's default.
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_content = messages[0]['content'] -%}"
    "{%- if system_content is mapping -%}{%- set system_content = system_content['text'] -%}{%- endif -%}"
    "{%- if system_content is not string -%}"
    "{{- raise_exception('The system message at position 0 has content of an unsupported form; the Apertus "
    "template takes a string or "
    '{"text": ...}.'
    "') -}}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- set first_position = 1 -%}"
    "{%- else -%}"
    "{%- set loop_messages = messages -%}"
    "{%- set first_position = 0 -%}"
    "{%- endif -%}"
    "{{- bos_token -}}<|system_start|>{{ system_content }}<|system_end|>"
)

_DEVELOPER_BLOCK = (
    # A developer message right after the system message (swiss-ai's SFT format: `{"has_thinking": bool,
    # "formatted_tools": "TypeScript signatures"}`) gives the developer block as it is. Without one, it comes from the
    # `enable_thinking` and `tools` template variables. Either way it is `Deliberation: enabled|disabled`, then
    # `Tool Capabilities:` and the tool signatures, or `Tool Capabilities: disabled`.
    "{%- if loop_messages and loop_messages[0]['role'] == 'developer' -%}"
    "{%- set developer_content = loop_messages[0]['content'] -%}"
    "{%- if developer_content is not mapping -%}"
    "{{- raise_exception('The developer message at position ' ~ first_position ~ ' has content of an unsupported "
    "form; the Apertus template takes "
    '{"has_thinking": true|false, "formatted_tools": "TypeScript signatures"} '
    "(both optional), the form of swiss-ai SFT data. Put instructions in the system message.') -}}"
    "{%- endif -%}"
    "{%- set thinking = developer_content['has_thinking'] is defined and developer_content['has_thinking'] -%}"
    "{%- set tool_signatures = developer_content['formatted_tools'] or '' -%}"
    "{%- if tools or (enable_thinking is defined and enable_thinking is not none "
    "and (enable_thinking and not thinking or thinking and not enable_thinking)) -%}"
    "{{- raise_exception('The developer message at position ' ~ first_position ~ ' sets the developer block, and "
    "so do the tools or enable_thinking passed to the template, differently; give Deliberation and the tools either "
    "in the developer message or as template variables.') -}}"
    "{%- endif -%}"
    "{%- set loop_messages = loop_messages[1:] -%}"
    "{%- set first_position = first_position + 1 -%}"
    "{%- else -%}"
    "{%- set thinking = enable_thinking is defined and enable_thinking -%}"
    "{%- set tool_signatures = render_tools(tools) if tools else '' -%}"
    "{%- endif -%}"
    "<|developer_start|>"
    "{{- 'Deliberation: enabled\\n' if thinking else 'Deliberation: disabled\\n' -}}"
    "{{- 'Tool Capabilities:\\n' ~ tool_signatures if tool_signatures else 'Tool Capabilities: disabled' -}}"
    "<|developer_end|>"
)

_TOOL_MESSAGE = (
    # Consecutive tool messages inside an assistant turn form one list: `[` at the first, `, ` between, and the `]`
    # is written before whatever comes next (see `_messages`).
    "{%- if not ns.in_turn -%}"
    "{{- raise_exception('The tool message at position ' ~ position ~ ' is outside an assistant turn; a tool message "
    "must follow the assistant message whose tool calls it answers (or another tool message).') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('The tool message at position ' ~ position ~ ' has non-string content; the Apertus "
    "template takes tool outputs as strings (serialize structured results to JSON first).') -}}"
    "{%- endif -%}"
    "{{- ', ' if ns.in_tool_list else '[' -}}"
    "{{- message['content'] -}}"
    "{%- set ns.in_tool_list = true -%}"
)

_USER_MESSAGE = (
    # A user message closes the open assistant turn (and its inner section, without a token) and renders its text.
    "{%- if ns.in_turn -%}"
    "{% generation %}<|assistant_end|>{% endgeneration %}"
    "{%- set ns.in_turn = false -%}"
    "{%- endif -%}"
    "{%- set ns.in_inner = false -%}"
    "<|user_start|>{{ render_user_content(message['content'], position) }}<|user_end|>"
)


def _assistant_blocks(space_after_tool_outputs: bool) -> str:
    """Structured content `{"blocks": [...]}`: `thoughts` open the inner section if needed, `response` closes it, as
    does a lone `display_answers` call (swiss-ai's tool for final answers) after another block; `tool_calls` render
    as calls, and `tool_outputs` (from the environment, so outside the generation spans) as a list, followed by a
    space before another block in swiss-ai's SFT data (`space_after_tool_outputs`) but not in the release."""
    space = "{{- ' ' if not loop.last else '' -}}" if space_after_tool_outputs else ""
    return (
        "{%- for block in content['blocks'] -%}"
        "{%- set block_type = block['type'] if block is mapping else none -%}"
        "{%- if block_type == 'thoughts' -%}"
        "{% generation %}{{ '' if ns.in_inner else '<|inner_prefix|>' }}{{ block['text'] }}{% endgeneration %}"
        "{%- set ns.in_inner = true -%}"
        "{%- elif block_type == 'tool_calls' -%}"
        "{%- set closes_inner = ns.in_inner and not loop.first and block['calls'] | length == 1 "
        "and block['calls'][0]['name'] == 'display_answers' -%}"
        "{% generation %}{{ '<|inner_suffix|>' if closes_inner else '' }}"
        "{{ render_tool_calls(block['calls'], position) }}{% endgeneration %}"
        "{%- if closes_inner -%}{%- set ns.in_inner = false -%}{%- endif -%}"
        "{%- elif block_type == 'tool_outputs' -%}"
        "{{- render_tool_outputs(block['outputs']) -}}" + space + "{%- elif block_type == 'response' -%}"
        "{% generation %}{{ '<|inner_suffix|>' if ns.in_inner else '' }}{{ block['text'] }}{% endgeneration %}"
        "{%- set ns.in_inner = false -%}"
        "{%- else -%}"
        "{{- raise_exception('Unsupported block type ' ~ block_type ~ ' (block ' ~ loop.index0 ~ ') in the assistant "
        "message at position ' ~ position ~ '; the Apertus template renders thoughts, tool_calls, tool_outputs and "
        "response blocks.') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


_ASSISTANT_FORMAT_CHECK = (
    # An assistant message opens a turn unless one is open (after tool messages it continues the same turn). Its
    # content is a string (with optional `reasoning_content`/`thinking`), `{"blocks": [...]}`, or absent/None (tool
    # calls only); string and structured assistant messages cannot be mixed in one conversation.
    "{%- if not ns.in_turn -%}<|assistant_start|>{%- set ns.in_turn = true -%}{%- endif -%}"
    "{%- set content = message['content'] -%}"
    "{%- if content is string -%}{%- set content_format = 'string' -%}"
    "{%- elif content is mapping and content['blocks'] is defined -%}{%- set content_format = 'structured' -%}"
    "{%- elif content is none or content is not defined -%}{%- set content_format = none -%}"
    "{%- else -%}"
    "{{- raise_exception('The assistant message at position ' ~ position ~ ' has content of an unsupported form; "
    "the Apertus template takes a string, "
    '{"blocks": [...]}, '
    "or no content for a message with only tool_calls.') -}}"
    "{%- endif -%}"
    "{%- if content_format is none and not message['tool_calls'] -%}"
    "{{- raise_exception('The assistant message at position ' ~ position ~ ' has neither content nor tool_calls; "
    "give it a string (empty for none), "
    '{"blocks": [...]}, '
    "or tool_calls.') -}}"
    "{%- endif -%}"
    "{%- if content_format is not none -%}"
    "{%- if ns.assistant_format is not none and ns.assistant_format != content_format -%}"
    "{{- raise_exception('The assistant message at position ' ~ position ~ ' has ' ~ content_format ~ ' content "
    "but an earlier assistant message has ' ~ ns.assistant_format ~ ' content; the Apertus template cannot mix "
    "string and structured "
    '({"blocks": [...]}) '
    "assistant messages in one conversation: write all of them in one format.') -}}"
    "{%- endif -%}"
    "{%- set ns.assistant_format = content_format -%}"
    "{%- endif -%}"
    "{%- set reasoning = message['reasoning_content'] if message['reasoning_content'] is string "
    "else message['thinking'] -%}"
    "{%- set reasoning = reasoning if reasoning is string else '' -%}"
)

_ASSISTANT_TEXT = (
    # String content: `<|inner_prefix|>REASONING<|inner_suffix|>` when the message has reasoning, then the text.
    "{% generation %}"
    "{%- if reasoning -%}<|inner_prefix|>{{ reasoning }}<|inner_suffix|>{%- endif -%}"
    "{{- content if content is string else '' -}}"
    "{% endgeneration %}"
)

_ASSISTANT_TOOL_CALLS = (
    # transformers/OpenAI `tool_calls` on an assistant message render after its content.
    "{%- if message['tool_calls'] -%}"
    "{% generation %}{{ render_tool_calls(message['tool_calls'], position) }}{% endgeneration %}"
    "{%- endif -%}"
)


def _assistant_message(space_after_tool_outputs: bool) -> str:
    return "".join(
        [
            _ASSISTANT_FORMAT_CHECK,
            "{%- if content_format == 'structured' -%}",
            "{%- if reasoning -%}",
            "{{- raise_exception('The assistant message at position ' ~ position ~ ' has both "
            '{"blocks": [...]} '
            "content and reasoning_content; put the reasoning in a "
            '{"type": "thoughts", "text": ...} '
            "block instead.') -}}",
            "{%- endif -%}",
            _assistant_blocks(space_after_tool_outputs),
            "{%- elif reasoning or content -%}",
            _ASSISTANT_TEXT,
            "{%- endif -%}",
            _ASSISTANT_TOOL_CALLS,
        ]
    )


_MISPLACED_ROLE = (
    # A system or developer message anywhere but at the start, or a role the format does not have.
    "{%- elif message['role'] == 'system' -%}"
    "{{- raise_exception('The system message at position ' ~ position ~ ' must be the first message: the Apertus "
    "template renders one system block, before the conversation. Merge it into the first system message.') -}}"
    "{%- elif message['role'] == 'developer' -%}"
    "{{- raise_exception('The developer message at position ' ~ position ~ ' must come first, or right after a "
    "leading system message: the Apertus template renders it as the developer block, before the conversation.') -}}"
    "{%- else -%}"
    "{{- raise_exception('Unsupported message role ' ~ message['role'] ~ ' at position ' ~ position ~ '; the "
    "Apertus template takes an optional leading system message, an optional developer message after it, then user, "
    "assistant and tool messages.') -}}"
)


def _messages(space_after_tool_outputs: bool) -> str:
    """The turns after the system and developer messages. `ns` carries the state across messages: an assistant turn
    is open, the inner (reasoning) section is open, a list of tool-message outputs is open, and the assistant content
    format seen so far."""
    return "".join(
        [
            "{%- set ns = namespace(in_turn=false, in_inner=false, in_tool_list=false, assistant_format=none) -%}",
            "{%- for message in loop_messages -%}",
            "{%- set position = loop.index0 + first_position -%}",
            "{%- if message['role'] == 'tool' -%}",
            _TOOL_MESSAGE,
            "{%- else -%}",
            "{%- if ns.in_tool_list -%}]{%- set ns.in_tool_list = false -%}{%- endif -%}",
            "{%- if message['role'] == 'user' -%}",
            _USER_MESSAGE,
            "{%- elif message['role'] == 'assistant' -%}",
            _assistant_message(space_after_tool_outputs),
            _MISPLACED_ROLE,
            "{%- endif -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if ns.in_tool_list -%}]{%- endif -%}",
        ]
    )


_MACROS = _TYPESCRIPT_TYPE_MACRO + _TOOLS_MACRO + _TOOL_CALLS_MACRO + _TOOL_OUTPUTS_MACRO + _USER_CONTENT_MACRO

_SFT_CONVERSATION_END = (
    # Every assistant turn ends, the last one too: a conversation that ends with an assistant message closes it. One
    # that ends with a tool message leaves the turn open for the model to continue, so no generation prompt is added.
    "{%- if ns.in_turn and loop_messages[-1]['role'] == 'assistant' -%}"
    "{% generation %}<|assistant_end|>{% endgeneration %}"
    "{%- set ns.in_turn = false -%}"
    "{%- endif -%}"
    "{%- if add_generation_prompt and not ns.in_turn -%}<|assistant_start|>{%- endif -%}"
)

_INSTRUCT_CONVERSATION_END = (
    # As released: the last assistant turn stays open, and the generation prompt is added whatever came before it.
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)

APERTUS_CHAT_TEMPLATE = "".join(
    [
        _MACROS,
        # No system message: an empty system block, as swiss-ai's SFT rendered such conversations.
        "{%- set system_content = '' -%}",
        _SYSTEM_MESSAGE,
        _DEVELOPER_BLOCK,
        _messages(space_after_tool_outputs=True),
        _SFT_CONVERSATION_END,
    ]
)
"""The Apertus chat template as swiss-ai's SFT rendered its training data (Jinja, for `tokenizer.chat_template`); the
template of every tokenizer apertus_hf builds or saves.

Template variables besides `messages`: `tools` (JSON-schema tools), `enable_thinking` (`Deliberation: enabled`) and
`add_generation_prompt`.
"""

APERTUS_INSTRUCT_CHAT_TEMPLATE = "".join(
    [
        _MACROS,
        # No system message: the released default system prompt, dated today unless `current_date` is given.
        "{%- set today = current_date if current_date is defined and current_date is not none "
        "else strftime_now('%Y-%m-%d') -%}",
        f"{{%- set system_content = {apertus_default_system_prompt('')!r} ~ today -%}}",
        _SYSTEM_MESSAGE,
        _DEVELOPER_BLOCK,
        _messages(space_after_tool_outputs=False),
        _INSTRUCT_CONVERSATION_END,
    ]
)
"""The Apertus chat template as the released instruct model renders conversations for inference (Jinja, for
`tokenizer.chat_template`): `apertus_default_system_prompt(today)` when there is no system message, and the last
assistant turn left open.

Template variables besides `messages`: `tools`, `enable_thinking`, `add_generation_prompt`, and `current_date`
(YYYY-MM-DD) for the default system prompt in place of today's date (`strftime_now`, which transformers provides).
"""
