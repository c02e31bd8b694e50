"""Engine side: install the LoRA fixes on a model runner when, and only when, it loads LoRA.

`LoRAModelRunnerMixin.load_lora_model` runs once per engine started with `--enable-lora`; wrapping
it is the only class-level change. Everything else is set on that runner's instances (its punica
wrappers, its `_get_prompt_logprobs_dict`), so an engine without LoRA runs vLLM's code untouched.
"""

from __future__ import annotations

import functools
import logging
from types import MethodType, ModuleType
from typing import Any

import torch

logger = logging.getLogger("vllm.lmkit.vllm_patches")
PATCHED = "_lmkit_patched"


def punica_wrappers(model: torch.nn.Module) -> tuple[list[Any], Any | None]:
    """All distinct punica wrappers of the model's LoRA layers, and the logits processor's (or None)."""
    from vllm.lora.layers import BaseLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    wrappers: dict[int, Any] = {}
    logits = None
    for module in model.modules():
        if isinstance(module, BaseLayerWithLoRA) and getattr(module, "punica_wrapper", None) is not None:
            wrappers[id(module.punica_wrapper)] = module.punica_wrapper
            if isinstance(module, LogitsProcessorWithLoRA):
                logits = module.punica_wrapper
    return list(wrappers.values()), logits


def install(runner: Any, model: torch.nn.Module) -> None:
    """Apply both fixes to `runner` if this engine is one they were written for; else log why not."""
    from lmkit.vllm_patches.lora_logits import per_row_lora_logits, prompt_logits_of
    from lmkit.vllm_patches.no_lora_rows import spare_base_rows
    from lmkit.vllm_patches.pins import unsupported_reason

    reason = unsupported_reason(runner.vllm_config)
    if reason is not None:
        logger.error("lmkit: LoRA fixes not applied; the API server refuses prompt logprobs. %s", reason)
        return
    wrappers, logits = punica_wrappers(model)
    for punica in wrappers:
        spare_base_rows(punica)
    if logits is None:
        return  # the logits processor is not LoRA-wrapped: prompt logprobs never read a LoRA mapping
    per_row_lora_logits(logits)
    original = type(runner)._get_prompt_logprobs_dict

    def _get_prompt_logprobs_dict(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.num_prompt_logprobs:
            return original(self, hidden_states, *args, **kwargs)
        with prompt_logits_of(logits, self.model, hidden_states):
            return original(self, hidden_states, *args, **kwargs)

    runner._get_prompt_logprobs_dict = MethodType(_get_prompt_logprobs_dict, runner)
    logger.info("lmkit: prompt logprobs use the per-token LoRA mapping (plugin lmkit_lora_prompt_logprobs)")


def patch_lora_runner(module: ModuleType) -> None:
    """Wrap `LoRAModelRunnerMixin.load_lora_model` (called only by engines started with LoRA)."""
    mixin = module.LoRAModelRunnerMixin
    original = mixin.load_lora_model
    if getattr(original, PATCHED, False):
        return

    @functools.wraps(original)
    def load_lora_model(self: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
        model = original(self, *args, **kwargs)
        install(self, model)
        return model

    setattr(load_lora_model, PATCHED, True)
    mixin.load_lora_model = load_lora_model
