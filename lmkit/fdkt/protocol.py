"""One FDKT federation as plain functions, shared by the in-process runner and the Flower app.

Round r: each client DP-synthesizes demonstrations (`client_synthesize`) and sends only
`outgoing(...)`: synthetic texts and their labels, its public description (name, domain, label set)
and its epsilon so far. The server clusters, filters and augments them (`server_augment`) and sends
each client its augmented set; the client trains its task model on local + augmented data
(`client_train`). What a client learns about itself (test scores, the canary audit) goes to its own
output dir, `<stage>/clients/<name>/`, and to the server only with `report_private_metrics`.
A client that fails is reported as dropped; the round goes on.
"""

from __future__ import annotations

import functools
import json
import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lmkit.fdkt.audit import canary_audit
from lmkit.fdkt.client import control_code, sample, train_task_model
from lmkit.fdkt.config import FDKTConfig
from lmkit.fdkt.data import ClientData, load_client, make_canaries, plant
from lmkit.fdkt.privacy import ClientPrivacy, dp_finetune
from lmkit.fdkt.server import LLM, augment, server_embedder
from lmkit.io import write_json_atomic, write_jsonl_atomic
from lmkit.loader import load_model


def client_dir(out: Path, config: FDKTConfig, partition: int) -> Path:
    return Path(out) / "clients" / config.clients[partition].name


class SimulatedDropout(RuntimeError):
    """A client failing on purpose (`fail_partitions`): a drill, nothing private in it."""


class ClientFailure(RuntimeError):
    """All the server learns of a client's failure: which client and step, and the error's type. The
    message may quote private records, so it stays in the client's own `error.log`."""


Step = TypeVar("Step", bound=Callable[..., Any])


def private_failures(step: str) -> Callable[[Step], Step]:
    """Client steps `(config, partition, ..., out)` raise `ClientFailure` instead of their own error."""

    def wrap(fn: Step) -> Step:
        @functools.wraps(fn)
        def run(config: FDKTConfig, partition: int, *args: Any) -> Any:
            try:
                return fn(config, partition, *args)
            except SimulatedDropout:
                raise
            except Exception as exc:
                mine = client_dir(args[-1], config, partition)
                mine.mkdir(parents=True, exist_ok=True)
                with open(mine / "error.log", "a", encoding="utf-8") as log:
                    log.write(traceback.format_exc())
                raise ClientFailure(
                    f"client {config.clients[partition].name}: {step} failed ({type(exc).__name__}); "
                    "the details are in its own output dir (error.log)"
                ) from None

        return run  # type: ignore[return-value]

    return wrap


def private_data(config: FDKTConfig, partition: int) -> ClientData:
    """What client `partition` holds locally (read on the client; never sent). The first client also
    holds the audit's planted canaries, and the fresh ones it compares them with."""
    data = load_client(config.clients[partition], partition, config.seed)
    if partition == 0 and config.canaries:
        data.canaries = make_canaries(data.train, config.canaries, config.seed)
        data.outsiders = make_canaries(data.train, config.canaries, config.seed + 10_000)
        data.train = plant(data.train, data.canaries, config.canary_repeats)
    return data


def outgoing(data: ClientData, samples: list[dict], ledger: ClientPrivacy, delta: float) -> dict[str, Any]:
    """The only payload a client sends: DP samples (post-processing), its public description, epsilon."""
    epsilon = ledger.epsilon(delta)
    return {
        "client": data.name,
        "domain": data.domain,
        "label_set": data.labels,
        "texts": [s["text"] for s in samples],
        "labels": [s["label"] for s in samples],
        "epsilon": epsilon if math.isfinite(epsilon) else -1.0,  # -1: no DP (epsilon = inf)
        "delta": delta,
    }


def shared(config: FDKTConfig, private: dict[str, Any]) -> dict[str, Any]:
    """What of a client's private metrics goes to the server: nothing unless the recipe opts in.
    Numbers only, as Flower's MetricRecord holds them: {"predicted_share": {"pos": 0.6}} travels as
    {"predicted_share.pos": 0.6}."""
    if not config.report_private_metrics:
        return {}
    flat = {k: v for k, v in private.items() if not isinstance(v, dict)}
    nested = {f"{k}.{inner}": v for k, d in private.items() if isinstance(d, dict) for inner, v in d.items()}
    return flat | nested


