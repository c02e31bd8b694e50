"""Speed against an endpoint (TTFT, time per output token, throughput per concurrency) and memory footprint.

Load is bounded: a fixed number of requests per level, a global timeout, and it stops by itself.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import time
from typing import Any

import openai
from rich.progress import Progress

from lmkit.errors import LmkitError
from lmkit.evals.config import EndpointTarget, SpeedConfig
from lmkit.loader import LoadedModel


async def _one_request(
    client: openai.AsyncOpenAI, endpoint: EndpointTarget, speed: SpeedConfig
) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.completions.create(
        model=endpoint.model,
        prompt=speed.prompt,
        max_tokens=speed.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    return {
        "ttft_s": first - started,
        "latency_s": end - started,
        "tokens": tokens,
        "tpot_s": (end - first) / max(tokens - 1, 1),
    }


async def _level(endpoint: EndpointTarget, speed: SpeedConfig, concurrency: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(
        base_url=endpoint.base_url, api_key=endpoint.api_key(), max_retries=0, timeout=endpoint.timeout_s
    ) as client:

        async def gated() -> dict[str, float]:
            async with gate:
                return await _one_request(client, endpoint, speed)

        started = time.perf_counter()
        runs = await asyncio.gather(*(gated() for _ in range(speed.requests_per_level)))
        wall = time.perf_counter() - started
    ttfts = sorted(r["ttft_s"] for r in runs)
    return {
        "concurrency": concurrency,
        "requests": len(runs),
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(sum(r["tokens"] for r in runs) / wall, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p90_s": round(ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))], 4),
        "tpot_mean_s": round(statistics.fmean(r["tpot_s"] for r in runs), 5),
    }


def run_speed(endpoint: EndpointTarget, speed: SpeedConfig) -> list[dict[str, Any]]:
    """One row per concurrency level; raises if the whole suite outlives `speed.timeout_s`."""

    async def all_levels() -> list[dict[str, Any]]:
        rows = []
        with Progress(transient=True) as progress:
            bar = progress.add_task("speed", total=len(speed.concurrency))
            for concurrency in speed.concurrency:
                rows.append(await _level(endpoint, speed, concurrency))
                progress.advance(bar)
        return rows

    try:
        return asyncio.run(asyncio.wait_for(all_levels(), speed.timeout_s))
    except TimeoutError:
        raise LmkitError(
            f"The speed suite did not finish within speed.timeout_s={speed.timeout_s:.0f}s. Fix: "
            "lower speed.requests_per_level or speed.max_tokens, or raise the timeout."
        ) from None


def memory_footprint(loaded: LoadedModel) -> dict[str, float]:
    """Model weights and buffers (transformers' count) and this process's peak resident memory."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "model_mb": round(loaded.model.get_memory_footprint() / 2**20, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }
