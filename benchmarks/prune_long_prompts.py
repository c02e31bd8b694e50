"""Long-prompt pruning on real inputs: a BoolQ passage or an AG News article hidden among distractors.

Each prompt is one target document among others of its kind (other BoolQ passages, other AG News
articles), shuffled, to about --lengths tokens, then a question only the target answers:
- BoolQ: "Question: <question>? Answer yes or no."
- AG News: 'What is the topic of the article "<title>"? Answer world, sports, business or technology.'
Half the prompts are of each kind, interleaved. Answers are chosen by the next-token logit of the
label words after the chat-formatted prompt (`answer: choose`), one prefill per prompt.

Cells (each a pruning config at one length) go to evals/results/raw/prune_long_prompts/, committed,
so the table grows across machines; prefill timing is one interleaved run per length (--timing).

    python benchmarks/prune_long_prompts.py [--lengths 2048 1024 4096] [--keeps 0.5 0.75 0.25]
        [--prompts 200] [--scorer-layers 8 4 2] [--sweep] [--timing]
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import statistics
from pathlib import Path
from typing import Any

from real_data import DATA, LEDGER, ROOT, bench_parser, ledgered, machine, missing

from lmkit.loader import AdapterSpec, ModelSpec, load_model
from lmkit.pruning.text import TextPruneConfig
from lmkit.pruning.text_recipe import measure_cells, time_cells
from lmkit.recipes import load_recipe, run_recipe
from lmkit.report import markdown_table, write_report, write_table

TOPICS = {1: "world", 2: "sports", 3: "business", 4: "technology"}
TRAIN_ROWS = 600  # per source, for the task model; the prompts ask about the other rows only
TOPIC_CHOICES = "Answer world, sports, business or technology."
KEPT = LEDGER / "prune_long_prompts"


def documents() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per source, {"train": rows the task model learns from, "test": rows the prompts ask about},
    a seeded split (BoolQ and AG News have one usable split each here)."""
    read = lambda name: [json.loads(line) for line in (DATA / name).open()]  # noqa: E731
    boolq = [
        {
            "doc": r["passage"],
            "question": f"Question: {r['question']}? Answer yes or no.",
            "target": "yes" if r["answer"] in (True, "True") else "no",
        }
        for r in read("boolq_eraser_val.jsonl")
    ]
    news = [
        {
            "doc": r["text"],
            "question": f'What is the topic of the article "{r["title"]}"? {TOPIC_CHOICES}',
            "target": TOPICS[int(r["label"])],
        }
        for r in read("ag_news_test.jsonl")
    ]
    split = {}
    for name, rows in [("boolq", boolq), ("ag_news", news)]:
        random.Random(f"split-{name}").shuffle(rows)
        split[name] = {"train": rows[:TRAIN_ROWS], "test": rows[TRAIN_ROWS:]}
    return split


def build_prompts(tokenizer, length: int, count: int, seed: int) -> list[dict[str, Any]]:
    """`count` prompts of about `length` tokens, alternating BoolQ and AG News, seeded."""
    rng = random.Random(f"{seed}-{length}")
    pools = documents()
    sizes: dict[str, int] = {}

    def tokens(text: str) -> int:
        if text not in sizes:
            sizes[text] = len(tokenizer(text, add_special_tokens=False).input_ids) + 1
        return sizes[text]

    prompts = []
    for i in range(count):
        task = ["boolq", "ag_news"][i % 2]
        pool = pools[task]["test"]
        target = rng.choice(pool)
        docs, total = [target["doc"]], tokens(target["doc"]) + tokens(target["question"]) + 30
        while total < length:
            other = rng.choice(pool)
            if other["doc"] not in docs:
                docs.append(other["doc"])
                total += tokens(other["doc"])
        rng.shuffle(docs)
        prompts.append(
            {
                "task": task,
                "input": "\n\n".join(docs) + "\n\n" + target["question"],
                "target": target["target"],
            }
        )
    return prompts


def training_rows(count: int, seed: int) -> list[dict[str, str]]:
    """The task model's data: a target document alone or with one distractor, then its question."""
    rng = random.Random(f"train-{seed}")
    pools = documents()
    rows = []
    for i in range(count):
        pool = pools[["boolq", "ag_news"][i % 2]]["train"]
        target = rng.choice(pool)
        docs = [target["doc"]] + ([rng.choice(pool)["doc"]] if rng.random() < 0.5 else [])
        rng.shuffle(docs)
        rows.append({"input": "\n\n".join(docs) + "\n\n" + target["question"], "target": target["target"]})
    return rows


