"""Server step, part one: embed the clients' demonstrations and cluster them per label.

Clusters serve two ends, as in FDKT: filtering looks at each cluster (so a mode of the client's
data is never filtered away entirely), and each augmentation prompt shows demonstrations of one
cluster (so augmentation covers every mode, not just the most common one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans

from lmkit.batching import pad
from lmkit.loader import ModelSpec, load_model
from lmkit.modeling import LMEncoder


@dataclass
class Cluster:
    label: str
    members: list[int]  # indices into the demonstrations
    central: int  # the member nearest the centroid


class Embedder:
    """Mean-pooled last hidden states of a language model, L2-normalised."""

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.encoder, self.tokenizer = LMEncoder(model), tokenizer
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, spec: ModelSpec) -> Embedder:
        loaded = load_model(spec)
        return cls(loaded.model, loaded.tokenizer)

    @torch.inference_mode()
    def __call__(self, texts: list[str], batch_size: int = 16) -> np.ndarray:
        vectors = []
        for start in range(0, len(texts), batch_size):
            rows = [
                self.tokenizer(t, truncation=True, max_length=128).input_ids
                for t in texts[start : start + batch_size]
            ]
            ids, mask = pad(rows, self.tokenizer.pad_token_id)
            pooled = self.encoder(ids.to(self.device), mask.to(self.device))
            vectors.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(vectors).numpy() if vectors else np.zeros((0, self.encoder.hidden_size))


def cluster_by_label(
    labels: list[str], vectors: np.ndarray | None, per_cluster: int, seed: int
) -> list[Cluster]:
    """KMeans per label with k = ceil(n / per_cluster); `vectors` None: one cluster per label."""
    clusters = []
    for label in dict.fromkeys(labels):
        members = [i for i, lb in enumerate(labels) if lb == label]
        if vectors is None or len(members) <= per_cluster:
            clusters.append(_cluster(label, members, vectors))
            continue
        k = math.ceil(len(members) / per_cluster)
        assignment = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(vectors[members])
        for c in range(k):
            group = [m for m, a in zip(members, assignment, strict=True) if a == c]
            if group:
                clusters.append(_cluster(label, group, vectors))
    return clusters


def _cluster(label: str, members: list[int], vectors: np.ndarray | None) -> Cluster:
    if vectors is None:
        return Cluster(label, members, members[0])
    points = vectors[members]
    distance = np.linalg.norm(points - points.mean(0), axis=1)
    return Cluster(label, members, members[int(distance.argmin())])


def keep_per_cluster(clusters: list[Cluster], passed: list[bool]) -> list[Cluster]:
    """Each cluster reduced to the demonstrations that passed the filter; a cluster where none did
    keeps its central one, so no mode of a client's data is lost to a noisy verdict."""
    kept = []
    for cluster in clusters:
        members = [m for m in cluster.members if passed[m]] or [cluster.central]
        central = cluster.central if cluster.central in members else members[0]
        kept.append(Cluster(cluster.label, members, central))
    return kept
