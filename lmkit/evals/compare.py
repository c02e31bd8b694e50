"""`lmkit compare RUN_DIR ...`: eval runs side by side (e.g. fp32 vs nf4, base vs adapter)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmkit.errors import LmkitError
from lmkit.evals.plots import quality_bars
from lmkit.report import write_report


def _load(run: Path) -> dict[str, Any]:
    path = run / "results.json"
    if not path.is_file():
        raise LmkitError(f"{run} has no results.json. Fix: pass output directories of `lmkit eval` runs.")
    results = json.loads(path.read_text())
    if "rows" not in results:
        raise LmkitError(f"{path} is not an lmkit eval result (no 'rows').")
    return results


def compare_runs(runs: list[Path], output_dir: Path) -> dict[str, Any]:
    loaded = {run.name: _load(run) for run in runs}
    if len(loaded) != len(runs):
        raise LmkitError("Runs to compare need distinct directory names (they label the columns).")
    keys: list[tuple[str, str, str]] = []
    values: dict[str, dict[tuple[str, str, str], Any]] = {}
    for name, results in loaded.items():
        values[name] = {}
        for section, item, metric, value in results["rows"]:
            key = (section, item, metric)
            if key not in keys:
                keys.append(key)
            values[name][key] = value
    headers = ["section", "name", "metric", *loaded]
    rows = [[*key, *(values[name].get(key, "-") for name in loaded)] for key in keys]
    comparison = {
        "runs": {name: str(run) for name, run in zip(loaded, runs, strict=True)},
        "targets": {name: r["target"] for name, r in loaded.items()},
        "rows": rows,
        "headers": headers,
    }
    write_report(
        output_dir,
        "lmkit compare: " + " vs ".join(loaded),
        comparison,
        headers,
        rows,
        [f"{name}: {r['target']}" for name, r in loaded.items()],
    )
    quality = [k for k in keys if k[0] == "quality"]
    quality_bars(
        output_dir / "compare_quality.png",
        "Quality by run",
        [(k[1], k[2]) for k in quality],
        {name: [float(values[name].get(k, 0) or 0) for k in quality] for name in loaded},
    )
    return comparison