def task_model(output: Path) -> Path:
    """A LoRA that does the two tasks (SmolLM2-135M zero-shot answers 'world' to every article), so
    pruning is judged on a model whose answers depend on the document. Trained once with lmkit's
    lora recipe and kept (1.8 MB) with the cells measured on it."""
    kept = KEPT / "task_adapter"
    if (kept / "adapter_model.safetensors").is_file():
        return kept
    data = output / "task_model_data"
    data.mkdir(parents=True, exist_ok=True)
    rows = training_rows(TRAIN_ROWS * 2 + 200, seed=0)
    for name, part in [("train", rows[:-200]), ("eval", rows[-200:])]:
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    recipe = load_recipe(
        ROOT / "recipes" / "real" / "lora_long_prompts.yaml",
        [
            f"data.sources[0].source={data / 'train.jsonl'}",
            f"data.sources[0].eval.source={data / 'eval.jsonl'}",
            f"output_dir={output / 'task_model'}",
        ],
    )
    results = run_recipe(recipe, resume=True)
    shutil.copytree(Path(results["adapter"]), kept)
    about = {"training": results["training"], "exact_match_on_200_short_rows": results["exact_match_adapted"]}
    (kept / "training.json").write_text(json.dumps(about, indent=1) + "\n")
    return kept


def fingerprint(prompts: list[dict[str, Any]]) -> str:
    return hashlib.sha256("\x00".join(p["input"] for p in prompts).encode()).hexdigest()[:16]


def configs(keeps: list[float], scorer_layers: list[int]) -> dict[str, TextPruneConfig]:
    """Named configs, unpruned first, then each method at each keep ratio."""
    base = TextPruneConfig(seed=0)
    out = {"unpruned": base.model_copy(update={"method": "none", "keep": 1.0})}
    for keep in keeps:
        for layers in scorer_layers:
            out[f"two-stage, {layers} scoring layers@{keep}"] = base.model_copy(
                update={"keep": keep, "score_layers": layers}
            )
        out[f"random@{keep}"] = base.model_copy(update={"method": "random", "keep": keep})
        out[f"uniform@{keep}"] = base.model_copy(update={"method": "uniform", "keep": keep})
    return out


def sweep_configs() -> dict[str, TextPruneConfig]:
    """One factor at a time around the default (8 layers, pivotal 0.5, pool 5), at keep 0.5."""
    base = TextPruneConfig(seed=0, keep=0.5)
    grid = [{"score_layers": n} for n in [1, 2, 4, 8, 16]]
    grid += [{"pivotal_fraction": f} for f in [0.0, 0.25, 0.75, 1.0]]
    grid += [{"pool": w} for w in [1, 3, 9]]
    out = {"unpruned": base.model_copy(update={"method": "none", "keep": 1.0})}
    for change in grid:
        name = ", ".join(f"{k} {v}" for k, v in change.items())
        out[f"sweep: {name}@0.5"] = base.model_copy(update=change)
    return out


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def measure(
    model, tokenizer, prompts, adapter: str, name: str, config: TextPruneConfig, where: Path
) -> dict[str, Any]:
    """One cell (kept in the ledger): answers per prompt, accuracy, mean prompt tokens."""
    stamp = f"{fingerprint(prompts)}-{adapter}"  # the prompts and the task model it was measured on

    def compute() -> dict[str, Any]:
        cell = measure_cells(model, tokenizer, prompts, {name: config}, "choose")[name]
        del cell["answer_match"]  # against itself; the table compares with the unpruned cell
        return cell | {"prompts": stamp, "config": config.model_dump()}

    cell = ledgered(where / f"{slug(name)}.json", compute)
    if cell["prompts"] != stamp:
        raise SystemExit(
            f"{where / slug(name)}.json was measured on other prompts or another task model; delete it to "
            "measure it again."
        )
    return cell


def table_rows(
    cells: dict[str, dict[str, Any]], prompts: list[dict[str, Any]], timing: dict[str, float]
) -> list[list[Any]]:
    reference = cells["unpruned"]["answers"]
    rows = []
    for name, cell in cells.items():
        by_task = {
            task: statistics.mean(
                a == p["target"] for a, p in zip(cell["answers"], prompts, strict=True) if p["task"] == task
            )
            for task in ["boolq", "ag_news"]
        }
        same = statistics.mean(a == b for a, b in zip(cell["answers"], reference, strict=True))
        speedup = (
            round(timing["unpruned"] / timing[name], 2) if name in timing and "unpruned" in timing else "-"
        )
        method, _, keep = name.rpartition("@") if "@" in name else (name, "", "1.0")
        rows.append(
            [
                method,
                keep,
                cell["prompt_tokens"],
                f"{cell['accuracy']:.3f}",
                f"{by_task['boolq']:.3f}",
                f"{by_task['ag_news']:.3f}",
                f"{same:.3f}",
                speedup,
            ]
        )
    return rows


