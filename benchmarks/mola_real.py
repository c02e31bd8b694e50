"""MoLA on real heterogeneous tasks (SST-2, AG News, RTE, BoolQ), several seeds, with baselines.

Reads ../shared/data through recipes/real/mola_tasks.yaml (skips when the folder is absent). Per
seed, four runs of the mola recipe, all on the same rows and stopping on their validation loss:
- `main`: single LoRA r8, per-task LoRAs, MoLA-Grad, MoLA-Router (TwD on);
- `single_matched`: one LoRA with as many parameters as MoLA (rank 8 x (tasks + shared));
- `no_instruction`: MoLA-Router with the task instruction removed from every prompt (the router
  must infer the task from the content);
- `no_twd`: MoLA-Router without task-wise decorrelation.
The table gives exact match per task, mean ± sd over seeds, and the router's gate purity.

    python benchmarks/mola_real.py [--seeds 0 1 2] [--rows 500]

Cost on 2 CPU cores: about 15 minutes per variant and seed (SmolLM2-135M trains at ~200 tok/s).
Runs already finished under --output are reused.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from real_data import DATA, ROOT, bench_parser, mean_sd, missing

from lmkit.recipes import load_recipe, run_recipe
from lmkit.report import write_report

RECIPE = ROOT / "recipes" / "real" / "mola_tasks.yaml"
TASKS = ["sst2", "ag_news", "rte", "boolq"]
BARE_TEMPLATES = [  # the recipe's templates without their instructions, in its source order
    '"{{ text }}"',
    '"{{ text }}"',
    '"{{ premise }}\\n{{ hypothesis }}"',
    '"{{ passage }}\\n{{ question }}?"',
]
RUNS: dict[str, tuple[list[str], dict[str, str]]] = {  # run -> (overrides, variant -> row label)
    "main": (
        [],
        {
            "single_lora": "single LoRA r8",
            "per_task_lora": "per-task LoRAs r8",
            "mola_grad": "MoLA-Grad",
            "mola_router": "MoLA-Router (TwD)",
        },
    ),
    "single_matched": (
        [
            "mola.variants=[single_lora]",
            f"mola.lora.r={8 * (len(TASKS) + 1)}",
            f"mola.lora.alpha={16 * (len(TASKS) + 1)}",
        ],
        {"single_lora": "single LoRA, MoLA's parameter count"},
    ),
    "no_instruction": (
        [
            "mola.variants=[mola_router]",
            *(f"data.sources[{i}].template={t}" for i, t in enumerate(BARE_TEMPLATES)),
        ],
        {"mola_router": "MoLA-Router, no task instruction"},
    ),
    "no_twd": (["mola.variants=[mola_router]", "mola.twd_weight=0"], {"mola_router": "MoLA-Router, TwD off"}),
}


def data_overrides(rows: int) -> list[str]:
    files = ["sst2_train_5k.jsonl", "ag_news_test.jsonl", "rte_train.jsonl", "boolq_eraser_val.jsonl"]
    out = [f"data.sources[{i}].source={DATA / f}" for i, f in enumerate(files)]
    out += [
        f"data.sources[0].eval.source={DATA / 'sst2_dev.jsonl'}",
        f"data.sources[2].eval.source={DATA / 'rte_dev.jsonl'}",
    ]
    return out + [f"data.sources[{i}].limit={rows}" for i in range(len(files))]


def run_once(out: Path, overrides: list[str]) -> dict[str, Any]:
    if not (out / "results.json").is_file():
        run_recipe(load_recipe(RECIPE, [*overrides, f"output_dir={out}"]), resume=True)
    return json.loads((out / "results.json").read_text())


def main() -> int:
    parser = bench_parser(__doc__, "mola_real", seeds=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=500, help="training rows per task")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    if missing():
        return 0
    scores: dict[str, list[dict[str, float]]] = {}
    purity: dict[str, list[float]] = {}
    steps: dict[str, list[int]] = {}
    eval_rows: dict[str, int] = {}
    for seed in args.seeds:
        for run in args.runs:
            overrides, labels = RUNS[run]
            results = run_once(
                Path(args.output) / f"seed{seed}" / run,
                [*data_overrides(args.rows), f"seed={seed}", *overrides],
            )
            for variant, label in labels.items():
                scores.setdefault(label, []).append(results["exact_match"][variant])
                steps.setdefault(label, []).append(results["training"][variant]["steps"])
                if variant in results.get("gate_purity", {}):
                    purity.setdefault(label, []).append(results["gate_purity"][variant]["overall"])
            eval_rows = results.get("eval_rows", eval_rows)
    headers = ["variant", *TASKS, "overall", "gate purity", "steps"]
    rows = [
        [
            label,
            *(mean_sd([s[t] for s in runs]) for t in [*TASKS, "overall"]),
            mean_sd(purity[label]) if label in purity else "-",
            ", ".join(map(str, steps[label])),
        ]
        for label, runs in scores.items()
    ]
    command = f"python benchmarks/mola_real.py --seeds {' '.join(map(str, args.seeds))} --rows {args.rows}"
    notes = [
        f"command: `{command}`; recipe recipes/real/mola_tasks.yaml (SmolLM2-135M-Instruct, rank 8 "
        "per adapter, shared LoRA)",
        f"data (../shared/data): {args.rows} seeded training rows per task (10% of them the "
        "early-stopping validation split); eval: SST-2 dev (250 sampled), AG News held-out (300 "
        "sampled), RTE dev (all 277), BoolQ held-out (250 sampled)",
        f"exact match of the greedy answer with the label word, mean ± sd over seeds {args.seeds}; "
        "gate purity: mean router gate on the example's own task's expert (1/4 = uninformed)",
        f"machine: {platform.processor() or platform.machine()}, 2 CPU cores, no GPU",
    ]
    write_report(
        Path(args.output) / "report",
        "MoLA on real tasks: exact match per task",
        {"rows": rows},
        headers,
        rows,
        notes,
    )
    Path(args.table).write_text((Path(args.output) / "report" / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
