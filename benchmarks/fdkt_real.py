"""FDKT on real data: three clients (SST-2 movie reviews, TweetEval tweets, AG News), several seeds.

Reads recipes/real/fdkt_sentiment.yaml (skips when ../shared/data is absent). Per seed:
- local only: each client's task model on its 200 private records;
- FDKT at every epsilon of the recipe: the recipe's own steps (`lmkit.fdkt.protocol`);
- ablations at epsilon 8, on the same DP synthetic data as FDKT at epsilon 8 (synthesis runs once
  per seed and epsilon, so the ablations differ from FDKT only in the server step): the server
  writes from the domain description alone (no demonstrations); the DP demonstrations go back
  unchanged (no server step); no clustering.
Accuracy on each client's held-out test set, mean with a 95% t-interval over seeds; the canary audit
of the movies client (100 planted vs 100 fresh canaries) at each epsilon.

    python benchmarks/fdkt_real.py [--seeds 0 1 2 3 4] [--epsilons 8] [--report-only]

Cost on 2 CPU cores (2026-12-03, seed 0): measured, local only ~9 minutes and epsilon 1 ~30
minutes (DP synthesis and the audit ~14, the server step and three client trainings ~16);
estimated, each ablation ~15 minutes: about 3 hours a seed. Finished stages under --output are
reused, and each finished cell's numbers (accuracies, audit, epsilon spent) are committed under
evals/results/raw/fdkt_real/seed<S>/, so a later run on a fresh machine adds the missing cells
instead of redoing the finished ones; `--report-only` rebuilds the table from those cells alone.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from real_data import DATA, LEDGER, ROOT, bench_parser, ledgered, machine, missing
from scipy import stats

from lmkit.fdkt.config import FDKTConfig
from lmkit.fdkt.privacy import ClientPrivacy
from lmkit.fdkt.protocol import (
    client_reports,
    client_synthesize,
    client_train,
    private_data,
    server_augment,
)
from lmkit.fdkt.server import LocalLLM, server_embedder
from lmkit.io import write_json_atomic
from lmkit.recipes import load_recipe
from lmkit.report import markdown_table, write_report, write_table

RECIPE = ROOT / "recipes" / "real" / "fdkt_sentiment.yaml"
PLANNED_SEEDS = [0, 1, 2, 3, 4]
ABLATION_EPSILON = 8.0
ABLATIONS: dict[str, dict[str, Any]] = {  # row label -> server_step settings
    "FDKT": {},
    "ablation: from the domain description only": {"mode": "describe_only"},
    "ablation: DP synthetic data only (no server step)": {"mode": "pass_through"},
    "ablation: no clustering": {"cluster": False},
}
AUDIT = ["secret_exposed", "secret_5gram_exposed", "membership_auc", "tpr_at_1pct_fpr", "tpr_at_10pct_fpr"]


def cached(path: Path, compute: Callable[[], Any]) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    write_json_atomic(path, result)
    return result


def synthesize(config: FDKTConfig, stage: Path) -> list[dict]:
    """Every client's DP synthetic payload at this stage's epsilon."""
    return [client_synthesize(config, p, ClientPrivacy(), 0, stage)[0] for p in range(len(config.clients))]


def label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def train_all(config: FDKTConfig, augmented: dict[int, list[dict]], out: Path) -> dict[str, Any]:
    for partition in range(len(config.clients)):
        client_train(config, partition, augmented.get(partition, []), out)
    return client_reports(config, out)


def variant_dir(step: dict[str, Any]) -> str:
    """A server-step variant's folder (and ledger file) name: 'fdkt', or its settings."""
    return "fdkt" if not step else "_".join(f"{k}-{v}" for k, v in step.items())


def variants_at(epsilon: float) -> dict[str, dict[str, Any]]:
    """The server-step variants run at this epsilon: the ablations at ABLATION_EPSILON, else FDKT."""
    return ABLATIONS if epsilon == ABLATION_EPSILON else {"FDKT": {}}


def row_name(name: str, epsilon: float) -> str:
    if name == "FDKT":
        return f"FDKT, epsilon {label(epsilon)}"
    return f"{name} (epsilon {label(epsilon)})"


MAJORITY = "majority class (always the test set's most common label)"


def majority_row(config: FDKTConfig) -> dict[str, float]:
    """Each client's constant-predictor accuracy on its test set: no training, read from the data.
    A model near it (see `predicted_share` in a client's metrics) has learned no task."""
    out = {}
    for partition, client in enumerate(config.clients):
        labels = [r["label"] for r in private_data(config, partition).test]
        out[client.name] = round(max(map(labels.count, set(labels))) / len(labels), 4)
    return out


