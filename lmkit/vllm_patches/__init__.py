"""Targeted fixes for the pinned vLLM release, loaded as the `vllm.general_plugins` entry point.

`register` is called by vLLM in every process it starts (API server, engine core, workers). It must
stay cheap and import nothing heavy: it only arranges for the patches to be applied when the vLLM
module they touch is imported anyway, so a process that never loads that module pays nothing.

Fixes shipped here, installed by `engine` on runners that load LoRA:
- `lora_logits`: prompt logprobs on a LoRA-enabled server. vLLM 0.32 computes them with the
  per-sequence LoRA mapping meant for sampling, so batching several prompt-logprob requests
  (lm-eval's log-likelihood requests: `echo`, `logprobs`, `max_tokens: 1`) kills the engine
  (vLLM issues 16668, 29955).
- `no_lora_rows`: on CPU, base-model rows must not pick up the last LoRA slot's delta.
Where they cannot apply, `guard` refuses prompt-logprob requests on LoRA servers with a 400.
"""

from __future__ import annotations

PLUGIN_NAME = "lmkit_lora_prompt_logprobs"
_registered = False


def register() -> None:
    """Entry point: hook the patches onto the vLLM modules they change (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from lmkit.vllm_patches.hooks import when_imported

    when_imported("vllm.v1.worker.lora_model_runner_mixin", _patch_engine)
    when_imported("vllm.v1.engine.input_processor", _patch_frontend)


def _patch_engine(module: object) -> None:
    from lmkit.vllm_patches.engine import patch_lora_runner

    patch_lora_runner(module)


def _patch_frontend(module: object) -> None:
    from lmkit.vllm_patches.guard import patch_input_processor

    patch_input_processor(module)
