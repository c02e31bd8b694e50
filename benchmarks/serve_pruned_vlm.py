"""The tiny VLM trained here, served by vLLM unpruned and through lmkit's pruning plugin, side by side.

One run starts one server per config (unpruned, then freePruner-style selection at each --keeps
budget), sends the same held-out scenes and questions to each over /v1/chat/completions (images as
data URLs, greedy, --concurrency requests in flight, streamed so the first token is timed), and
compares with the transformers path on the same questions:
- accuracy (first answer word = gold) served and in transformers, and how often the two agree;
- throughput (questions / s) and median time to first token, as ratios to the unpruned server.

    python benchmarks/serve_pruned_vlm.py [recipe overrides the model was trained with] [--keeps 128 64]
        [--questions 500] [--concurrency 8]

Needs the trained model (runs/tiny_vlm/model; benchmarks/prune_trained_vlm.py trains it when absent).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from prune_trained_vlm import RECIPE, ROOT, agreement, batches, run_cell, shown
from real_data import machine
from rich.progress import track

from lmkit.loader import load_model
from lmkit.pruning.config import PruneConfig
from lmkit.pruning.llava import PrunedLlava
from lmkit.pruning.vlm_recipe import ensure_trained, held_out
from lmkit.recipes import load_recipe
from lmkit.report import write_report, write_table
from lmkit.serving.config import ServeConfig
from lmkit.serving.process import ServerProcess


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(base_url: str, image_url: str, question: str) -> dict[str, Any]:
    """One streamed greedy question: the first answer word and the seconds to the first token."""
    body = {
        "model": "base",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
    }
    start, first, text = time.perf_counter(), None, ""
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=300) as response:
        if response.status_code != 200:
            raise RuntimeError(f"server answered {response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta and first is None:
                first = time.perf_counter() - start
            text += delta
    ttft = first if first is not None else time.perf_counter() - start  # an empty reply: its whole time
    return {"answer": (text.split() or [""])[0].strip(".,!?").lower(), "ttft": ttft}


def serve_and_ask(model: Path, prune: PruneConfig, items, concurrency: int, log: Path) -> dict:
    config = ServeConfig.model_validate(
        {
            "model": {"source": str(model), "dtype": "float32"},
            "engine": {"dtype": "float32", "max_model_len": 512, "extra_args": ["--enforce-eager"]},
            "prune": prune.model_dump(),
        }
    )
    urls = [data_url(scene.image) for scene, _ in items]
    with ServerProcess(config, log_path=log) as server:
        ask(server.config.base_url, urls[0], items[0][1].text)  # warm-up, not counted
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            replies = list(
                pool.map(lambda i: ask(server.config.base_url, urls[i], items[i][1].text), range(len(items)))
            )
        seconds = time.perf_counter() - start
    return {
        "answers": [r["answer"] for r in replies],
        "ttft_median_s": statistics.median(r["ttft"] for r in replies),
        "questions_per_s": len(items) / seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted overrides the model was trained with")
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "tiny_vlm" / "model")
    parser.add_argument("--keeps", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "benchmarks" / "serve_pruned_vlm")
    parser.add_argument("--table", type=Path, default=ROOT / "evals" / "results" / "serve_pruned_vlm.md")
    args = parser.parse_args()
    recipe = load_recipe(
        RECIPE, [*args.overrides, f"output_dir={args.model.parent}", f"vlm.eval_questions={args.questions}"]
    )
    ensure_trained(recipe, args.model)  # a model another recipe trained is refused
    items = held_out(recipe.vlm, recipe.seed)
    gold = [q.answer for _, q in items]
    loaded = load_model({"source": str(args.model), "dtype": "float32"})
    inputs = batches(loaded.processor, items, 16)
    args.output.mkdir(parents=True, exist_ok=True)
    configs = {"unpruned": PruneConfig(method="none")} | {
        f"freePruner-style@{k}": PruneConfig(method="freepruner_style", keep=k, seed=recipe.seed)
        for k in args.keeps
    }
    rows, measured = [], {}
    for name, prune in track(configs.items(), description="served configs"):
        local = run_cell(PrunedLlava(loaded.model, prune), loaded.processor.tokenizer, inputs)["answers"]
        served = serve_and_ask(args.model, prune, items, args.concurrency, args.output / f"{name}.log")
        measured[name] = served | {"transformers_answers": local}
        base = measured["unpruned"]
        rows.append(
            [
                name,
                agreement(served["answers"], gold),
                agreement(local, gold),
                agreement(served["answers"], local),
                round(served["questions_per_s"] / base["questions_per_s"], 2),
                round(served["ttft_median_s"] / base["ttft_median_s"], 2),
                round(served["questions_per_s"], 2),
                round(served["ttft_median_s"] * 1000),
            ]
        )
    headers = [
        "config",
        "accuracy (vLLM)",
        "accuracy (transformers)",
        "same answer vLLM vs transformers",
        "throughput ratio",
        "TTFT ratio",
        "questions/s",
        "median TTFT ms",
    ]
    notes = [
        "command: `"
        + " ".join(
            [
                "python benchmarks/serve_pruned_vlm.py --keeps",
                *map(str, args.keeps),
                f"--questions {args.questions} --concurrency {args.concurrency}",
                *args.overrides,
            ]
        )
        + f"`; model {shown(args.model)} (recipes/train_tiny_vlm.yaml)",
        "every config is served by lmkit's LLaVA class in vLLM (the vLLM plugin); unpruned = its method "
        "`none` (all image tokens, no scoring), since vLLM's own LLaVA module cannot load on CPU-only torch",
        f"{len(items)} held-out scenes and questions, the same for every config; one vLLM server per "
        f"config started in turn in one run (float32, --enforce-eager, max_model_len 512), "
        f"{args.concurrency} requests in flight, one warm-up request each; greedy, 3 tokens, streamed",
        "transformers: the same config through lmkit.pruning.llava.PrunedLlava (batches of 16, left "
        "padded); accuracy: first answer word = gold",
        f"machine: {machine()} (server and client share them)",
    ]
    (args.output / "answers.json").write_text(json.dumps(measured) + "\n")
    write_report(args.output, "Pruned tiny VLM served by vLLM", {"rows": rows}, headers, rows, notes)
    write_table(args.table, (args.output / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
