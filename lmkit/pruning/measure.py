"""Measurements for pruning runs: seeded test images, FLOPs, side-by-side latency, agreement."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "cyan"]


def synthetic_images(count: int, base_size: int, seed: int) -> list[Image.Image]:
    """Shapes on plain backgrounds, in varied sizes and aspect ratios (the processor resizes them)."""
    rng = random.Random(seed)
    images = []
    for _ in range(count):
        width, height = rng.randint(base_size // 2, base_size * 2), rng.randint(base_size // 2, base_size * 2)
        image = Image.new("RGB", (width, height), rng.choice(_COLORS))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.randrange(width), rng.randrange(height)
            box = (x0, y0, x0 + rng.randint(4, width), y0 + rng.randint(4, height))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape(box, fill=rng.choice(_COLORS))
        images.append(image)
    return images


def count_flops(fn: Callable[[], object], part: str = "language_model") -> dict[str, int]:
    """FLOPs torch dispatches for one call (matmuls, convolutions): in total and inside module `part`."""
    with FlopCounterMode(display=False) as counter:
        fn()
    by_module = counter.get_flop_counts()
    inside = [name for name in by_module if name.endswith(f".{part}")]
    return {"total": counter.get_total_flops(), part: sum(by_module[inside[0]].values()) if inside else 0}


def interleaved_medians(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call, timing the candidates in turn each round so drift hits all alike."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def agreement(reference: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """Next-token agreement: top-1 match rate and mean KL(reference || pruned)."""
    log_ref, log_pruned = reference.float().log_softmax(-1), pruned.float().log_softmax(-1)
    kl = F.kl_div(log_pruned, log_ref, log_target=True, reduction="batchmean")
    top1 = (reference.argmax(-1) == pruned.argmax(-1)).float().mean()
    return {"top1_match": round(float(top1), 4), "kl": round(float(kl), 5)}


def ratio(value: float, reference: float) -> float:
    """A measured quantity relative to the unpruned run, as tables show it."""
    return round(value / reference, 3)
