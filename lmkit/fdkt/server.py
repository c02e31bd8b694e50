"""Server step: cluster clients' DP demonstrations, filter them by the LLM's verdict, then have the
LLM write new samples from them (few-shot), with the labels and domain description the client gave.

The LLM is reached through an OpenAI-compatible endpoint (`lmkit serve`, vLLM) or, for tests and
offline runs, in-process through the shared loader. Its replies are parsed defensively: a reply
that yields nothing usable is counted as malformed and skipped, never fatal to a round.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from lmkit.errors import ConfigError
from lmkit.fdkt.cluster import Cluster, Embedder, cluster_by_label, keep_per_cluster
from lmkit.fdkt.config import FDKTConfig, ServerLLMConfig
from lmkit.generation import generate
from lmkit.loader import load_model


class LLM(Protocol):
    def complete(
        self, prompts: Sequence[str], max_tokens: int, greedy: bool = False, seed: int = 0
    ) -> list[str]:
        """Replies sampled with the server's temperature/top_p (seeded), or greedy verdicts."""
        ...


class EndpointLLM:
    """Chat completions over HTTP; requests run concurrently, the server batches them."""

    def __init__(self, config: ServerLLMConfig) -> None:
        self.config = config
        self.url = config.endpoint.rstrip("/") + "/v1/chat/completions"

    def _one(self, prompt: str, max_tokens: int, greedy: bool, seed: int) -> str:
        sampling = {"temperature": 0.0} if greedy else {"temperature": self.config.temperature}
        if not greedy and self.config.temperature > 0:
            sampling |= {"top_p": self.config.top_p, "seed": seed}
        body = {
            "model": self.config.served_model_name,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            **sampling,
        }
        import httpx  # only the endpoint path needs it (serve, eval and federated extras bring it)

        response = httpx.post(self.url, json=body, timeout=self.config.timeout_s)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"] or ""

    def complete(
        self, prompts: Sequence[str], max_tokens: int, greedy: bool = False, seed: int = 0
    ) -> list[str]:
        with ThreadPoolExecutor(8) as pool:
            return list(
                pool.map(lambda i: self._one(prompts[i], max_tokens, greedy, seed + i), range(len(prompts)))
            )


class LocalLLM:
    """The same model in-process with the same sampling settings (tests, machines without a server)."""

    def __init__(self, config: ServerLLMConfig) -> None:
        if config.model is None:
            raise ConfigError("fdkt.server: set server.endpoint or server.model (the in-process LLM).")
        loaded = load_model(config.model)
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, config

    def complete(
        self, prompts: Sequence[str], max_tokens: int, greedy: bool = False, seed: int = 0
    ) -> list[str]:
        temperature = 0.0 if greedy else self.config.temperature
        torch.manual_seed(seed)
        return generate(
            self.model,
            self.tokenizer,
            list(prompts),
            max_tokens,
            8,
            "server LLM",
            temperature=temperature,
            top_p=self.config.top_p,
        )


def server_llm(config: ServerLLMConfig) -> LLM:
    return EndpointLLM(config) if config.endpoint else LocalLLM(config)


def server_embedder(config: ServerLLMConfig, llm: LLM | None = None) -> Embedder:
    """The embedder: the in-process LLM itself when no other is named (one copy in memory)."""
    if config.embedder is None and isinstance(llm, LocalLLM):
        return Embedder(llm.model, llm.tokenizer)
    spec = config.embedder or config.model
    if spec is None:
        raise ConfigError(
            "fdkt.server: clustering needs an embedder and server.model is unset (the LLM is remote). "
            "Fix: set server.embedder (e.g. smollm2-135m), or fdkt.server_step.cluster: false."
        )
    return Embedder.load(spec)


@dataclass
class AugmentReport:
    samples: list[dict] = field(default_factory=list)
    kept_demos: int = 0  # after filtering, with each cluster's central one kept when none passed
    passed: int = 0  # demonstrations whose LLM verdict matched their label
    no_verdict: int = 0  # demonstrations whose verdict named no label (counted in malformed too)
    filtered_out: int = 0
    malformed: int = 0  # replies that gave nothing usable (filter verdicts or generations)
    clusters: int = 0


