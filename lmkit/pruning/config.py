"""What to prune and how much: one config for the transformers path, the vLLM plugin and recipes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmkit.config import StrictModel
from lmkit.errors import ConfigError

Budget = int | float  # a token count, or a ratio in (0, 1]
PruneMethod = Literal["freepruner_style", "random", "uniform", "fastv", "none"]


class PruneConfig(StrictModel):
    """Visual-token pruning settings.

    `keep` is a token count (int >= 1) or a ratio of the image's tokens (float in (0, 1]).
    Method `freepruner_style` is lmkit's freePruner-style selection: its scoring formulas are lmkit's
    reading of the paper's abstract (contribution degree, attention patterns), not a port. It keeps
    `pivotal_fraction` of the budget as pivotal tokens (highest contribution degree at
    `contribution_layer`) and fills the rest with complementary tokens whose attention patterns at
    `pattern_layer` are least covered by what is already kept.
    """

    method: PruneMethod = "freepruner_style"
    keep: int | float = Field(0.25, description="tokens kept per image: a count, or a ratio in (0, 1]")
    pivotal_fraction: float = Field(0.5, ge=0, le=1)
    contribution_layer: int | None = Field(
        None, description="vision layer whose attention scores contribution; default: the feature layer"
    )
    pattern_layer: int | None = Field(
        None, description="shallower vision layer whose attention rows are the patterns; default: halfway"
    )
    fastv_layer: int = Field(2, ge=1, description="method fastv: LM layer K after which image tokens drop")
    positions: Literal["renumber", "keep"] = Field(
        "renumber",
        description="position ids after pruning: renumber (consecutive, as vLLM does) or keep (each "
        "kept token at its unpruned position; transformers path only)",
    )
    seed: int | None = Field(
        None, description="method random: selection seed (unset: the recipe's seed, or 0)"
    )


def keep_count(keep: int | float, available: int) -> int:
    """Tokens to keep out of `available`, with an error that names the fix for a bad budget."""
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise ConfigError(f"pruning keep must be a count or a ratio, got {keep!r}. Fix: e.g. keep: 64")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ConfigError(
                f"pruning keep={keep} is a ratio outside (0, 1]. Fix: use a ratio like 0.25, "
                f"or a whole count of tokens (1..{available})."
            )
        return max(1, round(keep * available))
    if not 1 <= keep <= available:
        raise ConfigError(
            f"pruning keep={keep} tokens, but an image has {available}. Fix: keep between 1 and "
            f"{available}, or a ratio in (0, 1]."
        )
    return keep
