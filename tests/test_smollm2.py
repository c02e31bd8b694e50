"""The real embedded SmolLM2-135M (GGUF): local source forms, materialize, 4-bit, the quickstart recipe."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import next_token_logits

from lmkit.generation import generate
from lmkit.loader import ModelSpec, load_model, materialize
from lmkit.loader.sources import ALIASES
from lmkit.recipes import load_recipe, run_recipe

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def reference_logits(smollm2):
    return next_token_logits(smollm2, PROMPT)


def test_embedded_gguf_answers_a_simple_question(smollm2):
    assert smollm2.source.kind == "embedded-gguf"
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    [answer] = generate(
        smollm2.model, smollm2.tokenizer, ["What is the capital of France?"], max_new_tokens=12, batch_size=1
    )
    assert "Paris" in answer


def test_gguf_file_and_directory_sources_load_the_same_weights(tmp_path, reference_logits):
    gguf = ALIASES["smollm2-135m"].locate()
    copy = tmp_path / "model"
    copy.mkdir()
    shutil.copy(gguf, copy / gguf.name)
    from_file = load_model(str(copy / gguf.name))
    assert from_file.source.kind == "gguf-file"
    torch.testing.assert_close(next_token_logits(from_file, PROMPT), reference_logits)
    from_dir = load_model(str(copy))  # a directory holding exactly one .gguf
    torch.testing.assert_close(next_token_logits(from_dir, PROMPT), reference_logits)


def test_materialized_copy_is_plain_safetensors_with_identical_logits(reference_logits):
    path = materialize("smollm2-135m")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    reloaded = load_model(str(path))
    torch.testing.assert_close(next_token_logits(reloaded, PROMPT), reference_logits, rtol=0, atol=0)


def test_the_loaded_gguf_model_saves_as_a_plain_checkpoint(smollm2, tmp_path, reference_logits):
    """What every recipe that saves a model does (a merged LoRA, MoLA's shared base): transformers
    refuses to save a model it still marks GGUF-quantized, and vLLM refuses the config it carries."""
    smollm2.model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    smollm2.tokenizer.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    torch.testing.assert_close(next_token_logits(reloaded, PROMPT), reference_logits, rtol=0, atol=0)


def test_nf4_keeps_the_answer(reference_logits):
    quantized = load_model(ModelSpec(source="smollm2-135m", quantization="nf4"))
    assert type(quantized.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert quantized.model.is_quantized
    logits = next_token_logits(quantized, PROMPT)
    assert logits.argmax() == reference_logits.argmax()


def test_quickstart_recipe_runs_on_the_real_model(tmp_path):
    recipe = load_recipe(
        QUICKSTART,
        [
            f"output_dir={tmp_path / 'qs'}",
            "train.max_steps=12",
            "train.save_every=6",
            "data.generate.train_size=96",
            "data.generate.eval_size=8",
            "generate.evaluate_base=false",
        ],
    )
    results = run_recipe(recipe)
    assert results["training"]["final_loss"] < results["training"]["first_loss"] / 2
    assert results["exact_match_adapted"]["overall"] >= 0.5
    assert (tmp_path / "qs" / "adapter" / "adapter_model.safetensors").is_file()
