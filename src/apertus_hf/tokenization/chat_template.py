"""The Apertus chat template (Apertus tech report, arXiv 2509.14233, §4.2.1 'Format and Chat Template'): the instruct
format with reasoning and tool calls, as one Jinja string.

Both tokenizers carry it: the real one (`load_apertus_tokenizer`) and the ones `train_bpe_tokenizer` trains, which
put the Apertus special tokens at the same ids.
"""

APERTUS_DEFAULT_SYSTEM_PROMPT = "You are Apertus, a helpful assistant created by the SwissAI initiative."
"""Rendered when a conversation has no system message.

Public uses of the released Apertus instruct template show this default system prompt (followed there by a
"Knowledge cutoff" and a "Current date: <today>" line); the date lines are left out so that the same conversation
always renders to the same tokens, which training data needs.
"""

# The Apertus instruct format (swiss-ai/posttraining `src/post_training/data_sft/tokenization.py`, template
# `apertus`; swiss-ai's `apertus_format`), written as small Jinja pieces joined below.
#
# Conversation: `<s><|system_start|>SYSTEM<|system_end|><|developer_start|>DEVELOPER<|developer_end|>` then the turns.
# User turn: `<|user_start|>TEXT<|user_end|>`. Assistant turn: `<|assistant_start|>` ... `<|assistant_end|>`, where one
# turn holds every assistant and tool message up to the next user message, in order: reasoning
# `<|inner_prefix|>..<|inner_suffix|>`, text, tool calls `<|tools_prefix|>[{"NAME": ARGS}, ...]<|tools_suffix|>` and tool
# outputs `[OUT1, OUT2]`. A turn whose last message is a tool message stays open: the model continues after the outputs.
#
# Jinja notes. Every tag trims the whitespace around it (`{%- -%}`), so text that starts or ends with a space or a
# newline is written as a string expression. Dict keys are read as `x['key']`, since `x.items` would be the dict method.
# `{% generation %}` spans (what `apply_chat_template(..., return_assistant_tokens_mask=True)` marks) cover exactly what
# the model produces: reasoning, text and tool calls with their special tokens, and `<|assistant_end|>`; not
# `<|assistant_start|>` and not tool outputs, which come from the environment. They must sit in the top-level loop,
# never inside a macro: transformers places a span by the length of the output streamed before it.

