"""Domain-shifted review generators (`reviews_restaurant`, `reviews_electronics`, `reviews_travel`).

Each domain has its own subjects and sentiment words, so a few local examples cover little of a
domain's vocabulary: FDKT's demo setting. Rows are `(review text, positive|negative)`, so a
recipe's template (if any) writes the prompt and the label stays the answer word.
"""

from __future__ import annotations

import random

from lmkit.data.generated import register_task

REVIEW_DOMAINS: dict[str, dict[str, list[str]]] = {
    "restaurant": {
        "subjects": ["the pasta", "the soup", "our waiter", "the dessert", "the curry", "the bread"],
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


def review(rng: random.Random, domain: str, label: str) -> str:
    vocab = REVIEW_DOMAINS[domain]
    subject = rng.choice(vocab["subjects"])
    first, second = rng.sample(vocab[label], 2)
    return rng.choice(_FRAMES).format(s=subject, S=subject.capitalize(), a=first, b=second)


def _register(domain: str) -> None:
    @register_task(f"reviews_{domain}")
    def _generate(rng: random.Random) -> tuple[str, str]:
        label = rng.choice(["positive", "negative"])
        return review(rng, domain, label), label


for _domain in REVIEW_DOMAINS:
    _register(_domain)
