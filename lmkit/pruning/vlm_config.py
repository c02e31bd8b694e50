"""Settings of the tiny VLM trained here (`method: train_vlm`), apart from the torch code."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmkit.adapters import LoraSpec
from lmkit.config import StrictModel
from lmkit.loader import ModelSpec


class VisionTowerSpec(StrictModel):
    """A CLIP-style tower with [CLS]."""

    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(512, gt=0)
    layers: int = Field(4, gt=1, description="the LM reads the second-to-last layer")
    heads: int = Field(4, gt=0)


class StageSpec(StrictModel):
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr over these steps")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="lr after warm-up: held, or cosine-decayed to 0 at the last step"
    )
    max_grad_norm: float | None = Field(None, gt=0, description="clip gradients to this norm; unset: no clip")

    @model_validator(mode="after")
    def _warmup_fits(self) -> StageSpec:
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps {self.warmup_steps} must be fewer than steps {self.steps}. "
                "Fix: lower warmup_steps or raise steps."
            )
        return self


class HeldOutStopping(StrictModel):
    """align_stage stops when its loss on held-out chats stops falling, and keeps the best weights,
    so a longer cap costs only the steps that still help. Made for seed 1, which had not learned to
    read at 200 steps (0.496); at a 480-step cap it still had not (0.492, its held-out loss falling
    slowly to the end: evals/results/tiny_vlm_training.md)."""

    scenes: int = Field(32, gt=0, description="held-out scenes (their own seed stream), asked as in training")
    every: int = Field(40, gt=0, description="align_stage steps between held-out loss measurements")
    patience: int = Field(3, gt=0, description="measurements without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="improvement smaller than this does not count")


ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TinyVLMConfig(StrictModel):
    image_size: int = Field(224, gt=0, description="224 px at patch 14: 256 image tokens")
    patch_size: int = Field(14, gt=0)
    feature_layer: int = Field(-2, description="vision layer the LM reads (LLaVA-1.5's choice)")
    vision: VisionTowerSpec = Field(default_factory=VisionTowerSpec)
    lm: ModelSpec = Field(default_factory=lambda: ModelSpec(source="smollm2-135m", dtype="float32"))
    lm_layers: int | None = Field(
        None, gt=0, description="keep the first N LM layers; unset: all (4 or 12 never learned the lookup)"
    )
    lora: LoraSpec | None = Field(
        default_factory=lambda: LoraSpec(r=16, alpha=32, dropout=0.0, target_modules=ATTENTION_AND_MLP),
        description="stage 2 trains this LoRA on the LM (merged when done); null: fine-tune the LM's "
        "layers and final norm fully (embeddings and head stay frozen)",
    )
    projector_lr: float | None = Field(
        None, gt=0, description="caption and align stages: the projector's lr; unset: the stage's lr"
    )
    vision_stage: StageSpec = Field(
        default_factory=lambda: StageSpec(
            steps=1200, batch_size=32, lr=2e-3, warmup_steps=50, schedule="cosine", max_grad_norm=1.0
        )
    )
    anchor_stage: StageSpec | None = Field(
        default_factory=lambda: StageSpec(steps=300, batch_size=32, lr=1e-3),
        description="projector-only warm-up before align_stage: object patches mapped near the LM's "
        "embeddings of their colour, shape and side words (no LM forward); unset: none",
    )
    anchor_target: Literal["blend", "words"] = Field(
        "words",
        description="anchor_stage's target per object patch: blend (the mean of its colour, shape and "
        "side words) or words (one of them by patch column; the tower then also learns each patch's "
        "column phase); fed as ideal patches, the full LM learned the lookup from words in 50 steps of "
        "16, not from blend (evals/results/vlm_lookup.md)",
    )
    caption_stage: StageSpec | None = Field(
        None,
        description="before align_stage, the same parameters learn to list each scene's objects from "
        "left to right (size, colour, shape, side): LLaVA's caption alignment, dense in image-read words; "
        "batch_size counts scenes; unset: none",
    )
    align_stage: StageSpec = Field(
        default_factory=lambda: StageSpec(
            steps=200, batch_size=4, lr=1e-3, warmup_steps=20, schedule="cosine", max_grad_norm=1.0
        ),
        description="batch_size counts scenes, each asked questions_per_scene questions",
    )
    align_stopping: HeldOutStopping | None = Field(
        None,
        description="stop align_stage early on a held-out loss (align_stage.steps is then the cap; its "
        "cosine still spans all of it) and keep the best weights; unset: train all align_stage.steps "
        "and keep the last. Seed 1 at a 480-step cap still did not read (0.492; tiny_vlm_training.md)",
    )
    captions_per_step: int = Field(
        0,
        ge=0,
        description="align_stage: of each step's batch_size scenes, this many are captioned as in "
        "caption_stage instead of questioned, so answering is learned without unlearning the reading",
    )
    questions_per_scene: int = Field(
        4,
        gt=0,
        description="align_stage: questions per scene (each about a different shape), as the turns "
        "of one chat: more supervision per image at little extra cost; evaluation always asks one",
    )
    eval_questions: int = Field(500, gt=0, description="held-out scenes and questions")

    @model_validator(mode="after")
    def _captions_leave_questions(self) -> TinyVLMConfig:
        if self.captions_per_step >= self.align_stage.batch_size:
            raise ValueError(
                f"captions_per_step {self.captions_per_step} leaves no questioned scene in align_stage's "
                f"batch of {self.align_stage.batch_size}. Fix: lower captions_per_step or raise "
                "align_stage.batch_size."
            )
        return self
