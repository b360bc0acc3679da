"""The request body's size limit, applied before any route (or JSON parser) sees the body."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cake.faces.api.errors import ApiError, error_response

# A full 128k-token context is well under 1 MiB of text; JSON escaping can make it a few times
# longer (\uXXXX), and a token-id prompt is ~7 bytes per token.
MAX_BODY_BYTES = 8 * 1024 * 1024


class BodyLimit:
    """ASGI middleware: reads the whole body (at most `max_bytes`) and hands it on in one piece;
    a larger body is answered with 413 as soon as it is known to be larger (from its
    Content-Length, or while it arrives), without buffering the rest."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before it finished sending
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: list[Message] = [{"type": "http.request", "body": b"".join(chunks)}]

        async def replay() -> Message:
            # The body once, then the client's own messages (a disconnect, for the routes
            # that watch for one).
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(
            413,
            f"the request body is larger than this server accepts ({self.max_bytes} bytes)",
            code="request_too_large",
        )
        response = error_response(error, scope.get("path", ""))
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
