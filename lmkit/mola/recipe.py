"""`method: mola` — MoLA-Grad and MoLA-Router for causal LMs, against one shared LoRA and per-task LoRAs.

Every variant trains on the same multi-task data with the same steps and batch size; the recipe
reports per-task exact match and exports what the serving layer serves (one adapter per task
for MoLA-Grad and the per-task variants; experts + router for MoLA-Router).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from lmkit.adapters import LoraSpec
from lmkit.batching import pad, pad_batch
from lmkit.config import StrictModel
from lmkit.data import DataSpec, Example, load_data
from lmkit.errors import ConfigError
from lmkit.generation import encode_for_training, exact_match_by_task, format_prompt, generate
from lmkit.io import is_main_process, write_jsonl_atomic
from lmkit.loader import ModelSpec, load_model
from lmkit.mola.export import export_mola
from lmkit.mola.model import MoLAModel, MoLASettings
from lmkit.prompt_format import training_format, write_prompt_format
from lmkit.recipes import Method, Recipe
from lmkit.report import write_report
from lmkit.training import TrainConfig, Trainer

VariantName = Literal["single_lora", "per_task_lora", "mola_grad", "mola_router"]
ALL_VARIANTS: list[VariantName] = ["single_lora", "per_task_lora", "mola_grad", "mola_router"]


class MoLASection(StrictModel):
    variants: list[VariantName] = Field(default_factory=lambda: list(ALL_VARIANTS), min_length=1)
    tasks: list[str] | None = Field(
        None, description="task names (one adapter each); default: tasks in the data"
    )
    shared: Literal["none", "lora", "base"] = Field(
        "lora", description="what every task trains in MoLA variants"
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="each expert's (and the shared) LoRA")
    router_hidden: int = Field(64, gt=0)
    twd_weight: float = Field(
        0.1, ge=0, description="task-wise decorrelation loss weight (reference code: 0.1)"
    )
    twd_temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(12, gt=0)
    generate_batch_size: int = Field(16, gt=0)


class MoLARecipe(Recipe):
    method: Literal["mola"]
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    mola: MoLASection = Field(default_factory=MoLASection)
    train: TrainConfig = Field(default_factory=TrainConfig)


def _settings(section: MoLASection, variant: VariantName, tasks: list[str]) -> MoLASettings:
    common = {
        "lora": section.lora,
        "router_hidden": section.router_hidden,
        "twd_weight": section.twd_weight,
        "twd_temperature": section.twd_temperature,
    }
    if variant == "single_lora":  # one adapter, every sample routed to it
        return MoLASettings("grad", ["all"], shared="none", **common)
    if variant == "per_task_lora":  # isolated adapters, nothing shared
        return MoLASettings("grad", tasks, shared="none", **common)
    return MoLASettings(
        "grad" if variant == "mola_grad" else "router", tasks, shared=section.shared, **common
    )


def task_ids_for(examples: list[Example], tasks: list[str], where: str) -> list[int]:
    """Task index of each example; a missing or unknown task is a clear error."""
    ids = []
    for number, example in enumerate(examples, start=1):
        task = example.get("task")
        if task in (None, "", "default"):
            raise ConfigError(
                f"{where} example {number} has no task field; MoLA needs a task per example. Fix: "
                "give each data source its task (data.sources[].task) or a task column (columns.task)."
            )
        if task not in tasks:
            raise ConfigError(
                f"{where} example {number} has unknown task {task!r}; known tasks: {tasks}. Fix: "
                "add it to mola.tasks or correct the record."
            )
        ids.append(tasks.index(task))
    return ids


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    batch = pad_batch(rows, pad_id)
    batch["task_ids"] = torch.tensor([r["task_id"] for r in rows])
    return batch


def _train_variant(
    recipe: MoLARecipe,
    variant: VariantName,
    tasks: list[str],
    data: dict[str, tuple[list[Example], list[int]]],
    resume: bool,
) -> tuple[dict[str, float], dict[str, str], dict[str, Any]]:
    """Train one variant on the shared data: its exact match per task, what it exports for serving,
    and its training stats (plus, for the router, how much gate weight lands on each task's expert)."""
    section, out = recipe.mola, recipe.output_dir / "variants" / variant
    (train_examples, train_ids), (eval_examples, eval_ids) = data["train"], data["eval"]
    torch.manual_seed(recipe.seed)
    loaded = load_model(recipe.model)
    settings = replace(_settings(section, variant, tasks), length_buckets=recipe.train.length_buckets)
    model = MoLAModel(loaded.model, settings)
    route = [0] * len(train_ids) if variant == "single_lora" else train_ids
    rows = [
        {**encode_for_training(loaded.tokenizer, e, recipe.train.max_length), "task_id": t}
        for e, t in zip(train_examples, route, strict=True)
    ]
    trainer = Trainer(
        model,
        rows,
        partial(collate, pad_id=loaded.tokenizer.pad_token_id),
        recipe.train,
        out,
        before_optimizer_step=model.release_unrouted_grads,
    )
    stats = trainer.train(resume=resume)
    answers = generate(
        model,
        loaded.tokenizer,
        [e["input"] for e in eval_examples],
        section.max_new_tokens,
        section.generate_batch_size,
        variant,
        per_prompt={"task_ids": [0] * len(eval_ids) if variant == "single_lora" else eval_ids},
    )
    about: dict[str, Any] = {"training": stats}
    if variant == "mola_router":
        prompts = [e["input"] for e in eval_examples]
        about["gate_purity"] = gate_purity(model, loaded.tokenizer, prompts, eval_ids, tasks)
    if not is_main_process():
        return exact_match_by_task(eval_examples, answers), {}, about  # rank 0 writes and exports
    write_jsonl_atomic(
        out / "samples.jsonl", [{**e, "prediction": a} for e, a in zip(eval_examples, answers, strict=True)]
    )
    served = export_mola(model, out)
    prompt_format = training_format(loaded.tokenizer, recipe.data)
    for directory in served.values():  # each served adapter says how to prompt it
        write_prompt_format(Path(directory), prompt_format)
    return exact_match_by_task(eval_examples, answers), served, about


@torch.no_grad()
def gate_purity(
    model: MoLAModel, tokenizer: Any, prompts: list[str], task_ids: list[int], tasks: list[str]
) -> dict[str, float]:
    """Mean router gate on each example's own task's expert, per task and overall (1.0: always it;
    1/K: no idea). The router sees the prompt only, as when serving."""
    own: dict[str, list[float]] = {}
    for start in range(0, len(prompts), 32):
        chunk = prompts[start : start + 32]
        rows = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False).input_ids for p in chunk]
        ids, mask = pad(rows, tokenizer.pad_token_id, left=True)
        gates, _ = model.route(ids, mask, None)
        for row, task_id in enumerate(task_ids[start : start + 32]):
            weight = float(gates[row, task_id])
            own.setdefault(tasks[task_id], []).append(weight)
            own.setdefault("overall", []).append(weight)
    return {task: round(sum(v) / len(v), 4) for task, v in own.items()}


