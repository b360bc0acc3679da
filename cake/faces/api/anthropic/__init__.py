"""Anthropic's Messages API beside OpenAI's: `POST /v1/messages` (and `/count_tokens`), for
clients built on the `anthropic` SDK.

- `schemas.py`: the request body (system, messages of text, tool_use and tool_result blocks,
  tools, tool_choice, stop_sequences; images, documents and thinking blocks are refused).
- `conversation.py`: the request as cake's `ToolChat` and generation settings.
- `responses.py`: the answer as a message, or as Anthropic's named server-sent events.

The routes are in `routes.py` with the others: the same key check (also as `x-api-key`),
admission and model check; errors come in Anthropic's shape (`errors.py`).
"""