def filter_prompt(text: str, domain: str, labels: list[str]) -> str:
    options = ", ".join(labels)
    return f"Text ({domain}): {text}\nWhich label fits this text: {options}? Answer with the label only."


def parse_verdict(reply: str, labels: list[str]) -> str | None:
    """The label named first in the reply's first 12 words (the longer name wins a tie), else None."""
    head = " ".join(reply.split()[:12]).lower()
    hits = [
        (found.start(), -len(label), label)
        for label in labels
        if (found := re.search(rf"(?<![a-z0-9]){re.escape(label.lower())}(?![a-z0-9])", head))
    ]
    return min(hits)[2] if hits else None


def augment_prompt(domain: str, label: str, demos: list[str]) -> str:
    shown = "\n".join(f"- {d}" for d in demos)
    return (
        f'Here are examples of {domain} with the label "{label}":\n{shown}\n'
        f'Write one new example of {domain} with the label "{label}", different from these. '
        "Answer with the text only."
    )


def describe_prompt(domain: str, label: str) -> str:
    """The no-demonstrations ablation: the client's public description is all the LLM sees."""
    return f'Write one example of {domain} with the label "{label}". Answer with the text only.'


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
    labels: list[str],
    llm: LLM,
    config: FDKTConfig,
    seed: int,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> AugmentReport:
    """The server step for one client's demonstrations (`config.server_step.mode`): cluster per
    label, filter by the LLM's label verdict, then few-shot generate new samples, one cluster's
    demonstrations per prompt. `embed` is needed when clustering."""
    step, report = config.server_step, AugmentReport()
    demos = [d for d in demos if d["label"] in labels]  # a sample with a label the client never named
    seen: set[str] = set()
    if step.mode == "pass_through":
        report.samples = [d for d in demos if _usable(d["text"], seen)]
        return report
    rng = random.Random(seed)
    if step.mode == "describe_only":
        jobs = [
            (label, describe_prompt(domain, label))
            for label in labels
            for _ in range(config.prompts_per_label)
        ]
    else:
        groups = _filtered_clusters(demos, domain, labels, llm, config, seed, embed, report)
        seen = {" ".join(d["text"].lower().split()) for d in demos}  # no copies of the demos
        jobs = []
        for label in labels:
            mine = [g for g in groups if g.label == label]
            for j in range(config.prompts_per_label if mine else 0):
                texts = [demos[m]["text"] for m in mine[j % len(mine)].members]
                jobs.append(
                    (label, augment_prompt(domain, label, rng.sample(texts, min(config.shots, len(texts)))))
                )
    replies = llm.complete([prompt for _, prompt in jobs], config.server.max_tokens, seed=seed)
    counts = dict.fromkeys(labels, 0)
    for (label, _), reply in zip(jobs, replies, strict=True):
        parsed = parse_samples(reply)
        if not parsed:
            report.malformed += 1
        for text in parsed:
            if counts[label] < config.augment_per_label and _usable(text, seen):
                report.samples.append({"text": text, "label": label})
                counts[label] += 1
    return report


def _filtered_clusters(
    demos: list[dict],
    domain: str,
    labels: list[str],
    llm: LLM,
    config: FDKTConfig,
    seed: int,
    embed: Callable[[list[str]], np.ndarray] | None,
    report: AugmentReport,
) -> list[Cluster]:
    verdicts = llm.complete([filter_prompt(d["text"], domain, labels) for d in demos], 8, greedy=True)
    passed = []
    for demo, reply in zip(demos, verdicts, strict=True):
        verdict = parse_verdict(reply, labels)
        report.malformed += verdict is None
        report.no_verdict += verdict is None
        report.filtered_out += verdict is not None and verdict != demo["label"]
        report.passed += verdict == demo["label"]
        passed.append(verdict == demo["label"])
    vectors = None
    if config.server_step.cluster and demos:
        if embed is None:
            raise ConfigError("server_step.cluster is on but no embedder was given to augment().")
        vectors = embed([d["text"] for d in demos])
    groups = keep_per_cluster(
        cluster_by_label([d["label"] for d in demos], vectors, config.server_step.per_cluster, seed), passed
    )
    report.clusters = len(groups)
    report.kept_demos = sum(len(g.members) for g in groups)
    return groups
