"""The transformers calls behind the loader, with their failures turned into fixable errors."""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from lmkit.errors import ModelSourceError
from lmkit.loader.sources import ResolvedSource
from lmkit.loader.spec import ModelSpec


def torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def default_device_map() -> str | dict[str, Any]:
    """Whole model on this process's GPU when there is one (DDP-friendly under `accelerate launch`)."""
    if torch.cuda.is_available():
        return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"}
    return "cpu"


def quantization_config(spec: ModelSpec) -> BitsAndBytesConfig | None:
    if spec.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelSourceError(
            f"quantization={spec.quantization} needs bitsandbytes. Fix: pip install 'bitsandbytes>=0.50', "
            "or set model.quantization: none."
        )
    try:
        import bitsandbytes  # noqa: F401  (initialises its backend; fails loudly on unsupported devices)
    except Exception as exc:  # noqa: BLE001  (any backend failure means the same fix)
        raise ModelSourceError(
            f"bitsandbytes cannot run on this machine ({exc}). Fix: set model.quantization: none, or use a "
            "CUDA GPU or an x86-64/aarch64 CPU."
        ) from None
    if spec.quantization == "int8":
        # bitsandbytes warns on every matmul that it casts activations to fp16; once is enough.
        warnings.filterwarnings("once", message="MatMul8bitLt: inputs will be cast")
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float32 if spec.dtype in ("float32", "auto") else getattr(torch, spec.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def _hub_failure(src: ResolvedSource, exc: Exception) -> ModelSourceError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelSourceError(
        f"Could not load {src.location!r} from the Hugging Face hub: {first_line}. Fix: check the id and "
        "revision, go online (unset HF_HUB_OFFLINE) or set HF_TOKEN for gated models, or download the model "
        "and pass its local directory as model.source."
    )


def is_multimodal(config: PretrainedConfig) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_config(src: ResolvedSource, spec: ModelSpec, location: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(
            location,
            gguf_file=src.gguf_file if location == src.location else None,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        if src.kind == "hub":
            raise _hub_failure(src, exc) from None
        raise ModelSourceError(f"Cannot read the model config at {location}: {exc}") from None


def load_pretrained(
    src: ResolvedSource, spec: ModelSpec, location: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin | None]:
    """`from_pretrained` for model and tokenizer (or processor, for multimodal models).

    `location` overrides the source's own place (a materialized copy); GGUF applies only to the original.
    """
    location = location or src.location
    gguf_file = src.gguf_file if location == src.location else None
    common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code, "gguf_file": gguf_file}
    config = load_config(src, spec, location)
    model_class = AutoModelForImageTextToText if is_multimodal(config) else AutoModelForCausalLM
    try:
        processor = AutoProcessor.from_pretrained(location, **common) if is_multimodal(config) else None
        tokenizer = (
            processor.tokenizer
            if processor is not None
            else AutoTokenizer.from_pretrained(location, **common)
        )
        model = model_class.from_pretrained(
            location,
            dtype=torch_dtype(spec.dtype),
            device_map=spec.device_map or default_device_map(),
            quantization_config=quantization_config(spec),
            **common,
        )
    except ModelSourceError:
        raise
    except OSError as exc:
        if src.kind == "hub":
            raise _hub_failure(src, exc) from None
        raise ModelSourceError(f"Cannot load the model at {location}: {exc}") from None
    except (RuntimeError, ValueError, ImportError) as exc:
        if spec.quantization != "none":
            raise ModelSourceError(
                f"Loading with quantization={spec.quantization} failed on this device: {exc}. Fix: set "
                "model.quantization: none, or use a device bitsandbytes supports "
                "(CUDA GPU, x86-64/aarch64 CPU)."
            ) from None
        raise
    if gguf_file:
        forget_gguf_quantization(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, processor


def forget_gguf_quantization(model: PreTrainedModel) -> None:
    """transformers dequantizes the GGUF architectures lmkit's sources use (Llama and the like) on
    load, yet still marks the model quantized: its `save_pretrained` refuses to write it, and a
    config saved any other way names a GGUF quantization that vLLM rejects. Drop the marks, unless
    some weights stayed packed (a GGUF kernel kept them quantized), where the marks are true.
    (nf4/int8 never get here: they load from the materialized copy, not the GGUF file.)"""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model.config, "quantization_config", None)
    if getattr(config, "quant_method", None) != "gguf":  # GgufConfig's is a str enum
        return
    if getattr(quantizer, "packed_modules", None):  # a GGUF kernel kept these quantized
        return
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # transformers' own: config, quantizer, flags
    model.config.__dict__.pop("quantization_config", None)
    model.config.__dict__.pop("_is_quantized", None)
    model.hf_quantizer = None
    model.is_quantized = False