_TYPESCRIPT_TYPE_MACRO = (
    # The TypeScript type of one JSON-schema parameter, as Apertus reads tool signatures: `string`, `number`,
    # `boolean`, `"a" | "b"` (string enum), `T[]` (array of a simple type, else `any[]`), `{a: T, b?: U}` or `object`,
    # and `any` for everything else.
    "{%- macro typescript_type(spec) -%}"
    "{%- set kind = spec['type'] if spec is mapping else none -%}"
    "{%- if kind == 'string' and spec['enum'] -%}"
    "{%- for value in spec['enum'] -%}{{ value | tojson }}{{ ' | ' if not loop.last else '' }}{%- endfor -%}"
    "{%- elif kind == 'string' or kind == 'boolean' -%}{{ kind }}"
    "{%- elif kind == 'number' or kind == 'integer' -%}number"
    "{%- elif kind == 'array' -%}"
    "{%- set item_kind = spec['items']['type'] if spec['items'] is mapping else none -%}"
    "{%- if item_kind == 'string' or item_kind == 'boolean' -%}{{ item_kind }}[]"
    "{%- elif item_kind == 'number' or item_kind == 'integer' -%}number[]"
    "{%- else -%}any[]"
    "{%- endif -%}"
    "{%- elif kind == 'object' and spec['properties'] is mapping and spec['properties'] -%}"
    "{{- '{' -}}"
    "{%- for name, field in spec['properties'].items() -%}"
    "{{- name ~ ('' if name in (spec['required'] or []) else '?') ~ ': ' ~ typescript_type(field) -}}"
    "{{- ', ' if not loop.last else '' -}}"
    "{%- endfor -%}"
    "{{- '}' -}}"
    "{%- elif kind == 'object' -%}object"
    "{%- else -%}any"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

_TOOLS_MACRO = (
    # The tool signatures of the developer block, one per tool, separated by newlines:
    # `// DESCRIPTION\ntype NAME = (_: {\n// PARAM DESCRIPTION\nparam?: TYPE, // default: JSON,\n...\n}) => any;`,
    # or `type NAME = () => any;` without parameters. A tool is `{"type": "function", "function": SCHEMA}` (what
    # transformers passes) or the bare SCHEMA `{"name", "description", "parameters"}`.
    "{%- macro render_tools(tools) -%}"
    "{%- for tool in tools -%}"
    "{%- set schema = tool['function'] if tool['function'] is mapping else tool -%}"
    "{%- set parameters = schema['parameters'] if schema['parameters'] is mapping else {} -%}"
    "{%- set properties = parameters['properties'] if parameters['properties'] is mapping else {} -%}"
    "{%- set required = parameters['required'] or [] -%}"
    "{%- if schema['description'] -%}{{ '// ' ~ schema['description'] ~ '\\n' }}{%- endif -%}"
    "{{- 'type ' ~ schema['name'] ~ ' = ' -}}"
    "{%- if properties -%}"
    "{{- '(_: {\\n' -}}"
    "{%- for name, parameter in properties.items() -%}"
    "{%- if parameter['description'] -%}{{ '// ' ~ parameter['description'] ~ '\\n' }}{%- endif -%}"
    "{{- name ~ ('' if name in required else '?') ~ ': ' ~ typescript_type(parameter) -}}"
    "{%- if parameter['default'] is defined -%}{{ ', // default: ' ~ parameter['default'] | tojson }}{%- endif -%}"
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
    "{{- '{' ~ schema['name'] | tojson ~ ': ' ~ (arguments if arguments is string else arguments | tojson) ~ '}' -}}"
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

_SYSTEM_BLOCK = (
    # `<s><|system_start|>SYSTEM<|system_end|>`: a leading system message (a string or `{"text": ...}`), else the
    # default system prompt. `first_position` turns loop indices back into positions in `messages` for errors.
    "{{- bos_token -}}"
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
    f"{{%- set system_content = {APERTUS_DEFAULT_SYSTEM_PROMPT!r} -%}}"
    "{%- set loop_messages = messages -%}"
    "{%- set first_position = 0 -%}"
    "{%- endif -%}"
    "<|system_start|>{{ system_content }}<|system_end|>"
)

_DEVELOPER_BLOCK = (
    # `Deliberation: enabled|disabled` from the `enable_thinking` template variable, then the tool signatures when
    # `tools` are given, else `Tool Capabilities: disabled`.
    "<|developer_start|>"
    "{{- 'Deliberation: enabled\\n' if enable_thinking else 'Deliberation: disabled\\n' -}}"
    "{%- if tools -%}{{- 'Tool Capabilities:\\n' ~ render_tools(tools) -}}"
    "{%- else -%}Tool Capabilities: disabled"
    "{%- endif -%}"
    "<|developer_end|>"
)

_TOOL_MESSAGE = (
    # Consecutive tool messages inside an assistant turn form one list: `[` at the first, `, ` between, and the `]`
    # is written before whatever comes next (see `_MESSAGES`).
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

_ASSISTANT_BLOCKS = (
    # Structured content `{"blocks": [...]}`: `thoughts` open the inner section if needed, `response` closes it,
    # `tool_calls` render as calls, and `tool_outputs` (from the environment, so outside the generation spans) as a list.
    "{%- for block in content['blocks'] -%}"
    "{%- set block_type = block['type'] if block is mapping else none -%}"
    "{%- if block_type == 'thoughts' -%}"
    "{% generation %}{{ '' if ns.in_inner else '<|inner_prefix|>' }}{{ block['text'] }}{% endgeneration %}"
    "{%- set ns.in_inner = true -%}"
    "{%- elif block_type == 'tool_calls' -%}"
    "{% generation %}{{ render_tool_calls(block['calls'], position) }}{% endgeneration %}"
    "{%- elif block_type == 'tool_outputs' -%}"
    "{{- render_tool_outputs(block['outputs']) -}}"
    "{%- elif block_type == 'response' -%}"
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

_ASSISTANT_MESSAGE = "".join(
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
        _ASSISTANT_BLOCKS,
        "{%- elif reasoning or content -%}",
        _ASSISTANT_TEXT,
        "{%- endif -%}",
        _ASSISTANT_TOOL_CALLS,
    ]
)

_MESSAGES = "".join(
    [
        # The turns after the system message. `ns` carries the state across messages: an assistant turn is open, the
        # inner (reasoning) section is open, a list of tool-message outputs is open, and the assistant content format
        # seen so far.
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
        _ASSISTANT_MESSAGE,
        "{%- else -%}",
        "{{- raise_exception('Unsupported message role ' ~ message['role'] ~ ' at position ' ~ position ~ '; the "
        "Apertus template takes an optional leading system message, then user, assistant and tool messages.') -}}",
        "{%- endif -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
)

_CONVERSATION_END = (
    # Close an open tool-output list. A conversation that ends with an assistant message ends its turn; one that ends
    # with a tool message leaves the turn open for the model to continue, so no generation prompt is added then.
    "{%- if ns.in_tool_list -%}]{%- endif -%}"
    "{%- if ns.in_turn and loop_messages[-1]['role'] == 'assistant' -%}"
    "{% generation %}<|assistant_end|>{% endgeneration %}"
    "{%- set ns.in_turn = false -%}"
    "{%- endif -%}"
    "{%- if add_generation_prompt and not ns.in_turn -%}<|assistant_start|>{%- endif -%}"
)

APERTUS_CHAT_TEMPLATE = "".join(
    [
        _TYPESCRIPT_TYPE_MACRO,
        _TOOLS_MACRO,
        _TOOL_CALLS_MACRO,
        _TOOL_OUTPUTS_MACRO,
        _USER_CONTENT_MACRO,
        _SYSTEM_BLOCK,
        _DEVELOPER_BLOCK,
        _MESSAGES,
        _CONVERSATION_END,
    ]
)
"""The Apertus chat template (Jinja, for `tokenizer.chat_template`); see the comment above for the format.

Template variables besides `messages`: `tools` (JSON-schema tools), `enable_thinking` (`Deliberation: enabled`) and
`add_generation_prompt`.
"""
