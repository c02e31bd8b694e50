"""The request mix of benchmarks/serve_soak.py: every kind of operation, each with what it must get back.

Valid operations (completions, chat, streams read to the end or hung up mid-way, echo+logprobs on
the base model and the adapters, runtime adapter load/use/unload) must get 200 on every request;
malformed ones must get a 4xx. Each operation is seeded by its index, so a run is repeatable.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path

import httpx

BASE, ADAPTERS, ROUTER = "tiny", ("alpha", "beta"), "mix"
WORDS = ["river", "stone", "light", "cloud", "paper", "green", "quiet", "north", "bread", "window"]
VALID_SHARES = {"chat": 0.16, "stream": 0.14, "cancel": 0.10, "runtime": 0.08}  # completion: the rest


@dataclass
class Outcome:
    kind: str
    valid: bool  # a valid request must get 200, a malformed one 4xx
    statuses: list[int]  # one per HTTP request; 0 = no answer
    completed: int = 0  # generations run to the end (each counts in vllm:request_success_total)
    cancelled: int = 0  # streams closed by the client mid-way
    error: str = ""  # why there was no answer


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))


def _generation(rng: random.Random, chat: bool, models: tuple[str, ...], **extra: object) -> tuple[str, dict]:
    body = {
        "model": rng.choice(models),
        "max_tokens": rng.randint(1, 12),
        "temperature": rng.choice([0, 0.8]),
    }
    if chat:
        return "/v1/chat/completions", {
            **body,
            "messages": [{"role": "user", "content": _prompt(rng)}],
            **extra,
        }
    return "/v1/completions", {**body, "prompt": _prompt(rng), **extra}


async def _post(client: httpx.AsyncClient, kind: str, path: str, body: dict) -> Outcome:
    response = await client.post(path, json=body)
    return Outcome(kind, True, [response.status_code], completed=int(response.status_code == 200))


async def _stream(client: httpx.AsyncClient, rng: random.Random, cancel: bool) -> Outcome:
    """A stream read to [DONE], or (cancel) one left after two chunks: the client hangs up."""
    extra = {"max_tokens": 400, "ignore_eos": True} if cancel else {}  # long enough to still run at hang-up
    path, body = _generation(rng, rng.random() < 0.5, (BASE, *ADAPTERS, ROUTER), stream=True, **extra)
    chunks, done, failed = 0, False, False
    async with client.stream("POST", path, json=body) as response:
        async for line in response.aiter_lines():
            chunks += line.startswith("data: ")
            done = done or line == "data: [DONE]"
            failed = failed or line.startswith('data: {"error"')  # an error event inside a 200 stream
            if cancel and chunks == 2:
                break
    status = 500 if failed else response.status_code
    kind, ok = ("cancel" if cancel else "stream"), status == 200
    return Outcome(kind, True, [status], completed=int(ok and done), cancelled=int(cancel and ok))


async def _runtime(client: httpx.AsyncClient, rng: random.Random, index: int, root: Path) -> Outcome:
    """Load an adapter under a fresh name, generate with it, unload it."""
    name = f"rt-{index}"
    load = await client.post(
        "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(root / "runtime")}
    )
    path, body = _generation(rng, False, (name,))
    generate = await client.post(path, json=body)
    unload = await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    codes = [load.status_code, generate.status_code, unload.status_code]
    return Outcome("runtime", True, codes, completed=int(generate.status_code == 200))


async def _malformed(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    good = {"model": BASE, "prompt": _prompt(rng), "max_tokens": 4}
    bodies = [
        {**good, "model": "no-such-model"},
        {**good, "max_tokens": -1},
        {**good, "prompt": "word " * 600},  # over max_model_len
        {**good, "temperature": "hot"},
        {**good, "logprobs": 1000},
        {**good, "model": ROUTER, "prompt": ["a", "b"]},  # a router needs one prompt
    ]
    choice = rng.randrange(len(bodies) + 4)
    if choice < len(bodies):
        response = await client.post("/v1/completions", json=bodies[choice])
    elif choice == len(bodies):
        response = await client.post("/v1/completions", content=b'{"model": "tiny", "prompt": ')
    elif choice == len(bodies) + 1:
        response = await client.post("/v1/chat/completions", json={"model": BASE, "messages": "hello"})
    elif choice == len(bodies) + 2:  # outside adapter_dirs: lmkit's guard says 403
        response = await client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "/etc"})
    else:
        response = await client.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"})
    return Outcome("malformed", False, [response.status_code])


async def _one(client: httpx.AsyncClient, kind: str, index: int, seed: int, root: Path) -> Outcome:
    rng = random.Random(seed * 1_000_003 + index)  # each operation is the same in every run
    try:
        if kind in ("completion", "chat"):
            return await _post(client, kind, *_generation(rng, kind == "chat", (BASE, *ADAPTERS, ROUTER)))
        if kind == "echo":  # prompt logprobs, on the base model and on each adapter
            path, body = _generation(rng, False, (BASE, *ADAPTERS), echo=True, logprobs=1, max_tokens=1)
            return await _post(client, kind, path, body)
        if kind in ("stream", "cancel"):
            return await _stream(client, rng, kind == "cancel")
        if kind == "runtime":
            return await _runtime(client, rng, index, root)
        return await _malformed(client, rng)
    except httpx.HTTPError as exc:  # no answer: a dead server shows up as status 0, not as a crash
        return Outcome(kind, kind != "malformed", [0], error=f"{type(exc).__name__}: {exc}")


def plan(count: int, echo_share: float, malformed_share: float, seed: int) -> list[str]:
    """`count` operation kinds drawn with fixed shares; completions take what the others leave."""
    shares = {**VALID_SHARES, "echo": echo_share, "malformed": malformed_share}
    shares["completion"] = 1 - sum(shares.values())
    if shares["completion"] < 0:
        raise ValueError("the shares add up to more than 1")
    return random.Random(seed).choices(list(shares), weights=list(shares.values()), k=count)


async def drive(
    base_url: str, kinds: list[str], concurrency: int, seed: int, root: Path, start: int = 0
) -> list[Outcome]:
    """Run every planned operation (numbered from `start`) with `concurrency` in flight."""
    jobs = iter(enumerate(kinds, start=start))
    outcomes: list[Outcome] = []
    # idle connections expire on the client before uvicorn closes them (VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
    # 5 s, httpx's default too): else a request sent as the server closes gets a reset (ReadError)
    limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            for index, kind in jobs:  # one shared iterator: each operation runs once
                outcomes.append(await _one(client, kind, index, seed, root))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes
