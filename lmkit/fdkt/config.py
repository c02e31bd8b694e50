"""FDKT's settings, kept apart from the code that needs opacus, flwr or httpx.

A recipe validates (and `lmkit methods` documents it) without those installed; running it checks
them first and names the extra to install.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from lmkit.adapters import LoraSpec
from lmkit.config import StrictModel
from lmkit.loader import ModelSpec
from lmkit.training import TrainConfig


class DPConfig(StrictModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")  # epsilon .inf survives the JSON to Flower apps

    epsilon: float = Field(8.0, gt=0, description="target (epsilon, delta) over all rounds; .inf = no DP")
    delta: float = Field(1e-4, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample clipping norm")
    epochs: int = Field(4, gt=0, description="passes over the private data per round")
    batch_size: int = Field(8, gt=0, description="expected (Poisson) batch size")
    lr: float = Field(2e-3, gt=0)
    lora: LoraSpec = Field(
        default_factory=lambda: LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        description="the generator's LoRA (dropout 0: Opacus clips per-sample gradients of a fixed graph)",
    )
    max_length: int = Field(64, gt=8)


class SynthConfig(StrictModel):
    per_label: int = Field(8, gt=0, description="synthetic demonstrations sampled per label and round")
    max_new_tokens: int = Field(24, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)


class TaskConfig(StrictModel):
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(source="smollm2-135m", dtype="float32"))
    num_layers: int | None = Field(4, gt=0, description="keep the first N decoder layers of the task SLM")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(max_steps=30, batch_size=8, lr=5e-4, max_length=64)
    )


class ServerLLMConfig(StrictModel):
    """`endpoint` (an OpenAI-compatible base URL, e.g. lmkit serve) when set; else `model` in-process."""

    endpoint: str | None = None
    served_model_name: str = "base"
    model: ModelSpec | None = Field(default_factory=lambda: ModelSpec(source="smollm2-135m", dtype="float32"))
    max_tokens: int = Field(64, gt=0, description="per augmentation reply (filter verdicts use 8)")
    temperature: float = Field(0.8, ge=0)
    timeout_s: float = Field(120, gt=0)


class FDKTConfig(StrictModel):
    domains: list[str] = Field(default_factory=lambda: ["restaurant", "electronics", "travel"], min_length=1)
    private_train: int = Field(12, gt=0, description="private records per client (before canaries)")
    private_test: int = Field(48, gt=0, description="held-out private records per client")
    rounds: int = Field(1, gt=0)
    generator: ModelSpec = Field(default_factory=lambda: ModelSpec(source="smollm2-135m", dtype="float32"))
    dp: DPConfig = Field(default_factory=DPConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    server: ServerLLMConfig = Field(default_factory=ServerLLMConfig)
    augment_per_label: int = Field(16, gt=0, description="augmented samples per label sent to a client")
    shots: int = Field(3, gt=0)
    prompts_per_label: int = Field(8, gt=0)
    task: TaskConfig = Field(default_factory=TaskConfig)
    canaries: int = Field(4, ge=0, description="canaries planted in client 0's private data")
    canary_repeats: int = Field(2, gt=0)
    fail_partitions: list[int] = Field([], description="clients that fail in round 1 (a dropout drill)")
    seed: int = 0
