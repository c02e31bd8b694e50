"""Small builders shared by tests."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from lmkit.loader import load_model

# recipes/train_tiny_vlm.yaml at CI size: tiny scenes and tower, one tiny-llama layer, a few steps each
TINY_VLM = [
    "vlm.image_size=56",
    "vlm.patch_size=14",
    "vlm.vision={hidden_size: 32, intermediate_size: 64, layers: 2, heads: 2}",
    "vlm.lm.source=tiny-llama",
    "vlm.lm_layers=1",
    "vlm.vision_stage={steps: 3, batch_size: 4, lr: 1.0e-3, warmup_steps: 1, schedule: cosine}",
    "vlm.vision_stage.max_grad_norm=1.0",
    "vlm.anchor_stage={steps: 10, batch_size: 2, lr: 1.0e-3}",
    "vlm.caption_stage={steps: 2, batch_size: 2, lr: 1.0e-3}",
    "vlm.align_stage={steps: 2, batch_size: 2, lr: 1.0e-3}",
    "vlm.align_stopping={scenes: 2, every: 1, patience: 3}",
    "vlm.captions_per_step=1",
    "vlm.eval_questions=6",
]


def make_lora_adapter(
    path: Path, seed: int, source: str = "tiny-llama", targets: tuple[str, ...] = ("q_proj", "v_proj")
) -> Path:
    """Save a LoRA adapter for `source` whose B matrices are random (so it changes the outputs)."""
    base = load_model(source).model
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(path)
    return path


def next_token_logits(loaded, text: str = "hello world") -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits[0, -1].float()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hide_module(monkeypatch, module: str) -> None:
    """Make `importlib.util.find_spec(module)` report the package as not installed."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a)
    )


def assert_knows_the_capital_of_france(client, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        temperature=0,
        max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in reply.choices[0].message.content
