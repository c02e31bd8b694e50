"""Export MoLA as standard peft LoRA adapters that vLLM (and the loader) serve unchanged.

A weighted sum of LoRAs with fixed weights is exactly one LoRA of the summed rank:
sum_k w_k s_k B_k A_k = [w_1 s_1 B_1 ... w_K s_K B_K] [A_1; ...; A_K]. MoLA-Grad exports one such
adapter per task (task expert + shared adapter); MoLA-Router builds one per gate vector.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from lmkit.errors import ModelSourceError
from lmkit.io import write_dir_atomic, write_json_atomic
from lmkit.mola.model import SHARED, MoLAModel

SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return _read_adapter_config(path), load_file(path / "adapter_model.safetensors")


def concat_adapters(sources: list[tuple[Path, float]], target: Path) -> Path:
    """One peft LoRA equal to sum_k weight_k * adapter_k (scalings folded into B, lora_alpha = r)."""
    configs, tensors = zip(*(_read_adapter(path) for path, _ in sources), strict=True)
    modules = sorted({k[: -len(SUFFIXES[0])] for k in tensors[0] if k.endswith(SUFFIXES[0])})
    merged: dict[str, torch.Tensor] = {}
    for module in modules:
        a_parts, b_parts = [], []
        for (_, weight), config, state in zip(sources, configs, tensors, strict=True):
            scaling = config["lora_alpha"] / config["r"]
            a_parts.append(state[module + SUFFIXES[0]])
            b_parts.append(state[module + SUFFIXES[1]] * (weight * scaling))
        merged[module + SUFFIXES[0]] = torch.cat(a_parts, dim=0).contiguous()
        merged[module + SUFFIXES[1]] = torch.cat(b_parts, dim=1).contiguous()
    rank = sum(c["r"] for c in configs)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=configs[0]["target_modules"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=configs[0].get("base_model_name_or_path"),
    )

    def fill(tmp: Path) -> None:
        config.save_pretrained(tmp)
        save_file(merged, tmp / "adapter_model.safetensors")

    return write_dir_atomic(target, fill)


def export_mola(model: MoLAModel, out: Path) -> dict[str, str]:
    """Write experts/, adapters/<task>/ (servable; Grad only), router/ (Router only), base/ (shared=base).

    Returns {served name: adapter dir}.
    """
    settings = model.settings
    names = list(settings.experts) + ([SHARED] if settings.shared == "lora" else [])
    experts_dir = write_dir_atomic(
        out / "experts",
        lambda tmp: model.peft.save_pretrained(tmp, selected_adapters=names, save_embedding_layers=False),
    )
    shared = [(experts_dir / SHARED, 1.0)] if settings.shared == "lora" else []
    served: dict[str, str] = {}
    if settings.variant == "grad":
        for task in settings.experts:
            path = concat_adapters([(experts_dir / task, 1.0), *shared], out / "adapters" / task)
            served[task] = str(path)
    else:

        def fill(tmp: Path) -> None:
            save_file(
                {f"router.{k}": v for k, v in model.router.state_dict().items()}, tmp / "router.safetensors"
            )
            write_json_atomic(
                tmp / "router.json",
                {
                    "experts": settings.experts,
                    "shared": settings.shared,
                    "router_hidden": settings.router_hidden,
                    "embed_dim": model.router.net[0].normalized_shape[0],
                },
            )

        write_dir_atomic(out / "router", fill)
    if settings.shared == "base":
        base = copy.deepcopy(model.peft).unload()
        write_dir_atomic(out / "base", base.save_pretrained)
    return served


def adapter_for_gates(
    experts_dir: Path, experts: list[str], gates: list[float], shared: bool, target: Path
) -> Path:
    """The single LoRA equal to MoLA-Router's mixture for these gates (+ the shared adapter)."""
    sources = [(experts_dir / name, float(g)) for name, g in zip(experts, gates, strict=True)]
    if shared:
        sources.append((experts_dir / SHARED, 1.0))
    return concat_adapters(sources, target)


@dataclass(frozen=True)
class RouterExport:
    """What `export_mola` wrote for a MoLA-Router: read in one place, by the server and its checks."""

    path: Path
    experts: list[str]
    shared: bool  # a shared LoRA adapter is merged into every mixture
    embed_dim: int
    router_hidden: int
    merged_rank: int  # rank of any mixture: every expert's (and the shared) rank, concatenated


def read_router_export(path: Path) -> RouterExport:
    meta_file = path / "router" / "router.json"
    if not meta_file.is_file() or not (path / "experts").is_dir():
        raise ModelSourceError(
            f"{path} is not an exported MoLA-Router (no router/router.json or experts/). Fix: point to "
            "<output_dir>/variants/mola_router of a mola recipe run."
        )
    meta = json.loads(meta_file.read_text())
    shared = meta["shared"] == "lora"
    names = meta["experts"] + ([SHARED] if shared else [])
    rank = sum(_read_adapter_config(path / "experts" / name)["r"] for name in names)
    return RouterExport(path, meta["experts"], shared, meta["embed_dim"], meta["router_hidden"], rank)


def _read_adapter_config(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())
