"""Prefill pruning of long text prompts: the same two-stage selection, on context tokens.

A prompt is `context + separator + question` (the last separator splits them). The first
`score_layers` layers of the model itself read the whole prompt once (the forward stops there):
- contribution degree of a context token = attention it gets from the question tokens (head and
  query mean), max-pooled over `pool` neighbours so a hit keeps its span (numbers, names);
- patterns = its hidden state at that layer, for the complementary (coverage) stage.
The kept context tokens, in order, replace the context; template and question are never pruned.
The result is plain token ids, so any engine (transformers, vLLM's token-id prompts) can run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from lmkit.config import StrictModel
from lmkit.errors import ConfigError
from lmkit.generation import format_prompt
from lmkit.modeling import eager_attention
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
    """Raised by the hook after the scoring layer: the rest of the forward is not needed."""


def _spans(tokenizer, prompt: str, separator: str) -> tuple[list[int], tuple[int, int]]:
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


@torch.inference_mode()
def score_context(
    model: torch.nn.Module, input_ids: list[int], span: tuple[int, int], config: TextPruneConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contribution [n_context] and patterns [n_context, hidden] from the first `score_layers` layers."""
    layers = model.model.layers
    if config.score_layers > len(layers):
        raise ConfigError(f"score_layers={config.score_layers} but the model has {len(layers)} layers.")
    last = layers[config.score_layers - 1]
    recorded: dict[str, torch.Tensor] = {}

    def keep_attention(_module, _args, output):
        recorded["attention"] = output[1]

    def keep_hidden_and_stop(_module, _args, output):
        recorded["hidden"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handles = [
        last.self_attn.register_forward_hook(keep_attention),
        last.register_forward_hook(keep_hidden_and_stop),
    ]
    device = next(model.parameters()).device
    try:
        with eager_attention(model):
            model.model(input_ids=torch.tensor([input_ids], device=device), use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    start, end = span
    attention = recorded["attention"][0].float().mean(dim=0)  # [T, T], head mean
    contribution = attention[end:, start:end].mean(dim=0)
    if config.pool > 1:
        width = config.pool | 1
        contribution = F.max_pool1d(contribution[None, None], width, stride=1, padding=width // 2)[0, 0]
    return contribution, recorded["hidden"][0, start:end].float()


def prune_prompt(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    config: TextPruneConfig,
) -> PrunedPrompt:
    """Chat-formatted token ids for `prompt` with its context cut to the budget."""
    ids, (start, end) = _spans(tokenizer, prompt, config.separator)
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
