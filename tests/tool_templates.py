"""Small chat templates in the style of each family's tool rendering, for tests (the real ones
are long; what matters here is what cake reads from them: whether they render tools, and the
markers that say the format). `PLAIN` is ChatML that ignores tools, as SmolLM2's does."""

from __future__ import annotations

PLAIN = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen 2.5's structure: the tools in the system turn, calls in <tool_call> tags, results as
# <tool_response> in a user turn.
QWEN_STYLE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
    '\n</tools>\nAnswer calls as <tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n"
    "{% if m.content %}{{ m.content }}{% endif %}{% for c in m.tool_calls or [] %}\n<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Llama 3.1's JSON tool calling: the tools in the user turn, an answer of
# {"name": ..., "parameters": ...}; <|python_tag|> for its built-in tools.
LLAMA31_STYLE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
    '\n\n{% if tools and loop.last %}Respond in the format {"name": function name, '
    '"parameters": dictionary of argument name and its value}.{% for t in tools %}\n'
    "{{ t | tojson }}{% endfor %}\n\n{% endif %}{% if m.tool_calls %}<|python_tag|>"
    "{{ {'name': m.tool_calls[0].function.name, 'parameters': m.tool_calls[0].function.arguments}"
    " | tojson }}{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Mistral's v3 format: [AVAILABLE_TOOLS] before the last user turn, calls as [TOOL_CALLS][...],
# and call ids of 9 letters or digits, or the template raises.
MISTRAL_STYLE = (
    "<s>{% for m in messages %}{% for c in m.tool_calls or [] %}{% if c.id | length != 9 %}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{% endif %}{% endfor %}{% if m.role == 'tool' and m.tool_call_id | length != 9 %}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{% endif %}{% if m.role == 'user' %}{% if tools and loop.last %}"
    "[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}"
    "[/INST]{% elif m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | map(attribute='function') | list"
    " | tojson }}</s>{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{% else %}{{ m.content }}</s>{% endif %}{% endfor %}"
)
