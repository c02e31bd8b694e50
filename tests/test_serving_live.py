"""The real vLLM server with the embedded SmolLM2 and a LoRA adapter, driven by the openai client.

One server for the whole module (engine start is ~30 s on CPU).
"""

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from helpers import assert_knows_the_capital_of_france, free_port, make_lora_adapter

from lmkit.serving import ServerProcess, load_serve_config

pytestmark = pytest.mark.slow
KEY = "test-key-123"
DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parents[1] / "serve" / "smollm2.yaml"
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-adapters")
    make_lora_adapter(root / "style", seed=7, source="smollm2-135m")
    shutil.copytree(root / "style", root / "runtime")
    pytest.MonkeyPatch().setenv("LMKIT_TEST_KEY", KEY)
    config = load_serve_config(
        DEFAULT_SERVE_CONFIG,
        [
            f"port={free_port()}",
            "api_key_env=LMKIT_TEST_KEY",
            f"adapter_dirs=[{root}]",
            "runtime_adapters=true",
            f"model.adapters=[{{name: style, path: {root / 'style'}}}]",
            "engine.max_model_len=512",
        ],
    )
    process = ServerProcess(config, log_path=root / "vllm.log")
    process.start()
    yield process, root
    assert process.stop() == 0, "vLLM did not shut down cleanly on SIGTERM"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{config.base_url}/health")


@pytest.fixture(scope="module")
def client(server):
    process, _ = server
    return openai.OpenAI(base_url=f"{process.config.base_url}/v1", api_key=KEY, max_retries=0)


def complete(client, model: str, **kwargs) -> str:
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, **kwargs)
    return response.choices[0].text


def test_health_and_metrics_need_no_key(server):
    base = server[0].config.base_url
    assert httpx.get(f"{base}/health").status_code == 200
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.status_code == 200 and "vllm:" in metrics.text


def test_requests_without_the_key_get_401(server):
    base = server[0].config.base_url
    assert httpx.get(f"{base}/v1/models").status_code == 401
    wrong = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_models_lists_the_base_and_each_adapter(client):
    ids = {m.id for m in client.models.list().data}
    assert {"smollm2", "style"} <= ids


def test_completion_chat_and_streaming(client):
    text = complete(client, "smollm2")
    assert text.strip()
    assert_knows_the_capital_of_france(client, "smollm2")
    stream = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    )
    chunks = [c.choices[0].text for c in stream if c.choices]
    assert len(chunks) > 1 and "".join(chunks) == text


def test_adapter_model_name_changes_the_output(client):
    assert complete(client, "style") != complete(client, "smollm2")


def post(server, body: dict | str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return httpx.post(
        f"{server[0].config.base_url}/v1/completions", content=content, headers=headers, timeout=60
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "no-such-model", "prompt": PROMPT, "max_tokens": 4}, 404, "does not exist"),
        ({"model": "smollm2", "prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "smollm2", "prompt": "word " * 2000, "max_tokens": 4}, 400, "maximum context length"),
        ('{"model": "smollm2", "prompt": ', 400, "json"),
    ],
)
def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server, client, body, status, message):
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"].lower() or message in json.dumps(error).lower(), error
    assert complete(client, "smollm2").strip()


def test_runtime_adapter_load_unload_and_path_traversal_is_refused(server, client):
    process, root = server
    base, auth = process.config.base_url, {"Authorization": f"Bearer {KEY}"}
    escape = {"lora_name": "evil", "lora_path": f"{root}/../{root.name}/../.."}
    refused = httpx.post(f"{base}/v1/load_lora_adapter", json=escape, headers=auth)
    assert refused.status_code == 403
    assert "outside the allowed adapter directories" in refused.json()["error"]["message"]

    loaded = httpx.post(
        f"{base}/v1/load_lora_adapter",
        json={"lora_name": "rt", "lora_path": str(root / "runtime")},
        headers=auth,
        timeout=60,
    )
    assert loaded.status_code == 200, loaded.text
    assert "rt" in {m.id for m in client.models.list().data}
    assert complete(client, "rt") == complete(client, "style")  # same weights as the static adapter
    unloaded = httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "rt"}, headers=auth)
    assert unloaded.status_code == 200, unloaded.text
    assert "rt" not in {m.id for m in client.models.list().data}


def test_64_concurrent_requests_all_complete(server):
    process = server[0]

    async def one(client: openai.AsyncOpenAI, index: int) -> int:
        model = "style" if index % 2 else "smollm2"
        response = await client.completions.create(
            model=model, prompt=f"{PROMPT} number {index}", max_tokens=8, temperature=0
        )
        return response.usage.completion_tokens

    async def burst() -> list[int]:
        async with openai.AsyncOpenAI(
            base_url=f"{process.config.base_url}/v1", api_key=KEY, timeout=300, max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    tokens = asyncio.run(burst())
    assert len(tokens) == 64 and all(t > 0 for t in tokens)
