"""`lmkit eval`: quality (lm-eval), speed and memory for one target, written atomically to output_dir."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import httpx

from lmkit.config import to_yaml
from lmkit.errors import LmkitError
from lmkit.evals.config import EndpointTarget, EvalSuite
from lmkit.evals.plots import lines, quality_bars
from lmkit.evals.prompting import eval_format
from lmkit.evals.quality import metric_rows, run_quality
from lmkit.evals.speed import memory_footprint, run_speed
from lmkit.io import write_dir_atomic, write_jsonl_atomic, write_text_atomic
from lmkit.loader import load_model
from lmkit.report import write_report

HEADERS = ["section", "name", "metric", "value"]


def check_endpoint(endpoint: EndpointTarget) -> None:
    """Fail before any work if the endpoint is down or does not serve the requested model."""
    url = f"{endpoint.base_url.rstrip('/')}/models"
    try:
        response = httpx.get(url, headers={"Authorization": f"Bearer {endpoint.api_key()}"}, timeout=10)
    except httpx.HTTPError as exc:
        raise LmkitError(
            f"Endpoint {endpoint.base_url} is not reachable ({type(exc).__name__}: {exc}). Fix: start "
            "it (lmkit serve serve/<config>.yaml) or correct target.endpoint.base_url."
        ) from None
    if response.status_code == 401:
        raise LmkitError(
            f"Endpoint {endpoint.base_url} refused the API key (401). Fix: set target.endpoint."
            "api_key_env to the variable holding the server's key."
        )
    response.raise_for_status()
    served = [m["id"] for m in response.json().get("data", [])]
    if endpoint.model not in served:
        raise LmkitError(
            f"Endpoint {endpoint.base_url} does not serve {endpoint.model!r}; it serves {served}. "
            "Fix: set target.endpoint.model to one of those."
        )


def _target_label(suite: EvalSuite) -> str:
    if suite.target.endpoint is not None:
        return f"{suite.target.endpoint.model} @ {suite.target.endpoint.base_url}"
    assert suite.target.model is not None
    spec = suite.target.model
    extras = [spec.quantization] if spec.quantization != "none" else []
    extras += [f"adapter {a.name}" for a in spec.adapters]
    return spec.source + (f" ({', '.join(extras)})" if extras else "")


def _samples(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    keep = ("doc_id", "target", "filtered_resps", "acc", "exact_match")
    return [
        {"task": task, **{k: s[k] for k in keep if k in s}} for task, rows in samples.items() for s in rows
    ]


def run_suite(suite: EvalSuite) -> dict[str, Any]:
    if suite.target.endpoint is not None:
        check_endpoint(suite.target.endpoint)
    loaded = load_model(suite.target.model) if suite.target.model is not None else None
    results: dict[str, Any] = {"target": _target_label(suite), "suite": json.loads(suite.model_dump_json())}
    rows: list[list[Any]] = []
    samples: list[dict[str, Any]] = []
    prompt_format = eval_format(suite)
    with tempfile.TemporaryDirectory(prefix="lmkit-eval-") as work:
        if suite.tasks:
            quality = run_quality(suite, loaded, Path(work), prompt_format)
            results["quality"] = quality["results"]
            samples = _samples(quality["samples"])
            rows += [
                ["quality", task, metric, value] for task, metric, value, _ in metric_rows(quality["results"])
            ]
    if suite.memory and loaded is not None:
        results["memory"] = memory_footprint(loaded)
        rows += [["memory", "model", key, value] for key, value in results["memory"].items()]
    if suite.speed is not None:
        assert suite.target.endpoint is not None
        results["speed"] = run_speed(suite.target.endpoint, suite.speed)
        for level in results["speed"]:
            name = f"concurrency {level['concurrency']}"
            rows += [
                ["speed", name, key, level[key]]
                for key in ("throughput_tok_s", "ttft_p50_s", "ttft_p90_s", "tpot_mean_s")
            ]
    results["rows"] = rows
    results["prompt_format"] = {
        "chat_template": prompt_format.chat_template,
        "adapter_recorded": None if prompt_format.recorded is None else prompt_format.recorded.describe(),
        "warnings": prompt_format.warnings,
    }
    notes = [f"chat template {'on' if prompt_format.chat_template else 'off'}"]
    notes += [f"WARNING: {w}" for w in prompt_format.warnings]

    def fill(out: Path) -> None:
        write_report(out, f"lmkit eval: {results['target']}", results, HEADERS, rows, notes, suite.output_dir)
        write_text_atomic(out / "suite.resolved.yaml", to_yaml(suite))
        if samples:
            write_jsonl_atomic(out / "samples.jsonl", samples)
        quality_rows = [r for r in rows if r[0] == "quality"]
        quality_bars(
            out / "quality.png",
            "Quality",
            [(r[1], r[2]) for r in quality_rows],
            {results["target"]: [r[3] for r in quality_rows]},
        )
        if "speed" in results:
            levels = results["speed"]
            lines(
                out / "speed.png",
                "Throughput vs concurrency",
                [lv["concurrency"] for lv in levels],
                {"tokens/s": [lv["throughput_tok_s"] for lv in levels]},
                "concurrent requests",
                "tokens/s",
            )

    write_dir_atomic(suite.output_dir, fill)  # all or nothing: an earlier run's results stay if this fails
    return results
