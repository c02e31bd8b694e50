"""Padding token rows into batches: one rule for training, generation and feature encoding."""

from __future__ import annotations

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
