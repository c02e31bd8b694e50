"""Engine side: rows without an adapter get no LoRA delta (vLLM 0.32's CPU punica ops, `PunicaWrapperCPU`).

vLLM marks a token or sequence that uses no adapter with slot index -1. The CUDA kernels skip
such rows; the CPU torch ops (`bgmv_*`, `sgmv_*`) index the stacked weights with it, and
`weights[-1]` is the *last* slot. As long as that slot is empty its weights are zero and nothing
shows, but once `max_loras` adapters have been used (LRU keeps them resident) base-model requests
get the last adapter's delta: in the forward pass when batched with adapter requests, and in the
logits whenever that adapter targets lm_head (measured: base prompt logprobs off by up to 6.9 nats
with `max_loras: 1`). So the prompt-logprobs fix alone would still give base requests wrong numbers.

The fix keeps vLLM's ops and only undoes their effect on rows whose slot is -1: LoRA-A outputs of
those rows are zeroed (so LoRA-B adds nothing), and rows of ops that add into their output in
place are put back as they were.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def rows(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as (rows, features), sharing storage (punica's ops view their operands the same way)."""
    return tensor.view(-1, tensor.shape[-1])


def call_sparing_base_rows(y: torch.Tensor, slots: torch.Tensor, call: Callable[[], Any]) -> Any:
    """Run `call`, an op adding LoRA deltas into `y` in place, leaving rows with slot -1 untouched."""
    base = slots < 0
    if rows(y).shape[0] != base.shape[0] or not bool(base.any()):
        return call()
    if bool(base.all()):
        return None  # every row is base: there is no delta to add (the ops return None)
    kept = rows(y)[base].clone()
    result = call()
    rows(y)[base] = kept
    return result


def zero_base_rows(buffers: tuple[torch.Tensor, ...] | torch.Tensor, slots: torch.Tensor) -> None:
    """Zero the rows with slot -1 of LoRA-A outputs (no-op if the row count does not match)."""
    base = slots < 0
    for buffer in buffers if isinstance(buffers, tuple | list) else (buffers,):
        if rows(buffer).shape[0] == base.shape[0] and bool(base.any()):
            rows(buffer)[base] = 0


def spare_base_rows(punica: Any) -> None:
    """Patch this punica wrapper's per-token ops (LoRA-A of linear layers, LoRA embeddings)."""
    add_shrink = punica.add_shrink
    add_lora_embedding = punica.add_lora_embedding

    @functools.wraps(add_shrink)
    def shrink(y: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = add_shrink(y, x, *args, **kwargs)
        zero_base_rows(y, punica.token_lora_indices)
        return result

    @functools.wraps(add_lora_embedding)
    def embedding(y: torch.Tensor, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return call_sparing_base_rows(
            y, punica.token_lora_indices, lambda: add_lora_embedding(y, x, *args, **kwargs)
        )

    punica.add_shrink = shrink
    punica.add_lora_embedding = embedding
