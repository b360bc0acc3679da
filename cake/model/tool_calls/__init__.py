"""Tool calls as each model family writes them: the prompt that shows the tools, the parser
that finds the calls in the model's output, and the grammar that makes the model write one.

- `types.py`: a tool, a call, the caller's choice (auto, none, required, one named function).
- `formats.py`: what a format is, and which one a chat template speaks (`format_for`);
  `hermes.py` (Qwen, Hermes: `<tool_call>{...}</tool_call>`), `llama3.py` (Llama 3.1+: a JSON
  object, maybe after `<|python_tag|>`), `mistral.py` (`[TOOL_CALLS][...]`). A new family is
  one more file and one more entry in `FORMATS`.
- `parser.py`: the output as it streams, split into text and complete, checked calls.
- `prompt.py`: the conversation with its tools as token ids, by the model's own template when it
  renders tools, else by cake in the Hermes style.

Nothing here knows HTTP: the API shapes calls for OpenAI's and Anthropic's clients.
"""

from cake.model.tool_calls.base import ToolCallFormat
from cake.model.tool_calls.formats import FORMATS, format_named
from cake.model.tool_calls.parser import Piece, ToolCallParser
from cake.model.tool_calls.prompt import ToolPrompt, encode_tool_chat, tool_format_of
from cake.model.tool_calls.types import Tool, ToolCall, ToolChoice

__all__ = [
    "FORMATS",
    "Piece",
    "Tool",
    "ToolCall",
    "ToolCallFormat",
    "ToolCallParser",
    "ToolChoice",
    "ToolPrompt",
    "encode_tool_chat",
    "format_named",
    "tool_format_of",
]
