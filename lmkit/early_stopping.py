"""Train to convergence, not to a step budget: a seeded validation split carved from the training
rows, its loss measured every few steps, a stop after `patience` measurements without
improvement, and the best weights (not the last) kept."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lmkit.config import StrictModel


class EarlyStopping(StrictModel):
    validation_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="share of the training rows held out (seeded) to decide when to stop"
    )
    eval_every: int = Field(20, gt=0, description="steps between validation-loss measurements")
    patience: int = Field(3, gt=0, description="measurements without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="improvement smaller than this does not count")
    batch_size: int = Field(16, gt=0, description="validation batch size")


def split_validation(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation) rows: a seeded `fraction` held out; refuses a split that leaves either empty."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(rows) * fraction))
    if held >= len(rows):
        from lmkit.errors import ConfigError

        raise ConfigError(
            f"train.early_stopping: {len(rows)} training rows are too few to hold out a validation "
            "split. Fix: add data or remove train.early_stopping."
        )
    keep = set(order[held:])
    return [r for i, r in enumerate(rows) if i in keep], [r for i, r in enumerate(rows) if i not in keep]


class BestLoss:
    """Tracks a validation loss: the best so far, where it was measured, and how many measurements
    since it last improved (by more than `min_delta`). The caller keeps the weights on improvement."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best_loss: float | None = None
        self.best_step = 0
        self.bad = 0
        self.losses: list[dict[str, float]] = []

    def update(self, step: int, loss: float) -> bool:
        """Record `loss` at `step`; True when it is the best so far (a NaN or inf never is)."""
        self.losses.append({"step": step, "validation_loss": round(loss, 5)})
        if math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss - self.min_delta):
            self.best_loss, self.best_step, self.bad = loss, step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_loss": self.best_loss,
            "best_step": self.best_step,
            "bad": self.bad,
            "losses": self.losses,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]
        self.bad, self.losses = state["bad"], state["losses"]


class Validator(BestLoss):
    """`BestLoss` over the loss of held-out rows (`train.early_stopping`)."""

    def __init__(self, config: EarlyStopping, rows: list[dict], collate: Callable[[list[dict]], dict]):
        super().__init__(config.patience, config.min_delta)
        self.config, self.rows, self.collate = config, rows, collate

    @torch.no_grad()
    def loss(self, model: nn.Module, device: torch.device) -> float:
        """Mean of per-batch losses over the validation rows (the model is put back in train mode)."""
        model.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.rows), self.config.batch_size):
            chunk = self.rows[start : start + self.config.batch_size]
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            total += float(model(**batch).loss) * len(chunk)
            count += len(chunk)
        model.train()
        return total / count
