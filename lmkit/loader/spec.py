"""`ModelSpec`: the one description of a model that every method, the server and the evals share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmkit.config import StrictModel

DEFAULT_MODEL = "smollm2-135m"


class AdapterSpec(StrictModel):
    """A peft adapter directory (written by `save_pretrained`) loaded under `name`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: Path


class ModelSpec(StrictModel):
    """What to load and how.

    `source` is an embedded alias (see `lmkit models`), a local directory, a local `.gguf` file,
    or a Hugging Face hub id (`org/name`, downloaded by transformers when online).
    A bare string in YAML (`model: smollm2-135m`) is shorthand for `{source: ...}`.
    """

    source: str = DEFAULT_MODEL
    gguf_file: str | None = Field(None, description="GGUF file inside a directory or hub repo")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "nf4", "int8"] = "none"
    device_map: str | dict[str, Any] | None = Field(
        None, description="accelerate device map; default: whole model on cuda:0 if present, else cpu"
    )
    adapters: list[AdapterSpec] = []
    active_adapter: str | None = Field(None, description="adapter used for generation; default: the first")
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _accept_bare_source(cls, data: Any) -> Any:
        return {"source": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check_adapters(self) -> ModelSpec:
        names = [a.name for a in self.adapters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"adapter names must be unique, repeated: {duplicates}")
        if self.active_adapter is not None and self.active_adapter not in names:
            raise ValueError(f"active_adapter {self.active_adapter!r} is not one of the adapters {names}")
        return self
