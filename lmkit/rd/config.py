"""RD's recipe sections: the teacher and student encoders and the distillation settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmkit.config import StrictModel
from lmkit.loader import ModelSpec

ALL_VARIANTS = ["teacher_probe", "student_ce", "logit_kd", "feature_mse", "rd"]


class EncoderSection(StrictModel):
    num_layers: int | None = Field(None, gt=0, description="keep only the first N decoder layers")
    layer: int = Field(-1, description="hidden-state layer to pool (-1: final, after the norm)")
    pooling: Literal["mean", "last"] = "mean"
    max_length: int = Field(128, gt=0)


class StudentSection(EncoderSection):
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(source="tiny-llama"))


class RDSection(StrictModel):
    shared_dim: int = Field(128, gt=0)
    reprogrammer_hidden: int = Field(256, gt=0)
    hybrid_weight: float = Field(1.0, ge=0)
    agreement_weight: float = Field(1.0, ge=0)
    cka_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(1.0, ge=0, description="weight of the logit-KD and feature-MSE baseline terms")
    temperature: float = Field(2.0, gt=0)
    decay: Literal["linear", "none"] = "linear"
    cache_teacher_features: bool = True
    variants: list[Literal["teacher_probe", "student_ce", "logit_kd", "feature_mse", "rd"]] = Field(
        default_factory=lambda: list(ALL_VARIANTS), min_length=1
    )
    encode_batch_size: int = Field(16, gt=0)
