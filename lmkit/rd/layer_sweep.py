"""`teacher.layer: auto`: which of the frozen teacher's layers (and which pooling) a linear probe
reads the task from best, decided on a validation split carved from the training rows.

A teacher's last layer is often not its most linearly separable one for a classification task
(the last layers specialise in predicting the next token), and RD can only transfer what the
reprogrammed teacher already separates. The probe is a closed-form ridge classifier on
standardised features: deterministic, and instant even for every layer of a 30-layer model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmkit.early_stopping import split_validation


@dataclass
class LayerChoice:
    layer: int  # the LMEncoder layer index: -1 is the final (normed) output
    pooling: str
    index: int  # the chosen position in the [N, L + 1, D] stack
    validation_accuracy: float
    validation_rows: int
    scores: dict[str, list[float | None]] = field(default_factory=dict)  # pooling -> accuracy per layer

    def as_dict(self) -> dict:
        return {
            "layer": self.layer,
            "pooling": self.pooling,
            "validation_accuracy": self.validation_accuracy,
            "validation_rows": self.validation_rows,
            "validation_accuracy_per_layer": self.scores,
        }


def ridge_probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, classes: int
) -> float:
    """Accuracy of a ridge classifier (one-hot targets, penalty = feature count) fitted on train."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x, t = (train_x - mean) / std, (test_x - mean) / std
    x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    t = torch.cat([t, torch.ones(len(t), 1)], 1).double()
    targets = torch.nn.functional.one_hot(train_y, classes).double()
    penalty = x.shape[1] * torch.eye(x.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(x.T @ x + penalty, x.T @ targets)
    return float(((t @ weights).argmax(1) == test_y).double().mean())


def choose_layer(
    stacks: dict[str, torch.Tensor],
    labels: list[int],
    classes: int,
    validation_fraction: float,
    seed: int,
    layers: list[int] | None = None,
) -> LayerChoice:
    """Score every (layer, pooling) of `stacks` (pooling -> [N, L + 1, D] training features) and
    return the best; `layers` restricts the candidate stack positions (default: all)."""
    rows = [{"index": i} for i in range(len(labels))]
    fit, held = split_validation(rows, validation_fraction, seed)
    fit_ids = torch.tensor([r["index"] for r in fit])
    held_ids = torch.tensor([r["index"] for r in held])
    y = torch.tensor(labels)
    scores: dict[str, list[float | None]] = {}
    best: tuple[float, int, str] | None = None
    for pooling, stack in stacks.items():
        depth = stack.shape[1]
        candidates = layers if layers is not None else list(range(depth))
        per_layer: list[float | None] = []
        for index in range(depth):
            if index not in candidates:
                per_layer.append(None)  # not a candidate
                continue
            features = stack[:, index].float()
            accuracy = ridge_probe_accuracy(
                features[fit_ids], y[fit_ids], features[held_ids], y[held_ids], classes
            )
            per_layer.append(round(accuracy, 4))
            # ties go to the deeper layer, then to the pooling listed first
            if best is None or accuracy > best[0] or (accuracy == best[0] and index > best[1]):
                best = (accuracy, index, pooling)
        scores[pooling] = per_layer
    assert best is not None
    accuracy, index, pooling = best
    depth = stacks[pooling].shape[1]
    return LayerChoice(
        -1 if index == depth - 1 else index, pooling, index, round(accuracy, 4), len(held), scores
    )
