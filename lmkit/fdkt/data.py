"""A client's private data, read through the shared `data` section, and privacy-audit canaries.

Each client's `data` train split is its private records and its eval split its held-out test
records; a record is `{"text", "label"}` with the label as a word (label_names). Canaries follow the
in-distribution-prefix + random-secret-suffix design: the prefix is one of the client's own records,
the suffix a random secret, so a data-based or model-based test can look for the secret. Fresh
canaries, never planted, are built the same way and are the audit's outsiders.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

from lmkit.data import DataError, load_data
from lmkit.fdkt.config import ClientSpec


@dataclass
class Canary:
    text: str  # the record planted (prefix + secret)
    secret: str  # the high-entropy suffix a leak would reveal
    label: str


@dataclass
class ClientData:
    name: str
    domain: str  # the client's public description of its data
    labels: list[str]
    train: list[dict]
    test: list[dict]
    canaries: list[Canary] = field(default_factory=list)
    outsiders: list[Canary] = field(default_factory=list)


def load_client(client: ClientSpec, index: int, seed: int) -> ClientData:
    """The client's (private train, held-out test) records and its label set, checked."""
    data = client.data if client.data.seed is not None else client.data.model_copy(update={"seed": seed})
    if data.generate is not None and data.generate.seed is None:
        data = data.model_copy(update={"generate": data.generate.model_copy(update={"seed": seed})})
    train, test = load_data(data)
    if not train or not test:
        empty = "training records" if not train else "test records"
        raise DataError(
            f"fdkt.clients[{index}] ({client.name}): no {empty} (check limit, drop_labels and the eval "
            "split). Fix: give the client rows in both splits."
        )
    labels = list(train[0].get("choices") or []) or sorted({e["target"] for e in train})
    unknown = sorted({e["target"] for e in test} - set(labels))
    if unknown:
        raise DataError(
            f"fdkt.clients[{index}] ({client.name}): test labels {unknown} never occur in its training "
            f"records ({labels}). Fix: set data.sources[].label_names so both splits share the label set."
        )
    if len(labels) < 2:
        raise DataError(
            f"fdkt.clients[{index}] ({client.name}): its records have one label ({labels}); a task "
            "needs at least two. Fix: check columns.target."
        )
    records = [[{"text": e["input"], "label": e["target"]} for e in split] for split in (train, test)]
    return ClientData(client.name, client.domain, labels, *records)


def make_canaries(records: list[dict], count: int, seed: int) -> list[Canary]:
    """`count` canaries: a random record's text (first 20 words) + ' Ref <10 random characters>.'"""
    rng = random.Random(f"canary:{seed}")
    canaries = []
    for _ in range(count):
        record = rng.choice(records)
        prefix = " ".join(record["text"].split()[:20])
        secret = "".join(rng.choices(string.ascii_uppercase + string.digits, k=10))
        canaries.append(Canary(f"{prefix} Ref {secret}.", secret, record["label"]))
    return canaries


def plant(rows: list[dict], canaries: list[Canary], repeats: int) -> list[dict]:
    """The private train set with each canary inserted `repeats` times."""
    return rows + [{"text": c.text, "label": c.label} for c in canaries for _ in range(repeats)]
