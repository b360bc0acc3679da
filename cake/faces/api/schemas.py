"""What clients send: the request bodies of both endpoints, and the server's defaults for them.

Unknown fields are ignored (OpenAI clients send many); a known field out of its range is a 400
that names it. Content may be a string or a list of text parts; `max_completion_tokens` is the
newer name of `max_tokens`; `stop` is a string or a list. `response_format` asks for JSON (any
object, or one JSON schema), enforced while sampling; `logprobs` asks for the chosen tokens'
log-probabilities (chat: `logprobs: true` and `top_logprobs` 0..20; completions: `logprobs` 0..5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from cake.decoding.grammar import GrammarSpec
from cake.decoding.logprobs import MAX_TOP_LOGPROBS
from cake.decoding.sampling import SamplingParams
from cake.faces.api.errors import ApiError
from cake.faces.api.tool_schemas import MessageToolCall, ToolChoiceField, ToolDefinition

OPENAI_DEFAULT_TEMPERATURE = 1.0  # what OpenAI uses when a request names none
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # each; the stop filter looks back this far on every token
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions endpoint's limit, as OpenAI's


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # "developer" is what newer OpenAI clients send in place of "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    # (checked after role and tool_calls, whose values they need; so named in a 400)
    tool_call_id: str | None = Field(None, validate_default=True)  # a tool's result: of which call
    content: str | list[TextPart] | None = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not value:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return value

    @field_validator("content")
    @classmethod
    def _has_content(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and not (
            info.data.get("role") == "assistant" and info.data.get("tool_calls")
        ):
            raise ValueError("content is required (null only for an assistant's tool calls)")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_template_message(self) -> dict[str, str]:
        content = self.text()
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": content}
        return {**message, "name": self.name} if self.name else message


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's wrapper around the schema itself."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    # Whether the output must follow the schema exactly: cake's always does (the grammar
    # allows nothing else), so false is accepted and means the same.
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self) -> GrammarSpec | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return GrammarSpec("json_object")
        if self.json_schema is None:
            raise ApiError(
                400,
                "response_format of type json_schema needs a json_schema: "
                '{"name": ..., "schema": {...}}',
                param="response_format",
            )
        schema = self.json_schema.schema_ if self.json_schema.schema_ is not None else {}
        if self.json_schema.strict:
            schema = closed_objects(schema)
        return GrammarSpec("json_schema", json.dumps(schema))


# Where a JSON schema holds subschemas: one, a list, or a mapping of them. Not allOf's parts:
# each would close the object to the others' properties.
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_LIST = ("anyOf", "oneOf", "prefixItems")
_MAPPING = ("properties", "$defs", "definitions", "patternProperties")


def closed_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` in which every object schema that does not say
    `additionalProperties` has it false: OpenAI's strict mode, where an object has exactly its
    listed properties (a document without extra properties is valid for the original too)."""
    schema = json.loads(json.dumps(schema))  # a copy to change in place
    todo: list[Any] = [schema]
    while todo:
        node = todo.pop()
        if not isinstance(node, dict):
            continue
        is_object = node.get("type") == "object" or isinstance(node.get("properties"), dict)
        if is_object and "additionalProperties" not in node:
            node["additionalProperties"] = False
        todo.extend(node[key] for key in _ONE if key in node)
        todo.extend(sub for key in _LIST if isinstance(node.get(key), list) for sub in node[key])
        todo.extend(
            sub for key in _MAPPING if isinstance(node.get(key), dict) for sub in node[key].values()
        )
    return schema


class GenerationRequest(BaseModel):
    """Fields common to both endpoints."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's; vLLM and llama.cpp accept it too
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # cake's extension: speculative decoding for this request (default: the server's --draft):
    # "lookup", "model" (the server's --draft PATH), or "none"; and tokens per round, N or "auto".
    cake_draft: Literal["lookup", "model", "none"] | None = None
    cake_draft_tokens: int | Literal["auto"] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def grammar(self) -> GrammarSpec | None:
        """What the text must match (response_format), None for free text."""
        return self.response_format.grammar() if self.response_format else None

    def logprob_count(self) -> int | None:
        """How many top alternatives each token's logprobs carry; None: no logprobs."""
        return None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(
                400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop"
            )
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ApiError(
                400, f"a stop string is longer than {MAX_STOP_CHARS} characters", param="stop"
            )
        return [s for s in stops if s]

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(
                400,
                f"n={self.n} is not supported: cake generates one choice per request "
                "(send several requests, they run concurrently)",
                param="n",
            )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name of max_tokens
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoiceField | None = None
    parallel_tool_calls: bool = True
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def uses_tools(self) -> bool:
        """Tools offered, or tool calls in the history: the conversation goes through
        tool_chat.py."""
        return (
            bool(self.tools)
            or self.tool_choice is not None
            or any(message.tool_calls or message.role == "tool" for message in self.messages)
        )

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    # A text, a one-element list of texts, or the token ids themselves.
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    def logprob_count(self) -> int | None:
        return self.logprobs

    def check_supported(self) -> None:
        super().check_supported()
        if (
            isinstance(self.prompt, list)
            and len(self.prompt) > 1
            and isinstance(self.prompt[0], str)
        ):
            raise ApiError(
                400,
                f"got {len(self.prompt)} prompts: cake completes one prompt per request",
                param="prompt",
            )
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported", param="best_of")


@dataclass(frozen=True)
class ApiDefaults:
    """What a request gets for what it does not say: the server's CLI options."""

    max_tokens: int = 256
    top_k: int | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    ignore_eos: bool = False

    def sampling(self, request: GenerationRequest) -> SamplingParams:
        temperature = request.temperature
        try:
            return SamplingParams(
                temperature=OPENAI_DEFAULT_TEMPERATURE if temperature is None else temperature,
                top_k=request.top_k if request.top_k is not None else self.top_k,
                top_p=request.top_p,
                repeat_penalty=self.repeat_penalty,
                repeat_last_n=self.repeat_last_n,
                seed=request.seed if request.seed is not None else self.seed,
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
