"""LoRA on real data: SST-2, zero-shot base vs LoRA at several training sizes, plus the nf4 path.

Reads ../shared/data/sst2_train_5k.jsonl and sst2_dev.jsonl as they are, through lmkit's data
layer (recipes/real/lora_sst2.yaml; no conversion step), and skips, saying so, when they are absent.
Each training run stops on its validation loss (10% of its training rows). Every number is on
all 872 SST-2 dev rows:
- `ll acc`: lm-eval log-likelihood accuracy over {negative, positive} (`lmkit eval`, the adapter's
  recorded prompt format followed), with a 95% Wilson interval;
- `exact match`: the recipe's own greedy generation, compared with the label word.
Rows: the base model zero-shot (chat template on and off), LoRA at each `--sizes` x `--seeds`, the
fp32-trained adapter on the nf4 base, and QLoRA (trained on the nf4 base) at `--qlora-size`.

    python benchmarks/lora_sst2.py [--sizes 250 1000 5000] [--seeds 0] [--qlora-size 1000]

Runs already finished under --output are reused (delete a run's folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import yaml
from real_data import machine, wilson

from lmkit.evals.config import load_suite
from lmkit.evals.runner import run_suite
from lmkit.recipes import load_recipe, run_recipe
from lmkit.report import write_report, write_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RECIPE = ROOT / "recipes" / "real" / "lora_sst2.yaml"
HEADERS = [
    "setup",
    "train rows",
    "seeds",
    "steps (best)",
    "ll acc [95% CI]",
    "exact match",
    "train tok/s",
    "model MB",
]


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def eval_task(out: Path) -> Path:
    """The SST-2 dev file as an lmkit eval task, read as it is (same keys as the recipe's source)."""
    source = yaml.safe_load(RECIPE.read_text())["data"]["sources"][0]
    return write_yaml(
        out / "sst2_dev_task.yaml",
        {
            "name": "sst2_dev",
            "kind": "classification",
            "source": str(DATA / "sst2_dev.jsonl"),
            "columns": source["columns"],
            "label_names": source["label_names"],
            "template": source["template"],
        },
    )


def evaluate(out: Path, model: dict[str, Any], task: Path, **suite: Any) -> dict[str, Any]:
    """lm-eval accuracy and the model's memory footprint; reused when already measured."""
    done = out / "results.json"
    if not done.is_file():
        spec = {"target": {"model": model}, "tasks": [{"local": str(task)}], "output_dir": str(out)}
        run_suite(load_suite(write_yaml(out.parent / f"{out.name}.yaml", spec | suite)))
    results = json.loads(done.read_text())
    quality = results["quality"]["lmkit_sst2_dev"]
    return {"acc": quality["acc,none"], "model_mb": results["memory"]["model_mb"]}


def train(out: Path, overrides: list[str]) -> dict[str, Any]:
    """One lora recipe run (reused when its results exist)."""
    done = out / "results.json"
    if not done.is_file():
        run_recipe(load_recipe(RECIPE, [*overrides, f"output_dir={out}"]), resume=True)
    return json.loads(done.read_text())


def row(setup: str, rows: str, runs: list[dict[str, Any]], n_eval: int) -> list[Any]:
    accs = [r["acc"] for r in runs]
    mean = statistics.mean(accs)
    low, high = wilson(mean, n_eval * len(accs))
    spread = f" ± {statistics.stdev(accs):.3f} sd" if len(accs) > 1 else ""
    steps = ", ".join(f"{r['steps']} ({r['best_step']})" for r in runs if "steps" in r) or "-"
    exact = ", ".join(f"{r['exact']:.3f}" for r in runs if "exact" in r) or "-"
    speed = ", ".join(f"{r['tok_s']:.0f}" for r in runs if "tok_s" in r) or "-"
    return [
        setup,
        rows,
        len(runs),
        steps,
        f"{mean:.3f}{spread} [{low:.3f}, {high:.3f}]",
        exact,
        speed,
        runs[0]["model_mb"],
    ]


def lora_run(out: Path, task: Path, size: int, seed: int, quantization: str = "none") -> dict[str, Any]:
    name = f"{'qlora' if quantization != 'none' else 'lora'}-{size}-seed{seed}"
    overrides = [
        f"data.sources[0].source={DATA / 'sst2_train_5k.jsonl'}",
        f"data.sources[0].eval.source={DATA / 'sst2_dev.jsonl'}",
        f"data.sources[0].limit={size}",
        f"seed={seed}",
        f"model.quantization={quantization}",
    ]
    trained = train(out / name, overrides)
    adapter = {"name": "sst2", "path": trained["adapter"]}
    model = {
        "source": "smollm2-135m",
        "dtype": "float32",
        "quantization": quantization,
        "adapters": [adapter],
    }
    scored = evaluate(out / f"{name}-eval", model, task, batch_size=32)
    stats = trained["training"]
    return scored | {
        "steps": stats["steps"],
        "best_step": stats.get("best_step", stats["steps"]),
        "exact": trained["exact_match_adapted"]["overall"],
        "tok_s": stats["tokens_per_second"],
        "adapter": trained["adapter"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 5000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--qlora-size", type=int, default=1000, help="0: skip the nf4 rows")
    parser.add_argument(
        "--qlora-train", action=argparse.BooleanOptionalAction, default=True, help="train the QLoRA row"
    )
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmarks" / "lora_sst2"))
    parser.add_argument("--table", default=str(ROOT / "evals" / "results" / "lora_sst2.md"))
    args = parser.parse_args()
    if not (DATA / "sst2_dev.jsonl").is_file():
        print(f"SKIP: {DATA} not found; this benchmark reads SST-2 there at run time.")
        return 0
    out = Path(args.output)
    task, n_eval = eval_task(out), 872
    base = {"source": "smollm2-135m", "dtype": "float32"}
    rows = [
        row(
            "base, zero-shot, chat template",
            "0",
            [evaluate(out / "base-chat", base, task, apply_chat_template=True)],
            n_eval,
        ),
        row(
            "base, zero-shot, raw prompt",
            "0",
            [evaluate(out / "base-raw", base, task, apply_chat_template=False)],
            n_eval,
        ),
    ]
    runs: dict[int, list[dict[str, Any]]] = {}
    for size in args.sizes:
        runs[size] = [lora_run(out, task, size, seed) for seed in args.seeds]
        rows.append(row("LoRA r8 (fp32 base)", str(size), runs[size], n_eval))
    if args.qlora_size:
        size = args.qlora_size
        fp32 = runs.get(size) or [lora_run(out, task, size, seed) for seed in args.seeds]
        nf4_base = {**base, "quantization": "nf4"}
        on_nf4 = [
            evaluate(
                out / f"lora-{size}-seed{s}-on-nf4",
                nf4_base | {"adapters": [{"name": "sst2", "path": r["adapter"]}]},
                task,
                batch_size=32,
            )
            for s, r in zip(args.seeds, fp32, strict=True)
        ]
        rows.append(row("same LoRA, served on the nf4 base", str(size), on_nf4, n_eval))
        if args.qlora_train:
            rows.append(
                row(
                    "QLoRA r8 (trained on the nf4 base)",
                    str(size),
                    [lora_run(out, task, size, s, "nf4") for s in args.seeds],
                    n_eval,
                )
            )
    command = (
        "python benchmarks/lora_sst2.py "
        + " ".join(
            [
                f"--sizes {' '.join(map(str, args.sizes))}",
                f"--seeds {' '.join(map(str, args.seeds))}",
                f"--qlora-size {args.qlora_size}",
                "" if args.qlora_train else "--no-qlora-train",
            ]
        ).strip()
    )
    notes = [
        f"command: `{command}`; recipe recipes/real/lora_sst2.yaml (SmolLM2-135M-Instruct, LoRA r8 "
        "on q,k,v,o, lr 5e-4, batch 16)",
        "data: ../shared/data/sst2_train_5k.jsonl (GLUE SST-2 train, a 5,000-row seeded sample): a "
        "seeded `limit` sample of it, 10% of which is the validation split for early stopping (every "
        f"20 steps, patience 3, best weights kept); scored on all {n_eval} rows of sst2_dev.jsonl",
        "ll acc: lm-eval log-likelihood accuracy over {negative, positive}, 95% Wilson interval over "
        "all scored rows; exact match: greedy generation (4 tokens) equals the label word",
        "steps: steps run (step with the best validation loss); 150 is the max_steps cap, so a run "
        "that reached it may not have converged; model MB: the weight footprint `lmkit eval` reports",
        f"machine: {machine()}",
    ]
    results = {"rows": rows, "runs": {str(k): v for k, v in runs.items()}}
    write_report(
        Path(args.output) / "report",
        "LoRA on SST-2 (real data): accuracy on the 872-row dev set",
        results,
        HEADERS,
        rows,
        notes,
    )
    table = Path(args.table)
    write_table(table, (Path(args.output) / "report" / "summary.md").read_text())
    print(f"table: {table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
