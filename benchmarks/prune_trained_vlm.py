"""Visual-token pruning measured on the tiny VLM trained here (recipes/train_tiny_vlm.yaml).

For each method and kept-token budget, on held-out scenes and questions:
- accuracy (first answer word = the gold word) with its 95% interval, per question kind, and
  against random at the same budget (paired difference on the same questions, 95% interval);
- agreement with the unpruned model's answer;
- recall of the asked objects' ground-truth patches among the kept tokens (questions whose answer
  is an object: not "is there a ..." answered no, not "how many" answered zero);
- methods: freePruner-style two-stage selection (positions renumbered, and kept), pivotal-only
  (pivotal_fraction 1), complementary-only (pivotal_fraction 0), random (one subset per example),
  uniform, and FastV (in the LM, prefill only: accuracy of the first answer token, no recall).

    python benchmarks/prune_trained_vlm.py [recipe overrides, e.g. seed=1] [--keeps 192 128 64 32]

(overrides before the options, or after `--`: --keeps takes every number that follows it)

Trains the model first (lmkit run recipes/train_tiny_vlm.yaml) when --model does not exist.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from real_data import machine, paired_difference, wilson
from rich.progress import track

from lmkit.loader import load_model
from lmkit.pruning.config import PruneConfig
from lmkit.pruning.llava import PrunedLlava
from lmkit.pruning.scenes import target_patches
from lmkit.pruning.tiny_vlm import prompt
from lmkit.pruning.vlm_recipe import ensure_trained, held_out
from lmkit.recipes import load_recipe
from lmkit.report import write_report, write_table

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_tiny_vlm.yaml"
VARIANTS: dict[str, dict[str, Any]] = {
    "two-stage (freePruner-style)": {"method": "freepruner_style"},
    "two-stage, positions kept": {"method": "freepruner_style", "positions": "keep"},
    "pivotal only": {"method": "freepruner_style", "pivotal_fraction": 1.0},
    "complementary only": {"method": "freepruner_style", "pivotal_fraction": 0.0},
    "random": {"method": "random"},
    "uniform": {"method": "uniform"},
    "FastV": {"method": "fastv"},
}
SHORT = ["two-stage", "two-stage-kept", "pivotal", "complementary", "random", "uniform", "fastv"]
SLUGS = dict(zip(SHORT, VARIANTS, strict=True))  # --methods names


def batches(processor, items, size: int) -> list[dict[str, torch.Tensor]]:
    processor.tokenizer.padding_side = "left"
    return [
        dict(
            processor(
                images=[s.image for s, _ in items[i : i + size]],
                text=[prompt(processor, q.text) for _, q in items[i : i + size]],
                padding=True,
                return_tensors="pt",
            )
        )
        for i in range(0, len(items), size)
    ]


def first_words(tokenizer, ids: torch.Tensor) -> list[str]:
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [(t.split() or [""])[0].strip(".,!?").lower() for t in texts]


@torch.inference_mode()
def run_cell(pruned: PrunedLlava, tokenizer, inputs: list[dict]) -> dict[str, list]:
    """Answers (first word; FastV: first token) and kept patch indices per example."""
    answers, kept = [], []
    for batch in inputs:
        if pruned.config.method == "fastv":
            answers += first_words(tokenizer, pruned.next_token_logits(**batch).argmax(-1, keepdim=True))
            continue
        if pruned.config.method != "none":
            kept += pruned.encode_images(batch["pixel_values"])[1].tolist()
        answers += first_words(tokenizer, pruned.generate(**batch, max_new_tokens=3))
    return {"answers": answers, "kept": kept}


def recall(items, kept: list[list[int]], resamples: int = 1000) -> str | None:
    """Share of the asked objects' patches among the kept tokens, over questions with a target,
    with a 95% bootstrap interval over those questions (seeded, so a rerun prints the same)."""
    hits, sizes = [], []
    for (scene, question), indices in zip(items, kept, strict=True):
        target = target_patches(scene, question)
        if target.any():
            hits.append(int(target[np.asarray(indices)].sum()))
            sizes.append(int(target.sum()))
    if not sizes:
        return None
    hits_, sizes_ = np.asarray(hits), np.asarray(sizes)
    draws = np.random.default_rng(0).integers(0, len(sizes), (resamples, len(sizes)))
    low, high = np.percentile(hits_[draws].sum(1) / sizes_[draws].sum(1), [2.5, 97.5])
    return f"{hits_.sum() / sizes_.sum():.3f} [{low:.3f}, {high:.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the training recipe")
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "tiny_vlm" / "model")
    parser.add_argument("--keeps", type=int, nargs="+", default=[192, 128, 64, 32])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(SLUGS),
        default=list(SLUGS),
        help="variants to measure (default: all); random always runs, as the paired baseline",
    )
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--fastv-layer", type=int, default=2, help="FastV's K (LM layers before the drop)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "benchmarks" / "prune_trained_vlm")
    parser.add_argument("--table", type=Path, default=ROOT / "evals" / "results" / "prune_trained_vlm.md")
    args = parser.parse_args()
    recipe = load_recipe(
        RECIPE, [*args.overrides, f"output_dir={args.model.parent}", f"vlm.eval_questions={args.questions}"]
    )
    ensure_trained(recipe, args.model)  # a model another recipe trained is refused
    loaded = load_model({"source": str(args.model), "dtype": "float32"})
    items = held_out(recipe.vlm, recipe.seed)
    inputs = batches(loaded.processor, items, args.batch_size)
    tokenizer = loaded.processor.tokenizer
    gold = [q.answer for _, q in items]
    kinds = sorted({q.kind for _, q in items})
    base = run_cell(PrunedLlava(loaded.model, PruneConfig(method="none")), tokenizer, inputs)
    available = PrunedLlava(loaded.model, PruneConfig(method="none")).available
    rows = [["unpruned", available, *score(items, base["answers"], kinds), "-", 1.0, "-"]]
    first_token = _first_token_base(loaded, inputs)
    chosen = {SLUGS[m]: VARIANTS[SLUGS[m]] for m in dict.fromkeys([*args.methods, "random"])}
    cells = {}
    for name, settings in track(chosen.items(), description="variants"):
        for keep in args.keeps:
            config = PruneConfig(keep=keep, seed=recipe.seed, fastv_layer=args.fastv_layer, **settings)
            cells[f"{name}@{keep}"] = run_cell(PrunedLlava(loaded.model, config), tokenizer, inputs)
    for name, settings in chosen.items():
        for keep in args.keeps:
            cell = cells[f"{name}@{keep}"]
            reference = base["answers"] if settings["method"] != "fastv" else first_token
            found = recall(items, cell["kept"]) if cell["kept"] else None
            versus = "-" if settings["method"] == "random" else vs(cell, cells[f"random@{keep}"], gold)
            rows.append(
                [
                    name,
                    keep,
                    *score(items, cell["answers"], kinds),
                    versus,
                    agreement(cell["answers"], reference),
                    found or "-",
                ]
            )
    notes = [
        "command: `"
        + " ".join(
            [
                "python benchmarks/prune_trained_vlm.py --keeps",
                *map(str, args.keeps),
                f"--questions {args.questions} --fastv-layer {args.fastv_layer}",
                *(["--methods", *args.methods] if args.methods != list(SLUGS) else []),
                *args.overrides,
            ]
        )
        + f"`; model {shown(args.model)} (recipes/train_tiny_vlm.yaml)",
        f"{len(items)} held-out scenes and questions (seed stream 'eval:{recipe.seed}'), {available} image "
        "tokens per image; accuracy: first answer word = gold; agreement: same first word as unpruned "
        "(FastV: first answer token, against the unpruned first token)",
        "patch recall: kept ground-truth patches of the asked objects / all of them, over the questions "
        "that have such objects, [95% bootstrap interval over those questions] (a patch belongs to an "
        "object when >= 10% of its pixels do)",
        f"machine: {machine()}",
    ]
    notes.insert(
        2,
        "accuracy [95% Wilson interval]; vs random: accuracy minus random's at the same budget on the same "
        "questions, mean ± 95% paired interval (FastV's first-token answers against random's first word)",
    )
    headers = ["method", "kept tokens", "accuracy [95% CI]", *kinds, "vs random (paired)"]
    headers += ["agreement with unpruned", "patch recall [95% CI]"]
    results = {
        "rows": rows,
        "answers": {"gold": gold, "unpruned": base["answers"]}
        | {name: cell["answers"] for name, cell in cells.items()},
        "kept": {name: cell["kept"] for name, cell in cells.items() if cell["kept"]},
    }
    write_report(args.output, "Token pruning on the tiny VLM trained here", results, headers, rows, notes)
    write_table(args.table, (args.output / "summary.md").read_text())
    return 0


def shown(path: Path) -> str:
    """A path as a table prints it: relative to the project when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def score(items, answers: list[str], kinds: list[str]) -> list[str | float]:
    """Accuracy with its interval, then accuracy per question kind."""
    correct = hits(answers, [q.answer for _, q in items])
    low, high = wilson(sum(correct) / len(correct), len(correct))
    per_kind = [
        round(statistics.mean(c for c, (_, q) in zip(correct, items, strict=True) if q.kind == kind), 3)
        for kind in kinds
    ]
    return [f"{sum(correct) / len(correct):.3f} [{low:.3f}, {high:.3f}]", *per_kind]


def vs(cell: dict[str, list], random_cell: dict[str, list], gold: list[str]) -> str:
    mean, half = paired_difference(hits(cell["answers"], gold), hits(random_cell["answers"], gold))
    return f"{mean:+.3f} ± {half:.3f}"


def hits(answers: list[str], reference: list[str]) -> list[bool]:
    """Per question: the answer equals the reference (gold words, or another config's answers)."""
    return [a == b for a, b in zip(answers, reference, strict=True)]


def agreement(answers: list[str], reference: list[str]) -> float:
    """Share of answers equal to the reference."""
    return round(sum(hits(answers, reference)) / len(reference), 4)


def _first_token_base(loaded, inputs) -> list[str]:
    unpruned = PrunedLlava(loaded.model, PruneConfig(method="none"))
    tokenizer = loaded.processor.tokenizer
    return [
        w
        for b in inputs
        for w in first_words(tokenizer, unpruned.next_token_logits(**b).argmax(-1, keepdim=True))
    ]


if __name__ == "__main__":
    raise SystemExit(main())
