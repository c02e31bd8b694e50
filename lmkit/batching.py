"""Padding token rows into batches: one rule for training, generation and feature encoding."""

from __future__ import annotations

from collections.abc import Callable

import torch


def pad(
    rows: list[list[int]] | list[torch.Tensor], pad_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token ids and the attention mask: right-padded for training, left for generation."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.as_tensor(row)
        mask[i, span] = 1
    return ids, mask


def pad_batch(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded rows into tensors (labels padded with -100)."""
    ids, mask = pad([r["input_ids"] for r in rows], pad_id)
    labels, _ = pad([r["labels"] for r in rows], -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_buckets(attention_mask: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Row indices in up to `count` groups of similar length, shortest first."""
    order = attention_mask.sum(1).argsort(stable=True)
    return [rows for rows in order.chunk(count) if len(rows)]


def bucketed_loss(
    forward: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    batch: dict[str, torch.Tensor],
    count: int,
) -> torch.Tensor:
    """A right-padded batch's token-mean causal-LM loss, computed bucket by bucket, each bucket padded
    only to its own longest row.

    `forward(rows, sub_batch)` returns a bucket's token-mean loss; weighting each by its share of the
    predicted tokens gives exactly the loss (and gradients) of one padded forward over the batch.
    Mixed-length batches (a long passage among short sentences) then cost about their real tokens
    instead of rows x the longest row.
    """
    predicted = batch["labels"][:, 1:] != -100  # what a causal LM's shifted loss averages over
    total = predicted.sum()
    loss = batch["labels"].new_zeros((), dtype=torch.float32)
    for rows in length_buckets(batch["attention_mask"], count):
        width = int(batch["attention_mask"][rows].sum(1).max())
        tokens = predicted[rows].sum()
        if tokens == 0:
            continue
        sub = {key: value[rows, :width] if value.dim() > 1 else value[rows] for key, value in batch.items()}
        loss = loss + forward(rows, sub) * (tokens / total)
    return loss
