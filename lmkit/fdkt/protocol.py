"""One FDKT federation as plain functions, shared by the in-process runner and the Flower app.

Round r: each client DP-synthesizes demonstrations (`client_synthesize`) and sends only
`outgoing(...)`: synthetic texts, their labels, its domain name and its epsilon so far. The server
filters and augments them with its LLM (`server_augment`), sends each client its augmented set,
and the client trains its task SLM on local + augmented data and evaluates on its held-out
private data (`client_train`). A client that fails is reported as dropped; the round goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lmkit.fdkt.audit import exposure, membership_auc
from lmkit.fdkt.client import control_code, sample, train_and_evaluate
from lmkit.fdkt.config import FDKTConfig
from lmkit.fdkt.data import Canary, client_data, make_canaries, plant
from lmkit.fdkt.privacy import ClientPrivacy, dp_finetune
from lmkit.fdkt.server import LLM, augment
from lmkit.loader import load_model


@dataclass
class ClientData:
    domain: str
    train: list[dict]
    test: list[dict]
    canaries: list[Canary] = field(default_factory=list)
    outsiders: list[Canary] = field(default_factory=list)


def private_data(config: FDKTConfig, partition: int) -> ClientData:
    """What client `partition` holds locally (rebuilt on the client; never sent)."""
    domain = config.domains[partition % len(config.domains)]
    train, test = client_data(domain, config.private_train, config.private_test, config.seed + partition)
    if partition != 0 or config.canaries == 0:
        return ClientData(domain, train, test)
    canaries = make_canaries(domain, config.canaries, config.seed)
    outsiders = make_canaries(domain, config.canaries, config.seed + 10_000)
    return ClientData(domain, plant(train, canaries, config.canary_repeats), test, canaries, outsiders)


def outgoing(domain: str, samples: list[dict], ledger: ClientPrivacy, delta: float) -> dict[str, Any]:
    """The only payload a client sends: DP samples (post-processing), public domain name, epsilon."""
    epsilon = ledger.epsilon(delta)
    return {
        "domain": domain,
        "texts": [s["text"] for s in samples],
        "labels": [s["label"] for s in samples],
        "epsilon": epsilon if math.isfinite(epsilon) else -1.0,  # -1: no DP (epsilon = inf)
        "delta": delta,
    }


def client_synthesize(
    config: FDKTConfig, partition: int, ledger: ClientPrivacy, round_index: int
) -> tuple[dict[str, Any], dict[str, float]]:
    """(payload for the server, local audit metrics: only for the client holding canaries)."""
    if round_index == 0 and partition in config.fail_partitions:
        raise RuntimeError(f"client {partition}: simulated dropout (fail_partitions)")
    data = private_data(config, partition)
    seed = config.seed + 1000 * round_index + partition
    loaded = load_model(config.generator)
    texts = [f"{control_code(data.domain, r['label'])} {r['text']}" for r in data.train]
    generator = dp_finetune(loaded.model, loaded.tokenizer, texts, config.dp, ledger, config.rounds, seed)
    samples = sample(generator, loaded.tokenizer, data.domain, config.synth, seed)
    audit: dict[str, float] = {}
    if data.canaries:
        audit = exposure(data.canaries, [s["text"] for s in samples])
        audit["membership_auc"] = membership_auc(
            generator,
            loaded.tokenizer,
            [f"{control_code(data.domain, c.label)} {c.text}" for c in data.canaries],
            [f"{control_code(data.domain, c.label)} {c.text}" for c in data.outsiders],
        )
    return outgoing(data.domain, samples, ledger, config.dp.delta), audit


def server_augment(
    config: FDKTConfig, payload: dict[str, Any], llm: LLM, seed: int
) -> tuple[list[dict], dict]:
    """Augmented samples for one client, and the counts (kept, filtered, malformed) for the report."""
    demos = [{"text": t, "label": lb} for t, lb in zip(payload["texts"], payload["labels"], strict=True)]
    report = augment(
        demos,
        payload["domain"],
        llm,
        config.augment_per_label,
        config.shots,
        config.prompts_per_label,
        seed,
        config.server.max_tokens,
    )
    counts = {
        "demos": len(demos),
        "kept_demos": report.kept_demos,
        "filtered_out": report.filtered_out,
        "malformed": report.malformed,
        "augmented": len(report.samples),
    }
    return report.samples, counts


def client_train(config: FDKTConfig, partition: int, augmented: list[dict]) -> float:
    """Task SLM on local (+ augmented) data; accuracy on the client's held-out private test set."""
    data = private_data(config, partition)
    return train_and_evaluate(config.task, data.train + augmented, data.test, config.seed + partition)


def run_inprocess(config: FDKTConfig, llm: LLM, sent: list[dict] | None = None) -> dict[str, Any]:
    """The federation without Flower (tests, one machine). `sent` collects every client->server payload."""
    ledgers = {p: ClientPrivacy() for p in range(len(config.domains))}
    results: dict[str, Any] = {"clients": {}, "dropped": []}
    augmented: dict[int, list[dict]] = {p: [] for p in ledgers}
    for round_index in range(config.rounds):
        for partition, ledger in ledgers.items():
            try:
                payload, audit = client_synthesize(config, partition, ledger, round_index)
            except RuntimeError as exc:
                results["dropped"].append({"round": round_index, "client": partition, "error": str(exc)})
                continue
            if sent is not None:
                sent.append(payload)
            samples, counts = server_augment(config, payload, llm, config.seed + round_index)
            augmented[partition] += samples
            entry = results["clients"].setdefault(str(partition), {"domain": payload["domain"]})
            entry.update(epsilon=payload["epsilon"], server=counts, audit=audit or entry.get("audit", {}))
    for partition, entry in results["clients"].items():
        part = int(partition)
        entry["fdkt_accuracy"] = client_train(config, part, augmented[part])
    return results
