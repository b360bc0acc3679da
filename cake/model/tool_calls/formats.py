"""The formats cake knows, and which one a chat template speaks: a later family adds its file
and one entry here. The first that recognises the template wins, so more specific markers come
first (a Mistral template may mention JSON objects too)."""

from __future__ import annotations

from cake.model.tool_calls.base import ToolCallFormat
from cake.model.tool_calls.hermes import Hermes
from cake.model.tool_calls.llama3 import Llama3Json
from cake.model.tool_calls.mistral import Mistral

FORMATS: tuple[type[ToolCallFormat], ...] = (Mistral, Llama3Json, Hermes)


def format_for_template(template: str) -> ToolCallFormat | None:
    """The format a template renders tools in, None if cake knows none of its markers."""
    return next((fmt() for fmt in FORMATS if fmt.speaks(template)), None)


def format_named(name: str) -> ToolCallFormat:
    return next(fmt() for fmt in FORMATS if fmt.name == name)
