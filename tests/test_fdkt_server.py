"""FDKT's server step: clustering per label, per-cluster filtering and augmentation, and sampling
settings that mean the same in-process and over HTTP."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lmkit.fdkt.cluster import Embedder, cluster_by_label, keep_per_cluster
from lmkit.fdkt.server import EndpointLLM, LocalLLM, ServerLLMConfig, augment
from tests.fdkt_helpers import TINY, tiny_fdkt


class VerdictLLM:
    """Answers every filter verdict with one fixed label; records the augmentation prompts."""

    def __init__(self, verdict: str) -> None:
        self.verdict, self.augment_prompts = verdict, []

    def complete(self, prompts, max_tokens, greedy=False, seed=0):
        if greedy:
            return [self.verdict for _ in prompts]
        self.augment_prompts += list(prompts)
        return [f"A brand new text, number {seed} {i}." for i in range(len(prompts))]


def group_vectors(texts: list[str]) -> np.ndarray:
    """Texts 'group<g> ...' sit near axis g: three well-separated groups."""
    rng = np.random.default_rng(0)
    return np.stack([np.eye(3)[int(re.match(r"group(\d)", t)[1])] + rng.normal(0, 0.01, 3) for t in texts])


DEMOS = [{"text": f"group{g} positive demo {i}", "label": "positive"} for g in range(3) for i in range(2)] + [
    {"text": f"group0 negative demo {i}", "label": "negative"} for i in range(2)
]


def test_kmeans_per_label_finds_the_groups_and_keeps_one_demonstration_per_non_empty_cluster():
    labels = [d["label"] for d in DEMOS]
    clusters = cluster_by_label(labels, group_vectors([d["text"] for d in DEMOS]), per_cluster=2, seed=0)
    positive = [c for c in clusters if c.label == "positive"]
    assert len(positive) == 3 and sorted(len(c.members) for c in positive) == [2, 2, 2]
    assert all(len({DEMOS[m]["text"][:6] for m in c.members}) == 1 for c in positive)  # one group each
    kept = keep_per_cluster(clusters, passed=[False] * len(DEMOS))  # the filter rejects everything
    assert [len(c.members) for c in kept] == [1] * len(clusters)
    assert all(c.members == [c.central] for c in kept)
    assert cluster_by_label(labels, None, 2, 0)[0].members == [0, 1, 2, 3, 4, 5]  # clustering off


def test_augment_filters_per_cluster_and_draws_each_prompt_from_one_cluster():
    config = tiny_fdkt(server_step={"per_cluster": 2}, prompts_per_label=3, augment_per_label=3, shots=2)
    llm = VerdictLLM("negative")  # every positive demo is "filtered out" by the LLM
    report = augment(DEMOS, "shop reviews", ["positive", "negative"], llm, config, 0, group_vectors)
    assert report.clusters == 4 and report.filtered_out == 6
    assert report.kept_demos == 3 + 2  # one per positive cluster (none passed), both negatives
    positive_prompts = [p for p in llm.augment_prompts if 'label "positive"' in p]
    groups = [set(re.findall(r"- (group\d)", p)) for p in positive_prompts]
    assert all(len(g) == 1 for g in groups) and set().union(*groups) == {"group0", "group1", "group2"}
    assert len(report.samples) == 6 and {s["label"] for s in report.samples} == {"positive", "negative"}
    assert all("shop reviews" in p for p in llm.augment_prompts)


def test_ablation_modes_skip_the_demonstrations_or_the_server():
    describe = augment(
        DEMOS,
        "shop reviews",
        ["positive", "negative"],
        llm := VerdictLLM("positive"),
        tiny_fdkt(server_step={"mode": "describe_only"}),
        0,
    )
    assert describe.samples and not any("group" in p for p in llm.augment_prompts)
    passed = augment(
        DEMOS,
        "x",
        ["positive", "negative"],
        VerdictLLM("x"),
        tiny_fdkt(server_step={"mode": "pass_through"}),
        0,
    )
    assert [s["text"] for s in passed.samples] == [d["text"] for d in DEMOS]


def test_clustering_without_an_embedder_model_is_a_clear_error():
    from lmkit.errors import ConfigError
    from lmkit.fdkt.server import server_embedder

    with pytest.raises(ConfigError, match="server.embedder"):
        server_embedder(ServerLLMConfig(endpoint="http://127.0.0.1:9", model=None))


def test_the_embedder_gives_unit_vectors_from_a_loader_model():
    vectors = Embedder.load(TINY)(["one text", "another, longer text here"])
    assert vectors.shape[0] == 2 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_in_process_llm_samples_with_the_configured_temperature_seeded_and_greedy_for_verdicts():
    llm = LocalLLM(ServerLLMConfig(model=TINY, temperature=1.0, top_p=0.95))
    prompts = ["Write something.", "Write more."]
    first = llm.complete(prompts, 8, seed=1)
    assert llm.complete(prompts, 8, seed=1) == first and llm.complete(prompts, 8, seed=2) != first
    assert llm.complete(prompts, 8, greedy=True, seed=1) == llm.complete(prompts, 8, greedy=True, seed=2)


def test_endpoint_llm_sends_the_same_sampling_settings(monkeypatch):
    import httpx

    bodies = []

    def post(url, json, timeout):
        bodies.append(json)
        return httpx.Response(
            200, json={"choices": [{"message": {"content": "ok"}}]}, request=httpx.Request("POST", url)
        )

    monkeypatch.setattr(httpx, "post", post)
    llm = EndpointLLM(ServerLLMConfig(endpoint="http://server", temperature=0.7, top_p=0.8))
    llm.complete(["a", "b"], 5, seed=10)
    llm.complete(["c"], 5, greedy=True)
    sampled = sorted((b["temperature"], b["top_p"], b["seed"]) for b in bodies[:2])
    assert sampled == [(0.7, 0.8, 10), (0.7, 0.8, 11)]
    assert bodies[2]["temperature"] == 0.0 and "seed" not in bodies[2]
