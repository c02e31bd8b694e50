"""ASGI middleware vLLM loads via `--middleware`: serves MoLA-Router models by name.

A request whose `model` is a configured router gets its gates from the prompt; the middleware
ensures the bucketed merged LoRA for those gates is loaded (through vLLM's own runtime-load
endpoint, on loopback) and rewrites `model` to it. Everything else passes through untouched.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx

from lmkit.mola.router import PromptRouter, bucket
from lmkit.mola.serving import ROUTERS_ENV
from lmkit.serving.asgi import header, json_error, read_body, replayer, with_body_length

ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")


class MoLARouting:
    def __init__(self, app: Any) -> None:
        self.app = app
        config = json.loads(os.environ.get(ROUTERS_ENV, "{}"))
        self.server = config.get("server", "")
        self.routers = {
            r["name"]: PromptRouter(r["name"], Path(r["path"]), Path(config["model_dir"]), r["buckets"])
            for r in config.get("routers", [])
        }
        self.key = os.environ.get("VLLM_API_KEY")  # unauthenticated requests pass through to vLLM's 401
        self.loaded: set[str] = set()
        self.lock = asyncio.Lock()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in ROUTED_PATHS or not self.routers:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        try:
            request = json.loads(body)
            router = self.routers.get(request.get("model")) if isinstance(request, dict) else None
        except json.JSONDecodeError:
            router = None  # vLLM reports malformed JSON itself
        if router is not None and (
            not self.key or header(scope, b"authorization") == f"Bearer {self.key}".encode()
        ):
            prompt = self._prompt(router, request, scope["path"])
            if prompt is None:
                message = f"model {router.name!r} is a MoLA router: send one prompt (a string) per request"
                await json_error(send, 400, "BadRequestError", message)
                return
            request["model"] = await self._ensure_loaded(router, bucket(router.gates(prompt), router.buckets))
            body = json.dumps(request).encode()
            scope = with_body_length(scope, body)
        await self.app(scope, replayer(body, receive), send)

    @staticmethod
    def _prompt(router: PromptRouter, request: dict, path: str) -> str | None:
        if path.endswith("chat/completions"):
            messages = request.get("messages")
            return router.chat_prompt(messages) if isinstance(messages, list) else None
        prompt = request.get("prompt")
        return prompt if isinstance(prompt, str) else None

    async def _ensure_loaded(self, router: PromptRouter, shares: tuple[int, ...]) -> str:
        name = router.adapter_name(shares)
        async with self.lock:
            if name not in self.loaded:
                path = await asyncio.to_thread(router.adapter_path, shares)
                headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
                async with httpx.AsyncClient(timeout=120) as client:
                    response = await client.post(
                        f"{self.server}/v1/load_lora_adapter",
                        headers=headers,
                        json={"lora_name": name, "lora_path": str(path)},
                    )
                if response.status_code != 200 and "already been loaded" not in response.text:
                    raise RuntimeError(f"loading {name} failed: {response.status_code} {response.text}")
                self.loaded.add(name)
        return name
