"""Prompt formatting, batched greedy generation and exact-match scoring shared by methods and evals."""

from __future__ import annotations

from collections import defaultdict

import torch
from rich.progress import Progress
from transformers import PreTrainedTokenizerBase

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


def pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and the attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def pad_batch(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded rows into tensors (labels padded with -100)."""
    ids, mask = pad([r["input_ids"] for r in rows], pad_id)
    labels, _ = pad([r["labels"] for r in rows], -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    description: str = "generating",
    per_prompt: dict[str, list[int]] | None = None,
) -> list[str]:
    """Greedy completions for raw user prompts (chat-formatted here), batched with left padding.

    `per_prompt` holds extra integer inputs, one per prompt (e.g. MoLA's `task_ids`), passed batched.
    """
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    with Progress(transient=True) as progress:
        task = progress.add_task(description, total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            chunk = [format_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            extra = {
                k: torch.tensor(v[start : start + batch_size], device=device)
                for k, v in (per_prompt or {}).items()
            }
            generated = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                **extra,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            progress.advance(task, len(chunk))
    return outputs


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
