"""A conversation with tools as token ids, and the format the model will answer in.

Templates that know tools (Qwen, Llama 3.1+, Mistral) render them, and the calls and results
of the history, their own way: `apply_chat_template(messages, tools=...)`. Whether a template
does is seen, once per tokenizer, by rendering a probe tool and looking for its name; the
format its answers come in is read from its text (`formats.py`). A template that ignores tools
(SmolLM2's plain ChatML), or whose format cake does not know, gets them from cake in the Hermes
style: the tools in the system message, the history's calls in `<tool_call>` tags, the tools'
results in `<tool_response>` tags of a user turn, as Qwen's template writes them.

Messages are Hugging Face's chat messages: `role`, `content`, and for an assistant's calls
`tool_calls: [{"id", "type": "function", "function": {"name", "arguments": {...}}}]`, for a
tool's result `role: "tool"` with `tool_call_id`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cake.model.tokenizer import encode_chat, token_id
from cake.model.tool_calls.base import ToolCallFormat
from cake.model.tool_calls.formats import format_for_template
from cake.model.tool_calls.hermes import Hermes, render_call, render_response, tools_instructions
from cake.model.tool_calls.mistral import TOOL_CALLS
from cake.model.tool_calls.types import Tool, ToolChoice

SPECIAL_MARKERS = (TOOL_CALLS,)  # markers that some vocabularies hold as special tokens
PROBE = Tool("cake_probe_7f3a", "Whether the chat template renders tools.")


class ToolPromptError(ValueError):
    """The model's chat template cannot render this conversation (it raised)."""


@dataclass(frozen=True)
class ToolRendering:
    """How a tokenizer's conversations with tools are written: by its own template
    (`native`) or by cake, and in which format the model answers."""

    format: ToolCallFormat
    native: bool


@dataclass(frozen=True)
class ToolPrompt:
    ids: list[int]
    format: ToolCallFormat
    # Written at the start of the answer (in `ids`), so that the answer can only be a call:
    # the parser reads it before the model's output. Empty unless a call is forced by prompt.
    answer_start: str = ""


def template_text(tokenizer: Any) -> str:
    """The chat template's text (all of a tokenizer's named templates, together)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "\n".join(template.values()) if isinstance(template, dict) else template


_RENDERINGS: weakref.WeakKeyDictionary[Any, ToolRendering] = weakref.WeakKeyDictionary()


def tool_format_of(tokenizer: Any) -> ToolRendering:
    """How this tokenizer's tool conversations are written (probed once per tokenizer)."""
    with contextlib.suppress(KeyError, TypeError):
        return _RENDERINGS[tokenizer]
    fmt = format_for_template(template_text(tokenizer))
    rendering = (
        ToolRendering(fmt, True)
        if fmt and _renders_tools(tokenizer)
        else ToolRendering(Hermes(), False)
    )
    with contextlib.suppress(TypeError):
        _RENDERINGS[tokenizer] = rendering
    return rendering


def _renders_tools(tokenizer: Any) -> bool:
    probe = [{"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(
            probe, tools=[PROBE.as_template_tool()], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # a template that cannot take tools (jinja raises many kinds)
        return False
    return PROBE.name in text


def encode_tool_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[Tool],
    choice: ToolChoice,
    grammar: bool = False,
) -> ToolPrompt:
    """Token ids for the conversation, its tools shown unless `choice` is none, followed by an
    open assistant turn. A forced call without a grammar (`grammar` False) opens the answer
    with the format's `answer_start`, so that even a small model goes on with a call."""
    rendering = tool_format_of(tokenizer)
    shown = [] if choice.mode == "none" else list(tools)
    answer_start = (
        rendering.format.answer_start(choice.name) if choice.forced and not grammar else ""
    )
    if rendering.native:
        try:
            text = tokenizer.apply_chat_template(
                rendering.format.template_messages(messages),
                tools=[tool.as_template_tool() for tool in shown] or None,
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as exc:  # jinja's errors, and the templates' own raise_exception
            raise ToolPromptError(
                f"the model's chat template cannot render this conversation: {exc}"
            ) from exc
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    else:
        ids = encode_chat(tokenizer, hermes_messages(messages, shown, choice))
    if answer_start:
        ids += tokenizer.encode(answer_start, add_special_tokens=False)
    return ToolPrompt(ids, rendering.format, answer_start)


def hermes_messages(
    messages: Sequence[dict[str, Any]], tools: Sequence[Tool], choice: ToolChoice
) -> list[dict[str, str]]:
    """The conversation as plain messages for a template that knows no tools: the tools in the
    system message, calls and results as Hermes text."""
    plain: list[dict[str, str]] = []
    if tools:
        required = None
        if choice.forced:
            required = (
                f"You must call the function {choice.name}."
                if choice.name
                else "You must call one of the functions."
            )
        instructions = tools_instructions(tools, required)
        if messages and messages[0]["role"] == "system":
            instructions = f"{messages[0].get('content') or ''}\n\n{instructions}"
            messages = messages[1:]
        plain.append({"role": "system", "content": instructions})
    previous = None
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            response = render_response(content)
            if previous == "tool":
                plain[-1]["content"] += "\n" + response  # one user turn for a round's results
            else:
                plain.append({"role": "user", "content": response})
            previous = role
            continue
        previous = role
        calls = [
            render_call(
                {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
            )
            for call in message.get("tool_calls") or []
        ]
        plain.append({"role": role, "content": "\n".join(filter(None, [content, *calls]))})
    return plain


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """The ids of the formats' marker tokens that this vocabulary has (for the grammars)."""
    found = {marker: token_id(tokenizer, marker) for marker in SPECIAL_MARKERS}
    return {marker: id_ for marker, id_ in found.items() if id_ is not None}