@private_failures("synthesis")
def client_synthesize(
    config: FDKTConfig, partition: int, ledger: ClientPrivacy, round_index: int, out: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(payload for the server, the audit if shared). The audit is written to the client's dir."""
    if round_index == 0 and partition in config.fail_partitions:
        raise SimulatedDropout(f"client {partition}: simulated dropout (fail_partitions)")
    data = private_data(config, partition)
    seed = config.seed + 1000 * round_index + partition  # LoRA init and sampling (DP noise: see dp)
    loaded = load_model(config.generator)
    texts = [f"{control_code(data.domain, r['label'])} {r['text']}" for r in data.train]
    generator = dp_finetune(loaded.model, loaded.tokenizer, texts, config.dp, ledger, config.rounds, seed)
    samples = sample(generator, loaded.tokenizer, data.domain, data.labels, config.synth, seed)
    mine = client_dir(out, config, partition)
    write_jsonl_atomic(mine / f"synthetic_round{round_index}.jsonl", samples)
    audit: dict[str, Any] = {}
    if data.canaries:
        members, fresh = (
            [f"{control_code(data.domain, c.label)} {c.text}" for c in group]
            for group in (data.canaries, data.outsiders)
        )
        audit = canary_audit(
            generator, loaded.tokenizer, members, fresh, data.canaries, [s["text"] for s in samples]
        )
        write_json_atomic(mine / f"audit_round{round_index}.json", audit)
    return outgoing(data, samples, ledger, config.dp.delta), shared(config, audit)


def server_augment(
    config: FDKTConfig, payload: dict[str, Any], llm: LLM, embed, seed: int
) -> tuple[list[dict], dict]:
    """Augmented samples for one client, and the counts (kept, filtered, malformed) for the report."""
    demos = [{"text": t, "label": lb} for t, lb in zip(payload["texts"], payload["labels"], strict=True)]
    report = augment(demos, payload["domain"], payload["label_set"], llm, config, seed, embed)
    counts = {
        "demos": len(demos),
        "clusters": report.clusters,
        "kept_demos": report.kept_demos,
        "filtered_out": report.filtered_out,
        "malformed": report.malformed,
        "augmented": len(report.samples),
    }
    return report.samples, counts


@private_failures("training")
def client_train(config: FDKTConfig, partition: int, augmented: list[dict], out: Path) -> dict[str, Any]:
    """Task model on local (+ augmented) data. Writes the augmented data, the model and its accuracy on
    the held-out private test set to the client's dir; returns what of that is shared."""
    data = private_data(config, partition)
    mine = client_dir(out, config, partition)
    write_jsonl_atomic(mine / "augmented.jsonl", augmented)
    scores = train_task_model(
        config.task,
        data.train + augmented,
        data.test,
        data.labels,
        config.seed + partition,
        mine / "task_model",
    )
    metrics = scores | {"test_records": len(data.test), "train_records": len(data.train)}
    write_json_atomic(mine / "metrics.json", metrics | {"augmented": len(augmented)})
    return shared(config, metrics)


def client_reports(config: FDKTConfig, out: Path) -> dict[str, Any]:
    """Each client's own report (accuracy; the audit for the canary client), read from its output dir:
    in a simulation the operator reads them there; none of it travelled to the server."""
    reports = {}
    for partition, client in enumerate(config.clients):
        mine = client_dir(out, config, partition)
        report = json.loads(m.read_text()) if (m := mine / "metrics.json").is_file() else {}
        audits = {int(p.stem.removeprefix("audit_round")): p for p in mine.glob("audit_round*.json")}
        if audits:
            report["audit"] = json.loads(audits[max(audits)].read_text())  # the last round's
        reports[client.name] = report
    return reports


def embedder_for(config: FDKTConfig, llm: LLM):
    """The server's embedder when the server step clusters, else None."""
    step = config.server_step
    return server_embedder(config.server, llm) if step.mode == "augment" and step.cluster else None


def run_inprocess(config: FDKTConfig, llm: LLM, out: Path, sent: list[dict] | None = None) -> dict[str, Any]:
    """The federation without Flower (tests, one machine). `sent` collects every client->server message."""
    ledgers = {p: ClientPrivacy() for p in range(len(config.clients))}
    results: dict[str, Any] = {"clients": {}, "dropped": []}
    augmented: dict[int, list[dict]] = {p: [] for p in ledgers}
    embed = embedder_for(config, llm)
    for round_index in range(config.rounds):
        for partition, ledger in ledgers.items():
            try:
                payload, audit = client_synthesize(config, partition, ledger, round_index, out)
            except RuntimeError as exc:
                results["dropped"].append({"round": round_index, "client": partition, "error": str(exc)})
                continue
            if sent is not None:
                sent.append({"payload": payload, "audit": audit})
            samples, counts = server_augment(config, payload, llm, embed, config.seed + round_index)
            augmented[partition] += samples
            entry = results["clients"].setdefault(payload["client"], {"domain": payload["domain"]})
            entry.update(epsilon=payload["epsilon"], server=counts)
            if audit:
                entry["audit"] = audit
    for partition in ledgers:
        name = config.clients[partition].name
        if name in results["clients"]:
            reply = client_train(config, partition, augmented[partition], out)
            if sent is not None:
                sent.append({"train_reply": reply})
            results["clients"][name] |= reply
    return results
