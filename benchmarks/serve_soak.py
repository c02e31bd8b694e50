"""Soak `lmkit serve`: a bounded, loopback-only storm of mixed requests that must leave the server as it was.

One server on tiny-llama with two LoRA adapters, runtime adapter loading and a MoLA-Router. A fixed
number of operations (completions, chat, streams, streams cancelled mid-way, echo+logprobs on the
base and the adapters, runtime adapter load/use/unload, ~20% malformed requests) runs with a fixed
number in flight. It checks: no engine death (the server's process tree is unchanged and /health
answered 200 throughout), every valid request 200, every malformed one 4xx, the RSS of the
server's process tree within a stated bound of its post-warm-up value, and /metrics agreeing with
the counts (request_success_total deltas = generations run to the end; nothing left running).
Client hang-ups are not counted there by vLLM 0.32 (finished_reason "abort" stays 0): reported only.

    python benchmarks/serve_soak.py [--requests 1000] [--concurrency 64] [--echo-share 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from soak_requests import ADAPTERS, BASE, ROUTER, Outcome, drive, plan

from lmkit.report import write_report
from lmkit.serving import ServerProcess
from lmkit.serving.config import ServeConfig, check_serve_config

ROOT = Path(__file__).resolve().parents[1]
FINISHED = ("stop", "length", "repetition")  # request_success reasons of a generation run to its end


def build_config(root: Path, port: int) -> ServeConfig:
    """Two random LoRAs, a copy for runtime loads and an exported MoLA-Router, made by the test suite's
    own builders (tests/helpers.py, tests/test_mola.py) so the soak serves what the tests serve."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_lora_adapter
    from test_mola import make_model

    from lmkit.mola.export import export_mola

    for seed, name in enumerate(ADAPTERS, start=1):
        make_lora_adapter(root / name, seed=seed)
    shutil.copytree(root / ADAPTERS[0], root / "runtime")
    export_mola(make_model("router")[0], root / "router")
    config = {
        "model": {"source": "tiny-llama", "adapters": [{"name": n, "path": root / n} for n in ADAPTERS]},
        "served_model_name": BASE,
        "port": port,
        "adapter_dirs": [root],
        "runtime_adapters": True,
        "max_lora_rank": 32,  # the router's merged adapter: 4 experts + shared, rank 4 each
        "mola_routers": [{"name": ROUTER, "path": root / "router", "buckets": 10}],
        "engine": {"dtype": "float32", "max_model_len": 512},
    }
    return check_serve_config(ServeConfig.model_validate(config))


class Watch(threading.Thread):
    """Samples the server's process tree RSS and /health every `every` seconds while the soak runs."""

    def __init__(self, server: ServerProcess, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.server, self.every, self.stopped = server, every, threading.Event()
        self.health: Counter[int | None] = Counter()
        self.rss: list[int] = []

    def tree(self) -> list[psutil.Process]:
        assert self.server.process is not None
        top = psutil.Process(self.server.process.pid)
        return [top, *top.children(recursive=True)]

    def rss_by_process(self) -> dict[str, int]:
        found = {}
        for process in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):  # a helper that exited meanwhile
                found[f"{process.name()} {process.pid}"] = process.memory_info().rss
        return found

    def tree_rss(self) -> int:
        return sum(self.rss_by_process().values())

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.health[self.server.health(timeout=10)] += 1
            self.rss.append(self.tree_rss())


def metrics(base_url: str) -> dict[str, float]:
    """request_success_total per finished_reason, and the running/waiting gauges, from /metrics."""
    found: Counter[str] = Counter()
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        match = re.match(r"(vllm:[a-z_]+)(?:\{(.*)\})? ([0-9.eE+-]+)$", line)
        if match is None:
            continue
        name, labels, value = match.groups()
        if name == "vllm:request_success_total":
            reason = re.search(r'finished_reason="([a-z_]+)"', labels or "")
            found[reason.group(1) if reason else "?"] += float(value)
        elif name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            found[name.removeprefix("vllm:")] += float(value)
    return dict(found)


def _settle(base_url: str, seconds: float = 60) -> dict[str, float]:
    """/metrics once nothing runs or waits any more (aborts of hung-up streams land a moment later)."""
    for _ in range(int(seconds * 2)):
        found = metrics(base_url)
        if found.get("num_requests_running", 0) + found.get("num_requests_waiting", 0) == 0:
            break
        threading.Event().wait(0.5)
    return found


def _as_expected(outcome: Outcome) -> bool:
    """Every request of a valid operation answered 200; a malformed one answered 4xx."""
    if outcome.valid:
        return all(s == 200 for s in outcome.statuses)
    return all(400 <= s < 500 for s in outcome.statuses)


