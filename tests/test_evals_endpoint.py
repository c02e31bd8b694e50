"""Same task, same model: the score in-process equals the score through a real vLLM endpoint."""

import pytest
from helpers import free_port
from test_evals import mc_task, write

from lmkit.evals.config import load_suite
from lmkit.evals.runner import run_suite
from lmkit.serving import ServerProcess
from lmkit.serving.config import ServeConfig

pytestmark = pytest.mark.slow
SENTIMENT = {
    "name": "sentiment_small",
    "kind": "classification",
    "generate": {"task": "sentiment", "size": 40},
    "choices": ["positive", "negative"],
}


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    config = ServeConfig.model_validate(
        {
            "model": "tiny-llama",
            "served_model_name": "tiny",
            "port": free_port(),
            "engine": {"dtype": "float32", "max_model_len": 512},
        }
    )
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    with ServerProcess(config, log_path=log) as server:
        yield server


def test_in_process_and_endpoint_scores_agree(tmp_path, tiny_server):
    tasks = [
        {"local": str(mc_task(tmp_path, True))},
        {"local": str(write(tmp_path / "sentiment.yaml", SENTIMENT))},
    ]
    in_process = run_suite(
        load_suite(
            write(
                tmp_path / "a.yaml",
                {"target": {"model": "tiny-llama"}, "tasks": tasks, "output_dir": str(tmp_path / "a")},
            )
        )
    )
    endpoint = run_suite(
        load_suite(
            write(
                tmp_path / "b.yaml",
                {
                    "target": {
                        "endpoint": {
                            "base_url": f"{tiny_server.config.base_url}/v1",
                            "model": "tiny",
                            "tokenizer": "tiny-llama",
                            "num_concurrent": 4,
                        }
                    },
                    "tasks": tasks,
                    "output_dir": str(tmp_path / "b"),
                    "speed": {"concurrency": [1, 4], "requests_per_level": 4, "max_tokens": 8},
                },
            )
        )
    )
    assert endpoint["quality"]["lmkit_known_mc"]["acc,none"] == 1.0
    local_acc = in_process["quality"]["lmkit_sentiment_small"]["acc,none"]
    served_acc = endpoint["quality"]["lmkit_sentiment_small"]["acc,none"]
    assert abs(local_acc - served_acc) <= 0.05, (
        local_acc,
        served_acc,
    )  # fp32 both sides; at most 2 of 40 flip
    speed = {row["concurrency"]: row for row in endpoint["speed"]}
    assert set(speed) == {1, 4}
    for row in speed.values():
        assert (
            row["requests"] == 4
            and row["throughput_tok_s"] > 0
            and 0 < row["ttft_p50_s"] <= row["ttft_p90_s"]
        )
    assert (tmp_path / "b" / "speed.png").is_file()


def test_unknown_served_model_is_a_clear_error(tmp_path, tiny_server):
    suite = load_suite(
        write(
            tmp_path / "c.yaml",
            {
                "target": {
                    "endpoint": {
                        "base_url": f"{tiny_server.config.base_url}/v1",
                        "model": "nope",
                        "tokenizer": "tiny-llama",
                    }
                },
                "tasks": [{"local": str(mc_task(tmp_path, True))}],
                "output_dir": str(tmp_path / "c"),
            },
        )
    )
    with pytest.raises(Exception, match=r"does not serve 'nope'; it serves \['tiny'\]"):
        run_suite(suite)
    assert not (tmp_path / "c").exists()
