"""Modules of reprogramming distillation and of the baselines it is compared with.

Teacher and student are causal LMs from the shared loader, used as feature encoders: hidden
states of one layer, pooled per example. Pooled features make the pair independent of
tokenizer and hidden size. The student ships with its projection and the shared classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from lmkit.errors import ConfigError
from lmkit.rd.cka import cka_loss

Pooling = Literal["mean", "last"]
Variant = Literal["student_ce", "logit_kd", "feature_mse", "rd"]


def truncate_layers(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """Keep the first `num_layers` decoder layers (e.g. a 6-layer SmolLM2 student from the 30-layer model)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(
            f"num_layers: cannot truncate {type(model).__name__} (no model.layers); leave it unset."
        )
    if not 0 < num_layers <= len(layers):
        raise ConfigError(f"num_layers must be between 1 and {len(layers)} for this model, got {num_layers}.")
    model.model.layers = nn.ModuleList(list(layers)[:num_layers])
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    return model


class LMEncoder(nn.Module):
    """Pooled hidden states of one layer of a causal LM (the LM head is never run)."""

    def __init__(self, model: PreTrainedModel, layer: int = -1, pooling: Pooling = "mean") -> None:
        super().__init__()
        self.base = model.get_decoder()
        self.layer, self.pooling = layer, pooling
        self.hidden_size = model.config.get_text_config().hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.base(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.layer != -1
        )
        hidden = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float()
        last = attention_mask.sum(1) - 1  # right padding
        return hidden[torch.arange(hidden.shape[0]), last].float()


class Reprogrammer(nn.Sequential):
    """Maps frozen teacher features into the shared (student-side) space."""

    def __init__(self, teacher_dim: int, hidden: int, shared_dim: int) -> None:
        super().__init__(
            nn.LayerNorm(teacher_dim),
            nn.Linear(teacher_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, shared_dim),
        )


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class TeacherProbe(nn.Module):
    """Teacher + reprogramming alone: reprogrammer and classifier trained on frozen teacher features."""

    def __init__(self, teacher_dim: int, hidden: int, shared_dim: int, num_classes: int) -> None:
        super().__init__()
        self.reprogram = Reprogrammer(teacher_dim, hidden, shared_dim)
        self.head = nn.Linear(shared_dim, num_classes)

    def forward(
        self, teacher_features: torch.Tensor, labels: torch.Tensor | None = None, **_: torch.Tensor
    ) -> Output:
        logits = self.head(self.reprogram(teacher_features))
        return Output(F.cross_entropy(logits, labels) if labels is not None else None, logits)


@dataclass
class LossWeights:
    hybrid: float = 1.0  # CE of the reprogrammed-teacher logits through the shared classifier (decays)
    agreement: float = 1.0  # KL(teacher-side || student) at `temperature` (decays)
    cka: float = 1.0
    kd: float = 1.0  # logit KD and feature MSE baselines
    temperature: float = 2.0
    decay: Literal["linear", "none"] = "linear"


class StudentDistiller(nn.Module):
    """Student encoder + projection + classifier, trained with the objective of `variant`.

    Teacher features arrive either precomputed (`teacher_features`, from the cache) or are computed
    live by a frozen `teacher` encoder from `teacher_input_ids`.
    """

    def __init__(
        self,
        student: LMEncoder,
        teacher_dim: int,
        num_classes: int,
        variant: Variant,
        weights: LossWeights,
        shared_dim: int,
        reprogrammer_hidden: int,
        probe: TeacherProbe | None = None,
        teacher: LMEncoder | None = None,
    ) -> None:
        super().__init__()
        self.student, self.variant, self.weights = student, variant, weights
        self.project = nn.Linear(student.hidden_size, shared_dim)
        self.head = nn.Linear(shared_dim, num_classes)
        self.teacher = teacher.requires_grad_(False) if teacher is not None else None
        self.probe = probe.requires_grad_(False) if probe is not None else None
        if variant == "rd":
            self.reprogram = Reprogrammer(teacher_dim, reprogrammer_hidden, shared_dim)
        if variant == "feature_mse":
            self.regress = nn.Linear(student.hidden_size, teacher_dim)
        if variant == "logit_kd" and probe is None:
            raise ValueError("logit_kd needs a trained teacher probe")
        self.progress = 0.0  # share of training done, set by the trainer; drives the decaying weights

    def _decay(self) -> float:
        return 1.0 - self.progress if self.weights.decay == "linear" else 1.0

    def _teacher_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "teacher_features" in batch:
            return batch["teacher_features"]
        assert self.teacher is not None, "no teacher features in the batch and no live teacher"
        with torch.no_grad():
            return self.teacher(batch["teacher_input_ids"], batch["teacher_attention_mask"])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **teacher_inputs: torch.Tensor,
    ) -> Output:
        raw = self.student(input_ids, attention_mask)
        shared = self.project(raw)
        logits = self.head(shared)
        if labels is None:
            return Output(None, logits)
        loss = F.cross_entropy(logits, labels)
        if self.variant == "student_ce":
            return Output(loss, logits)
        w, temp = self.weights, self.weights.temperature
        teacher = self._teacher_features(teacher_inputs)
        if self.variant == "feature_mse":
            target = F.layer_norm(teacher, teacher.shape[-1:])
            return Output(loss + w.kd * F.mse_loss(self.regress(raw), target), logits)
        if self.variant == "logit_kd":
            assert self.probe is not None
            teacher_logits = self.probe(teacher).logits
            return Output(loss + w.kd * _kl(teacher_logits, logits, temp), logits)
        reprogrammed = self.reprogram(teacher)
        hybrid = self.head(reprogrammed)
        decay = self._decay()
        loss = loss + decay * w.hybrid * F.cross_entropy(hybrid, labels)
        loss = loss + decay * w.agreement * _kl(hybrid.detach(), logits, temp)
        loss = loss + w.cka * cka_loss(reprogrammed, shared)
        return Output(loss, logits)


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton et al.)."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, -1),
            F.log_softmax(teacher_logits / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
