"""What the real-data benchmarks share: where ../shared/data is, their common flags, mean ± sd.

The data folder is benchmark-only (a user's clone lacks it): each benchmark skips cleanly without it.
Imported by the scripts next to it (`python benchmarks/<name>.py` puts this folder on sys.path).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LEDGER = ROOT / "evals" / "results" / "raw"


def bench_parser(doc: str | None, name: str, seeds: list[int] | None = None) -> argparse.ArgumentParser:
    """--output (runs/benchmarks/NAME) and --table (evals/results/NAME.md), plus --seeds if given."""
    parser = argparse.ArgumentParser(description=(doc or name).splitlines()[0])
    if seeds is not None:
        parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmarks" / name))
    parser.add_argument("--table", default=str(ROOT / "evals" / "results" / f"{name}.md"))
    return parser


def machine() -> str:
    """The machine a table was measured on, as its notes state it. The CPU's name and vector units
    are part of it: two 2-core machines here differed 2.3x in training speed (AVX-512 vs AVX2)."""
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu()}, {len(os.sched_getaffinity(0))} CPU cores, {accelerator}"


def cpu() -> str:
    """e.g. 'AMD EPYC (x86_64, AVX2)': the model name and the widest vector units Linux reports."""
    name, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    units = [label for flag, label in VECTOR_UNITS if flag in flags][:1]
    extras = [label for flag, label in MATRIX_UNITS if flag in flags]
    return f"{name} ({', '.join([platform.machine(), *units, *extras])})"


VECTOR_UNITS = [("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sse4_2", "SSE4.2")]  # widest first
MATRIX_UNITS = [("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")]


def missing(path: Path = DATA) -> bool:
    """True (after saying so) when the real data this benchmark reads is not on this machine."""
    if path.exists():
        return False
    print(f"SKIP: {path} not found; this benchmark reads the real datasets there at run time.")
    return True


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{sd}"


def wilson(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def paired_difference(a: list[bool], b: list[bool], z: float = 1.96) -> tuple[float, float]:
    """Mean of a - b over the same examples, and the half-width of its normal interval: pairing
    removes the per-example difficulty both share, so it is far tighter than two separate intervals."""
    diffs = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / len(diffs)
    sd = statistics.pstdev(diffs) if len(diffs) > 1 else 0.0
    return mean, z * sd / math.sqrt(len(diffs))


def ledgered(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A benchmark cell's small result, kept under evals/results/raw/ and committed.

    Machines here start empty (runs/ does not survive a session), so a long benchmark keeps each
    finished cell's numbers in the repository: a later run, on any machine, adds the missing cells
    instead of redoing the finished ones. Delete a file to measure its cell again.
    """
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result
