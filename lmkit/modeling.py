"""Causal LMs used as encoders: layer truncation, pooled hidden states, a classifier's output, and
eager attention on demand.

Shared by the methods that turn an LM into a classifier (RD's teacher and students, FDKT's client
task model): pooled features make them independent of tokenizer and hidden size. Pruning scores
tokens by attention weights, which only the eager kernel returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[B, T, D] hidden states -> [B, D] fp32: the masked mean, or the last real token (right padding)."""
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float()
    last = attention_mask.sum(1) - 1
    return hidden[torch.arange(hidden.shape[0]), last].float()


class LMEncoder(nn.Module):
    """Pooled hidden states of one layer of a language model (its LM head, if any, is never run).

    Causal LMs and encoder-only models (BERT-style, bidirectional) both work: the pooled state of
    one layer is all the methods use, so tokenizer, width and attention pattern are free.
    """

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
        return pool(hidden, attention_mask, self.pooling)

    def every_layer(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, poolings: tuple[Pooling, ...]
    ) -> dict[str, torch.Tensor]:
        """pooling -> [B, L + 1, D]: the embeddings and every layer's output, the last one after the
        final norm (what `layer: -1` gives), for choosing the layer a probe reads best."""
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = [*out.hidden_states[:-1], out.last_hidden_state]
        return {p: torch.stack([pool(h, attention_mask, p) for h in hidden], 1) for p in poolings}


@dataclass
class ClassifierOutput:
    """What lmkit's classifiers return; the Trainer reads `loss`."""

    loss: torch.Tensor | None
    logits: torch.Tensor


@torch.inference_mode()
def predicted_classes(
    model: nn.Module, rows: list[dict], collate: Callable[[list[dict]], dict], batch_size: int
) -> tuple[list[int], list[int]]:
    """(argmax class, gold `labels`) per row, for classification models returning `.logits`."""
    model.eval()
    predicted, gold = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        gold += batch.pop("labels").tolist()
        predicted += model(**batch).logits.argmax(-1).tolist()
    return predicted, gold


def accuracy(predicted: list[int], gold: list[int]) -> float:
    """Share of equal pairs, to 4 places."""
    return round(sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold), 4)


def classification_accuracy(
    model: nn.Module, rows: list[dict], collate: Callable[[list[dict]], dict], batch_size: int
) -> float:
    """Share of rows whose argmax logit equals `labels` (classification models returning `.logits`)."""
    return accuracy(*predicted_classes(model, rows, collate, batch_size))


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` with eager attention (which returns weights), restoring its setting afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
