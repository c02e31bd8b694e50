"""`lmkit eval` through a served LoRA adapter scores like the same adapter in-process.

The adapter is served by `lmkit serve` next to its base model and evaluated on a 240-example
log-likelihood task both ways. lm-eval sends 16 echo+logprobs requests at a time: the batch that
crashed vLLM before lmkit.vllm_patches.
"""

import json

import httpx
import pytest
from helpers import free_port, make_lora_adapter
from test_evals import write

from lmkit.evals.config import load_suite
from lmkit.evals.runner import run_suite
from lmkit.serving import ServerProcess
from lmkit.serving.config import ServeConfig

pytestmark = pytest.mark.slow
ADAPTER = "senti"
TASK = {
    "name": "sentiment_240",
    "kind": "classification",
    "generate": {"task": "sentiment", "size": 240, "seed": 7},
    "choices": ["positive", "negative"],
}


@pytest.fixture(scope="module")
def adapter_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-adapter")
    adapter = make_lora_adapter(root / ADAPTER, seed=5)
    config = ServeConfig.model_validate(
        {
            "model": {"source": "tiny-llama", "adapters": [{"name": ADAPTER, "path": str(adapter)}]},
            "served_model_name": "tiny",
            "port": free_port(),
            "adapter_dirs": [str(root)],
            "engine": {"dtype": "float32", "max_model_len": 512},
        }
    )
    with ServerProcess(config, log_path=root / "vllm.log") as server:
        yield server, adapter


def evaluate(tmp_path, name: str, target: dict) -> tuple[float, list[list[float]]]:
    """Accuracy and, per example, the log-likelihood of each label."""
    task = write(tmp_path / "task.yaml", TASK)
    suite = {"target": target, "tasks": [{"local": str(task)}], "output_dir": str(tmp_path / name)}
    results = run_suite(load_suite(write(tmp_path / f"{name}.yaml", suite)))
    rows = [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
    loglikelihoods = [
        [float(resp[0]) for resp in row["filtered_resps"]] for row in sorted(rows, key=lambda r: r["doc_id"])
    ]
    return results["quality"]["lmkit_sentiment_240"]["acc,none"], loglikelihoods


def test_adapter_endpoint_scores_like_the_adapter_in_process(tmp_path, adapter_server):
    server, adapter = adapter_server

    def endpoint(model: str) -> dict:
        base_url = f"{server.config.base_url}/v1"
        return {
            "endpoint": {
                "base_url": base_url,
                "model": model,
                "tokenizer": "tiny-llama",
                "num_concurrent": 16,
            }
        }

    local_acc, local_ll = evaluate(
        tmp_path,
        "local",
        {"model": {"source": "tiny-llama", "adapters": [{"name": ADAPTER, "path": str(adapter)}]}},
    )
    served_acc, served_ll = evaluate(tmp_path, "served", endpoint(ADAPTER))
    assert len(served_ll) == 240
    assert abs(local_acc - served_acc) <= 0.02, (local_acc, served_acc)
    worst = max(
        abs(a - b) for x, y in zip(local_ll, served_ll, strict=True) for a, b in zip(x, y, strict=True)
    )
    assert worst <= 1e-3, f"per-label log-likelihoods differ by up to {worst:.2e}"  # float32 both sides
    assert httpx.get(f"{server.config.base_url}/health", timeout=30).status_code == 200
    assert echo_logprobs(server, ADAPTER) != echo_logprobs(server, "tiny")  # the adapter was applied


def echo_logprobs(server, model: str) -> list[float]:
    body = {"model": model, "prompt": "a warm, funny film", "echo": True, "logprobs": 1, "max_tokens": 1}
    response = httpx.post(f"{server.config.base_url}/v1/completions", json=body, timeout=60)
    return response.json()["choices"][0]["logprobs"]["token_logprobs"][1:-1]
