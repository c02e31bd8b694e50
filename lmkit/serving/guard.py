"""ASGI middleware vLLM loads via `--middleware`: confines runtime adapter loads to `adapter_dirs`.

vLLM's load endpoints (`/v1/load_lora_adapter`, SageMaker-style `/adapters`) accept any path on the
server's disk. This guard rejects, with 403, a path that resolves outside the configured directories
(`..` tricks and symlinks included). Every other request passes straight through.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmkit.serving.asgi import json_error, read_body, replayer

ALLOWED_DIRS_ENV = "LMKIT_ADAPTER_DIRS"
GUARDED = {"/v1/load_lora_adapter": "lora_path", "/adapters": "src"}


def _allowed_roots() -> list[Path]:
    return [Path(p).resolve() for p in os.environ.get(ALLOWED_DIRS_ENV, "").split(os.pathsep) if p]


def path_allowed(raw_path: object, roots: list[Path]) -> bool:
    if not isinstance(raw_path, str) or not raw_path:
        return False
    resolved = Path(raw_path).resolve()
    return any(resolved.is_relative_to(root) for root in roots)


class AdapterPathGuard:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.roots = _allowed_roots()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        field = GUARDED.get(scope.get("path", "")) if scope["type"] == "http" else None
        if field is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        try:
            requested = json.loads(body or b"{}").get(field)
        except (json.JSONDecodeError, AttributeError):
            requested = None  # let vLLM report the malformed body itself
        else:
            if not path_allowed(requested, self.roots):
                allowed = ", ".join(str(r) for r in self.roots) or "(none configured)"
                message = f"adapter path {requested!r} is outside the allowed adapter directories: {allowed}"
                await json_error(send, 403, "PermissionDenied", message)
                return
        await self.app(scope, replayer(body, receive), send)
