"""lmkit's pruned-LLaVA vLLM plugin on a real vLLM server: budget, agreement with transformers, config."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lmkit.errors import ConfigError
from lmkit.loader import load_model
from lmkit.pruning.config import PruneConfig
from lmkit.pruning.llava import PrunedLlava
from lmkit.pruning.measure import synthetic_images
from lmkit.serving.config import ServeConfig
from lmkit.serving.process import ServerProcess
from tests.helpers import free_port

pytestmark = pytest.mark.slow
KEEP, AVAILABLE = 4, 16
PRUNE = {"method": "freepruner_style", "keep": KEEP}


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def serve_tiny_llava(prune: dict, tmp_path_factory):
    config = ServeConfig.model_validate(
        {
            "model": {"source": "tiny-llava", "dtype": "float32"},
            "port": free_port(),
            "engine": {"dtype": "float32", "max_model_len": 256, "extra_args": ["--enforce-eager"]},
            "prune": prune,
        }
    )
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    return ServerProcess(config, log_path=log)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_tiny_llava(PRUNE, tmp_path_factory) as process:
        yield process


def chat(server, images, text: str = "What is it?", max_tokens: int = 5) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
    }
    response = httpx.post(f"{server.config.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_each_image_takes_exactly_the_budget_in_the_prompt(server):
    image_id = load_model("tiny-llava").model.config.image_token_id
    for count in (1, 2):
        reply = chat(server, synthetic_images(count, 32, seed=count))
        assert reply["prompt_token_ids"].count(image_id) == KEEP * count


def test_vllm_generates_what_the_transformers_pruned_model_generates(server):
    assert_generates_as_transformers(server, PRUNE)


def test_method_none_serves_every_image_token_as_the_unpruned_model(tmp_path_factory):
    """vLLM's own LLaVA module cannot load on CPU-only torch; `none` is the unpruned baseline."""
    with serve_tiny_llava({"method": "none"}, tmp_path_factory) as unpruned:
        image_id = load_model("tiny-llava").model.config.image_token_id
        reply = chat(unpruned, synthetic_images(1, 32, seed=3))
        assert reply["prompt_token_ids"].count(image_id) == AVAILABLE
        assert_generates_as_transformers(unpruned, {"method": "none"})


def assert_generates_as_transformers(server, prune: dict) -> None:
    loaded = load_model("tiny-llava")
    pruned = PrunedLlava(loaded.model, PruneConfig(**prune))
    image_id = loaded.model.config.image_token_id
    for seed in (0, 1):
        image = synthetic_images(1, 32, seed=seed)[0]
        reply = chat(server, [image])
        ids = []
        for token in reply["prompt_token_ids"]:  # vLLM's prompt with the full placeholder run restored
            if token != image_id:
                ids.append(token)
            elif not ids or ids[-1] != image_id:
                ids += [image_id] * AVAILABLE
        pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        input_ids = torch.tensor([ids])
        expected = pruned.generate(input_ids, torch.ones_like(input_ids), pixels, max_new_tokens=5)
        assert reply["choices"][0]["token_ids"] == expected[0].tolist()


def test_concurrent_requests_with_different_images_all_complete(server):
    images = synthetic_images(8, 32, seed=7)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda image: chat(server, [image], max_tokens=3), images))
    assert all(r["usage"]["completion_tokens"] == 3 for r in replies)


def test_serving_refuses_methods_vllm_cannot_run_and_text_only_models(tmp_path):
    with pytest.raises(ValueError, match="fastv"):
        ServeConfig.model_validate({"model": "tiny-llava", "prune": {"method": "fastv"}})
    from lmkit.loader import materialize
    from lmkit.pruning.vllm_plugin import pruned_model_dir

    with pytest.raises(ConfigError, match="LLaVA"):
        pruned_model_dir(materialize("tiny-llama"), PruneConfig())
    with pytest.raises(ValueError, match="positions: keep cannot be served"):
        ServeConfig.model_validate({"model": "tiny-llava", "prune": {"positions": "keep"}})
    with pytest.raises(ConfigError, match="positions: renumber"):
        pruned_model_dir(materialize("tiny-llava"), PruneConfig(positions="keep"))


def test_a_model_changed_in_place_gets_a_fresh_pruned_dir(tmp_path):
    """The pruned sibling copies config.json: a model retrained (or its config mended) at the same
    path must not be served with the stale copy."""
    from lmkit.loader import materialize
    from lmkit.pruning.vllm_plugin import pruned_model_dir

    model = tmp_path / "model"
    model.mkdir()
    for item in materialize("tiny-llava").iterdir():
        if item.name != "config.json":
            (model / item.name).symlink_to(item)
    source = json.loads((materialize("tiny-llava") / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(source))
    first = pruned_model_dir(model, PruneConfig(keep=KEEP))
    assert pruned_model_dir(model, PruneConfig(keep=KEEP)) == first  # unchanged: reused
    (model / "config.json").write_text(json.dumps({**source, "edited": True}))
    second = pruned_model_dir(model, PruneConfig(keep=KEEP))
    assert second != first and json.loads((second / "config.json").read_text())["edited"] is True
