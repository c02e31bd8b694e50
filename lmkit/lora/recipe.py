"""`method: lora` — fine-tune one peft LoRA adapter, then reload it through the loader and generate.

The quickstart recipe uses it. It measures exact-match accuracy of the base model and of the
adapted model (reloaded from disk, as a user or the server would) on held-out examples.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from pydantic import Field

from lmkit.adapters import LoraSpec
from lmkit.batching import pad_batch
from lmkit.config import StrictModel
from lmkit.data import DataSpec, load_data
from lmkit.errors import ConfigError
from lmkit.generation import encode_for_training, exact_match_by_task, generate
from lmkit.io import is_main_process, write_dir_atomic, write_jsonl_atomic
from lmkit.loader import AdapterSpec, ModelSpec, load_model
from lmkit.prompt_format import PromptFormat, training_format, write_prompt_format
from lmkit.recipes import Method, Recipe
from lmkit.report import write_report
from lmkit.training import TrainConfig, Trainer


class GenerateSection(StrictModel):
    max_new_tokens: int = Field(16, gt=0)
    batch_size: int = Field(16, gt=0)
    evaluate_base: bool = Field(True, description="also score the base model, for a before/after comparison")


class LoraRecipe(Recipe):
    method: Literal["lora"]
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    adapter_name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateSection = Field(default_factory=GenerateSection)


def _save_adapter(model: torch.nn.Module, prompt_format: PromptFormat, directory: Path) -> None:
    """The weights and the prompt format they expect, written together."""
    model.save_pretrained(directory, save_embedding_layers=False)
    write_prompt_format(directory, prompt_format)


def run(recipe: LoraRecipe, resume: bool) -> dict[str, Any]:
    if recipe.model.adapters:
        raise ConfigError(
            "method lora trains a new adapter on the base model; remove model.adapters "
            "(or merge them into a base checkpoint first)."
        )
    out = recipe.output_dir
    train_examples, eval_examples = load_data(recipe.data)
    if is_main_process():
        write_jsonl_atomic(out / "data" / "train.jsonl", train_examples)
        write_jsonl_atomic(out / "data" / "eval.jsonl", eval_examples)
    prompts = [e["input"] for e in eval_examples]
    gen = recipe.generate

    loaded = load_model(recipe.model)
    base_scores, base_predictions = None, [None] * len(prompts)
    if gen.evaluate_base:
        base_predictions = generate(
            loaded.model, loaded.tokenizer, prompts, gen.max_new_tokens, gen.batch_size, "base model"
        )
        base_scores = exact_match_by_task(eval_examples, base_predictions)

    model = loaded.model
    if recipe.model.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(recipe.seed)
    model = get_peft_model(model, recipe.lora.peft_config(task_type="CAUSAL_LM"))
    tokenizer = loaded.tokenizer
    rows = [encode_for_training(tokenizer, e, recipe.train.max_length) for e in train_examples]
    trainer = Trainer(model, rows, partial(pad_batch, pad_id=tokenizer.pad_token_id), recipe.train, out)
    stats = trainer.train(resume=resume)
    adapter_dir = out / "adapter"
    prompt_format = training_format(tokenizer, recipe.data)
    if trainer.accelerator.is_main_process:
        write_dir_atomic(adapter_dir, partial(_save_adapter, trainer.unwrapped, prompt_format))
    trainer.accelerator.wait_for_everyone()
    del trainer, model, loaded  # free the training copy before reloading

    adapted_spec = recipe.model.model_copy(
        update={"adapters": [AdapterSpec(name=recipe.adapter_name, path=adapter_dir)]}
    )
    reloaded = load_model(adapted_spec)
    predictions = generate(
        reloaded.model, reloaded.tokenizer, prompts, gen.max_new_tokens, gen.batch_size, "adapted model"
    )
    scores = exact_match_by_task(eval_examples, predictions)
    if not is_main_process():
        return {"adapter": str(adapter_dir), "training": stats}  # rank 0 writes samples and report
    write_jsonl_atomic(
        out / "samples.jsonl",
        [
            {**e, "prediction": p, "base_prediction": b}
            for e, p, b in zip(eval_examples, predictions, base_predictions, strict=True)
        ],
    )

    results = {
        "method": "lora",
        "model": recipe.model.source,
        "adapter": str(adapter_dir),
        "training": stats,
        "eval_examples": len(eval_examples),
        "exact_match_base": base_scores,
        "exact_match_adapted": scores,
    }
    rows_out = [
        [task, "-" if base_scores is None else base_scores.get(task, "-"), score]
        for task, score in scores.items()
    ]
    notes = [
        f"{stats['steps']} steps, loss {stats['first_loss']} -> {stats['final_loss']}, "
        f"{stats['tokens_per_second']} train tokens/s",
        f"adapter saved to {adapter_dir} and reloaded through the loader for generation",
        f"prompt format recorded with the adapter (lmkit eval follows it): {prompt_format.describe()}",
    ]
    write_report(
        out,
        f"LoRA on {recipe.model.source}: exact match on {len(eval_examples)} held-out examples",
        results,
        ["task", "base", "adapted"],
        rows_out,
        notes,
    )
    return results


METHOD = Method(LoraRecipe, run, "fine-tune one LoRA adapter, reload it and generate")