def run(recipe: MoLARecipe, resume: bool) -> dict[str, Any]:
    section = recipe.mola
    train_examples, eval_examples = load_data(recipe.data)
    tasks = section.tasks or sorted({e.get("task", "") for e in train_examples} - {"", "default"})
    data = {
        "train": (train_examples, task_ids_for(train_examples, tasks, "train data")),
        "eval": (eval_examples, task_ids_for(eval_examples, tasks, "eval data")),
    }
    if len(tasks) < 2:
        raise ConfigError(
            f"MoLA mixes adapters over tasks; the data has {len(tasks)} task(s). Fix: use >= 2 tasks."
        )
    scores: dict[str, dict[str, float]] = {}
    served: dict[str, dict[str, str]] = {}
    about: dict[str, dict[str, Any]] = {}
    for variant in section.variants:
        scores[variant], served[variant], about[variant] = _train_variant(
            recipe, variant, tasks, data, resume
        )
    return _report(recipe, tasks, len(eval_examples), scores, served, about)


def _report(
    recipe: MoLARecipe,
    tasks: list[str],
    eval_count: int,
    scores: dict[str, dict[str, float]],
    served: dict[str, dict[str, str]],
    about: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    section = recipe.mola
    results = {
        "method": "mola",
        "model": recipe.model.source,
        "tasks": tasks,
        "exact_match": scores,
        "training": {v: a["training"] for v, a in about.items()},
        "gate_purity": {v: a["gate_purity"] for v, a in about.items() if "gate_purity" in a},
        "batch_size": recipe.train.batch_size,
        "served_adapters": served,
    }
    columns = list(scores)
    rows_out = [[task, *(scores[v].get(task, "-") for v in columns)] for task in [*tasks, "overall"]]
    steps = ", ".join(f"{v} {a['training']['steps']}" for v, a in about.items())
    purity = results["gate_purity"].get("mola_router")
    write_report(
        recipe.output_dir,
        f"MoLA on {recipe.model.source}: exact match on {eval_count} held-out examples",
        results,
        ["task", *columns],
        rows_out,
        [
            f"same data, batch {recipe.train.batch_size}; steps run: {steps}; "
            f"rank {section.lora.r} per adapter, shared part: {section.shared}",
            *([f"router gate on the example's own task's expert: {purity}"] if purity else []),
        ],
    )
    return results


METHOD = Method(MoLARecipe, run, "mixture of LoRA adapters (MoLA-Grad, MoLA-Router) with baselines")
