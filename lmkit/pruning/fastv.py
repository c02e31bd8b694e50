"""FastV-style baseline: drop image tokens inside the language model (prefill only).

After layer K-1, image tokens that get the least attention from the last token (head mean) are
dropped; layers K.. run on the shorter sequence with the kept tokens' original positions. It needs
attention weights, so the LM runs eager attention for this call, and every row needs the same
number of image tokens (as in FastV). Decoding gains are nil for in-LLM pruning with a KV cache.
"""

from __future__ import annotations

import torch

from lmkit.errors import ConfigError
from lmkit.modeling import eager_attention
from lmkit.pruning.select import gather_tokens, padded_positions


def fastv_next_token_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    image_token_id: int,
    layer: int,
    keep: int,
    available: int,
) -> torch.Tensor:
    lm = model.model.language_model
    layers = lm.layers
    if not 1 <= layer < len(layers):
        raise ConfigError(
            f"fastv_layer={layer} must be in [1, {len(layers) - 1}] for this {len(layers)}-layer LM."
        )
    is_image = (input_ids == image_token_id) & attention_mask.bool()
    counts = is_image.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ConfigError(
            f"fastv needs the same number of image tokens in every row, got {counts.tolist()}. "
            "Fix: batch prompts with the same number of images."
        )
    drop = int(counts[0]) // available * (available - keep)
    length = input_ids.shape[1]
    state: dict[str, torch.Tensor] = {}

    def score(_module, _args, output):
        weights = output[1]
        if weights is None:
            raise ConfigError("fastv reads attention weights; the language model returned none.")
        from_last = weights[:, :, -1, :].float().mean(dim=1).masked_fill(~is_image, float("inf"))
        kept = torch.ones_like(is_image)
        kept.scatter_(1, from_last.topk(drop, dim=1, largest=False).indices, False)
        state["index"] = kept.nonzero()[:, 1].view(len(kept), length - drop)

    def prune(_module, args, kwargs):
        index = state["index"]
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if hidden.shape[1] == length:
            hidden = gather_tokens(hidden, index, 1)
        cos, sin = kwargs["position_embeddings"]
        if cos.shape[1] == length:
            kwargs["position_embeddings"] = (gather_tokens(cos, index, 1), gather_tokens(sin, index, 1))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape[-1] == length:
            kwargs["attention_mask"] = gather_tokens(gather_tokens(mask, index, 2), index, 3)
        if (
            isinstance(kwargs.get("position_ids"), torch.Tensor)
            and kwargs["position_ids"].shape[-1] == length
        ):
            kwargs["position_ids"] = gather_tokens(kwargs["position_ids"], index, 1)
        return (hidden, *args[1:]), kwargs

    handles = [layers[layer - 1].self_attn.register_forward_hook(score)]
    handles += [block.register_forward_pre_hook(prune, with_kwargs=True) for block in layers[layer:]]
    try:
        with eager_attention(lm):
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                position_ids=padded_positions(attention_mask),
                use_cache=False,
                logits_to_keep=1,
            )
    finally:
        for handle in handles:
            handle.remove()
    return out.logits[:, -1].float()