def row_order(epsilons: list[float]) -> list[str]:
    """Every row the table can have, in the order it prints them."""
    names = [MAJORITY, "local only"]
    for epsilon in epsilons:
        variants = variants_at(epsilon)
        names += [row_name(name, epsilon) for name in variants]
    return names


def ledger_seeds() -> list[int]:
    """Seeds with at least one cell in the ledger, whichever run (or machine) measured them."""
    folders = (LEDGER / "fdkt_real").glob("seed*")
    return sorted(
        int(f.name[4:]) for f in folders if f.is_dir() and f.name[4:].isdigit() and any(f.iterdir())
    )


def one_seed(
    config: FDKTConfig,
    epsilons: list[float],
    out: Path,
    llm,
    embed,
    measure: bool = True,
    measure_at: Collection[float] | None = None,
) -> dict[str, Any]:
    """{row: {client: accuracy}}, plus the audit and epsilon spent per epsilon. With `measure`
    off, only the cells already in the ledger (the rest are left out, nothing runs); `measure_at`
    limits the measuring to those epsilons (unset: all)."""
    kept = LEDGER / "fdkt_real" / out.name  # small per-cell numbers, committed (see real_data.ledgered)

    def cell(name: str, compute: Callable[[], dict[str, Any]], now: bool = measure) -> dict[str, Any] | None:
        return ledgered(kept / name, compute) if now or (kept / name).is_file() else None

    local = cell("local.json", lambda: train_all(config, {}, out / "local_only"))
    rows = {MAJORITY: majority_row(config)} if DATA.is_dir() else {}
    if local:
        rows["local only"] = {client: r["accuracy"] for client, r in local.items()}
    audits, spent = {}, {}
    for epsilon in epsilons:
        now = measure and (measure_at is None or epsilon in measure_at)
        at = config.model_copy(update={"dp": config.dp.model_copy(update={"epsilon": epsilon})})
        stage = out / f"eps_{label(epsilon)}"

        def privacy(c: FDKTConfig = at, s: Path = stage) -> dict[str, Any]:
            payloads = cached(s / "payloads.json", lambda: synthesize(c, s))
            audit = client_reports(c, s)[c.clients[0].name].get("audit", {})
            return {"audit": audit, "epsilon_spent": payloads[0]["epsilon"]}

        synthesis = cell(f"eps_{label(epsilon)}_privacy.json", privacy, now)
        if synthesis:
            audits[label(epsilon)], spent[label(epsilon)] = synthesis["audit"], synthesis["epsilon_spent"]
        variants = variants_at(epsilon)
        for name, step in variants.items():
            variant = at.model_copy(update={"server_step": at.server_step.model_copy(update=step)})
            where = stage / variant_dir(step)

            def federate(c: FDKTConfig = variant, w: Path = where, s: Path = stage) -> dict:
                augmented, counts = {}, {}
                for p, payload in enumerate(cached(s / "payloads.json", lambda: synthesize(c, s))):
                    augmented[p], counts[payload["client"]] = server_augment(c, payload, llm, embed, c.seed)
                return {"reports": train_all(c, augmented, w), "server": counts}

            result = cell(f"eps_{label(epsilon)}_{where.name}.json", federate, now)
            if result:
                rows[row_name(name, epsilon)] = {c: r["accuracy"] for c, r in result["reports"].items()} | {
                    "_server": result["server"]
                }
    return {"rows": rows, "audit": audits, "epsilon_spent": spent}


