"""One error, two shapes: OpenAI's on the OpenAI routes, Anthropic's on /v1/messages (and only
there: a path that merely starts with the same letters keeps OpenAI's)."""

from __future__ import annotations

import json

import pytest

from cake.faces.api.errors import ApiError, error_response


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
    ],
)
def test_anthropic_routes_answer_in_anthropics_shape(status: int, kind: str) -> None:
    error = ApiError(status, "what went wrong", param="messages")
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        response = error_response(error, path)
        assert response.status_code == status
        assert json.loads(response.body) == {
            "type": "error",
            "error": {"type": kind, "message": "what went wrong"},
        }
    for path in ("/v1/chat/completions", "/v1/messagesX", ""):
        assert json.loads(error_response(error, path).body) == {"error": error.body}
