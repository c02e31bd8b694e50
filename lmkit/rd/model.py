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

from lmkit.modeling import ClassifierOutput, LMEncoder
from lmkit.rd.cka import cka_loss

Variant = Literal["student_ce", "logit_kd", "feature_mse", "rd"]


class Reprogrammer(nn.Sequential):
    """Maps frozen teacher features into the shared (student-side) space."""

    def __init__(self, teacher_dim: int, hidden: int, shared_dim: int) -> None:
        super().__init__(
            nn.LayerNorm(teacher_dim),
            nn.Linear(teacher_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, shared_dim),
        )


class TeacherProbe(nn.Module):
    """Teacher + reprogramming alone: reprogrammer and classifier trained on frozen teacher features."""

    def __init__(self, teacher_dim: int, hidden: int, shared_dim: int, num_classes: int) -> None:
        super().__init__()
        self.reprogram = Reprogrammer(teacher_dim, hidden, shared_dim)
        self.head = nn.Linear(shared_dim, num_classes)

    def forward(
        self, teacher_features: torch.Tensor, labels: torch.Tensor | None = None, **_: torch.Tensor
    ) -> ClassifierOutput:
        logits = self.head(self.reprogram(teacher_features))
        return ClassifierOutput(F.cross_entropy(logits, labels) if labels is not None else None, logits)


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
    ) -> ClassifierOutput:
        raw = self.student(input_ids, attention_mask)
        shared = self.project(raw)
        logits = self.head(shared)
        if labels is None:
            return ClassifierOutput(None, logits)
        loss = F.cross_entropy(logits, labels)
        if self.variant == "student_ce":
            return ClassifierOutput(loss, logits)
        w, temp = self.weights, self.weights.temperature
        teacher = self._teacher_features(teacher_inputs)
        if self.variant == "feature_mse":
            target = F.layer_norm(teacher, teacher.shape[-1:])
            return ClassifierOutput(loss + w.kd * F.mse_loss(self.regress(raw), target), logits)
        if self.variant == "logit_kd":
            assert self.probe is not None
            teacher_logits = self.probe(teacher).logits
            return ClassifierOutput(loss + w.kd * _kl(teacher_logits, logits, temp), logits)
        reprogrammed = self.reprogram(teacher)
        hybrid = self.head(reprogrammed)
        decay = self._decay()
        loss = loss + decay * w.hybrid * F.cross_entropy(hybrid, labels)
        loss = loss + decay * w.agreement * _kl(hybrid.detach(), logits, temp)
        loss = loss + w.cka * cka_loss(reprogrammed, shared)
        return ClassifierOutput(loss, logits)


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
