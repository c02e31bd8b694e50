"""`serve/*.yaml`: what `lmkit serve` runs, validated like recipes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmkit.config import StrictModel, apply_overrides, read_yaml, secret_from_env, validate
from lmkit.errors import ConfigError
from lmkit.loader import AdapterSpec, ModelSpec
from lmkit.pruning.config import PruneConfig
from lmkit.pruning.vllm_plugin import VLLM_METHODS
from lmkit.serving.guard import path_allowed


class EngineConfig(StrictModel):
    """vLLM engine settings; multi-GPU and multi-node keys are passed straight to vLLM."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int = Field(2048, gt=0)
    max_num_seqs: int | None = Field(None, gt=0)
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="GPU: share of GPU memory; vLLM-CPU reads it as a share of host RAM"
    )
    cpu_kvcache_space_gb: int = Field(1, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU builds")
    tensor_parallel_size: int = Field(1, gt=0)
    pipeline_parallel_size: int = Field(1, gt=0)
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    seed: int = 0
    extra_args: list[str] = Field([], description="further vLLM flags, verbatim (e.g. [--enforce-eager])")


class MoLARouterSpec(StrictModel):
    """An exported MoLA-Router (`<output_dir>/variants/mola_router` of a mola recipe), served as `name`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: Path
    buckets: int = Field(10, ge=1, le=100, description="gates are rounded to multiples of 1/buckets")


class ServeConfig(StrictModel):
    model: ModelSpec = Field(default_factory=ModelSpec)
    served_model_name: str = Field("base", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    api_key_env: str | None = Field(
        None, description="name of the environment variable holding the API key; unset = no auth"
    )
    adapter_dirs: list[Path] = Field(
        [], description="adapters (static and runtime-loaded) must live inside one of these directories"
    )
    runtime_adapters: bool = Field(
        False, description="enable /v1/load_lora_adapter and /v1/unload_lora_adapter"
    )
    max_lora_rank: int = Field(16, gt=0)
    max_loras: int = Field(4, gt=0, description="adapters batched together at once")
    vllm_plugins: list[str] = Field([], description="vLLM plugins to load (VLLM_PLUGINS), e.g. pruned models")
    mola_routers: list[MoLARouterSpec] = Field([], description="MoLA-Router models, routed per request")
    prune: PruneConfig | None = Field(
        None, description="serve a LLaVA-family model with visual tokens pruned (lmkit's vLLM plugin)"
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    startup_timeout_s: float = Field(600, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.model.quantization == "int8":
            raise ValueError(
                "vLLM quantizes with bitsandbytes in flight to 4-bit only; use model.quantization: nf4 "
                "(or none)"
            )
        if self.runtime_adapters and not self.adapter_dirs:
            raise ValueError(
                "runtime_adapters needs adapter_dirs: the directories runtime loads may read from"
            )
        if self.prune is not None and self.prune.method not in VLLM_METHODS:
            raise ValueError(
                f"prune.method {self.prune.method!r} cannot be served: fastv prunes inside the LM, which "
                f"vLLM's paged KV cache rules out. Fix: use one of {', '.join(VLLM_METHODS)}"
            )
        names = [a.name for a in self.model.adapters]
        if self.served_model_name in names:
            raise ValueError(f"served_model_name {self.served_model_name!r} is also an adapter name")
        return self

    @property
    def lora_enabled(self) -> bool:
        return bool(self.model.adapters) or self.runtime_adapters or bool(self.mola_routers)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def api_key(self) -> str | None:
        return None if self.api_key_env is None else secret_from_env(self.api_key_env, "api_key_env")


def check_bnb_plugin(config: ServeConfig) -> None:
    """vLLM moved bitsandbytes out of its core (v0.28) into the vllm-bnb-plugin package."""
    if config.model.quantization == "nf4" and importlib.util.find_spec("vllm_bnb_plugin") is None:
        raise ConfigError(
            "model.quantization: nf4 needs vLLM's bitsandbytes plugin. Fix: pip install --no-deps "
            "vllm-bnb-plugin==0.0.3 (make setup does; --no-deps because it lists the CUDA vllm), or set "
            "model.quantization: none."
        )


def check_adapter(adapter: AdapterSpec, config: ServeConfig) -> None:
    """An adapter must be a peft LoRA dir inside `adapter_dirs` (when set) with rank <= max_lora_rank."""
    roots = [d.resolve() for d in config.adapter_dirs]
    if roots and not path_allowed(str(adapter.path), roots):
        allowed = ", ".join(str(d) for d in config.adapter_dirs)
        raise ConfigError(
            f"Adapter {adapter.name!r} at {adapter.path} is outside adapter_dirs ({allowed}). "
            "Fix: move it into one of them or add its directory to adapter_dirs."
        )
    config_file = adapter.path / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"Adapter {adapter.name!r}: {config_file} not found. Fix: point to a directory written "
            "by peft's save_pretrained (e.g. <output_dir>/adapter of a training recipe)."
        )
    rank = json.loads(config_file.read_text()).get("r", 0)
    if rank > config.max_lora_rank:
        raise ConfigError(
            f"Adapter {adapter.name!r} has rank {rank} > max_lora_rank {config.max_lora_rank}. "
            f"Fix: set max_lora_rank: {rank} or more."
        )


def check_router(spec: MoLARouterSpec, config: ServeConfig) -> None:
    meta_file = spec.path / "router" / "router.json"
    if not meta_file.is_file() or not (spec.path / "experts").is_dir():
        raise ConfigError(
            f"mola_routers {spec.name!r}: {spec.path} is not an exported MoLA-Router. Fix: point to "
            "<output_dir>/variants/mola_router of a mola recipe run."
        )
    meta = json.loads(meta_file.read_text())
    names = meta["experts"] + (["shared"] if meta["shared"] == "lora" else [])
    rank = sum(
        json.loads((spec.path / "experts" / n / "adapter_config.json").read_text())["r"] for n in names
    )
    if rank > config.max_lora_rank:
        raise ConfigError(
            f"mola_routers {spec.name!r}: its merged adapter has rank {rank} (all experts "
            f"concatenated) > max_lora_rank {config.max_lora_rank}. Fix: set max_lora_rank to a vLLM "
            f"rank >= {rank} (8, 16, 32, 64, 128, 256, 320, 512)."
        )


def load_serve_config(path: str | Path, overrides: list[str] | None = None) -> ServeConfig:
    data = apply_overrides(read_yaml(path), list(overrides or []))
    config = validate(ServeConfig, data, str(path))
    check_bnb_plugin(config)
    for adapter in config.model.adapters:
        check_adapter(adapter, config)
    for router in config.mola_routers:
        check_router(router, config)
    return config
