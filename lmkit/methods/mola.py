"""`method: mola` — MoLA-Grad and MoLA-Router for causal LMs, against one shared LoRA and per-task LoRAs.

Every variant trains on the same multi-task data with the same steps and batch size; the recipe
reports per-task exact match and exports what the serving layer serves (one adapter per task
for MoLA-Grad and the per-task variants; experts + router for MoLA-Router).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from pydantic import Field

from lmkit.config import StrictModel
from lmkit.data import Example, load_data
from lmkit.errors import ConfigError
from lmkit.generation import encode_for_training, exact_match_by_task, generate, pad_batch
from lmkit.io import write_jsonl_atomic
from lmkit.loader import load_model
from lmkit.mola.export import export_mola
from lmkit.mola.model import MoLAModel, MoLASettings
from lmkit.recipes import Recipe, register_method
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
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    router_hidden: int = Field(64, gt=0)
    twd_weight: float = Field(
        0.1, ge=0, description="task-wise decorrelation loss weight (reference code: 0.1)"
    )
    twd_temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(12, gt=0)
    generate_batch_size: int = Field(16, gt=0)


class MoLARecipe(Recipe):
    method: Literal["mola"]
    mola: MoLASection = Field(default_factory=MoLASection)
    train: TrainConfig = Field(default_factory=TrainConfig)


def _settings(section: MoLASection, variant: VariantName, tasks: list[str]) -> MoLASettings:
    common = {
        "r": section.r,
        "alpha": section.alpha,
        "dropout": section.dropout,
        "target_modules": tuple(section.target_modules),
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
                f"{where} example {number} has no task field. MoLA needs {{task, input, target}} "
                "records. Fix: add a task to every record."
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


def run(recipe: MoLARecipe, resume: bool) -> dict[str, Any]:
    out, section = recipe.output_dir, recipe.mola
    train_examples, eval_examples = load_data(recipe.data)
    tasks = section.tasks or sorted({e.get("task", "") for e in train_examples} - {"", "default"})
    train_ids = task_ids_for(train_examples, tasks, "train data")
    eval_ids = task_ids_for(eval_examples, tasks, "eval data")
    if len(tasks) < 2:
        raise ConfigError(
            f"MoLA mixes adapters over tasks; the data has {len(tasks)} task(s). Fix: use >= 2 tasks."
        )
    scores: dict[str, dict[str, float]] = {}
    served: dict[str, dict[str, str]] = {}
    for variant in section.variants:
        torch.manual_seed(recipe.seed)
        loaded = load_model(recipe.model)
        settings = _settings(section, variant, tasks)
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
            out / "variants" / variant,
            before_optimizer_step=model.release_unrouted_grads,
        )
        trainer.train(resume=resume)
        eval_route = [0] * len(eval_ids) if variant == "single_lora" else eval_ids
        answers = generate(
            model,
            loaded.tokenizer,
            [e["input"] for e in eval_examples],
            section.max_new_tokens,
            section.generate_batch_size,
            variant,
            per_prompt={"task_ids": eval_route},
        )
        scores[variant] = exact_match_by_task(eval_examples, answers)
        write_jsonl_atomic(
            out / "variants" / variant / "samples.jsonl",
            [{**e, "prediction": a} for e, a in zip(eval_examples, answers, strict=True)],
        )
        served[variant] = export_mola(model, out / "variants" / variant)

    results = {
        "method": "mola",
        "model": recipe.model.source,
        "tasks": tasks,
        "exact_match": scores,
        "steps": recipe.train.max_steps,
        "batch_size": recipe.train.batch_size,
        "served_adapters": served,
    }
    columns = list(scores)
    rows_out = [[task, *(scores[v].get(task, "-") for v in columns)] for task in [*tasks, "overall"]]
    write_report(
        out,
        f"MoLA on {recipe.model.source}: exact match on {len(eval_examples)} held-out examples",
        results,
        ["task", *columns],
        rows_out,
        [
            f"same data, {recipe.train.max_steps} steps of batch {recipe.train.batch_size} per variant; "
            f"rank {section.r} per adapter, shared part: {section.shared}"
        ],
    )
    return results


register_method("mola", MoLARecipe, run, "mixture of LoRA adapters (MoLA-Grad, MoLA-Router) with baselines")
