"""`method: prune`: visual tokens of a LLaVA-family model (long prompts: `text_recipe`, `method: prune_text`).

Training-free, so a run is a measurement: for each pruning method and budget it reports
agreement with the unpruned model, prefill FLOPs and prefill latency as ratios to the unpruned run,
all measured side by side in the same process.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from rich.progress import track

from lmkit.data import DataSpec, load_data
from lmkit.errors import ConfigError
from lmkit.generation import format_prompt
from lmkit.loader import ModelSpec, load_model
from lmkit.pruning.config import Budget, PruneConfig, keep_count
from lmkit.pruning.llava import PrunedLlava
from lmkit.pruning.measure import agreement, count_flops, interleaved_medians, ratio, synthetic_images
from lmkit.recipes import Method, Recipe
from lmkit.report import write_report


class PruneRecipe(Recipe):
    """Visual-token pruning on generated images; questions come from `data`'s eval split."""

    method: Literal["prune"]
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(source="tiny-llava-576", dtype="float32"))
    data: DataSpec = Field(description="questions: the eval split (the train split is not used)")
    settings: PruneConfig = Field(default_factory=PruneConfig, description="shared by every grid cell")
    methods: list[Literal["freepruner_style", "random", "uniform", "fastv"]] = Field(
        default_factory=lambda: ["freepruner_style", "random", "uniform", "fastv"], min_length=1
    )
    keeps: list[Budget] = Field(default_factory=lambda: [192, 128, 64], min_length=1)
    batch_size: int = Field(4, gt=0)
    max_new_tokens: int = Field(8, gt=0)
    image_size: int = Field(96, gt=0, description="typical side of the generated images (sizes vary)")
    timing_repeats: int = Field(5, gt=0)


def _visual_batches(recipe: PruneRecipe, processor, questions: list[str]) -> list[dict[str, torch.Tensor]]:
    images = synthetic_images(len(questions), recipe.image_size, recipe.seed)
    processor.tokenizer.padding_side = "left"
    texts = [format_prompt(processor.tokenizer, f"<image>\n{q}") for q in questions]
    step = recipe.batch_size
    return [
        dict(
            processor(
                images=images[i : i + step], text=texts[i : i + step], padding=True, return_tensors="pt"
            )
        )
        for i in range(0, len(texts), step)
    ]


def _cell(
    pruned: PrunedLlava,
    available: int,
    logits: dict[str, torch.Tensor],
    answers: dict[str, list],
    flops: dict[str, dict[str, int]],
    seconds: dict[str, float],
    name: str,
) -> dict[str, Any]:
    """One grid cell's measurements, each relative to the unpruned model."""
    match = answers.get(name)
    same = None if match is None else sum(a == b for a, b in zip(match, answers["unpruned"], strict=True))
    return {
        "method": pruned.config.method,
        "kept_tokens": keep_count(pruned.config.keep, available),
        **agreement(logits["unpruned"], logits[name]),
        "answer_match": None if match is None else round(same / len(match), 4),
        "prefill_flops_ratio": ratio(flops[name]["total"], flops["unpruned"]["total"]),
        "lm_flops_ratio": ratio(flops[name]["language_model"], flops["unpruned"]["language_model"]),
        "prefill_latency_ratio": ratio(seconds[name], seconds["unpruned"]),
    }


def run_visual(recipe: PruneRecipe, resume: bool) -> dict[str, Any]:
    loaded = load_model(recipe.model)
    if loaded.processor is None or not hasattr(loaded.model.config, "vision_config"):
        raise ConfigError(
            f"method prune needs a LLaVA-family model with a processor; {recipe.model.source} is text-only. "
            "Fix: use a LLaVA model (e.g. tiny-llava-576, llava-hf/llava-1.5-7b-hf) or method prune_text."
        )
    _, eval_examples = load_data(recipe.data)
    batches = _visual_batches(recipe, loaded.processor, [e["input"] for e in eval_examples])
    unpruned = PrunedLlava(loaded.model, recipe.settings.model_copy(update={"method": "none"}))
    available = unpruned.available
    cells = {"unpruned": unpruned}
    for method in recipe.methods:
        for keep in recipe.keeps:
            cells[f"{method}@{keep}"] = PrunedLlava(
                loaded.model, recipe.settings.model_copy(update={"method": method, "keep": keep})
            )
    logits, answers = {}, {}
    for name, pruned in track(cells.items(), description="pruned variants"):
        logits[name] = torch.cat([pruned.next_token_logits(**b) for b in batches])
        if pruned.config.method != "fastv":
            answers[name] = [
                row.tolist()
                for b in batches
                for row in pruned.generate(**b, max_new_tokens=recipe.max_new_tokens)
            ]
    first = batches[0]
    flops = {name: count_flops(lambda p=p: p.next_token_logits(**first)) for name, p in cells.items()}
    seconds = interleaved_medians(
        {name: (lambda p=p: p.next_token_logits(**first)) for name, p in cells.items()}, recipe.timing_repeats
    )
    measured = {
        name: _cell(p, available, logits, answers, flops, seconds, name)
        for name, p in cells.items()
        if name != "unpruned"
    }
    results = {
        "tokens_per_image": available,
        "images": len(eval_examples),
        "cells": measured,
        "unpruned": {"prefill_flops": flops["unpruned"], "prefill_seconds": round(seconds["unpruned"], 5)},
    }
    rows = [
        [
            c["method"],
            f"{available} -> {c['kept_tokens']}",
            c["top1_match"],
            c["kl"],
            "n/a" if c["answer_match"] is None else c["answer_match"],
            c["lm_flops_ratio"],
            c["prefill_flops_ratio"],
            c["prefill_latency_ratio"],
        ]
        for c in measured.values()
    ]
    write_report(
        recipe.output_dir,
        f"Visual token pruning: {recipe.model.source}",
        results,
        ["method", "tokens/image", "top-1", "KL", "answer match", "LM FLOPs", "all FLOPs", "latency"],
        rows,
        notes=[
            "Ratios are pruned / unpruned, measured side by side in this run (prefill of the first batch).",
            "LM FLOPs: inside the language model; all FLOPs: every matmul torch dispatches (vision tower, "
            "scoring, LM); latency: interleaved medians.",
            "Answer match: greedy answers identical to the unpruned model's; fastv is prefill-only (n/a).",
        ],
    )
    return results


METHOD = Method(PruneRecipe, run_visual, "training-free visual token pruning (LLaVA family)")
