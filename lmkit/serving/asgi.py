"""Small ASGI helpers shared by lmkit's vLLM middlewares."""

from __future__ import annotations

import json
from typing import Any


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def replayer(body: bytes, receive: Any):
    """A `receive` that first hands over the (already read, possibly rewritten) body, then defers to the
    original one, so the app can still wait for `http.disconnect` (streaming does)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def with_body_length(scope: dict, body: bytes) -> dict:
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}


def header(scope: dict, key: bytes) -> bytes | None:
    return next((v for k, v in scope.get("headers", []) if k == key), None)


async def json_error(send: Any, status: int, error_type: str, message: str) -> None:
    """An OpenAI-shaped error response, like vLLM's own."""
    payload = json.dumps({"error": {"message": message, "type": error_type, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
