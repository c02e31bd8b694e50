"""Token selection: pure tensor functions shared by the transformers path, the vLLM plugin and text pruning.

Every selector returns `[batch, k]` indices that are unique and sorted, so kept tokens stay in their
original order. Their position ids are renumbered or kept (`PruneConfig.positions`).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from lmkit.errors import ConfigError


def attention_map(query: torch.Tensor, key: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Head-averaged softmax(q k^T / sqrt(d)) from projected q, k of shape [B, T, heads*d].

    Recomputed from the projections, so it works whatever attention kernel the model runs (SDPA,
    flash, vLLM's fused encoders) without asking the model to materialize attention weights.
    """
    batch, length, width = query.shape
    head_dim = width // num_heads
    q = query.float().view(batch, length, num_heads, head_dim).transpose(1, 2)
    k = key.float().view(batch, length, num_heads, head_dim).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)
    return weights.mean(dim=1)


def contribution_degree(attention: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """How much each token feeds the image's summary: the [CLS] query's attention to it, or, for
    encoders without [CLS] (SigLIP), the mean attention it receives from all queries."""
    return attention[:, 0, :] if has_cls else attention.mean(dim=1)


def gather_tokens(tensor: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Keep `index` [batch, kept] along `dim`; a batch-1 tensor (shared positions) is broadcast."""
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    shape = [1] * tensor.dim()
    shape[0], shape[dim] = index.shape
    target = list(tensor.shape)
    target[dim] = index.shape[1]
    return tensor.gather(dim, index.to(tensor.device).view(shape).expand(target))


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (left padding gets 0), as transformers' generate does."""
    return (attention_mask.long().cumsum(1) - 1).clamp_min(0).masked_fill(attention_mask == 0, 0)


def _sorted(indices: torch.Tensor) -> torch.Tensor:
    return indices.sort(dim=-1).values


def example_seeds(seed: int, examples: torch.Tensor) -> list[int]:
    """One seed per example (row of `examples`: its pixel values or token ids) and `seed`, so method
    `random` keeps the same subset of an example in every call that sees it (logits, answers, FLOPs,
    each engine), whatever else is in the batch or how often it was scored before."""
    rows = examples.detach().cpu()
    # pixels rounded to bfloat16 first: an engine running the tower in fp16/bf16 hashes the same values
    rows = rows.to(torch.bfloat16).float() if rows.is_floating_point() else rows.to(torch.int64)
    rows = rows.reshape(len(rows), -1)
    key = str(seed).encode()
    return [
        int.from_bytes(hashlib.blake2b(row.numpy().tobytes(), digest_size=8, key=key).digest(), "little") >> 1
        for row in rows
    ]


def random_indices(available: int, k: int, seeds: list[int]) -> torch.Tensor:
    """[len(seeds), k]: a subset drawn from each example's own seed (see `example_seeds`)."""
    draws = [torch.randperm(available, generator=torch.Generator().manual_seed(s))[:k] for s in seeds]
    return _sorted(torch.stack(draws))


def uniform_indices(batch: int, available: int, k: int) -> torch.Tensor:
    """Evenly spaced in raster order; spacing >= 1 keeps the rounded positions distinct."""
    row = torch.tensor([available // 2]) if k == 1 else torch.linspace(0, available - 1, k).round().long()
    return row.unsqueeze(0).expand(batch, k).clone()


def two_stage(
    contribution: torch.Tensor, patterns: torch.Tensor, k: int, pivotal_fraction: float
) -> torch.Tensor:
    """Pivotal tokens by contribution degree, then complementary tokens by pattern coverage.

    Stage 1 keeps the `round(k * pivotal_fraction)` tokens with the highest contribution (high-level
    semantics). Stage 2 adds, one at a time, the token whose pattern is least similar (cosine) to
    every token kept so far (farthest-point selection), so regions the pivotal tokens do not cover
    keep a representative. With no pivotal budget, the top-contribution token seeds stage 2.
    """
    batch, available = contribution.shape
    seeds = contribution.topk(max(min(k, round(k * pivotal_fraction)), 1), dim=-1).indices
    kept = torch.zeros(batch, available, dtype=torch.bool, device=contribution.device)
    kept.scatter_(1, seeds, True)
    unit = F.normalize(patterns.float(), dim=-1)
    rows = torch.arange(batch, device=contribution.device)
    coverage = torch.einsum("bnd,bkd->bnk", unit, gather_tokens(unit, seeds))
    coverage = coverage.amax(dim=-1).masked_fill(kept, float("inf"))
    for _ in range(k - seeds.shape[1]):
        chosen = coverage.argmin(dim=-1)
        kept[rows, chosen] = True
        similarity = torch.einsum("bnd,bd->bn", unit, unit[rows, chosen])
        coverage = torch.maximum(coverage, similarity).masked_fill(kept, float("inf"))
    return kept.nonzero()[:, 1].view(batch, k)


def select(
    method: str,
    k: int,
    available: int,
    batch: int,
    contribution: torch.Tensor | None = None,
    patterns: torch.Tensor | None = None,
    pivotal_fraction: float = 0.5,
    seeds: list[int] | None = None,
) -> torch.Tensor:
    """Indices of the `k` tokens to keep out of `available`, per batch row; method `random` draws
    each row from its seed in `seeds` (`example_seeds`)."""
    if not 1 <= k <= available:
        raise ConfigError(f"cannot keep {k} of {available} tokens. Fix: keep between 1 and {available}.")
    if method == "random":
        if seeds is None or len(seeds) != batch:
            raise ValueError("random selection needs one seed per example (example_seeds)")
        return random_indices(available, k, seeds)
    if method == "uniform":
        return uniform_indices(batch, available, k)
    if method == "freepruner_style":
        if contribution is None or patterns is None:
            raise ValueError("freepruner_style selection needs contribution scores and patterns")
        return two_stage(contribution, patterns, k, pivotal_fraction)
    raise ConfigError(
        f"pruning method {method!r} does not select tokens before the language model. "
        "Fix: use freepruner_style, random or uniform here (fastv prunes inside the LM)."
    )
