"""`method: prune` (visual tokens of a LLaVA-family model) and `method: prune_text` (long prompts).

Both are training-free, so a run is a measurement: for each pruning method and budget it reports
agreement with the unpruned model, prefill FLOPs and prefill latency as ratios to the unpruned run,
all measured side by side in the same process.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from rich.progress import track

from lmkit.data import load_data
from lmkit.errors import ConfigError
from lmkit.generation import format_prompt, generate_ids
from lmkit.loader import ModelSpec, load_model
from lmkit.pruning.config import PruneConfig, keep_count
from lmkit.pruning.llava import PrunedLlava
from lmkit.pruning.measure import agreement, count_flops, interleaved_medians, synthetic_images
from lmkit.pruning.text import TextPruneConfig, prune_prompt
from lmkit.recipes import Recipe, register_method
from lmkit.report import write_report

Budget = int | float


class PruneRecipe(Recipe):
    """Visual-token pruning on generated images; questions come from `data`'s eval split."""

    method: Literal["prune"]
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(source="tiny-llava-576", dtype="float32"))
    settings: PruneConfig = Field(default_factory=PruneConfig, description="shared by every grid cell")
    methods: list[Literal["freepruner", "random", "uniform", "fastv"]] = Field(
        default_factory=lambda: ["freepruner", "random", "uniform", "fastv"], min_length=1
    )
    keeps: list[Budget] = Field(default_factory=lambda: [192, 128, 64], min_length=1)
    batch_size: int = Field(4, gt=0)
    max_new_tokens: int = Field(8, gt=0)
    image_size: int = Field(96, gt=0, description="typical side of the generated images (sizes vary)")
    timing_repeats: int = Field(5, gt=0)


class PruneTextRecipe(Recipe):
    """Context pruning of long prompts ('<context>\\n\\n<question>'); scored by containment of the target."""

    method: Literal["prune_text"]
    settings: TextPruneConfig = Field(default_factory=TextPruneConfig)
    methods: list[Literal["freepruner", "random", "uniform"]] = Field(
        default_factory=lambda: ["freepruner", "random", "uniform"], min_length=1
    )
    keeps: list[Budget] = Field(default_factory=lambda: [0.75, 0.5, 0.25], min_length=1)
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(16, gt=0)
    timing_prompts: int = Field(4, gt=0)
    timing_repeats: int = Field(5, gt=0)


def _ratio(value: float, reference: float) -> float:
    return round(value / reference, 3)


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
    rows, results = [], {"tokens_per_image": available, "images": len(eval_examples), "cells": {}}
    for name, pruned in cells.items():
        if name == "unpruned":
            continue
        kept = keep_count(pruned.config.keep, available)
        match = answers.get(name)
        answer_match = (
            round(sum(a == b for a, b in zip(match, answers["unpruned"], strict=True)) / len(match), 4)
            if match is not None
            else None
        )
        cell = {
            "method": pruned.config.method,
            "kept_tokens": kept,
            **agreement(logits["unpruned"], logits[name]),
            "answer_match": answer_match,
            "prefill_flops_ratio": _ratio(flops[name]["total"], flops["unpruned"]["total"]),
            "lm_flops_ratio": _ratio(flops[name]["language_model"], flops["unpruned"]["language_model"]),
            "prefill_latency_ratio": _ratio(seconds[name], seconds["unpruned"]),
        }
        results["cells"][name] = cell
        rows.append(
            [
                cell["method"],
                f"{available} -> {kept}",
                cell["top1_match"],
                cell["kl"],
                "n/a" if answer_match is None else answer_match,
                cell["lm_flops_ratio"],
                cell["prefill_flops_ratio"],
                cell["prefill_latency_ratio"],
            ]
        )
    results["unpruned"] = {
        "prefill_flops": flops["unpruned"],
        "prefill_seconds": round(seconds["unpruned"], 5),
    }
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
        generator = torch.Generator().manual_seed(config.seed)
        pruned = [
            prune_prompt(model, tokenizer, p, config, generator) for p in track(prompts, description=name)
        ]
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
            "prefill_latency_ratio": _ratio(seconds[name], seconds["unpruned"]),
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


register_method("prune", PruneRecipe, run_visual, "training-free visual token pruning (LLaVA family)")
register_method("prune_text", PruneTextRecipe, run_text, "training-free context pruning of long prompts")