def soak(
    server: ServerProcess,
    root: Path,
    requests: int,
    concurrency: int,
    warmup: int,
    echo_share: float,
    malformed_share: float = 0.2,
    seed: int = 0,
    rss_growth: float = 0.10,
) -> dict:
    """Warm up, then run `requests` operations; the report holds every count `problems` checks."""
    base = server.config.base_url
    kinds = plan(warmup + requests, echo_share, malformed_share, seed)
    watch = Watch(server)
    tree = watch.tree()  # psutil identifies a process by pid and start time: a restart shows
    rss_start = watch.tree_rss()
    watch.start()
    try:
        outcomes = asyncio.run(drive(base, kinds[:warmup], concurrency, seed, root))
        before = _settle(base)
        rss_warm = watch.rss_by_process()
        main = asyncio.run(drive(base, kinds[warmup:], concurrency, seed, root, start=warmup))
        after = _settle(base)
        rss_final = watch.rss_by_process()
    finally:
        watch.stopped.set()
        watch.join()
    outcomes += main
    valid = [o for o in outcomes if o.valid]
    malformed = [o for o in outcomes if not o.valid]
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in (*FINISHED, "abort", "error")}
    return {
        "operations": len(outcomes),
        "http_requests": sum(len(o.statuses) for o in outcomes),
        "kinds": dict(Counter(o.kind for o in outcomes)),
        "valid": sum(len(o.statuses) for o in valid),
        "valid_200": sum(s == 200 for o in valid for s in o.statuses),
        "malformed": len(malformed),
        "malformed_4xx": sum(_as_expected(o) for o in malformed),
        "unexpected": [(o.kind, o.statuses, o.error) for o in outcomes if not _as_expected(o)][:10],
        "completed": sum(o.completed for o in main),
        "cancelled": sum(o.cancelled for o in main),
        "success_delta": delta,
        "finished_delta": sum(delta[k] for k in FINISHED),
        "left_running": after.get("num_requests_running", 0) + after.get("num_requests_waiting", 0),
        "engine_deaths": sum(not p.is_running() for p in tree),
        "processes": len(tree),
        "health": {str(k): v for k, v in watch.health.items()},
        "rss_mib": {
            "at_start": rss_start / 2**20,
            "after_warmup": sum(rss_warm.values()) / 2**20,
            "final": sum(rss_final.values()) / 2**20,
            "peak": max([sum(rss_warm.values()), *watch.rss]) / 2**20,
            "bound": sum(rss_warm.values()) * (1 + rss_growth) / 2**20,
        },
        "rss_mib_by_process": {k: [rss_warm.get(k, 0) / 2**20, v / 2**20] for k, v in rss_final.items()},
    }


def problems(report: dict) -> list[str]:
    """What the soak must show, as failures (empty: the server came through unchanged)."""
    found = []
    if report["engine_deaths"]:
        found.append(f"{report['engine_deaths']} of {report['processes']} server processes died")
    if set(report["health"]) != {"200"}:
        found.append(f"/health answered {report['health']}")
    if report["valid_200"] != report["valid"] or report["malformed_4xx"] != report["malformed"]:
        found.append(f"unexpected statuses, e.g. {report['unexpected']}")
    if report["finished_delta"] != report["completed"] or report["success_delta"]["error"]:
        found.append(
            f"/metrics request_success deltas {report['success_delta']} vs {report['completed']} run"
        )
    if report["left_running"]:
        found.append(f"{report['left_running']} requests still running or waiting after the soak")
    rss = report["rss_mib"]
    if rss["final"] > rss["bound"]:
        found.append(
            f"RSS grew from {rss['after_warmup']:.0f} to {rss['final']:.0f} MiB (bound {rss['bound']:.0f})"
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="operations after the warm-up")
    parser.add_argument("--concurrency", type=int, default=64)
    # the engine worker's malloc heap grows over the first ~1,000 operations of this mix (measured
    # here: 230 -> 790 MiB, then flat for 1,500 more), so the bound applies after a warm-up
    parser.add_argument("--warmup", type=int, default=1000, help="operations before the RSS baseline")
    parser.add_argument("--echo-share", type=float, default=0.10, help="echo+logprobs share (0 = none)")
    parser.add_argument("--malformed-share", type=float, default=0.20)
    parser.add_argument("--rss-growth", type=float, default=0.10, help="allowed RSS growth after the warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmarks" / "serve_soak"))
    args = parser.parse_args()

    out = Path(args.output)
    shutil.rmtree(out / "artifacts", ignore_errors=True)
    (out / "artifacts").mkdir(parents=True)
    config = build_config(out / "artifacts", args.port)
    started = time.perf_counter()
    with ServerProcess(config, log_path=out / "vllm.log") as server:
        options = ("requests", "concurrency", "warmup", "echo_share", "malformed_share", "seed", "rss_growth")
        report = soak(server, out / "artifacts", **{k: getattr(args, k) for k in options})
    report["wall_s"] = time.perf_counter() - started
    failed = problems(report)
    rss, delta = report["rss_mib"], report["success_delta"]
    rows = [
        ["operations (HTTP requests)", f"{report['operations']} ({report['http_requests']})", ""],
        ["valid requests answered 200", f"{report['valid_200']} / {report['valid']}", "all"],
        ["malformed requests answered 4xx", f"{report['malformed_4xx']} / {report['malformed']}", "all"],
        ["engine deaths (server processes gone)", f"{report['engine_deaths']} of {report['processes']}", "0"],
        ["/health probes during the soak", report["health"], "all 200"],
        [
            "after warm-up: generations run to the end vs Δ request_success (stop+length)",
            f"{report['completed']} vs {report['finished_delta']:.0f}",
            "equal",
        ],
        [
            "after warm-up: streams hung up mid-way vs Δ request_success (abort)",
            f"{report['cancelled']} vs {delta['abort']:.0f}",
            "",
        ],
        ["requests left running/waiting", f"{report['left_running']:.0f}", "0"],
        [
            "server tree RSS MiB: at start / after warm-up / final / peak",
            f"{rss['at_start']:.0f} / {rss['after_warmup']:.0f} / {rss['final']:.0f} / {rss['peak']:.0f}",
            f"final <= {rss['bound']:.0f}",
        ],
    ]
    notes = [
        f"tiny-llama (float32, max_model_len 512), 2 LoRA adapters + runtime loads + a MoLA-Router; "
        f"{args.warmup} warm-up + {args.requests} operations, {args.concurrency} in flight, seed {args.seed}",
        f"mix: {report['kinds']}; echo+logprobs share {args.echo_share}",
        f"wall time {report['wall_s']:.0f} s with engine start; checks: {'; '.join(failed) or 'all passed'}",
    ]
    write_report(out, "lmkit serve soak", report, ["measure", "value", "expected"], rows, notes)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
