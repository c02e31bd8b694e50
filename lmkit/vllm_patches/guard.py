"""API-server side: refuse prompt logprobs on a LoRA server where the engine-side fix cannot apply.

A 400 that names the reason, instead of a request that kills the engine for every client. The
check wraps vLLM's own request validation (`InputProcessor._validate_params`), so the error has
vLLM's usual shape and status, and it runs before the request reaches the engine.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any


def refuse_if_unsupported(processor: Any, params: Any) -> None:
    """Raise vLLM's validation error (HTTP 400) for a prompt-logprobs request the engine cannot serve."""
    if processor.lora_config is None or getattr(params, "prompt_logprobs", None) is None:
        return
    from lmkit.vllm_patches.pins import unsupported_reason

    reason = unsupported_reason(processor.vllm_config, with_guard=True)
    if reason is not None:
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(reason, parameter="prompt_logprobs", value=params.prompt_logprobs)


def patch_input_processor(module: ModuleType) -> None:
    """Add the check after vLLM's own parameter validation."""
    cls = module.InputProcessor
    original = cls._validate_params
    if getattr(original, "_lmkit_guard", False):
        return

    @functools.wraps(original)
    def _validate_params(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, params, *args, **kwargs)
        refuse_if_unsupported(self, params)
        return result

    _validate_params._lmkit_guard = True  # type: ignore[attr-defined]
    cls._validate_params = _validate_params
