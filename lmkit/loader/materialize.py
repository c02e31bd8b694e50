"""Write any model source as a plain safetensors directory in lmkit's cache.

vLLM cannot load the embedded GGUF (its GGUF plugin is GPU-only) and tiny models exist only as
code, so the server and other engines get a materialized copy: the dequantized weights, saved in
the asked dtype.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from lmkit import __version__
from lmkit.io import write_dir_atomic, write_json_atomic
from lmkit.loader.hf import load_pretrained, torch_dtype
from lmkit.loader.sources import TinyModel, resolve_source
from lmkit.loader.spec import ModelSpec

MARKER = "lmkit_materialized.json"


def cache_root() -> Path:
    return Path(os.environ.get("LMKIT_CACHE", "~/.cache/lmkit")).expanduser()


def plain_copy(model: PreTrainedModel, dtype: str) -> PreTrainedModel:
    """A fresh model with the same weights in `dtype`, for saving; `model` and its config stay as
    they are. A quantization_config is dropped from the copy: the weights here are plain tensors
    (a GGUF model loaded outside lmkit's loader still names its file's quantization)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.tie_weights()
    if dtype != "auto":
        fresh.to(torch_dtype(dtype))
    return fresh


def materialize(spec: ModelSpec | str, *, force: bool = False) -> Path:
    """Return a local safetensors directory for `spec` (adapters and quantization are not baked in)."""
    spec = ModelSpec.model_validate(spec)
    src = resolve_source(spec)
    if src.kind == "local-dir":
        return Path(src.location)
    target = cache_root() / "models" / src.cache_key
    if (target / MARKER).is_file() and not force:
        return target

    def fill(tmp: Path) -> None:
        if isinstance(src.alias, TinyModel):
            src.alias.build(tmp)
        else:
            plain = spec.model_copy(
                update={"quantization": "none", "adapters": [], "active_adapter": None, "device_map": "cpu"}
            )
            model, tokenizer, processor = load_pretrained(src, plain)
            plain_copy(model, spec.dtype).save_pretrained(tmp)
            (processor or tokenizer).save_pretrained(tmp)
        write_json_atomic(
            tmp / MARKER,
            {
                "source": spec.source,
                "kind": src.kind,
                "gguf_file": src.gguf_file,
                "dtype": spec.dtype,
                "lmkit_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )

    return write_dir_atomic(target, fill)


def list_materialized() -> list[dict[str, Any]]:
    """Every cached copy with its provenance and size, for `lmkit models`."""
    root = cache_root() / "models"
    rows = []
    for marker in sorted(root.glob(f"*/{MARKER}")):
        info = json.loads(marker.read_text())
        size = sum(f.stat().st_size for f in marker.parent.rglob("*") if f.is_file())
        rows.append({"path": str(marker.parent), "size_mb": round(size / 2**20, 1), **info})
    return rows
