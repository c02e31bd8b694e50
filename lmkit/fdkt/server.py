"""Server step: the LLM filters clients' DP demonstrations, then writes new samples from them.

The LLM is reached through an OpenAI-compatible endpoint (`lmkit serve`, vLLM) or, for tests and
offline runs, in-process through the shared loader. Its replies are parsed defensively: a reply
that yields nothing usable is counted as malformed and skipped, never fatal to a round.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from lmkit.fdkt.config import ServerLLMConfig
from lmkit.fdkt.data import LABELS
from lmkit.generation import generate
from lmkit.loader import load_model


class LLM(Protocol):
    def complete(self, prompts: Sequence[str], max_tokens: int) -> list[str]: ...


class EndpointLLM:
    """Chat completions over HTTP; requests run concurrently, the server batches them."""

    def __init__(self, config: ServerLLMConfig) -> None:
        self.config = config
        self.url = config.endpoint.rstrip("/") + "/v1/chat/completions"

    def _one(self, prompt: str, max_tokens: int) -> str:
        body = {
            "model": self.config.served_model_name,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": self.config.temperature,
        }
        import httpx  # only the endpoint path needs it (serve, eval and federated extras bring it)

        response = httpx.post(self.url, json=body, timeout=self.config.timeout_s)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"] or ""

    def complete(self, prompts: Sequence[str], max_tokens: int) -> list[str]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda p: self._one(p, max_tokens), prompts))


class LocalLLM:
    """The same model in-process (greedy), for tests and machines without a server."""

    def __init__(self, config: ServerLLMConfig) -> None:
        loaded = load_model(config.model)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer

    def complete(self, prompts: Sequence[str], max_tokens: int) -> list[str]:
        return generate(self.model, self.tokenizer, list(prompts), max_tokens, 8, "server LLM")


def server_llm(config: ServerLLMConfig) -> LLM:
    return EndpointLLM(config) if config.endpoint else LocalLLM(config)


@dataclass
class AugmentReport:
    samples: list[dict] = field(default_factory=list)
    kept_demos: int = 0
    filtered_out: int = 0
    malformed: int = 0  # replies that gave nothing usable (filter verdicts or generations)


def filter_prompt(text: str) -> str:
    return f"Review: {text}\nIs this review positive or negative? Answer with one word."


def parse_verdict(reply: str) -> str | None:
    words = re.findall(r"[a-z]+", reply.lower())
    found = [w for w in words[:8] if w in LABELS]
    return found[0] if found else None


def augment_prompt(domain: str, label: str, demos: list[str]) -> str:
    shown = "\n".join(f"- {d}" for d in demos)
    return (
        f"Here are {label} reviews about {domain}:\n{shown}\n"
        f"Write one new {label} review about {domain}, different from these. Answer with the review only."
    )


def parse_samples(reply: str) -> list[str]:
    """Samples from a reply: a JSON list of strings, else bulleted or numbered lines, else the reply's
    text itself (an intro line ending in ':' and quotes dropped, first two sentences); else nothing."""
    start, end = reply.find("["), reply.rfind("]")
    if 0 <= start < end:
        try:
            items = json.loads(reply[start : end + 1])
            if isinstance(items, list):
                return [i.strip() for i in items if isinstance(i, str) and i.strip()]
        except json.JSONDecodeError:
            pass
    lines = [re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip(' "') for line in reply.splitlines()]
    listed = [
        line
        for line, raw in zip(lines, reply.splitlines(), strict=True)
        if re.match(r"^\s*(?:[-*•]|\d+[.)])\s+", raw)
    ]
    if listed:
        return [line for line in listed if line]
    paragraphs = [p.strip() for p in reply.strip().split("\n") if p.strip()]
    if len(paragraphs) > 1 and paragraphs[0].endswith(":"):
        paragraphs = paragraphs[1:]
    text = " ".join(paragraphs).strip().strip('"').strip()
    sentences = re.findall(r"[^.!?]+[.!?]", text)
    text = "".join(sentences[:2]).strip() if sentences else text
    return [text] if _words(text) >= 3 and len(text.split()) <= 60 and not text.endswith(":") else []


def _words(text: str) -> int:
    return len(re.findall(r"[A-Za-z]{2,}", text))


def _usable(text: str, seen: set[str]) -> bool:
    key = " ".join(text.lower().split())
    if _words(key) < 3 or key in seen:
        return False
    seen.add(key)
    return True


def augment(
    demos: list[dict],
    domain: str,
    llm: LLM,
    per_label: int,
    shots: int,
    prompts_per_label: int,
    seed: int,
    max_tokens: int = 64,
) -> AugmentReport:
    """Filter the demonstrations by the LLM's label verdict, then few-shot generate new samples."""
    report = AugmentReport()
    verdicts = llm.complete([filter_prompt(d["text"]) for d in demos], 8)
    kept: dict[str, list[str]] = {label: [] for label in LABELS}
    for demo, reply in zip(demos, verdicts, strict=True):
        verdict = parse_verdict(reply)
        if verdict is None:
            report.malformed += 1
        elif verdict != demo["label"]:
            report.filtered_out += 1
        else:
            kept[demo["label"]].append(demo["text"])
    report.kept_demos = sum(len(v) for v in kept.values())
    rng = random.Random(seed)
    jobs = [
        (label, rng.sample(texts, min(shots, len(texts))))
        for label, texts in kept.items()
        for _ in range(prompts_per_label if texts else 0)
    ]
    replies = llm.complete([augment_prompt(domain, label, shown) for label, shown in jobs], max_tokens)
    seen = {" ".join(t.lower().split()) for texts in kept.values() for t in texts}  # no copies of the demos
    counts = dict.fromkeys(LABELS, 0)
    for (label, _), reply in zip(jobs, replies, strict=True):
        parsed = parse_samples(reply)
        if not parsed:
            report.malformed += 1
        for text in parsed:
            if counts[label] < per_label and _usable(text, seen):
                report.samples.append({"text": text, "label": label})
                counts[label] += 1
    return report
