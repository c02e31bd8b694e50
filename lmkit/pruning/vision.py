"""Scores for visual tokens from a vision encoder's own attention, captured with forward hooks.

Hooks record the q/k projections of two encoder layers and the attention is recomputed from them
(`select.attention_map`), so the encoder keeps its fast attention kernel and no fork is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lmkit.errors import ConfigError
from lmkit.pruning.config import PruneConfig, keep_count
from lmkit.pruning.select import attention_map, contribution_degree, select


def resolve_layer(index: int, num_layers: int, what: str) -> int:
    """An encoder layer index (negative counts from the end, like `vision_feature_layer`)."""
    if not -num_layers <= index < num_layers:
        raise ValueError(
            f"{what}={index} is outside the vision encoder's {num_layers} layers. "
            f"Fix: use an index in [{-num_layers}, {num_layers - 1}]."
        )
    return index % num_layers


def feature_layer_to_layer(vision_feature_layer: int, num_layers: int) -> int:
    """`hidden_states[i]` is the output of layer i-1 (index 0 is the embeddings)."""
    return resolve_layer(
        vision_feature_layer if vision_feature_layer < 0 else max(vision_feature_layer - 1, 0),
        num_layers,
        "vision_feature_layer",
    )


def feature_layout(patches: int, has_cls: bool, select_strategy: str) -> tuple[int, int]:
    """(feature tokens the LM sees per image, leading encoder tokens dropped before them).

    LLaVA's "default" strategy drops the encoder's first token ([CLS] for CLIP), "full" keeps all.
    """
    if select_strategy not in ("default", "full"):
        raise ConfigError(
            f"vision_feature_select_strategy {select_strategy!r} is not supported by token pruning. "
            "Fix: prune a model whose strategy is 'default' or 'full'."
        )
    leading = int(select_strategy == "default")
    return patches + int(has_cls) - leading, leading


def scoring_layers(config: PruneConfig, vision_feature_layer: int, num_layers: int) -> tuple[int, int]:
    """(contribution layer, pattern layer); both default relative to the feature layer the LM reads."""
    feature = feature_layer_to_layer(vision_feature_layer, num_layers)
    deep = (
        feature
        if config.contribution_layer is None
        else resolve_layer(config.contribution_layer, num_layers, "contribution_layer")
    )
    shallow = (
        deep // 2
        if config.pattern_layer is None
        else resolve_layer(config.pattern_layer, num_layers, "pattern_layer")
    )
    if max(deep, shallow) > feature:
        raise ConfigError(
            f"pruning layers (contribution {deep}, pattern {shallow}) are past the feature layer {feature}, "
            "which the language model reads. Fix: choose layers at or before it."
        )
    return deep, shallow


@contextmanager
def record_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each named module's output (the first element when it returns a tuple)."""
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def store(_module, _inputs, output):
            outputs[name] = output[0] if isinstance(output, tuple) else output

        return store

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def score_tokens(
    deep: torch.Tensor, shallow: torch.Tensor, has_cls: bool, leading: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contribution [B, N] and pattern [B, N, N] for the N feature tokens after `leading` dropped ones."""
    contribution = contribution_degree(deep, has_cls)[:, leading:]
    patterns = shallow[:, leading:, leading:]
    return contribution, patterns


def select_visual(
    config: PruneConfig,
    deep_qk: tuple[torch.Tensor, torch.Tensor] | None,
    shallow_qk: tuple[torch.Tensor, torch.Tensor] | None,
    num_heads: int,
    has_cls: bool,
    leading: int,
    images: int,
    available: int,
    seeds: list[int] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """[images, k] sorted indices into each image's `available` feature tokens.

    `leading` is how many encoder tokens precede the features (1 when [CLS] is dropped). `reduce`
    averages attention maps across tensor-parallel ranks, so every rank keeps the same tokens.
    """
    k = keep_count(config.keep, available)
    contribution = patterns = None
    if config.method == "freepruner_style":
        if deep_qk is None or shallow_qk is None:
            raise ValueError("freepruner_style needs the recorded q/k of the contribution and pattern layers")
        deep = attention_map(*deep_qk, num_heads)
        shallow = attention_map(*shallow_qk, num_heads)
        if reduce is not None:
            deep, shallow = reduce(deep), reduce(shallow)
        contribution, patterns = score_tokens(deep, shallow, has_cls, leading)
    return select(config.method, k, available, images, contribution, patterns, config.pivotal_fraction, seeds)
