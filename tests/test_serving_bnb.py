"""Serving the embedded SmolLM2 quantized in flight to NF4 by vLLM's bitsandbytes plugin, on CPU."""

import openai
import pytest
from helpers import assert_knows_the_capital_of_france, free_port
from test_serving_live import DEFAULT_SERVE_CONFIG

from lmkit.serving import ServerProcess, load_serve_config

pytestmark = pytest.mark.slow


def test_nf4_model_serves_and_answers(tmp_path):
    config = load_serve_config(
        DEFAULT_SERVE_CONFIG,
        [
            f"port={free_port()}",
            "model.quantization=nf4",
            "engine.max_model_len=512",
            "engine.extra_args=[--enforce-eager]",  # no torch.compile; test_serving_live compiles
        ],
    )
    log = tmp_path / "vllm.log"
    with ServerProcess(config, log_path=log):
        client = openai.OpenAI(base_url=f"{config.base_url}/v1", api_key="none", max_retries=0)
        assert_knows_the_capital_of_france(client, "smollm2")
    text = log.read_text()
    assert "'quantization': 'bitsandbytes'" in text and "BitsAndBytesModelLoader" in text
