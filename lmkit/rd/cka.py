"""Linear CKA between two sets of per-example features, usable as a loss.

CKA compares the n x n Gram matrices of the batch, so the two feature sets may have different
widths (teacher and student hidden sizes, different tokenizers). It is computed in fp32 with a
clamped denominator, so a collapsed (constant) feature gives CKA 0, not NaN.
"""

from __future__ import annotations

import torch

MIN_CKA_BATCH = 4  # below this the Gram matrices carry almost no structure


def linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Biased linear CKA of x [n, d1] and y [n, d2].

    1 for identical or rotated (orthogonally transformed) features, near 0 for independent ones.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_cka needs [n, d] features with the same n, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < MIN_CKA_BATCH:
        raise ValueError(f"linear_cka needs at least {MIN_CKA_BATCH} examples per batch, got {x.shape[0]}")
    x = x.float() - x.float().mean(0, keepdim=True)
    y = y.float() - y.float().mean(0, keepdim=True)
    gram_x, gram_y = x @ x.T, y @ y.T
    cross = (gram_x * gram_y).sum()
    norm = (gram_x * gram_x).sum().clamp_min(eps).sqrt() * (gram_y * gram_y).sum().clamp_min(eps).sqrt()
    return cross / norm


def cka_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1.0 - linear_cka(x, y)
