"""`method: prune_text`: training-free context pruning of long prompts, measured against the full prompt.

For each method and keep ratio: accuracy, agreement with the unpruned answer, and prefill latency
(scoring included: what a user pays) as a ratio to the unpruned prompt, side by side in one run.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from rich.progress import track

from lmkit.data import DataSpec, load_data
from lmkit.generation import generate_ids
from lmkit.loader import ModelSpec, load_model
from lmkit.pruning.config import Budget
from lmkit.pruning.measure import interleaved_medians, ratio
from lmkit.pruning.text import TextPruneConfig, prune_prompt
from lmkit.recipes import Method, Recipe
from lmkit.report import write_report


class PruneTextRecipe(Recipe):
    """Context pruning of long prompts ('<context>\\n\\n<question>'); scored by containment of the target."""

    method: Literal["prune_text"]
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(description="prompts: the eval split (the train split is not used)")
    settings: TextPruneConfig = Field(default_factory=TextPruneConfig)
    methods: list[Literal["freepruner_style", "random", "uniform"]] = Field(
        default_factory=lambda: ["freepruner_style", "random", "uniform"], min_length=1
    )
    keeps: list[Budget] = Field(default_factory=lambda: [0.75, 0.5, 0.25], min_length=1)
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(16, gt=0)
    timing_prompts: int = Field(4, gt=0)
    timing_repeats: int = Field(5, gt=0)


def _prefill(model: torch.nn.Module, ids: list[int]) -> None:
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)


def run_text(recipe: PruneTextRecipe, resume: bool) -> dict[str, Any]:
    loaded = load_model(recipe.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    _, examples = load_data(recipe.data)
    prompts = [e["input"] for e in examples]
    configs = {"unpruned": recipe.settings.model_copy(update={"method": "none", "keep": 1.0})}
    for method in recipe.methods:
        for keep in recipe.keeps:
            configs[f"{method}@{keep}"] = recipe.settings.model_copy(update={"method": method, "keep": keep})
    outputs, lengths = {}, {}
    for name, config in configs.items():
        pruned = [prune_prompt(model, tokenizer, p, config) for p in track(prompts, description=name)]
        lengths[name] = sum(len(p.input_ids) for p in pruned) / len(pruned)
        outputs[name] = generate_ids(
            model,
            tokenizer,
            [p.input_ids for p in pruned],
            recipe.max_new_tokens,
            recipe.batch_size,
            f"generating {name}",
        )
    timed = prompts[: recipe.timing_prompts]

    def prefill_all(config: TextPruneConfig) -> None:  # scoring + pruned prefill, what a user pays
        for prompt in timed:
            _prefill(model, prune_prompt(model, tokenizer, prompt, config).input_ids)

    seconds = interleaved_medians(
        {n: (lambda c=c: prefill_all(c)) for n, c in configs.items()}, recipe.timing_repeats
    )
    rows, results = [], {"examples": len(examples), "cells": {}}
    for name, config in configs.items():
        accuracy = sum(e["target"] in o for e, o in zip(examples, outputs[name], strict=True)) / len(examples)
        same = sum(a == b for a, b in zip(outputs[name], outputs["unpruned"], strict=True)) / len(examples)
        cell = {
            "method": config.method,
            "keep": config.keep,
            "accuracy": round(accuracy, 4),
            "answer_match": round(same, 4),
            "prompt_tokens": round(lengths[name], 1),
            "prefill_latency_ratio": ratio(seconds[name], seconds["unpruned"]),
        }
        results["cells"][name] = cell
        rows.append(
            [
                config.method,
                config.keep,
                cell["prompt_tokens"],
                cell["accuracy"],
                cell["answer_match"],
                cell["prefill_latency_ratio"],
            ]
        )
    write_report(
        recipe.output_dir,
        f"Long-prompt pruning: {recipe.model.source}",
        results,
        ["method", "keep", "prompt tokens", "accuracy", "answer match", "prefill latency ratio"],
        rows,
        notes=[
            "Accuracy: the target appears in the greedy answer. Answer match: same answer as unpruned.",
            f"Latency ratio includes scoring ({recipe.settings.score_layers} layers over the full prompt); "
            "interleaved medians, same run.",
        ],
    )
    return results


METHOD = Method(PruneTextRecipe, run_text, "training-free context pruning of long prompts")
