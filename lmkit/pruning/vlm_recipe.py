"""`method: train_vlm`: train the tiny VLM on procedural scenes, save it as a transformers LLaVA
directory (`<output_dir>/model`), and score it on held-out scenes and questions, per question kind,
against always answering the most common answer of that kind."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any, Literal

from pydantic import Field

from lmkit.io import write_dir_atomic, write_json_atomic
from lmkit.loader import load_model
from lmkit.pruning.tiny_vlm import align, answers, assemble, draw_scenes
from lmkit.pruning.tiny_vlm_anchor import anchor_hits, anchor_projector
from lmkit.pruning.tiny_vlm_vision import pretrain_vision
from lmkit.pruning.vlm_config import TinyVLMConfig
from lmkit.recipes import Method, Recipe
from lmkit.report import write_report


class TrainVLMRecipe(Recipe):
    """A small LLaVA-family model trained here; `--resume` reuses a saved model and only re-scores."""

    method: Literal["train_vlm"]
    vlm: TinyVLMConfig = Field(default_factory=TinyVLMConfig)


def held_out(config: TinyVLMConfig, seed: int):
    """The evaluation scenes and questions: their own seed stream, never drawn in training."""
    return draw_scenes(random.Random(f"eval:{seed}"), config.eval_questions, config)


def loss_curve(losses: list[float], points: int = 10) -> dict[str, Any]:
    """The mean loss over each tenth of the steps: enough to see whether training flattened."""
    bounds = [round(i * len(losses) / points) for i in range(points + 1)]
    chunks = [losses[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    return {"steps": len(losses), "mean_per_chunk": [round(sum(c) / len(c), 4) for c in chunks]}


def run(recipe: TrainVLMRecipe, resume: bool) -> dict[str, Any]:
    config, target = recipe.vlm, recipe.output_dir / "model"
    if not (resume and (target / "config.json").is_file()):
        tower, probe = pretrain_vision(config, recipe.seed)
        write_json_atomic(recipe.output_dir / "vision_probe.json", probe)
        lm = load_model(config.lm)
        model, processor = assemble(config, tower, lm.model, lm.tokenizer)
        anchoring = anchor_projector(config, model, processor, recipe.seed)
        if anchoring:
            write_json_atomic(
                recipe.output_dir / "anchor_loss.json", {"first": anchoring[0], "last": anchoring[-1]}
            )
            hits = anchor_hits(config, model, processor, recipe.seed)
            write_json_atomic(recipe.output_dir / "anchor_hits.json", hits)
            print(f"anchoring: patches nearest their own target {hits}", flush=True)  # before the long stage
        model, losses = align(config, model, processor, recipe.seed)
        curves = {phase: loss_curve(values) for phase, values in losses.items()}
        write_json_atomic(recipe.output_dir / "align_loss.json", curves)

        def fill(tmp):
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)

        write_dir_atomic(target, fill)
    loaded = load_model({"source": str(target), "dtype": "float32"})  # as every user of it will
    items = held_out(config, recipe.seed)
    predicted = answers(loaded.model, loaded.processor, items)
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for (_, question), answer in zip(items, predicted, strict=True):
        by_kind.setdefault(question.kind, []).append((question.answer, answer))
    rows = []

    def majority_hits(pairs: list[tuple[str, str]]) -> int:
        return Counter(gold for gold, _ in pairs).most_common(1)[0][1]

    for kind, pairs in sorted(by_kind.items()):
        accuracy = sum(gold == answer for gold, answer in pairs) / len(pairs)
        rows.append([kind, len(pairs), round(accuracy, 4), round(majority_hits(pairs) / len(pairs), 4)])
    hits = sum(gold == answer for pairs in by_kind.values() for gold, answer in pairs)
    majority = sum(majority_hits(pairs) for pairs in by_kind.values())  # each kind's most common answer
    rows.append(["all", len(items), round(hits / len(items), 4), round(majority / len(items), 4)])
    stages = ("vision_probe", "anchor_loss", "anchor_hits", "align_loss")
    saved = {name: recipe.output_dir / f"{name}.json" for name in stages}
    results = {
        "model_dir": str(target),
        **{name: json.loads(f.read_text()) if f.is_file() else None for name, f in saved.items()},
        "accuracy": {r[0]: r[2] for r in rows},
        "majority": {r[0]: r[3] for r in rows},
    }
    notes = [
        f"model: {target} (LLaVA: CLIP-style tower {config.vision.layers} layers x "
        f"{config.vision.hidden_size}, "
        f"{(config.image_size // config.patch_size) ** 2} image tokens; LM {config.lm.source}, "
        + (f"first {config.lm_layers} layers, " if config.lm_layers else "all layers, ")
        + (f"LoRA r{config.lora.r} merged)" if config.lora else "fine-tuned fully)"),
        f"held-out: {config.eval_questions} scenes and questions (their own seed stream); majority = always "
        "answering the most common answer of the kind",
    ]
    write_report(
        recipe.output_dir,
        "Tiny VLM on held-out scenes",
        results,
        ["kind", "questions", "accuracy", "majority"],
        rows,
        notes,
    )
    return results


METHOD = Method(
    TrainVLMRecipe, run, "train a small LLaVA-family model on procedural scenes (pruning testbed)"
)
