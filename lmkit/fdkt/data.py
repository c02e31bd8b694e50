"""Seeded, domain-shifted private data for FDKT clients, and privacy-audit canaries.

Each client holds reviews from its own domain (its subjects and its sentiment words differ), so a
client's few local examples cover little of its domain's vocabulary: the gap FDKT fills with
server-augmented data. Canaries follow the in-distribution-prefix + random-secret-suffix design,
so a data-based or model-based membership test can look for the secret.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

LABELS = ["positive", "negative"]

DOMAINS: dict[str, dict[str, list[str]]] = {
    "restaurant": {
        "subjects": [
            "the pasta",
            "the soup",
            "our waiter",
            "the dessert",
            "the curry",
            "the bread",
            "the wine list",
        ],
        "positive": [
            "delicious",
            "fresh",
            "flavorful",
            "tender",
            "generous",
            "attentive",
            "crispy",
            "savory",
        ],
        "negative": ["bland", "greasy", "cold", "soggy", "overcooked", "rude", "stale", "salty"],
    },
    "electronics": {
        "subjects": ["the battery", "the screen", "this laptop", "the charger", "the speaker", "the camera"],
        "positive": ["reliable", "fast", "sharp", "sturdy", "responsive", "crisp", "durable", "bright"],
        "negative": ["laggy", "flimsy", "dim", "buggy", "noisy", "faulty", "sluggish", "cracked"],
    },
    "travel": {
        "subjects": [
            "the hotel room",
            "our guide",
            "the train ride",
            "the beach",
            "the check-in",
            "the tour",
        ],
        "positive": ["relaxing", "spotless", "scenic", "friendly", "smooth", "charming", "cozy", "punctual"],
        "negative": ["dirty", "crowded", "delayed", "noisy", "cramped", "chaotic", "overpriced", "shabby"],
    },
}
_FRAMES = [
    "{s} was {a}.",
    "Honestly, {s} felt {a}.",
    "I found {s} {a} and {b}.",
    "{S} seemed {a}, really {b}.",
]


@dataclass
class Canary:
    text: str  # the record planted (prefix + secret)
    secret: str  # the high-entropy suffix a leak would reveal
    label: str


def review(rng: random.Random, domain: str, label: str) -> str:
    vocab = DOMAINS[domain]
    subject = rng.choice(vocab["subjects"])
    first, second = rng.sample(vocab[label], 2)
    return rng.choice(_FRAMES).format(s=subject, S=subject.capitalize(), a=first, b=second)


def client_data(domain: str, train: int, test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(private train, private held-out test) records `{"text", "label"}`, labels balanced by turns."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown FDKT domain {domain!r}; available: {sorted(DOMAINS)}")
    rng = random.Random(f"{domain}:{seed}")
    rows = [{"text": review(rng, domain, LABELS[i % 2]), "label": LABELS[i % 2]} for i in range(train + test)]
    rng.shuffle(rows)
    return rows[:train], rows[train:]


def make_canaries(domain: str, count: int, seed: int) -> list[Canary]:
    """In-distribution prefix plus a random 10-character secret, e.g. '... was fresh. Ref QX7K2M9PLA.'"""
    rng = random.Random(f"canary:{domain}:{seed}")
    canaries = []
    for i in range(count):
        label = LABELS[i % 2]
        secret = "".join(rng.choices(string.ascii_uppercase + string.digits, k=10))
        canaries.append(Canary(f"{review(rng, domain, label)} Ref {secret}.", secret, label))
    return canaries


def plant(rows: list[dict], canaries: list[Canary], repeats: int) -> list[dict]:
    """The private train set with each canary inserted `repeats` times."""
    return rows + [{"text": c.text, "label": c.label} for c in canaries for _ in range(repeats)]
