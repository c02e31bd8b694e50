"""Pooled features of many texts, and a disk cache for the frozen teacher's features.

With the cache, the teacher runs once; student training then needs no teacher in memory.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from lmkit.batching import pad
from lmkit.io import write_dir_atomic, write_json_atomic
from lmkit.modeling import LMEncoder


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts]


@torch.inference_mode()
def encode(
    encoder: LMEncoder,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int,
    description: str,
) -> tuple[torch.Tensor, float]:
    """[N, D] pooled features and the seconds the forward passes took."""
    encoder.eval()
    device = next(encoder.parameters()).device
    rows = tokenize(tokenizer, texts, max_length)
    chunks, seconds = [], 0.0
    with Progress(transient=True) as progress:
        bar = progress.add_task(description, total=len(rows))
        for start in range(0, len(rows), batch_size):
            ids, mask = pad(rows[start : start + batch_size], tokenizer.pad_token_id)
            began = time.perf_counter()
            chunks.append(encoder(ids.to(device), mask.to(device)).cpu())
            seconds += time.perf_counter() - began
            progress.advance(bar, len(ids))
    return torch.cat(chunks), seconds


def cache_key(description: dict[str, Any], texts: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def load_cached(cache_dir: Path, key: str) -> dict[str, torch.Tensor] | None:
    meta = cache_dir / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        return load_file(cache_dir / "features.safetensors")
    return None


def save_cache(
    cache_dir: Path, key: str, features: dict[str, torch.Tensor], description: dict[str, Any]
) -> None:
    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in features.items()}, tmp / "features.safetensors")
        write_json_atomic(
            tmp / "meta.json",
            {"key": key, "teacher": description, "shapes": {k: list(v.shape) for k, v in features.items()}},
        )

    write_dir_atomic(cache_dir, fill)