HEADERS = [
    "method",
    "keep",
    "prompt tokens",
    "accuracy",
    "BoolQ",
    "AG News",
    "same answer as unpruned",
    "prefill speed-up",
]


def main() -> int:
    parser = bench_parser(__doc__, "prune_long_prompts")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 1024, 4096])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.75, 0.25])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument(
        "--scorer-layers", type=int, nargs="+", default=[8, 4, 2], help="two-stage rows: layers read to score"
    )
    parser.add_argument("--sweep", action="store_true", help="the scorer sweep at 2,048 tokens, keep 0.5")
    parser.add_argument("--sweep-prompts", type=int, default=100)
    parser.add_argument("--timing", action="store_true", help="time every config side by side per length")
    parser.add_argument("--timing-prompts", type=int, default=4)
    parser.add_argument("--timing-repeats", type=int, default=3)
    args = parser.parse_args()
    if missing():
        return 0
    adapter = task_model(Path(args.output))
    spec = ModelSpec(
        source="smollm2-135m", dtype="float32", adapters=[AdapterSpec(name="task", path=adapter)]
    )
    loaded = load_model(spec)
    model, tokenizer = loaded.model.merge_and_unload(), loaded.tokenizer  # merged, as a user serves it
    stamp = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
    runs = [
        (f"{n} tokens", n, 0, args.prompts, configs(args.keeps, args.scorer_layers)) for n in args.lengths
    ]
    if args.sweep:  # on its own prompts (seed 1), so the sweep does not tune on the table's prompts
        runs.append(("scorer sweep, 2048 tokens", 2048, 1, args.sweep_prompts, sweep_configs()))
    sections = []
    for title, length, seed, count, named in runs:
        prompts = build_prompts(tokenizer, length, count, seed)
        where = KEPT / f"{length}_seed{seed}_{count}"
        # the keep-0.5 cells first: they answer the headline question soonest
        order = sorted(named, key=lambda n: (n != "unpruned", not n.endswith("@0.5")))
        cells = {name: measure(model, tokenizer, prompts, stamp, name, named[name], where) for name in order}
        timing_file = where / "timing.json"
        if args.timing:
            timed = [p["input"] for p in prompts[: args.timing_prompts]]
            seconds = time_cells(model, tokenizer, timed, {n: named[n] for n in order}, args.timing_repeats)
            timing_file.write_text(json.dumps(seconds, indent=1) + "\n")
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        rows = table_rows({n: cells[n] for n in named}, prompts, timing)
        sections.append((title, count, rows))
    about = json.dumps(json.loads((adapter / "training.json").read_text()))
    notes = [
        "command: `python benchmarks/prune_long_prompts.py "
        f"--lengths {' '.join(map(str, args.lengths))} --keeps {' '.join(map(str, args.keeps))} --prompts "
        f"{args.prompts} --scorer-layers {' '.join(map(str, args.scorer_layers))}"
        f"{' --sweep' if args.sweep else ''} --timing`; "
        "cells kept in evals/results/raw/prune_long_prompts/<length>_seed<S>_<prompts>/",
        "model: SmolLM2-135M-Instruct (embedded, float32, transformers, chat template) + the task LoRA "
        "(r8 on q/v, merged; recipes/real/lora_long_prompts.yaml) trained on 1,200 prompts of one "
        "document alone or beside one distractor, from rows the long prompts never ask about; its "
        f"training and short-prompt accuracy: {about}",
        "pruned: the context (all documents); the template and the question never are",
        "data (../shared/data): BoolQ passages (boolq_eraser_val.jsonl) and AG News articles "
        "(ag_news_test.jsonl), half the prompts each; each prompt is one target document among "
        "distractors of its kind, seeded per length",
        "accuracy: the label word (yes/no; world/sports/business/technology) whose first token gets the "
        "highest next-token logit equals the gold one, among all six label words (an answer of the other "
        "task's kind counts as wrong); same answer: that choice equals the unpruned one",
        "two-stage = lmkit's freePruner-style selection (pivotal: the question's attention at the scoring "
        "layer, max-pooled over 5 tokens; complementary: coverage of the hidden states; pivotal fraction "
        "0.5); random: one seeded subset per prompt; uniform: evenly spaced",
        f"prefill speed-up: unpruned prefill time / (scoring + pruned prefill) time, median of "
        f"{args.timing_repeats} interleaved rounds over the first {args.timing_prompts} prompts, one run",
        f"machine: {machine()}",
    ]
    text = "# Long-prompt pruning on real inputs (SmolLM2-135M)\n"
    for title, count, rows in sections:
        text += f"\n## {title} ({count} prompts)\n\n" + markdown_table(HEADERS, rows) + "\n"
    text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_report(
        Path(args.output), "Long-prompt pruning on real inputs", {"sections": sections}, HEADERS, [], notes
    )
    write_table(Path(args.table), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
