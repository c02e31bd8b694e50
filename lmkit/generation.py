"""Prompt formatting, batched greedy generation and exact-match scoring shared by methods and evals."""

from __future__ import annotations

from collections import defaultdict

import torch
from rich.progress import Progress
from transformers import PreTrainedTokenizerBase

from lmkit.batching import pad
from lmkit.data import Example


def format_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str) -> str:
    """The chat-formatted prompt when the tokenizer has a template, else the raw text and a newline."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": user_text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return user_text + "\n"


def encode_for_training(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> dict:
    """Token ids of prompt + target + EOS, with the loss masked (-100) on the prompt."""
    prompt_ids = tokenizer(format_prompt(tokenizer, example["input"]), add_special_tokens=False).input_ids
    target_ids = tokenizer(example["target"] + tokenizer.eos_token, add_special_tokens=False).input_ids
    input_ids = (prompt_ids + target_ids)[-max_length:]
    labels = ([-100] * len(prompt_ids) + target_ids)[-max_length:]
    return {"input_ids": input_ids, "labels": labels}


@torch.inference_mode()
def generate_ids(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    description: str = "generating",
    per_prompt: dict[str, list[int]] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """Completions for tokenized prompts, batched with left padding: greedy, or sampled when
    `temperature` > 0 (seed torch's RNG first for a reproducible draw).

    `per_prompt` holds extra integer inputs, one per prompt (e.g. MoLA's `task_ids`), passed batched.
    """
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {}
    )
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    with Progress(transient=True) as progress:
        task = progress.add_task(description, total=len(rows))
        for start in range(0, len(rows), batch_size):
            ids, mask = pad(rows[start : start + batch_size], tokenizer.pad_token_id, left=True)
            extra = {
                k: torch.tensor(v[start : start + batch_size], device=device)
                for k, v in (per_prompt or {}).items()
            }
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                **extra,
                max_new_tokens=max_new_tokens,
                **(sampling or {"do_sample": False}),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, ids.shape[1] :]
            outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            progress.advance(task, len(ids))
    return outputs


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    description: str = "generating",
    per_prompt: dict[str, list[int]] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """Completions for raw user prompts (chat-formatted here); see `generate_ids`."""
    rows = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False).input_ids for p in prompts]
    return generate_ids(
        model, tokenizer, rows, max_new_tokens, batch_size, description, per_prompt, temperature, top_p
    )


def normalize(text: str) -> str:
    return " ".join(text.strip().strip(".").split()).lower()


def exact_match_by_task(examples: list[Example], predictions: list[str]) -> dict[str, float]:
    """Exact-match accuracy per task (after trimming, case- and whitespace-folding), plus `overall`."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for example, prediction in zip(examples, predictions, strict=True):
        hit = normalize(prediction) == normalize(example["target"])
        hits[example["task"]].append(hit)
        hits["overall"].append(hit)
    return {task: round(sum(v) / len(v), 4) for task, v in sorted(hits.items())}
