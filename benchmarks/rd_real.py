"""Reprogramming distillation on real data: SST-2 and AG News at several training sizes and seeds,
against the baselines that could beat it, with ablations.

Reads ../shared/data through recipes/real/rd_{sst2,ag_news}.yaml (skips when the folder is absent).
Per dataset, size and seed, the frozen teacher's side is prepared once (features cached per split
under --output/teacher_cache, so the fixed SST-2 dev set is encoded once), then every row trains on
the same rows until its validation loss stops improving:
teacher probe, student alone, logit KD, feature MSE (FitNet), RD, and RD without CKA / without the
hybrid CE / without the agreement KL / with the joint (not detached) CKA target. On request
(--rows), the truncated-SmolLM2 student (the teacher's first 4 layers) alone, with logit KD and RD.

    python benchmarks/rd_real.py [--datasets sst2 ag_news] [--sizes 64 256 1000] [--seeds 0 1 2]

Finished rows are reused (one JSON per row under --output), so the grid can be run in parts.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from real_data import DATA, ROOT, bench_parser, machine, mean_sd, missing

from lmkit.rd.recipe import student_cost, train_probe, train_student
from lmkit.rd.teacher import prepare
from lmkit.recipes import load_recipe
from lmkit.report import write_report, write_table

DATASETS = {
    "sst2": ("rd_sst2.yaml", ["sst2_train_5k.jsonl"], {"eval.source": "sst2_dev.jsonl"}),
    "ag_news": ("rd_ag_news.yaml", ["ag_news_test.jsonl"], {}),
}
# The teacher's own first 4 layers as the student (pretrained, same tokenizer), fine-tuned at a
# fine-tuning learning rate: the student a user gets by truncating instead of training from scratch.
TRUNCATED = ({"scratch": None, "num_layers": 4}, {"lr": 2.0e-4})
ROWS: dict[str, tuple[str, dict[str, Any], tuple[dict[str, Any], dict[str, Any]] | None]] = {
    # row label -> (variant, rd overrides, (student, train) overrides or None: the recipe's student)
    "teacher probe": ("teacher_probe", {}, None),
    "student alone": ("student_ce", {}, None),
    "logit KD": ("logit_kd", {}, None),
    "feature MSE (FitNet)": ("feature_mse", {}, None),
    "RD": ("rd", {}, None),
    "RD without CKA": ("rd", {"cka_weight": 0.0}, None),
    "RD without hybrid CE": ("rd", {"hybrid_weight": 0.0}, None),
    "RD without agreement KL": ("rd", {"agreement_weight": 0.0}, None),
    "RD, joint CKA target": ("rd", {"cka_target": "joint"}, None),
    "truncated SmolLM2 student alone": ("student_ce", {}, TRUNCATED),
    "truncated SmolLM2 student, logit KD": ("logit_kd", {}, TRUNCATED),
    "truncated SmolLM2 student, RD": ("rd", {}, TRUNCATED),
}
DEFAULT_ROWS = [label for label, (_, _, student) in ROWS.items() if student is None]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def run_cell(dataset: str, size: int, seed: int, output: Path, rows: list[str]) -> dict[str, Any]:
    """Every row for one (dataset, size, seed); a dict row -> {accuracy, steps, ...}."""
    recipe_file, files, evals = DATASETS[dataset]
    cell = output / dataset / f"n{size}-seed{seed}"
    overrides = [f"data.sources[0].source={DATA / files[0]}", f"data.sources[0].limit={size}"]
    overrides += [f"data.sources[0].{key}={DATA / name}" for key, name in evals.items()]
    overrides += [f"seed={seed}", f"output_dir={cell}", f"rd.teacher_cache_dir={output / 'teacher_cache'}"]
    recipe = load_recipe(ROOT / "recipes" / "real" / recipe_file, overrides)
    done = {label: cell / "rows" / f"{_slug(label)}.json" for label in rows}
    if all(path.is_file() for path in done.values()):
        return {label: json.loads(path.read_text()) for label, path in done.items()}
    setup = prepare(recipe)
    cell_info = {
        "teacher_layer": setup.layer_choice.as_dict() if setup.layer_choice else None,
        "train_rows": len(setup.texts["train"]),
        "eval_rows": len(setup.texts["eval"]),
        "teacher_params": setup.teacher_params,
        "teacher_latency_seconds": setup.teacher_seconds,
    }
    probe, probe_accuracy, probe_stats = train_probe(recipe, setup, resume=True)
    out: dict[str, Any] = {}
    for label in rows:
        if done[label].is_file():
            out[label] = json.loads(done[label].read_text())
            continue
        variant, changes, student = ROWS[label]
        if variant == "teacher_probe":
            accuracy, stats, extra = probe_accuracy, probe_stats, {}
        else:
            update = {"rd": recipe.rd.model_copy(update=changes), "output_dir": cell / _slug(label)}
            if student is not None:
                update["student"] = recipe.student.model_copy(update=student[0])
                update["train"] = recipe.train.model_copy(update=student[1])
            row_recipe = recipe.model_copy(update=update)
            model, tokenizer, accuracy, stats = train_student(row_recipe, setup, variant, probe, resume=True)
            cost = student_cost(recipe, setup, model, tokenizer)
            extra = {"student_params": cost["params"], "student_latency_seconds": cost["seconds"]}
        out[label] = {"accuracy": accuracy, **stats, **extra, **cell_info}
        done[label].parent.mkdir(parents=True, exist_ok=True)
        done[label].write_text(json.dumps(out[label], indent=1))
        print(
            f"{dataset} n={size} seed={seed} {label}: {accuracy:.4f} ({stats.get('steps')} steps)", flush=True
        )
    return out


def main() -> int:
    parser = bench_parser(__doc__, "rd_real", seeds=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1000])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    args = parser.parse_args()
    if missing():
        return 0
    output = Path(args.output)
    results: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for dataset in args.datasets:
        for size in args.sizes:
            for seed in args.seeds:
                cell = run_cell(dataset, size, seed, output, args.rows)
                results.setdefault(dataset, {}).setdefault(size, []).append(cell)
    report(args, results)
    return 0


def report(args: argparse.Namespace, results: dict[str, dict[int, list[dict[str, Any]]]]) -> None:
    output = Path(args.output)
    headers = ["dataset", "row", *(f"n={size}" for size in args.sizes), "steps (mean, per size)"]
    table, notes = [], []
    for dataset, per_size in results.items():
        for label in args.rows:
            cells = [[c[label] for c in per_size.get(size, [])] for size in args.sizes]
            steps = " / ".join(
                f"{statistics.mean(r['steps'] for r in runs):.0f}" if runs else "-" for runs in cells
            )
            table.append([dataset, label, *(mean_sd([r["accuracy"] for r in runs]) for runs in cells), steps])
        any_cell = next(iter(per_size.values()))[0]
        first = next(iter(any_cell.values()))  # every row carries its cell's facts
        student = next((v for v in any_cell.values() if "student_params" in v), None)
        layers = sorted(
            {
                "{layer}/{pooling}".format(**row["teacher_layer"])
                for runs in per_size.values()
                for cell in runs
                for row in cell.values()
                if row.get("teacher_layer")
            }
        )
        facts = [f"{dataset}: {first['eval_rows']} eval rows"]
        if student:
            facts.append(
                f"student/teacher parameters {student['student_params'] / student['teacher_params']:.3f}, "
                "latency (fp32 forward) "
                f"{student['student_latency_seconds'] / student['teacher_latency_seconds']:.3f}"
            )
        facts.append(f"teacher layer/pooling chosen by the probe sweep: {', '.join(layers) or '-'}")
        notes.append("; ".join(facts))
    command = (
        f"python benchmarks/rd_real.py --datasets {' '.join(args.datasets)} --sizes "
        f"{' '.join(map(str, args.sizes))} --seeds {' '.join(map(str, args.seeds))}"
    )
    if args.rows != DEFAULT_ROWS:
        command += " --rows " + " ".join(f'"{label}"' for label in args.rows)
    notes = [
        f"command: `{command}`; recipes recipes/real/rd_sst2.yaml and rd_ag_news.yaml",
        "teacher: frozen SmolLM2-135M-Instruct (fp32), layer and pooling chosen per run by a ridge probe "
        "on the validation split; student: random-init 4-layer Llama, width 256, SmolLM2's tokenizer",
        "data (../shared/data): n seeded training rows (20% of them the early-stopping validation "
        "split); eval: SST-2 dev (all 872), AG News held-out rows (1,000 sampled per seed)",
        f"accuracy, mean ± sd over seeds {args.seeds}; every row trained until its validation loss "
        "(student CE) stopped improving (patience 5 x 10 steps, cap 1,500)",
        *notes,
        f"machine: {machine()}",
    ]
    write_report(
        output / "report",
        "Reprogramming distillation on real data: accuracy",
        {"rows": table},
        headers,
        table,
        notes,
    )
    write_table(Path(args.table), (output / "report" / "summary.md").read_text())


if __name__ == "__main__":
    raise SystemExit(main())
