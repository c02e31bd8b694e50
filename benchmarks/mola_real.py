"""MoLA on real heterogeneous tasks (SST-2, AG News, RTE, BoolQ), several seeds, with baselines.

Reads ../shared/data through recipes/real/mola_tasks.yaml (skips when the folder is absent). Per
seed, one run of the mola recipe per cell, all on the same rows and stopping on their validation loss:
- `single_lora`, `per_task_lora`, `mola_grad`, `mola_router` (TwD on): rank 8 per adapter;
- `single_matched`: one LoRA with as many parameters as MoLA (rank 8 x (tasks + shared));
- `no_instruction`: MoLA-Router with the task instruction removed from every prompt (the router
  must infer the task from the content);
- `no_twd`: MoLA-Router without task-wise decorrelation.
The table gives exact match per task, mean ± sd over seeds, and the router's gate purity.

    python benchmarks/mola_real.py [--seeds 0 1 2] [--rows 500] [--cells single_lora mola_grad ...]

Cost on 2 CPU cores: `single_lora` ran ~10 s per training step on 2026-12-02's machine and ~24 s
on 2026-12-08's (AMD EPYC, AVX2 only, no bf16 units), validation every 25 steps aside, so a cell
(one variant, one seed) takes 0.5-1.4 h if it stops early at ~200 steps and 1.7-4 h at the
600-step cap; a GPU session is the place for the full grid. Each finished
cell's numbers are committed under evals/results/raw/mola_real/, so the table grows across machines
and sessions; the table is rewritten after every cell.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from real_data import DATA, LEDGER, ROOT, bench_parser, ledgered, machine, mean_sd, missing

from lmkit.recipes import load_recipe, run_recipe
from lmkit.report import write_report, write_table

RECIPE = ROOT / "recipes" / "real" / "mola_tasks.yaml"
TASKS = ["sst2", "ag_news", "rte", "boolq"]
BARE_TEMPLATES = [  # the recipe's templates without their instructions, in its source order
    '"{{ text }}"',
    '"{{ text }}"',
    '"{{ premise }}\\n{{ hypothesis }}"',
    '"{{ passage }}\\n{{ question }}?"',
]
VARIANT = 0  # index into a cell's tuple: (variant trained, overrides, row label)
CELLS: dict[str, tuple[str, list[str], str]] = {
    "single_lora": ("single_lora", [], "single LoRA r8"),
    "single_matched": (
        "single_lora",
        [f"mola.lora.r={8 * (len(TASKS) + 1)}", f"mola.lora.alpha={16 * (len(TASKS) + 1)}"],
        "single LoRA, MoLA's parameter count",
    ),
    "per_task_lora": ("per_task_lora", [], "per-task LoRAs r8"),
    "mola_grad": ("mola_grad", [], "MoLA-Grad"),
    "mola_router": ("mola_router", [], "MoLA-Router (TwD)"),
    "no_instruction": (
        "mola_router",
        [f"data.sources[{i}].template={t}" for i, t in enumerate(BARE_TEMPLATES)],
        "MoLA-Router, no task instruction",
    ),
    "no_twd": ("mola_router", ["mola.twd_weight=0"], "MoLA-Router, TwD off"),
}


def data_overrides(rows: int) -> list[str]:
    files = ["sst2_train_5k.jsonl", "ag_news_test.jsonl", "rte_train.jsonl", "boolq_eraser_val.jsonl"]
    out = [f"data.sources[{i}].source={DATA / f}" for i, f in enumerate(files)]
    out += [
        f"data.sources[0].eval.source={DATA / 'sst2_dev.jsonl'}",
        f"data.sources[2].eval.source={DATA / 'rte_dev.jsonl'}",
    ]
    return out + [f"data.sources[{i}].limit={rows}" for i in range(len(files))]


def run_cell(out: Path, variant: str, overrides: list[str]) -> dict[str, Any]:
    """Train and score one variant; the numbers the table needs (kept in the ledger)."""
    began = time.monotonic()
    recipe = load_recipe(RECIPE, [*overrides, f"mola.variants=[{variant}]", f"output_dir={out}"])
    results = run_recipe(recipe, resume=True)
    samples = [json.loads(line) for line in (out / "variants" / variant / "samples.jsonl").open()]
    return {
        "exact_match": results["exact_match"][variant],
        "training": results["training"][variant],
        "gate_purity": results["gate_purity"].get(variant),
        "eval_rows": dict(Counter(s["task"] for s in samples)),
        "overrides": overrides,
        "measured": time.strftime("%Y-%m-%d"),
        "wall_minutes": round((time.monotonic() - began) / 60, 1),
    }


def table(rows_per_task: int, output: Path, path: Path) -> None:
    """The table over every cell in the ledger at this training size, whichever run measured it."""
    cells = {
        cell: [
            json.loads(f.read_text())
            for f in sorted(LEDGER.glob(f"mola_real/rows{rows_per_task}/seed*/{cell}.json"))
        ]
        for cell in CELLS
    }
    cells = {cell: runs for cell, runs in cells.items() if runs}
    if not cells:
        return
    headers = ["variant", *TASKS, "overall", "gate purity", "seeds", "steps (best)"]
    rows = [
        [
            CELLS[cell][2],
            *(mean_sd([r["exact_match"][t] for r in runs]) for t in [*TASKS, "overall"]),
            mean_sd([r["gate_purity"]["overall"] for r in runs]) if runs[0]["gate_purity"] else "-",
            len(runs),
            ", ".join(f"{r['training']['steps']} ({r['training'].get('best_step', '-')})" for r in runs),
        ]
        for cell, runs in cells.items()
    ]
    first = next(iter(cells.values()))[0]
    eval_rows = ", ".join(f"{t} {first['eval_rows'][t]}" for t in TASKS)
    notes = [
        f"command: `python benchmarks/mola_real.py --seeds S... --rows {rows_per_task}`; every finished "
        f"cell is kept in evals/results/raw/mola_real/rows{rows_per_task}/seed<S>/<cell>.json, and the "
        "table covers all of them; recipe recipes/real/mola_tasks.yaml (SmolLM2-135M-Instruct, rank 8 "
        "per adapter, shared LoRA, batch 16, lr 5e-4)",
        f"data (../shared/data): {rows_per_task} seeded training rows per task (a seeded 10% of them "
        "the early-stopping validation split: every 25 steps, patience 3, best weights kept, max 600 "
        f"steps); eval rows per task: {eval_rows} (SST-2 dev sample, AG News held-out sample, all of "
        "RTE dev, BoolQ held-out sample)",
        "exact match of the greedy answer with the label word; mean ± sd over the seeds in the "
        "'seeds' column; gate purity: mean router gate on the example's own task's expert "
        f"(1/{len(TASKS)} = uninformed)",
        f"machine: {machine()}",
    ]
    write_report(
        output / "report", "MoLA on real tasks: exact match per task", {"cells": cells}, headers, rows, notes
    )
    write_table(path, (output / "report" / "summary.md").read_text())


def main() -> int:
    parser = bench_parser(__doc__, "mola_real", seeds=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=500, help="training rows per task")
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    args = parser.parse_args()
    if missing():
        return 0
    for seed in args.seeds:
        for cell in args.cells:
            variant, overrides, _ = CELLS[cell]
            settings = [*data_overrides(args.rows), f"seed={seed}", *overrides]
            where = f"rows{args.rows}/seed{seed}/{cell}"
            ledgered(
                LEDGER / "mola_real" / f"{where}.json",
                lambda o=Path(args.output) / where, v=variant, s=settings: run_cell(o, v, s),
            )
            table(args.rows, Path(args.output), Path(args.table))  # after each cell: partial is kept
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
