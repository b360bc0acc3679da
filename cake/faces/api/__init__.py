"""The OpenAI-compatible HTTP API, and Anthropic's Messages API beside it:
`cake-cli --model M [--topology T] --api HOST:PORT`.

- `errors.py`: OpenAI's error body for every failure (Anthropic's on /v1/messages);
  `limits.py`: the body size limit (413).
- `schemas.py`: the request bodies and the server's defaults for them; `tool_schemas.py`:
  the tool parts of a chat request.
- `tool_chat.py`: a conversation with tools, whichever API it came through (checks, encoding,
  the grammar of a required call, the answer's parser); `openai_tools.py`: tool calls in
  OpenAI's shapes; `anthropic/`: the Messages API.
- `service.py`: admission (429), prompt encoding off the event loop, length checks,
  generations as tasks, health.
- `responses.py`: a generation as one JSON body or as server-sent events; `logprobs.py`: the
  tokens' logprobs in the chat's and the legacy completions' shapes.
- `routes.py`: `create_app` and the routes; `server.py`: `serve_api` (the CLI's entry).
"""

from cake.faces.api.errors import ApiError
from cake.faces.api.routes import create_app
from cake.faces.api.schemas import ApiDefaults
from cake.faces.api.server import (
    ApiSettings,
    api_address,
    listen,
    model_id,
    serve_api,
    server_for,
)

__all__ = [
    "ApiDefaults",
    "ApiError",
    "ApiSettings",
    "api_address",
    "create_app",
    "listen",
    "model_id",
    "serve_api",
    "server_for",
]
