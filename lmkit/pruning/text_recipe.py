"""`method: prune_text`: training-free context pruning of long prompts, measured against the full prompt.

For each method and keep ratio: accuracy, agreement with the unpruned answer, and prefill latency
(scoring included: what a user pays) as a ratio to the unpruned prompt, side by side in one run.
The measuring functions are shared with benchmarks/prune_long_prompts.py.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from rich.progress import track

from lmkit.data import DataSpec, Example, load_data
from lmkit.errors import ConfigError
from lmkit.generation import generate_ids
from lmkit.loader import ModelSpec, load_model
from lmkit.pruning.config import Budget
from lmkit.pruning.measure import interleaved_medians, ratio
from lmkit.pruning.text import TextPruneConfig, prune_prompt
from lmkit.recipes import Method, Recipe
from lmkit.report import write_report

Answer = Literal["generate", "choose"]


class PruneTextRecipe(Recipe):
    """Context pruning of long prompts ('<context>\\n\\n<question>'), scored against the targets."""

    method: Literal["prune_text"]
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(description="prompts: the eval split (the train split is not used)")
    settings: TextPruneConfig = Field(default_factory=TextPruneConfig)
    methods: list[Literal["freepruner_style", "random", "uniform"]] = Field(
        default_factory=lambda: ["freepruner_style", "random", "uniform"], min_length=1
    )
    keeps: list[Budget] = Field(default_factory=lambda: [0.75, 0.5, 0.25], min_length=1)
    answer: Answer = Field(
        "generate",
        description="generate: the greedy answer contains the target; choose: of the eval targets "
        "(label words), the one whose first token the model ranks highest after the prompt (one prefill)",
    )
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(16, gt=0, description="answer: generate only")
    timing_prompts: int = Field(4, gt=0)
    timing_repeats: int = Field(5, gt=0)


def _last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        device = next(model.parameters()).device
        return model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1).logits[
            0, -1
        ]


def choice_tokens(tokenizer, labels: list[str]) -> list[set[int]]:
    """Per label, the first token ids it may start an answer with (as written, capitalized, after a
    space), less any that another label may start with too (a lone space, a shared prefix); an error
    when a label has none left, since no next-token logit could then tell it apart."""
    starts = [
        {
            tokenizer(v, add_special_tokens=False).input_ids[0]
            for v in {w, w.capitalize(), " " + w, " " + w.capitalize()}
        }
        for w in labels
    ]
    distinct = [a - set().union(*(b for j, b in enumerate(starts) if j != i)) for i, a in enumerate(starts)]
    for label, tokens in zip(labels, distinct, strict=True):
        if not tokens:
            raise ConfigError(
                f"label {label!r} starts with the same token as another label in every spelling, so "
                "`answer: choose` cannot tell them apart. Fix: use label_names that differ in their "
                "first word, or answer: generate."
            )
    return distinct


def choose(
    model: torch.nn.Module, rows: list[list[int]], labels: list[str], starts: list[set[int]]
) -> list[str]:
    """The label whose best first token has the highest next-token logit, per tokenized prompt."""
    answers = []
    for ids in rows:
        logits = _last_logits(model, ids)
        answers.append(
            labels[max(range(len(labels)), key=lambda i: max(float(logits[t]) for t in starts[i]))]
        )
    return answers


def measure_cells(
    model: torch.nn.Module,
    tokenizer,
    examples: list[Example],
    configs: dict[str, TextPruneConfig],
    answer: Answer,
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Per named config: accuracy, agreement with the first config's answers, mean prompt tokens."""
    labels = sorted({e["target"] for e in examples})
    starts = choice_tokens(tokenizer, labels) if answer == "choose" else []
    answers: dict[str, list[str]] = {}
    cells = {}
    for name, config in configs.items():
        pruned = [
            prune_prompt(model, tokenizer, e["input"], config) for e in track(examples, description=name)
        ]
        rows = [p.input_ids for p in pruned]
        if answer == "choose":
            answers[name] = choose(model, rows, labels, starts)
            right = [a == e["target"] for a, e in zip(answers[name], examples, strict=True)]
        else:
            answers[name] = generate_ids(
                model, tokenizer, rows, max_new_tokens, batch_size, f"answering {name}"
            )
            right = [e["target"] in a for a, e in zip(answers[name], examples, strict=True)]
        reference = answers[next(iter(configs))]
        cells[name] = {
            "method": config.method,
            "keep": config.keep,
            "accuracy": round(sum(right) / len(examples), 4),
            "answer_match": round(
                sum(a == b for a, b in zip(answers[name], reference, strict=True)) / len(examples), 4
            ),
            "prompt_tokens": round(sum(len(r) for r in rows) / len(rows), 1),
            "answers": answers[name],
        }
    return cells


def time_cells(
    model: torch.nn.Module, tokenizer, prompts: list[str], configs: dict[str, TextPruneConfig], repeats: int
) -> dict[str, float]:
    """Median seconds of scoring + pruned prefill over `prompts` per config, interleaved in one run."""

    def prefill_all(config: TextPruneConfig) -> None:  # what a user pays
        for prompt in prompts:
            _last_logits(model, prune_prompt(model, tokenizer, prompt, config).input_ids)

    return interleaved_medians({n: (lambda c=c: prefill_all(c)) for n, c in configs.items()}, repeats)


def run_text(recipe: PruneTextRecipe, resume: bool) -> dict[str, Any]:
    loaded = load_model(recipe.model)
    _, examples = load_data(recipe.data)
    configs = {"unpruned": recipe.settings.model_copy(update={"method": "none", "keep": 1.0})}
    for method in recipe.methods:
        for keep in recipe.keeps:
            configs[f"{method}@{keep}"] = recipe.settings.model_copy(update={"method": method, "keep": keep})
    cells = measure_cells(
        loaded.model,
        loaded.tokenizer,
        examples,
        configs,
        recipe.answer,
        recipe.max_new_tokens,
        recipe.batch_size,
    )
    prompts = [e["input"] for e in examples[: recipe.timing_prompts]]
    seconds = time_cells(loaded.model, loaded.tokenizer, prompts, configs, recipe.timing_repeats)
    for name, cell in cells.items():
        cell["prefill_latency_ratio"] = ratio(seconds[name], seconds["unpruned"])
    columns = ["method", "keep", "prompt_tokens", "accuracy", "answer_match", "prefill_latency_ratio"]
    write_report(
        recipe.output_dir,
        f"Long-prompt pruning: {recipe.model.source}",
        {"examples": len(examples), "answer": recipe.answer, "cells": cells},
        [c.replace("_", " ") for c in columns],
        [[cell[c] for c in columns] for cell in cells.values()],
        notes=[
            "Accuracy: "
            + (
                "the target appears in the greedy answer."
                if recipe.answer == "generate"
                else "the target label ranks first."
            )
            + " Answer match: same answer as unpruned.",
            f"Latency ratio includes scoring ({recipe.settings.score_layers} layers, the question's "
            "attention rows only); interleaved medians, same run.",
        ],
    )
    return {"examples": len(examples), "cells": cells}


METHOD = Method(PruneTextRecipe, run_text, "training-free context pruning of long prompts")
