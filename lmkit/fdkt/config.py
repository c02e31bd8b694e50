"""FDKT's settings, kept apart from the code that needs opacus, flwr or httpx.

A recipe validates (and `lmkit methods` documents it) without those installed; running it checks
them first and names the extra to install.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from lmkit.adapters import LoraSpec
from lmkit.config import StrictModel
from lmkit.data import DataSpec
from lmkit.data.spec import TASK_NAME
from lmkit.loader import ModelSpec
from lmkit.training import TrainConfig

INSECURE = (
    "dp.secure_mode is false: DP noise and sampling are reproducible from the recipe seed, so the "
    "epsilon reported is NOT a privacy guarantee (experiments only; set dp.secure_mode: true)"
)


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
    secure_mode: bool = Field(
        True,
        description="DP noise and Poisson sampling drawn from OS entropy, never from the recipe seed, "
        "with Opacus' floating-point-safe noise; false: reproducible from the seed (experiments only)",
    )


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
    temperature: float = Field(0.8, ge=0, description="0: greedy; the same in-process and over HTTP")
    top_p: float = Field(0.9, gt=0, le=1)
    embedder: ModelSpec | None = Field(
        None, description="pooled hidden states that cluster demonstrations; unset: server.model"
    )
    timeout_s: float = Field(120, gt=0)


class ClientSpec(StrictModel):
    """One client: its private data (the shared `data` section) and what that data is, in words."""

    name: str = Field(pattern=TASK_NAME)
    domain: str = Field(description="what the texts are, e.g. 'movie reviews': prompts and control codes")
    data: DataSpec = Field(
        description="train split: the private records; eval split: the client's held-out test records. "
        "The target column holds the label (label_names turn raw labels into words)"
    )


def _review_client(domain: str) -> ClientSpec:
    generate = {"tasks": [f"reviews_{domain}"], "train_size": 12, "eval_size": 48}
    return ClientSpec(name=domain, domain=f"{domain} reviews", data=DataSpec(generate=generate))


class ServerStep(StrictModel):
    """What the server does with the demonstrations (the last two modes are ablations)."""

    mode: Literal["augment", "describe_only", "pass_through"] = Field(
        "augment",
        description="augment: cluster, filter, few-shot augment; describe_only: augment from the "
        "client's domain description alone; pass_through: return the DP demonstrations unchanged",
    )
    cluster: bool = Field(True, description="KMeans per label before filtering (false: one group per label)")
    per_cluster: int = Field(4, gt=0, description="demonstrations per cluster: k = ceil(n_label / this)")


class FDKTConfig(StrictModel):
    clients: list[ClientSpec] = Field(
        default_factory=lambda: [_review_client(d) for d in ("restaurant", "electronics", "travel")],
        min_length=1,
    )
    rounds: int = Field(1, gt=0)
    generator: ModelSpec = Field(default_factory=lambda: ModelSpec(source="smollm2-135m", dtype="float32"))
    dp: DPConfig = Field(default_factory=DPConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    server: ServerLLMConfig = Field(default_factory=ServerLLMConfig)
    augment_per_label: int = Field(16, gt=0, description="augmented samples per label sent to a client")
    shots: int = Field(3, gt=0)
    prompts_per_label: int = Field(8, gt=0)
    server_step: ServerStep = Field(default_factory=ServerStep)
    task: TaskConfig = Field(default_factory=TaskConfig)
    canaries: int = Field(4, ge=0, description="canaries planted in the first client's private data")
    canary_repeats: int = Field(2, gt=0)
    report_private_metrics: bool = Field(
        False,
        description="send each client's test scores (accuracy, majority-class rate, share of each "
        "predicted label: they reveal its test set's label mix) and audit to the server; default: "
        "clients write them to their own output dir and only DP synthetic data and epsilon leave a client",
    )
    fail_partitions: list[int] = Field([], description="clients that fail in round 1 (a dropout drill)")
    seed: int = 0

    @model_validator(mode="after")
    def _unique_names(self) -> FDKTConfig:
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise ValueError(f"fdkt.clients need unique names, got {names}")
        return self
