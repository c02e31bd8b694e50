"""`load_model`: ModelSpec -> model + tokenizer, the single entry point every method and the server use."""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from lmkit.errors import ModelSourceError
from lmkit.loader.hf import load_pretrained
from lmkit.loader.materialize import materialize
from lmkit.loader.sources import ResolvedSource, resolve_source
from lmkit.loader.spec import AdapterSpec, ModelSpec


@dataclass
class LoadedModel:
    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase
    processor: ProcessorMixin | None
    spec: ModelSpec
    source: ResolvedSource


def _check_adapter_dir(adapter: AdapterSpec) -> None:
    if not (adapter.path / "adapter_config.json").is_file():
        where = "does not exist" if not adapter.path.exists() else "has no adapter_config.json"
        raise ModelSourceError(
            f"Adapter {adapter.name!r}: {adapter.path} {where}. Fix: point adapters[].path to a directory "
            "written by peft's save_pretrained (e.g. <output_dir>/adapter of a training recipe)."
        )


def attach_adapters(
    model: PreTrainedModel, adapters: list[AdapterSpec], active: str | None, trainable: bool = False
) -> PreTrainedModel | PeftModel:
    """Load every named peft adapter onto `model` and activate one (the first by default)."""
    if not adapters:
        return model
    for adapter in adapters:
        _check_adapter_dir(adapter)
    first, *rest = adapters
    try:
        wrapped = PeftModel.from_pretrained(
            model, first.path, adapter_name=first.name, is_trainable=trainable
        )
        for adapter in rest:
            wrapped.load_adapter(adapter.path, adapter_name=adapter.name, is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelSourceError(
            f"An adapter does not fit this base model: {exc}. Fix: load adapters trained on the same base "
            "model (check the adapter's base_model_name_or_path)."
        ) from None
    wrapped.set_adapter(active or first.name)
    return wrapped


def load_model(spec: ModelSpec | str, *, trainable_adapters: bool = False) -> LoadedModel:
    """Load `spec` as a transformers model (+ peft adapters), tokenizer and, for multimodal models, processor.

    Tiny aliases are built once into the cache; a quantized GGUF source goes through its materialized
    copy because bitsandbytes quantizes from ordinary checkpoints.
    """
    spec = ModelSpec.model_validate(spec)
    src = resolve_source(spec)
    location = None
    if src.kind == "tiny" or (src.gguf_file and spec.quantization != "none"):
        location = str(materialize(spec))
    model, tokenizer, processor = load_pretrained(src, spec, location)
    model = attach_adapters(model, spec.adapters, spec.active_adapter, trainable_adapters)
    model.eval()
    return LoadedModel(model, tokenizer, processor, spec, src)