def interval(values: list[float]) -> str:
    """mean [95% t-interval] over seeds."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def main() -> int:
    parser = bench_parser(__doc__, "fdkt_real", seeds=PLANNED_SEEDS)
    parser.add_argument(
        "--report-only", action="store_true", help="measure nothing: the table from the ledger's cells"
    )
    parser.add_argument(
        "--epsilons",
        type=float,
        nargs="+",
        help="measure only these of the recipe's epsilons this run (e.g. 8: FDKT and the ablations), "
        "plus local-only if not ledgered yet; the table still shows every ledgered cell",
    )
    args = parser.parse_args()
    if not args.report_only and missing():
        return 0
    planned = load_recipe(RECIPE).epsilons
    if args.epsilons and not set(args.epsilons) <= set(planned):
        parser.error(f"--epsilons {args.epsilons}: the recipe's epsilons are {planned}")
    measured = [] if args.report_only else args.seeds
    seeds = sorted(set(measured) | set(ledger_seeds()))  # earlier runs' seeds are read back, not rerun
    if not seeds:
        print("nothing to report: the ledger (evals/results/raw/fdkt_real/) is empty; drop --report-only")
        return 2
    per_seed, llm, embed = {}, None, None
    for seed in seeds:
        recipe = load_recipe(RECIPE, [f"seed={seed}"])
        config = recipe.fdkt.model_copy(update={"seed": seed})
        if llm is None and seed in measured:
            llm = LocalLLM(config.server)
            embed = server_embedder(config.server, llm)
        out = Path(args.output) / f"seed{seed}"
        per_seed[seed] = one_seed(
            config, recipe.epsilons, out, llm, embed, measure=seed in measured, measure_at=args.epsilons
        )
    clients = [c.name for c in config.clients]
    headers = ["setup", *clients, "mean over clients", "seeds"]
    table = []
    for row in row_order(recipe.epsilons):
        runs = [per_seed[s]["rows"][row] for s in seeds if row in per_seed[s]["rows"]]
        if not runs:
            table.append([row, *["not run yet"] * (len(clients) + 1), 0])
            continue
        means = [statistics.mean(r[c] for c in clients) for r in runs]
        table.append([row, *(interval([r[c] for r in runs]) for c in clients), interval(means), len(runs)])
    audit_rows = []
    for eps in map(label, recipe.epsilons):
        audited = [per_seed[s]["audit"][eps] for s in seeds if eps in per_seed[s]["audit"]]
        if audited:
            spent_at = [per_seed[s]["epsilon_spent"][eps] for s in seeds if eps in per_seed[s]["audit"]]
            audit_rows.append(
                [
                    f"{eps} (spent {interval(spent_at)})",
                    *(interval([a[k] for a in audited]) for k in AUDIT),
                    len(audited),
                ]
            )
    complete = sum(
        len(per_seed[s]["rows"]) == len(table) and len(per_seed[s]["audit"]) == len(recipe.epsilons)
        for s in seeds
        if s in PLANNED_SEEDS
    )
    title = "FDKT on real data: accuracy per client" + (
        f" (PARTIAL: {complete} of {len(PLANNED_SEEDS)} seeds complete)"
        if complete < len(PLANNED_SEEDS)
        else ""
    )
    named = " ".join(map(str, seeds))
    notes = [
        (
            "table rebuilt from the ledger alone (`python benchmarks/fdkt_real.py --report-only`); the "
            f"cells were measured by `python benchmarks/fdkt_real.py --seeds {named}`"
            if args.report_only
            else f"command: `python benchmarks/fdkt_real.py --seeds {named}`"
        )
        + "; cells already in the ledger (evals/results/raw/fdkt_real/seed<S>/) are read back, not "
        "rerun; recipe recipes/real/fdkt_sentiment.yaml",
        "clients (../shared/data), 200 private training records each (a seeded sample per seed): movies = "
        "sst2_train_5k.jsonl, tested on all 872 rows of sst2_dev.jsonl; tweets = tweeteval_sentiment_val"
        ".jsonl with neutral dropped, tested on 500 rows of tweeteval_sentiment_test.jsonl (neutral "
        "dropped); news = ag_news_test.jsonl (4 topics), tested on 500 of the 20% held out of it",
        "models: client generator SmolLM2-135M + LoRA r8, DP-SGD (Opacus, PRV accountant, OS-entropy RNG, "
        "delta 1e-4, 2 epochs, batch 16); server LLM SmolLM2-135M, all 30 layers, in-process, sampling "
        "at temperature 0.8 / top_p 0.9, KMeans per label on its mean-pooled states (4 per cluster); "
        "client task model: the first 4 SmolLM2 layers + a linear head, early stopping on 15% of its "
        "training rows (max 300 steps)",
        "each client sends 32 DP synthetic samples per label; the server returns up to 32 augmented "
        "samples per label; ablations reuse the epsilon-8 synthetic data of the same seed when it is "
        "still under --output (runs/ is not kept: a cell measured on another machine synthesized anew, "
        "a fresh DP draw)",
        f"accuracy: mean [95% t-interval] over the seeds that measured the row (of {named}; the "
        "'seeds' column counts them); 'mean over clients' averages the three clients per seed first",
        f"machine: {machine()}",
    ]
    audit_notes = [
        "audit: the movies client holds 100 canaries (one of its records' first 20 words + a random "
        "10-character secret, planted once) and 100 fresh ones built the same way; exposure = share "
        "of secrets (or of any 5-character run) found in the synthetic data it sent; membership = "
        "loss-based test on its DP generator; TPR at 1% / 10% FPR",
    ]
    results = {"per_seed": per_seed, "table": table, "audit": audit_rows}
    write_report(Path(args.output) / "report", title, results, headers, table, notes)
    summary = (Path(args.output) / "report" / "summary.md").read_text()
    audit_md = markdown_table(["epsilon (target)", *AUDIT, "seeds"], audit_rows)
    write_table(
        Path(args.table),
        summary
        + "\n## Privacy audit\n\n"
        + audit_md
        + "\n\n"
        + "\n".join(f"- {n}" for n in audit_notes)
        + "\n",
    )
    print(f"table: {args.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
