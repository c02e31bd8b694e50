"""Privacy audit with planted canaries, reported next to epsilon.

- Data-based: does the synthetic text that leaves the client reveal a canary's secret (the whole
  secret, or any 5-character run of it)?
- Model-based membership test on the client's DP-trained generator: loss of planted canaries vs
  fresh canaries built the same way but never planted; AUC 0.5 = no signal, 1.0 = full exposure,
  and the true-positive rate at a low false-positive rate (the number that matters for privacy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmkit.fdkt.data import Canary


def exposure(canaries: list[Canary], synthetic: list[str], run: int = 5) -> dict[str, float]:
    corpus = "\n".join(synthetic).upper()
    whole = sum(c.secret in corpus for c in canaries)
    partial = sum(
        any(c.secret[i : i + run] in corpus for i in range(len(c.secret) - run + 1)) for c in canaries
    )
    return {
        "secret_exposed": round(whole / len(canaries), 4),
        f"secret_{run}gram_exposed": round(partial / len(canaries), 4),
    }


@torch.inference_mode()
def sequence_losses(model: torch.nn.Module, tokenizer, texts: list[str]) -> list[float]:
    losses = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        losses.append(float(F.cross_entropy(logits[0], ids[0, 1:])))
    return losses


def auc(member_scores: list[float], outsider_scores: list[float]) -> float:
    """P(a member scores higher than an outsider), ties counting half (Mann-Whitney)."""
    wins = sum((m > o) + 0.5 * (m == o) for m in member_scores for o in outsider_scores)
    return round(wins / (len(member_scores) * len(outsider_scores)), 4)


def tpr_at_fpr(member_scores: list[float], outsider_scores: list[float], fpr: float) -> float:
    """Share of members flagged at the threshold that flags at most `fpr` of the outsiders."""
    ranked = sorted(outsider_scores, reverse=True)
    allowed = math.floor(fpr * len(ranked))
    threshold = ranked[allowed] if allowed < len(ranked) else -math.inf
    return round(sum(m > threshold for m in member_scores) / len(member_scores), 4)


def canary_audit(
    model: torch.nn.Module,
    tokenizer,
    members: list[str],
    outsiders: list[str],
    canaries: list[Canary],
    synthetic: list[str],
) -> dict[str, float]:
    """Exposure of the secrets in the synthetic text, and loss-based membership inference on the
    generator (planted vs fresh canaries): AUC and true-positive rate at 1% and 10% false positives."""
    member_scores = [-x for x in sequence_losses(model, tokenizer, members)]
    outsider_scores = [-x for x in sequence_losses(model, tokenizer, outsiders)]
    return exposure(canaries, synthetic) | {
        "membership_auc": auc(member_scores, outsider_scores),
        "tpr_at_1pct_fpr": tpr_at_fpr(member_scores, outsider_scores, 0.01),
        "tpr_at_10pct_fpr": tpr_at_fpr(member_scores, outsider_scores, 0.10),
        "canaries": len(members),
        "fresh_canaries": len(outsiders),
    }
