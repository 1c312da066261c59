"""The server's gate, as a plain ASGI middleware: X-Request-Id in and out, API keys, a cap on the body size,
JSON bodies sent without saying so read as JSON.

Plain ASGI rather than Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`): that one passes every chunk
of a streamed response through a memory stream and an extra task, a cost paid per token on the streaming routes.
Here a refused request is answered at once and an accepted one only gets its response headers extended.
"""

from __future__ import annotations

import hmac
import uuid

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .serving import APIError, error_response

OPEN_PATHS = {"/", "/health", "/ready", "/metrics", "/docs", "/openapi.json"}


# What clients send JSON as when they do not say it is JSON: nothing (many scripts), curl -d's form type, text.
READ_AS_JSON = ("", "application/x-www-form-urlencoded", "text/plain")


def as_json(scope: Scope, headers: Headers) -> None:
    """A POST body whose Content-Type is missing, curl's form default or text/plain is read as the JSON every
    JSON route takes (the sent type is kept in scope["state"]["sent_content_type"] for error messages), instead
    of failing with a schema error that hides the cause."""
    sent = headers.get("content-type", "")
    if scope["method"] != "POST" or sent.split(";")[0].strip().lower() not in READ_AS_JSON:
        return
    scope.setdefault("state", {})["sent_content_type"] = sent or "(none)"
    kept = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
    scope["headers"] = kept + [(b"content-type", b"application/json")]


class Guard:
    """ASGI middleware over `app`. `api_keys`: accepted Bearer keys (none: every route is open; an empty key is
    no key); `max_body_bytes`: the largest Content-Length accepted (413 past it; a chunked body is 411)."""

    def __init__(self, app: ASGIApp, api_keys: list[str], max_body_bytes: int):
        self.app = app
        self.keys = [k.strip().encode() for k in api_keys if k.strip()]
        self.max_body_bytes = max_body_bytes

    def refusal(self, path: str, headers: Headers) -> APIError | None:
        if self.keys and path not in OPEN_PATHS and not path.startswith("/static/"):
            auth = headers.get("authorization", "")
            given = auth[7:].encode() if auth.lower().startswith("bearer ") else b""
            # compare_digest against every key, always: the time taken says nothing about which key is near
            if not given or not any([hmac.compare_digest(given, k) for k in self.keys]):
                return APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            return APIError(413, f"request body over {self.max_body_bytes} bytes")
        if length is None and "chunked" in headers.get("transfer-encoding", ""):
            # A chunked body would be read whole before any limit could apply: its size must be declared.
            return APIError(411, "send Content-Length (chunked request bodies are refused)")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = (headers.get("x-request-id") or uuid.uuid4().hex).encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": kept + [(b"x-request-id", request_id)]}
            await send(message)

        as_json(scope, headers)
        refused = self.refusal(scope["path"], headers)
        if refused is not None:
            await error_response(refused)(scope, receive, send_with_id)
        else:
            await self.app(scope, receive, send_with_id)
