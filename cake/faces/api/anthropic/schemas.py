"""What Anthropic's clients send to `/v1/messages`. Unknown fields are ignored (`metadata`,
`cache_control`, ...); a content block of a type cake does not serve is a 400 that names it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

# Anthropic's rule for tool names.
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        content = self.content
        text = content if isinstance(content, str) else "".join(b.text for b in content)
        return f"Error: {text}" if self.is_error else text


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


BLOCK_TYPES = ("text", "tool_use", "tool_result")


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _served_blocks(cls, content: Any) -> Any:
        """A block of a kind cake does not serve is named, rather than failing every union
        member in pydantic's words."""
        for block in content if isinstance(content, list) else []:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in BLOCK_TYPES:
                raise ValueError(
                    f"content blocks of type {kind!r} are not supported; cake serves "
                    f"{', '.join(BLOCK_TYPES)}"
                )
        return content


class ToolSpec(BaseModel):
    name: str = Field(pattern=TOOL_NAME)
    description: str = ""
    input_schema: dict[str, Any]


class ToolChoiceSpec(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class MessagesRequest(BaseModel):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    temperature: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoiceSpec | None = None


class CountTokensRequest(BaseModel):
    """`/v1/messages/count_tokens`: the request without what only generation needs."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoiceSpec | None = None
