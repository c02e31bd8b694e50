"""RD's recipe sections: the teacher and student encoders and the distillation settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmkit.config import StrictModel
from lmkit.data import DataSpec
from lmkit.loader import ModelSpec
from lmkit.recipes import Recipe
from lmkit.training import TrainConfig

ALL_VARIANTS = ["teacher_probe", "student_ce", "logit_kd", "feature_mse", "rd"]


class EncoderSection(StrictModel):
    num_layers: int | None = Field(None, gt=0, description="keep only the first N decoder layers")
    max_length: int = Field(128, gt=0)


class TeacherSection(EncoderSection):
    layer: int | Literal["auto"] = Field(
        "auto",
        description="hidden-state layer to pool (-1: final, after the norm); auto: the layer whose linear "
        "probe scores best on a validation split carved from the training rows",
    )
    pooling: Literal["mean", "last", "auto"] = Field(
        "auto", description="auto: chosen with the layer, by the same probe sweep"
    )


class ScratchSpec(StrictModel):
    """A student built from a config with random weights; only the tokenizer comes from `model`."""

    kind: Literal["decoder", "encoder"] = Field(
        "decoder", description="decoder: a causal Llama; encoder: a bidirectional BERT-style encoder"
    )
    hidden_size: int = Field(256, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int | None = Field(None, gt=0, description="default: 4 x hidden_size")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ScratchSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class StudentSection(EncoderSection):
    model: ModelSpec = Field(
        default_factory=lambda: ModelSpec(source="tiny-llama"),
        description="the student's weights and tokenizer (only its tokenizer when `scratch` is set)",
    )
    scratch: ScratchSpec | None = Field(
        None, description="train a randomly initialised student of this shape"
    )
    layer: int = Field(-1, description="hidden-state layer to pool (-1: final)")
    pooling: Literal["mean", "last"] = "mean"

    @model_validator(mode="after")
    def _scratch_has_no_truncation(self) -> StudentSection:
        if self.scratch is not None and self.num_layers is not None:
            raise ValueError(
                "student.num_layers truncates a pretrained student; with scratch set "
                "use student.scratch.num_layers"
            )
        return self


class StagePair(StrictModel):
    """One extra stage of multi-stage RD: a teacher layer aligned with a student layer."""

    teacher_layer: int = Field(description="0: embeddings, k: output of layer k, -1: final (normed)")
    student_layer: int = Field(description="same numbering, in the student")


class RDSection(StrictModel):
    shared_dim: int = Field(128, gt=0)
    reprogrammer_hidden: int = Field(256, gt=0)
    hybrid_weight: float = Field(1.0, ge=0)
    agreement_weight: float = Field(1.0, ge=0)
    cka_weight: float = Field(1.0, ge=0)
    cka_target: Literal["detached", "joint"] = Field(
        "detached",
        description="detached: CKA moves only the student (the reprogrammed teacher is its target); "
        "joint: it moves the reprogrammer too, which once the hybrid and agreement weights have "
        "decayed pulls the 'teacher' side toward the student",
    )
    decay_floor: float = Field(
        0.0, ge=0, le=1, description="the hybrid and agreement weights decay to this share, not below"
    )
    stages: list[StagePair] = Field(
        default_factory=list,
        description="multi-stage RD: extra (teacher layer, student layer) pairs, each aligned by CKA "
        "through its own student projector, on top of the final pooled features",
    )
    stage_weight: float = Field(1.0, ge=0, description="weight of each extra stage's CKA term")
    kd_weight: float = Field(1.0, ge=0, description="weight of the logit-KD and feature-MSE baseline terms")
    temperature: float = Field(2.0, gt=0)
    decay: Literal["linear", "none"] = "linear"
    decay_steps: int | None = Field(
        None,
        gt=0,
        description="steps over which the hybrid and agreement weights decay (default: train.max_steps; "
        "set it when early stopping makes max_steps only a cap)",
    )
    cache_teacher_features: bool = True
    teacher_cache_dir: Path | None = Field(
        None,
        description="where cached teacher features live (default: <output_dir>/teacher_features); "
        "runs that share it encode each identical split once",
    )
    variants: list[Literal["teacher_probe", "student_ce", "logit_kd", "feature_mse", "rd"]] = Field(
        default_factory=lambda: list(ALL_VARIANTS), min_length=1
    )
    encode_batch_size: int = Field(16, gt=0)
    latency_rows: int = Field(256, gt=0, description="eval rows timed for the student/teacher latency ratio")


CKA_BATCH_FLOOR = 8  # recipe floor; lmkit.rd.cka.MIN_CKA_BATCH (4) is where CKA stops being defined


class RDRecipe(Recipe):
    """`model` is the frozen teacher; `student` is any smaller model (own tokenizer and width)."""

    method: Literal["rd"]
    model: ModelSpec = Field(
        default_factory=ModelSpec,
        description="the frozen teacher (float32 by default: on CPU a bf16 teacher is slower, not faster)",
    )
    data: DataSpec
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    student: StudentSection = Field(default_factory=StudentSection)
    labels: list[str] | None = Field(
        None, min_length=2, description="classifier classes; default: targets seen"
    )
    rd: RDSection = Field(default_factory=RDSection)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check(self) -> RDRecipe:
        if "rd" in self.rd.variants and self.rd.cka_weight > 0 and self.train.batch_size < CKA_BATCH_FLOOR:
            raise ValueError(
                f"CKA compares n x n Gram matrices over a batch and needs train.batch_size >= "
                f"{CKA_BATCH_FLOOR} (got {self.train.batch_size}); gradient accumulation does not "
                "enlarge it. Fix: raise train.batch_size or set rd.cka_weight: 0"
            )
        if "logit_kd" in self.rd.variants and "teacher_probe" not in self.rd.variants:
            raise ValueError("variant logit_kd distils the teacher_probe; add teacher_probe to rd.variants")
        return self
