"""MoLA costs, measured side by side in one run (ratios; absolute times mean little on shared CPUs).

1. Training throughput of MoLA-Grad (grouped: each expert on its task's rows; and dense: every expert
   on every row, gated) and MoLA-Router (dense, soft gates) vs one plain peft LoRA (same batches, same
   rank per adapter, 4 tasks + a shared LoRA), in alternating rounds, per batch size.
2. Serving overhead of MoLA-Router: requests to the router name (gates + bucket lookup in lmkit's
   middleware) vs requests naming the very same merged adapter directly, alternating, on one
   vLLM server. Needs an exported router: run `lmkit run recipes/mola_compare.yaml` first.

    python benchmarks/mola_overhead.py [--router runs/mola_compare/variants/mola_router] [--rounds 3]
        [--batch-sizes 8 16] [--skip-serving]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import openai
import torch
from peft import get_peft_model

from lmkit.adapters import LoraSpec
from lmkit.data import generate_examples
from lmkit.generation import encode_for_training
from lmkit.loader import load_model
from lmkit.mola.model import MoLAModel, MoLASettings
from lmkit.mola.recipe import collate
from lmkit.report import write_report
from lmkit.serving import ServerProcess, load_serve_config

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sentiment", "uppercase", "arithmetic", "reverse_words"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MOLA_VARIANTS = {  # name: (variant, grouped)
    "mola_grad": ("grad", True),
    "mola_grad_dense": ("grad", False),
    "mola_router": ("router", False),
}


def _train_models(source: str) -> dict[str, torch.nn.Module]:
    """Same LoRA shape everywhere (dropout 0.05 as LoraSpec's default)."""
    spec = LoraSpec(r=8, alpha=16, target_modules=list(TARGETS))
    models: dict[str, torch.nn.Module] = {
        "peft_lora": get_peft_model(load_model(source).model, spec.peft_config(task_type="CAUSAL_LM"))
    }
    for name, (variant, grouped) in MOLA_VARIANTS.items():
        settings = MoLASettings(variant, TASKS, shared="lora", lora=spec, grouped=grouped)
        models[name] = MoLAModel(load_model(source).model, settings)
    return models


def _step_seconds(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> float:
    inputs = (
        dict(batch) if isinstance(model, MoLAModel) else {k: v for k, v in batch.items() if k != "task_ids"}
    )
    started = time.perf_counter()
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - started


def training_throughput(
    source: str, models: dict[str, torch.nn.Module], batch_size: int, rounds: int, steps: int
) -> dict[str, float]:
    """Tokens/s per model on one mixed-task batch (generated data, tasks interleaved)."""
    tokenizer = load_model(source).tokenizer
    examples = generate_examples(TASKS, batch_size, seed=0)
    rows = [{**encode_for_training(tokenizer, e, 128), "task_id": TASKS.index(e["task"])} for e in examples]
    batch = collate(rows, tokenizer.pad_token_id)
    tokens = int(batch["attention_mask"].sum())
    optimizers = {
        n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for n, m in models.items()
    }
    for name, model in models.items():  # warm-up
        _step_seconds(model, batch, optimizers[name])
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            seconds[name].append(
                sum(_step_seconds(model, batch, optimizers[name]) for _ in range(steps)) / steps
            )
    return {name: tokens / statistics.median(values) for name, values in seconds.items()}


def serving_overhead(router_dir: Path, rounds: int, requests: int) -> dict[str, float]:
    config = load_serve_config(
        ROOT / "serve" / "smollm2.yaml",
        [
            "port=8121",
            "max_lora_rank=64",
            f"adapter_dirs=[{router_dir}]",
            f"mola_routers=[{{name: mix, path: {router_dir}, buckets: 10}}]",
        ],
    )
    prompt = "Is this review positive or negative? Review: The soup was lovely."
    logs = ROOT / "runs" / "benchmarks" / "mola_overhead"
    logs.mkdir(parents=True, exist_ok=True)
    with ServerProcess(config, log_path=logs / "vllm.log"):
        client = openai.OpenAI(base_url=f"{config.base_url}/v1", api_key="none", max_retries=0)

        def latency(model: str) -> float:
            started = time.perf_counter()
            client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            return time.perf_counter() - started

        latency("mix")  # builds and loads the bucket adapter once
        bucket_name = next(m.id for m in client.models.list().data if m.id.startswith("mix--"))
        samples: dict[str, list[float]] = {"router": [], "same adapter by name": []}
        for _ in range(rounds):
            for _ in range(requests):
                samples["router"].append(latency("mix"))
                samples["same adapter by name"].append(latency(bucket_name))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--router", default=str(ROOT / "runs" / "mola_compare" / "variants" / "mola_router"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[8], help="examples per batch (4 tasks)"
    )
    parser.add_argument("--skip-serving", action="store_true", help="training throughput only (no vLLM)")
    args = parser.parse_args()

    models = _train_models(args.model)
    rows, results = [], {"training_tokens_per_s": {}}
    for size in args.batch_sizes:
        throughput = training_throughput(args.model, models, size, args.rounds, args.steps)
        results["training_tokens_per_s"][f"batch {size}"] = throughput
        base = throughput["peft_lora"]
        rows += [
            [f"training tokens/s (batch {size}): {n}", round(v, 1), round(v / base, 3)]
            for n, v in throughput.items()
        ]
    if not args.skip_serving and (Path(args.router) / "router" / "router.json").is_file():
        latency = serving_overhead(Path(args.router), args.rounds, args.requests)
        ratio = latency["router"] / latency["same adapter by name"]
        results |= {"serving_latency_s": latency, "router_over_direct": ratio}
        rows += [
            [f"serving latency s: {n}", round(v, 4), round(v / latency["same adapter by name"], 3)]
            for n, v in latency.items()
        ]
    write_report(
        ROOT / "runs" / "benchmarks" / "mola_overhead",
        "MoLA overhead (ratios vs a single LoRA)",
        results,
        ["measure", "value", "ratio"],
        rows,
        [
            f"median of {args.rounds} alternating rounds of {args.steps} steps; model {args.model}; "
            f"{len(TASKS)} tasks + shared LoRA, rank 8 per adapter; torch threads {torch.get_num_threads()}"
        ],
    )


if __name__ == "__main__":
    main()
