"""One LoRA shape for every method that trains adapters: lora, MoLA's experts, FDKT's DP generator."""

from __future__ import annotations

from typing import Literal

from peft import LoraConfig
from pydantic import Field

from lmkit.config import StrictModel


class LoraSpec(StrictModel):
    r: int = Field(8, gt=0, description="rank")
    alpha: float = Field(16, gt=0, description="scale numerator: the update is (alpha / r) * B A x")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names to adapt, or all-linear",
    )

    def peft_config(self, **extra: object) -> LoraConfig:
        """The peft config of this shape (`extra`: further LoraConfig fields, e.g. task_type)."""
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            **extra,
        )
