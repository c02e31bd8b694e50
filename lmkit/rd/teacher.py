"""The frozen teacher's side of RD, shared by every variant: the data and labels, the teacher's
pooled features per split (encoded once, cached per split), and the layer they are read from.

With `teacher.layer: auto` the teacher encodes every layer once, a ridge probe picks the layer and
pooling on a validation split of the training rows, and only that layer's features are kept.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch

from lmkit.data import load_data
from lmkit.errors import ConfigError
from lmkit.loader import load_model
from lmkit.modeling import LMEncoder, truncate_layers
from lmkit.rd.config import RDRecipe
from lmkit.rd.features import cache_key, encode, encode_every_layer, load_cached, save_cache, tokenize
from lmkit.rd.layer_sweep import LayerChoice, choose_layer

SWEEP_VALIDATION_FRACTION = 0.2  # when train.early_stopping (whose split the sweep reuses) is unset


@dataclass
class Setup:
    """What every variant shares: the data, the labels and the frozen teacher's side."""

    labels: list[str]
    texts: dict[str, list[str]]  # split -> input texts
    targets: dict[str, list[int]]  # split -> label ids
    features: dict[str, torch.Tensor]  # split -> pooled teacher features (cached or fresh)
    stage_features: dict[str, torch.Tensor] | None  # split -> [N, stages, D] for multi-stage RD
    teacher_tokenizer: Any
    teacher_seconds: float  # the teacher's forward time on the latency rows
    teacher_params: int
    live_teacher: LMEncoder | None  # kept in memory only when features are not cached
    teacher_length: int
    layer_choice: LayerChoice | None  # set when teacher.layer or teacher.pooling is auto

    def rows(self, split: str, student_tokenizer: Any = None, max_length: int = 0) -> list[dict]:
        """Training rows: label and feature index, plus token ids for the student (and a live teacher)."""
        rows = [{"label": y, "index": i} for i, y in enumerate(self.targets[split])]
        if student_tokenizer is not None:
            for row, ids in zip(
                rows, tokenize(student_tokenizer, self.texts[split], max_length), strict=True
            ):
                row["input_ids"] = ids
        if self.live_teacher is not None:
            teacher_ids = tokenize(self.teacher_tokenizer, self.texts[split], self.teacher_length)
            for row, ids in zip(rows, teacher_ids, strict=True):
                row["teacher_ids"] = ids
        return rows


def label_ids(labels: list[str], targets: list[str], where: str) -> list[int]:
    unknown = sorted(set(targets) - set(labels))
    if unknown:
        raise ConfigError(
            f"{where} has labels {unknown} that the classifier (labels: {labels}, "
            f"{len(labels)} outputs) does not have. Fix: add them to labels or remove labels."
        )
    return [labels.index(t) for t in targets]


