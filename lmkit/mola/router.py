"""MoLA-Router at serving time: prompt -> gates -> a bucketed, exactly merged LoRA that vLLM can serve.

vLLM applies one LoRA per request. Because MoLA-Router's gates are fixed per sequence, its
mixture for a prompt is one LoRA of summed rank (see `export.concat_adapters`). Gates are
rounded to multiples of 1/buckets so that similar prompts share an adapter, which vLLM then
keeps in its LoRA cache instead of loading one per request.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from lmkit.errors import ModelSourceError
from lmkit.mola.export import adapter_for_gates, read_router_export
from lmkit.mola.model import Router


def bucket(gates: list[float], buckets: int) -> tuple[int, ...]:
    """Integer shares summing to `buckets`, nearest to `gates` (largest-remainder rounding)."""
    raw = [g * buckets for g in gates]
    shares = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - shares[i], reverse=True)
    for i in by_remainder[: buckets - sum(shares)]:
        shares[i] += 1
    return tuple(shares)


def _embedding_matrix(model_dir: Path) -> torch.Tensor:
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                if key.endswith("embed_tokens.weight"):
                    return handle.get_tensor(key).float()
    raise ModelSourceError(
        f"No embed_tokens.weight in {model_dir}; the router needs the base model's embeddings."
    )


class PromptRouter:
    def __init__(self, name: str, export_dir: Path, model_dir: Path, buckets: int) -> None:
        export = read_router_export(export_dir)
        self.name, self.export_dir, self.buckets = name, export_dir, buckets
        self.experts, self.shared = export.experts, export.shared
        self.router = Router(export.embed_dim, export.router_hidden, len(self.experts))
        weights = load_file(export_dir / "router" / "router.safetensors")
        self.router.load_state_dict({k.removeprefix("router."): v for k, v in weights.items()})
        self.router.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.embeddings = _embedding_matrix(model_dir)

    @torch.inference_mode()
    def gates(self, prompt: str) -> list[float]:
        ids = torch.tensor(self.tokenizer(prompt, add_special_tokens=False).input_ids)
        embedded = self.embeddings[ids].unsqueeze(0)
        return self.router(embedded, torch.ones(1, len(ids))).softmax(-1)[0].tolist()

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def adapter_name(self, shares: tuple[int, ...]) -> str:
        return f"{self.name}--{'-'.join(map(str, shares))}"

    def adapter_path(self, shares: tuple[int, ...]) -> Path:
        """The merged adapter for these shares, built once into `<export>/buckets/`."""
        target = self.export_dir / "buckets" / self.adapter_name(shares)
        if not (target / "adapter_model.safetensors").is_file():
            adapter_for_gates(
                self.export_dir / "experts",
                self.experts,
                [s / self.buckets for s in shares],
                self.shared,
                target,
            )
        return target
