"""Engine side: LoRA logits of prompt tokens use the prompt tokens' own adapters (vLLM 0.32, CPU).

Root cause. A LoRA-enabled engine wraps the logits processor (`LogitsProcessorWithLoRA`), whose
`add_lora_logits` picks each row's adapter from the punica wrapper's `sampler_indices`: one entry
per *sampled* row, built by `set_active_loras` from the per-request mapping. That fits the sampler,
which computes logits for one row per sequence. `_get_prompt_logprobs_dict` then calls the same
`compute_logits` on one request's *prompt* hidden states, one row per prompt token, under that
per-sequence mapping. With one request in the batch the single index broadcasts (by luck, right);
with several, the row counts disagree (68 prompt rows vs 15 sequences) and `bgmv_shrink`'s einsum
raises inside the engine, which then dies. (vLLM issues 16668, 29955; PR 16694 resets the mapping.)

Fix. The per-token mapping already exists: `token_lora_indices`, which the forward pass used for
exactly these tokens. While `_get_prompt_logprobs_dict` runs (`prompt_logits_of`), each of its
`compute_logits` calls (one request's rows, a slice of the step's hidden states) looks up that
request's slot there, and `add_lora_logits` applies it to every row it gets (a base request gets
none); the sampler's indices are restored right after, so nothing later in the step sees a change.
Sampler rows without an adapter are spared too (see `no_lora_rows`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lmkit.vllm_patches.no_lora_rows import call_sparing_base_rows

PROMPT_SLOT = "_lmkit_prompt_slot"  # set on the punica wrapper while one request's prompt logits run


def rows_of(part: torch.Tensor, whole: torch.Tensor) -> slice:
    """The rows of the 2-D `whole` that the view `part` is (vLLM slices `hidden_states[a:b]`)."""
    if (
        part.dim() != 2
        or part.stride() != whole.stride()
        or part.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()
    ):
        raise RuntimeError("lmkit prompt-logprobs fix: logits input is not a row slice of the hidden states")
    start, misaligned = divmod(part.storage_offset() - whole.storage_offset(), whole.stride(0))
    if misaligned or start < 0 or start + part.shape[0] > whole.shape[0]:
        raise RuntimeError("lmkit prompt-logprobs fix: logits rows fall outside the step's hidden states")
    return slice(start, start + part.shape[0])


@contextmanager
def sampler_indices_set_to(punica: Any, indices: torch.Tensor) -> Iterator[None]:
    """Make `punica.sampler_indices` read `indices` for the duration, then restore it exactly."""
    saved_len = punica.indices_len[1]
    saved = punica._sampler_indices[:saved_len].clone()
    punica._sampler_indices[: indices.shape[0]].copy_(indices)
    punica.indices_len[1] = indices.shape[0]
    try:
        yield
    finally:
        punica._sampler_indices[:saved_len].copy_(saved)
        punica.indices_len[1] = saved_len


@contextmanager
def prompt_logits_of(punica: Any, model: torch.nn.Module, hidden_states: torch.Tensor) -> Iterator[None]:
    """Within the block, `model.compute_logits` on rows of `hidden_states` (one request's prompt tokens,
    as `_get_prompt_logprobs_dict` passes them) applies those rows' adapter to all its logits rows."""
    compute_logits = model.compute_logits

    @functools.wraps(compute_logits)
    def per_request(states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        slots = punica.token_lora_indices[rows_of(states, hidden_states)]
        if slots.numel() and bool((slots != slots[0]).any()):
            raise RuntimeError("lmkit prompt-logprobs fix: these logits rows belong to several requests")
        setattr(punica, PROMPT_SLOT, slots[:1])
        try:
            return compute_logits(states, *args, **kwargs)
        finally:
            setattr(punica, PROMPT_SLOT, None)

    model.compute_logits = per_request  # this instance only, for this block only
    try:
        yield
    finally:
        del model.compute_logits


def per_row_lora_logits(punica: Any) -> None:
    """Patch this punica wrapper's `add_lora_logits`: a prompt's slot on all its rows, base rows spared."""
    add_lora_logits = punica.add_lora_logits
    setattr(punica, PROMPT_SLOT, None)

    @functools.wraps(add_lora_logits)
    def per_row(y: torch.Tensor, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        slot = getattr(punica, PROMPT_SLOT)
        if slot is None:  # the sampler's call: one row per sequence, vLLM's own mapping
            slots = punica.sampler_indices
            return call_sparing_base_rows(y, slots, lambda: add_lora_logits(y, x, *args, **kwargs))
        if int(slot) < 0:
            return None  # a base-model prompt: no LoRA delta (what the ops return)
        # One index for all rows: the torch ops broadcast it, instead of gathering a copy of the
        # adapter's (vocab x rank) LoRA-B matrix per prompt token.
        with sampler_indices_set_to(punica, slot):
            return add_lora_logits(y, x, *args, **kwargs)

    punica.add_lora_logits = per_row
