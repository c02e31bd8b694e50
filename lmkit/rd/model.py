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
    decay_floor: float = 0.0  # the decaying weights stop at this share
    stage: float = 1.0  # per extra stage: 1 - CKA(teacher layer, projected student layer)
    cka_target: Literal["detached", "joint"] = "detached"  # may CKA move the reprogrammer?


class StudentDistiller(nn.Module):
    """Student encoder + projection + classifier, trained with the objective of `variant`.

    Teacher features arrive either precomputed (`teacher_features`, from the cache) or are computed
    live by a frozen `teacher` encoder from `teacher_input_ids`; the teacher and the probe stay in
    eval mode whatever mode the trainer sets (a teacher with dropout would give noisy targets).
    In eval mode the loss is the student's cross-entropy alone: what validation compares across
    variants, whose training objectives differ.
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
        stages: list[tuple[int, int]] | None = None,
    ) -> None:
        """`stages`: extra (teacher layer, student layer) pairs aligned by CKA through per-stage
        student projectors (multi-stage RD); layer indices count the embeddings as 0."""
        super().__init__()
        self.student, self.variant, self.weights = student, variant, weights
        self.project = nn.Linear(student.hidden_size, shared_dim)
        self.head = nn.Linear(shared_dim, num_classes)
        self.teacher = teacher.requires_grad_(False) if teacher is not None else None
        self.probe = probe.requires_grad_(False) if probe is not None else None
        self.stages = list(stages or []) if variant == "rd" else []
        if variant == "rd":
            self.reprogram = Reprogrammer(teacher_dim, reprogrammer_hidden, shared_dim)
            # No bias: CKA centres its inputs, so a bias gets no gradient but float noise, which
            # Adam would turn into lr-sized random steps.
            self.stage_projects = nn.ModuleList(
                nn.Linear(student.hidden_size, shared_dim, bias=False) for _ in self.stages
            )
        if variant == "feature_mse":
            self.regress = nn.Linear(student.hidden_size, teacher_dim)
        if variant == "logit_kd" and probe is None:
            raise ValueError("logit_kd needs a trained teacher probe")
        self.progress = 0.0  # share of training done, set by the trainer; drives the decaying weights

    def train(self, mode: bool = True) -> StudentDistiller:
        super().train(mode)
        for frozen in (self.teacher, self.probe):
            if frozen is not None:
                frozen.eval()
        return self

    def _decay(self) -> float:
        if self.weights.decay == "none":
            return 1.0
        return max(1.0 - self.progress, self.weights.decay_floor)

    def _teacher_side(
        self, batch: dict[str, torch.Tensor], stages: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's pooled features [B, D] and, with `stages`, its extra stages' [B, S, D]: from
        the cache, or from one forward pass of the live teacher."""
        if "teacher_features" in batch:
            return batch["teacher_features"], batch.get("teacher_stage_features") if stages else None
        assert self.teacher is not None, "no teacher features in the batch and no live teacher"
        ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
        with torch.no_grad():
            if not stages:
                return self.teacher(ids, mask), None
            pooling = self.teacher.pooling
            stack = self.teacher.every_layer(ids, mask, (pooling,))[pooling]
        return stack[:, self.teacher.layer], stack[:, [t for t, _ in self.stages]]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **teacher_inputs: torch.Tensor,
    ) -> ClassifierOutput:
        stack = None
        if self.stages and self.training and labels is not None:  # every student layer, one pass
            pooling = self.student.pooling
            stack = self.student.every_layer(input_ids, attention_mask, (pooling,))[pooling]
            raw = stack[:, self.student.layer]
        else:
            raw = self.student(input_ids, attention_mask)
        shared = self.project(raw)
        logits = self.head(shared)
        if labels is None:
            return ClassifierOutput(None, logits)
        loss = F.cross_entropy(logits, labels)
        if self.variant == "student_ce" or not self.training:
            return ClassifierOutput(loss, logits)
        w, temp = self.weights, self.weights.temperature
        teacher, teacher_stages = self._teacher_side(teacher_inputs, stages=stack is not None)
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
        target = reprogrammed.detach() if w.cka_target == "detached" else reprogrammed
        loss = loss + w.cka * cka_loss(target, shared)
        if stack is not None:
            assert teacher_stages is not None, "multi-stage RD needs the teacher's stage features"
            for i, (project, (_, student_layer)) in enumerate(
                zip(self.stage_projects, self.stages, strict=True)
            ):
                loss = loss + w.stage * cka_loss(teacher_stages[:, i], project(stack[:, student_layer]))
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
