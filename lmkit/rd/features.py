"""Pooled features of many texts, and a disk cache for the frozen teacher's features.

With the cache, the teacher runs once per split; student training then needs no teacher in memory.
Each split is cached under its own key (teacher, settings and texts), so runs that share a cache
directory encode a split they have in common (e.g. the same dev set) only once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from lmkit.batching import pad
from lmkit.io import write_dir_atomic, write_json_atomic
from lmkit.modeling import LMEncoder, Pooling


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts]


def _batched(
    run: Callable[[torch.Tensor, torch.Tensor], Any],
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int,
    description: str,
) -> tuple[list[Any], float]:
    """`run(ids, mask)` over padded batches of `texts`; its outputs and the seconds it took."""
    rows = tokenize(tokenizer, texts, max_length)
    outputs, seconds = [], 0.0
    with Progress(transient=True) as progress:
        bar = progress.add_task(description, total=len(rows))
        for start in range(0, len(rows), batch_size):
            ids, mask = pad(rows[start : start + batch_size], tokenizer.pad_token_id)
            began = time.perf_counter()
            outputs.append(run(ids, mask))
            seconds += time.perf_counter() - began
            progress.advance(bar, len(ids))
    return outputs, seconds


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
    chunks, seconds = _batched(
        lambda ids, mask: encoder(ids.to(device), mask.to(device)).cpu(),
        tokenizer,
        texts,
        max_length,
        batch_size,
        description,
    )
    return torch.cat(chunks), seconds


@torch.inference_mode()
def encode_every_layer(
    encoder: LMEncoder,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int,
    poolings: tuple[Pooling, ...],
    description: str,
) -> dict[str, torch.Tensor]:
    """pooling -> [N, L + 1, D]: every layer's pooled features, from one forward pass per batch."""
    encoder.eval()
    device = next(encoder.parameters()).device

    def run(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        stacks = encoder.every_layer(ids.to(device), mask.to(device), poolings)
        return {p: s.cpu() for p, s in stacks.items()}

    chunks, _ = _batched(run, tokenizer, texts, max_length, batch_size, description)
    return {p: torch.cat([c[p] for c in chunks]) for p in poolings}


def cache_key(description: dict[str, Any], texts: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def load_cached(cache_dir: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors saved under `key` (one split's features), or None when not cached."""
    entry = cache_dir / key[:32]
    meta = entry / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        return load_file(entry / "features.safetensors")
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

    write_dir_atomic(cache_dir / key[:32], fill)
