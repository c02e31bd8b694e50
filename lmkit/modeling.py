"""Causal LMs used as encoders: layer truncation, pooled hidden states, a classifier's output, and
eager attention on demand.

Shared by the methods that turn an LM into a classifier (RD's teacher and students, FDKT's client
task model): pooled features make them independent of tokenizer and hidden size. Pruning scores
tokens by attention weights, which only the eager kernel returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from lmkit.errors import ConfigError

Pooling = Literal["mean", "last"]


def truncate_layers(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """Keep the first `num_layers` decoder layers (e.g. a 6-layer SmolLM2 student from the 30-layer model)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(
            f"num_layers: cannot truncate {type(model).__name__} (no model.layers); leave it unset."
        )
    if not 0 < num_layers <= len(layers):
        raise ConfigError(f"num_layers must be between 1 and {len(layers)} for this model, got {num_layers}.")
    model.model.layers = nn.ModuleList(list(layers)[:num_layers])
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    return model


class LMEncoder(nn.Module):
    """Pooled hidden states of one layer of a causal LM (the LM head is never run)."""

    def __init__(self, model: PreTrainedModel, layer: int = -1, pooling: Pooling = "mean") -> None:
        super().__init__()
        self.base = model.get_decoder()
        self.layer, self.pooling = layer, pooling
        self.hidden_size = model.config.get_text_config().hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.base(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.layer != -1
        )
        hidden = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float()
        last = attention_mask.sum(1) - 1  # right padding
        return hidden[torch.arange(hidden.shape[0]), last].float()


@dataclass
class ClassifierOutput:
    """What lmkit's classifiers return; the Trainer reads `loss`."""

    loss: torch.Tensor | None
    logits: torch.Tensor


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` with eager attention (which returns weights), restoring its setting afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