def prepare(recipe: RDRecipe) -> Setup:
    """Load the data, encode it with the frozen teacher (or reuse the cache), then drop the teacher."""
    rd, tcfg = recipe.rd, recipe.teacher
    train_examples, eval_examples = load_data(recipe.data)
    labels = recipe.labels or sorted({e["target"] for e in train_examples})
    targets = {
        "train": label_ids(labels, [e["target"] for e in train_examples], "train data"),
        "eval": label_ids(labels, [e["target"] for e in eval_examples], "eval data"),
    }
    texts = {"train": [e["input"] for e in train_examples], "eval": [e["input"] for e in eval_examples]}
    loaded = load_model(recipe.model)
    model = truncate_layers(loaded.model, tcfg.num_layers) if tcfg.num_layers else loaded.model
    tokenizer = loaded.tokenizer
    sweep = tcfg.layer == "auto" or tcfg.pooling == "auto"
    every_layer = sweep or bool(rd.stages)  # multi-stage RD reads several teacher layers
    poolings = ("mean", "last") if tcfg.pooling == "auto" else (tcfg.pooling,)
    layer = -1 if tcfg.layer == "auto" else tcfg.layer
    teacher = LMEncoder(model, layer, poolings[0])
    described = {
        "model": recipe.model.model_dump(mode="json"),
        "num_layers": tcfg.num_layers,
        "max_length": tcfg.max_length,
        "features": f"every layer, {'/'.join(poolings)} pooling"
        if every_layer
        else f"layer {layer}, {poolings[0]}",
    }
    cache_dir = rd.teacher_cache_dir or recipe.output_dir / "teacher_features"

    def features_of(split: str) -> dict[str, torch.Tensor]:
        key = cache_key(described, texts[split])
        cached = load_cached(cache_dir, key) if rd.cache_teacher_features else None
        if cached is not None:
            return cached
        if every_layer:
            fresh = encode_every_layer(
                teacher, tokenizer, texts[split], tcfg.max_length, rd.encode_batch_size, poolings, split
            )
        else:
            fresh = {
                "features": encode(
                    teacher,
                    tokenizer,
                    texts[split],
                    tcfg.max_length,
                    rd.encode_batch_size,
                    f"teacher {split}",
                )[0]
            }
        if rd.cache_teacher_features:
            save_cache(cache_dir, key, fresh, described)
        return fresh

    encoded = {split: features_of(split) for split in texts}
    choice, stage_features = None, None
    if sweep:
        stopping = recipe.train.early_stopping
        try:
            choice = choose_layer(
                encoded["train"],
                targets["train"],
                len(labels),
                stopping.validation_fraction if stopping else SWEEP_VALIDATION_FRACTION,
                recipe.train.seed or 0,
                layers=None if tcfg.layer == "auto" else [_stack_index(tcfg.layer, model)],
            )
        except ConfigError as exc:
            raise ConfigError(
                f"teacher.layer/pooling auto: {len(targets['train'])} training rows are too few to hold "
                "out a validation split for the probe sweep. Fix: add data, or set teacher.layer and "
                "teacher.pooling."
            ) from exc
        teacher.layer, teacher.pooling = choice.layer, choice.pooling
    if every_layer:
        index = choice.index if choice else _stack_index(layer, model)
        features = {
            split: stacks[teacher.pooling][:, index].contiguous() for split, stacks in encoded.items()
        }
    else:
        features = {split: parts["features"] for split, parts in encoded.items()}
    if rd.stages:
        depth = model.config.get_text_config().num_hidden_layers + 1
        stage_layers = [
            check_layer(s.teacher_layer, depth, "teacher", "rd.stages: teacher_layer") for s in rd.stages
        ]
        stage_features = {
            split: stacks[teacher.pooling][:, stage_layers].contiguous() for split, stacks in encoded.items()
        }
    del encoded
    _, teacher_seconds = encode(
        teacher, tokenizer, texts["eval"][: rd.latency_rows], tcfg.max_length, rd.encode_batch_size, "latency"
    )
    teacher_params = sum(p.numel() for p in teacher.parameters())
    live = None if rd.cache_teacher_features else teacher.requires_grad_(False)
    if live is None:
        del teacher, model, loaded
        gc.collect()
    return Setup(
        labels,
        texts,
        targets,
        features,
        stage_features,
        tokenizer,
        teacher_seconds,
        teacher_params,
        live,
        tcfg.max_length,
        choice,
    )


def _stack_index(layer: int, model: Any) -> int:
    """Position of LMEncoder layer index `layer` in the [L + 1] stack of every layer."""
    return check_layer(
        layer, model.config.get_text_config().num_hidden_layers + 1, "teacher", "teacher.layer"
    )


def check_layer(layer: int, depth: int, side: str, key: str) -> int:
    """`layer` as a position in a [depth] stack, or a ConfigError naming the recipe `key`."""
    if not -depth <= layer < depth:
        raise ConfigError(
            f"{key} {layer} is out of range; the {side} has {depth - 1} layers "
            f"(0 = embeddings, {depth - 1} or -1 = final). Fix: pick a layer in that range."
        )
    return layer % depth
