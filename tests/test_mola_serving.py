"""MoLA on real vLLM via lmkit serve: a model name per MoLA-Grad task, a per-request routed MoLA-Router."""

import httpx
import openai
import pytest
import torch
from helpers import free_port
from test_mola import TASKS, make_model

from lmkit.generation import format_prompt
from lmkit.loader import ModelSpec, load_model
from lmkit.mola.export import export_mola
from lmkit.mola.router import bucket
from lmkit.serving import ServerProcess
from lmkit.serving.config import ServeConfig, check_serve_config

PROMPT = "Write this in capital letters: river stone"


def test_bucketing_keeps_the_sum_and_rounds_to_nearest():
    assert bucket([0.5, 0.5], 10) == (5, 5)
    assert bucket([0.26, 0.24, 0.5], 10) == (3, 2, 5)
    assert sum(bucket([0.1234, 0.3333, 0.2222, 0.3211], 7)) == 7


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("mola")
    grad, _ = make_model("grad")
    task_adapters = export_mola(grad, root / "grad")
    router, tokenizer = make_model("router")
    export_mola(router, root / "router")
    config = ServeConfig.model_validate(
        {
            "model": {
                "source": "tiny-llama",
                "adapters": [{"name": t, "path": p} for t, p in task_adapters.items()],
            },
            "served_model_name": "tiny",
            "port": free_port(),
            "adapter_dirs": [str(root)],
            "max_lora_rank": 32,
            "mola_routers": [{"name": "mix", "path": str(root / "router"), "buckets": 10}],
            "engine": {"dtype": "float32", "max_model_len": 512},
        }
    )
    check_serve_config(config)
    with ServerProcess(config, log_path=root / "vllm.log") as server:
        client = openai.OpenAI(base_url=f"{config.base_url}/v1", api_key="none", max_retries=0)
        yield server, client, root, tokenizer


def complete(client, model: str, prompt: str = PROMPT) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text


@pytest.mark.slow
def test_each_mola_grad_task_is_a_model_name(served):
    _, client, _, _ = served
    names = {m.id for m in client.models.list().data}
    assert set(TASKS) <= names
    outputs = {task: complete(client, task) for task in TASKS}
    assert len(set(outputs.values())) > 1 and outputs["sentiment"] != complete(client, "tiny")


@pytest.mark.slow
def test_router_requests_are_served_with_the_merged_adapter_for_their_gates(served):
    server, client, root, tokenizer = served
    prompt = format_prompt(tokenizer, PROMPT)
    routed = complete(client, "mix", prompt)
    bucket_names = [m.id for m in client.models.list().data if m.id.startswith("mix--")]
    assert len(bucket_names) == 1
    assert complete(client, bucket_names[0], prompt) == routed
    # the same merged adapter in transformers generates the same tokens
    merged = root / "router" / "buckets" / bucket_names[0]
    loaded = load_model(ModelSpec(source="tiny-llama", adapters=[{"name": "m", "path": merged}]))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = loaded.model.generate(
            **ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert tokenizer.decode(out[0, ids.input_ids.shape[1] :]) == routed
    chat = client.chat.completions.create(
        model="mix", max_tokens=4, temperature=0, messages=[{"role": "user", "content": PROMPT}]
    )
    assert chat.choices[0].message.content is not None
    bad = httpx.post(f"{server.config.base_url}/v1/completions", json={"model": "mix", "prompt": ["a", "b"]})
    assert bad.status_code == 400 and "one prompt" in bad.json()["error"]["message"]
