"""Prefill pruning of long text prompts: the same two-stage selection, on context tokens.

A prompt is `context + separator + question` (the last separator splits them). The first
`score_layers` layers of the model itself read the whole prompt once (the forward stops there):
- contribution degree of a context token = attention it gets from the question tokens at layer
  `score_layers` (head and query mean), max-pooled over `pool` neighbours so a hit keeps its span
  (numbers, names);
- patterns = its (normalized) hidden state entering that layer's attention, for the complementary
  (coverage) stage.
The kept context tokens, in order, replace the context; template and question are never pruned.
The result is plain token ids, so any engine (transformers, vLLM's token-id prompts) can run it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from lmkit.config import StrictModel
from lmkit.errors import ConfigError
from lmkit.generation import format_prompt
from lmkit.pruning.config import keep_count
from lmkit.pruning.select import example_seeds, select


class TextPruneConfig(StrictModel):
    method: Literal["freepruner_style", "random", "uniform", "none"] = "freepruner_style"
    keep: int | float = Field(0.5, description="context tokens kept: a count, or a ratio in (0, 1]")
    pivotal_fraction: float = Field(0.5, ge=0, le=1)
    score_layers: int = Field(8, ge=1, description="layers run to score (attention of the last one)")
    pool: int = Field(5, ge=1, description="max-pool width over neighbouring contribution scores (odd)")
    separator: str = "\n\n"
    seed: int | None = Field(None, description="method random: selection seed (unset: the recipe's seed)")


@dataclass
class PrunedPrompt:
    input_ids: list[int]
    context_tokens: int
    kept_context: list[int]  # indices into the context tokens, sorted


class _Stop(Exception):
    """Raised once the scoring layer's input is seen: the rest of the forward is not needed."""


def context_span(tokenizer, prompt: str, separator: str) -> tuple[list[int], tuple[int, int]]:
    """Chat-formatted token ids and the [start, end) token span of the context."""
    if separator not in prompt:
        raise ConfigError(
            f"prompt has no context/question separator {separator!r}. Fix: write prompts as "
            "'<context><separator><question>' or set separator."
        )
    context = prompt[: prompt.rindex(separator)]
    text = format_prompt(tokenizer, prompt)
    start = text.index(context)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [
        i for i, (a, b) in enumerate(encoded.offset_mapping) if a >= start and b <= start + len(context)
    ]
    return encoded.input_ids, (inside[0], inside[-1] + 1)


def question_attention(
    attention: torch.nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], first: int
) -> torch.Tensor:
    """Causal softmax attention [heads, T - first, T] of rows `first:` (the question) over all keys,
    computed from `attention`'s own q/k projections and rotary embedding.

    Only the question's rows are formed, never the T x T map: scoring stays cheap on long prompts and
    the layers before run on the model's fast kernel (SDPA), not eager attention.
    """
    rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if rotary is None or not hasattr(attention, "q_proj"):
        raise ConfigError(
            f"text pruning reads q/k projections and apply_rotary_pos_emb; {type(attention).__name__} "
            "has neither. Fix: use a Llama-style decoder (Llama, SmolLM2, Qwen2, Mistral)."
        )
    head_dim = attention.head_dim
    length = hidden.shape[1]
    query = attention.q_proj(hidden[:, first:]).view(1, length - first, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden).view(1, length, -1, head_dim).transpose(1, 2)
    cos, sin = rope
    query, _ = rotary(query, query, cos[:, first:], sin[:, first:])
    _, key = rotary(key, key, cos, sin)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query heads
    scores = (query.float() @ key.float().transpose(-1, -2))[0] * attention.scaling
    future = torch.ones(length - first, length, dtype=torch.bool, device=hidden.device).triu(first + 1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


@torch.inference_mode()
def score_context(
    model: torch.nn.Module, input_ids: list[int], span: tuple[int, int], config: TextPruneConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contribution [n_context] and patterns [n_context, hidden], read at layer `score_layers`.

    Layers before it run as usual; at its attention the question's attention to the context (head
    and query mean) is the contribution, and its normalized input states are the patterns. The
    forward stops there, so scoring costs about score_layers / num_layers of a prefill.
    """
    layers = model.model.layers
    if config.score_layers > len(layers):
        raise ConfigError(f"score_layers={config.score_layers} but the model has {len(layers)} layers.")
    attention = layers[config.score_layers - 1].self_attn
    start, end = span
    recorded: dict[str, torch.Tensor] = {}

    def score_and_stop(module, _args, kwargs):
        hidden = kwargs["hidden_states"]
        recorded["attention"] = question_attention(module, hidden, kwargs["position_embeddings"], end)
        recorded["hidden"] = hidden[0, start:end].float()
        raise _Stop

    handle = attention.register_forward_pre_hook(score_and_stop, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        model.model(input_ids=torch.tensor([input_ids], device=device), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    contribution = recorded["attention"].mean(dim=(0, 1))[start:end]
    if config.pool > 1:
        width = config.pool | 1
        contribution = F.max_pool1d(contribution[None, None], width, stride=1, padding=width // 2)[0, 0]
    return contribution, recorded["hidden"]


def prune_prompt(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    config: TextPruneConfig,
) -> PrunedPrompt:
    """Chat-formatted token ids for `prompt` with its context cut to the budget."""
    ids, (start, end) = context_span(tokenizer, prompt, config.separator)
    available = end - start
    if config.method == "none":
        return PrunedPrompt(ids, available, list(range(available)))
    k = keep_count(config.keep, available)
    contribution = patterns = None
    if config.method == "freepruner_style":
        contribution, patterns = score_context(model, ids, (start, end), config)
        contribution, patterns = contribution[None], patterns[None]
    seeds = example_seeds(config.seed or 0, torch.tensor([ids])) if config.method == "random" else None
    kept = select(config.method, k, available, 1, contribution, patterns, config.pivotal_fraction, seeds)[0]
    kept_list = kept.tolist()
    pruned = ids[:start] + [ids[start + i] for i in kept_list] + ids[end:]
    return PrunedPrompt(pruned, available, kept_list)
