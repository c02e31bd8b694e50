"""Prompt logprobs on a LoRA-enabled vLLM server: lmkit.vllm_patches (plugin lmkit_lora_prompt_logprobs).

Unpatched vLLM 0.32 computes them with the per-sequence LoRA mapping, so batched echo+logprobs
requests (lm-eval's log-likelihood requests) crash the engine. The live test sends such a batch,
base and adapter mixed, and checks every prompt logprob against peft in float32. The adapter also
targets lm_head, so a wrong per-token mapping would change the numbers, not just the shapes, and
the server has one LoRA slot, so base rows that picked up the last slot's adapter would show too.
"""

import asyncio
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
import torch
from helpers import free_port, make_lora_adapter

from lmkit.loader import AdapterSpec, ModelSpec, load_model
from lmkit.serving import ServerProcess
from lmkit.serving.config import ServeConfig
from lmkit.vllm_patches import pins
from lmkit.vllm_patches.guard import refuse_if_unsupported
from lmkit.vllm_patches.hooks import when_imported
from lmkit.vllm_patches.lora_logits import per_row_lora_logits, prompt_logits_of
from lmkit.vllm_patches.no_lora_rows import spare_base_rows

BASE, ADAPTER = "tiny", "sharp"
CONCURRENT = 24
TOLERANCE = 1e-4  # float32 on both sides (measured: 3e-6); bf16 would need ~5e-2


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, 60, (CONCURRENT,), generator=generator)
    return [torch.randint(0, 256, (int(n),), generator=generator).tolist() for n in lengths]


def reference_logprobs(loaded, ids: list[int], adapter: bool) -> torch.Tensor:
    tokens = torch.tensor([ids])
    with torch.no_grad():
        if adapter:
            logits = loaded.model(input_ids=tokens).logits[0]
        else:
            with loaded.model.disable_adapter():
                logits = loaded.model(input_ids=tokens).logits[0]
    return torch.log_softmax(logits[:-1].float(), -1).gather(1, tokens[0, 1:, None])[:, 0]


def prompt_logprobs(response: httpx.Response, ids: list[int]) -> list[float]:
    """Logprobs of prompt tokens 1.. from an echo response (token 0 has none, the last is generated)."""
    return response.json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]


# --- no server -------------------------------------------------------------------------------------


def test_register_imports_nothing_heavy_and_patches_nothing_by_itself():
    code = (
        "import sys, lmkit.vllm_patches as p; p.register(); p.register(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lmkit', 'vllm', 'torch')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "['lmkit', 'lmkit.vllm_patches', 'lmkit.vllm_patches.hooks']"


def test_when_imported_runs_after_the_module_executes(tmp_path, monkeypatch):
    (tmp_path / "lmkit_probe_mod.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("lmkit_probe_mod", lambda module: seen.append(module.VALUE))
    assert seen == []
    import lmkit_probe_mod  # noqa: F401

    assert seen == [42]
    when_imported("lmkit_probe_mod", lambda module: seen.append(-module.VALUE))  # already imported: now
    assert seen == [42, -42]


def test_the_pinned_sources_match_the_installed_vllm():
    assert pins.changed_sources(with_guard=True) == ()
    assert pins.unsupported_reason(SimpleNamespace(use_v2_model_runner=False), with_guard=True) is None


def test_a_changed_source_or_an_uncovered_engine_is_refused(monkeypatch):
    from vllm.exceptions import VLLMValidationError

    processor = SimpleNamespace(lora_config=object(), vllm_config=SimpleNamespace(use_v2_model_runner=True))
    with pytest.raises(VLLMValidationError, match="Model Runner V2") as refused:
        refuse_if_unsupported(processor, SimpleNamespace(prompt_logprobs=1))
    assert "refused on this LoRA-enabled server" in str(refused.value)
    refuse_if_unsupported(processor, SimpleNamespace(prompt_logprobs=None))  # no prompt logprobs: fine
    refuse_if_unsupported(SimpleNamespace(lora_config=None), SimpleNamespace(prompt_logprobs=1))  # no LoRA

    key = "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU.add_lora_logits"
    monkeypatch.setitem(pins.ENGINE_SOURCES, key, "0" * 16)
    pins.changed_sources.cache_clear()
    try:
        reason = pins.unsupported_reason(SimpleNamespace(use_v2_model_runner=False))
    finally:
        pins.changed_sources.cache_clear()
    assert reason is not None and "PunicaWrapperCPU.add_lora_logits" in reason


def cpu_punica(vocab: int):
    """A CPU punica wrapper for 3 sequences / 9 tokens using adapter 1, none, adapter 2, with both
    slots taken, so vLLM's "no adapter" index -1 lands on a loaded adapter (slot 1)."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    punica = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=8, device="cpu")
    mapping = LoRAMapping((1, 1, 1, 0, 0, 2, 2, 2, 2), (1, 0, 2), is_prefill=True)
    punica.update_metadata(mapping, [1, 2], 3, vocab)
    return punica, [0, 0, 0, -1, -1, 1, 1, 1, 1]


def with_deltas(base, states, lora_a, lora_b, slots):
    expected = base.clone()
    for row, slot in enumerate(slots):
        if slot >= 0:
            expected[row] += lora_b[slot, 0] @ (lora_a[slot, 0] @ states[row])
    return expected


class LoRAHead(torch.nn.Module):
    """What vLLM's compute_logits does with LoRA: the base lm_head, then add_lora_logits."""

    def __init__(self, punica, head: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        self.punica, self.head, self.lora_a, self.lora_b = punica, head, lora_a, lora_b

    def compute_logits(self, states: torch.Tensor) -> torch.Tensor:
        logits = states @ self.head.T
        self.punica.add_lora_logits(logits, states, self.lora_a, self.lora_b, 1.0)
        return logits


def test_lora_logits_use_each_prompt_rows_adapter_and_spare_base_rows():
    """The root cause in miniature: 9 prompt rows against the sampler's 3 per-sequence indices."""
    hidden, vocab, rank = 16, 32, 4
    punica, slots = cpu_punica(vocab)
    torch.manual_seed(0)
    lora_a, lora_b = torch.randn(2, 1, rank, hidden), torch.randn(2, 1, vocab, rank)
    states = torch.randn(9, hidden)
    model = LoRAHead(punica, torch.randn(vocab, hidden), lora_a, lora_b)
    expected = with_deltas(states @ model.head.T, states, lora_a, lora_b, slots)

    with pytest.raises(RuntimeError, match="einsum"):  # what vLLM does without the fix
        model.compute_logits(states[5:9])
    per_row_lora_logits(punica)
    with prompt_logits_of(punica, model, states):
        for rows in (slice(0, 3), slice(3, 5), slice(5, 9)):  # as _get_prompt_logprobs_dict slices them
            torch.testing.assert_close(model.compute_logits(states[rows]), expected[rows])
    assert "compute_logits" not in vars(model)
    assert punica.sampler_indices.tolist() == [0, -1, 1]  # the sampler's mapping is back
    last_rows = [2, 4, 8]  # the sampler: one row per sequence, the base one gets no delta
    torch.testing.assert_close(model.compute_logits(states[last_rows]), expected[last_rows])


def test_linear_lora_spares_base_tokens():
    hidden, out, rank = 16, 24, 4
    punica, slots = cpu_punica(vocab=32)
    torch.manual_seed(1)
    lora_a, lora_b = torch.randn(2, 1, rank, hidden), torch.randn(2, 1, out, rank)
    states, base = torch.randn(9, hidden), torch.randn(9, out)
    expected = with_deltas(base, states, lora_a, lora_b, slots)

    def linear() -> torch.Tensor:
        y = base.clone()
        punica.add_lora_linear(y, states, (lora_a,), (lora_b,), 1.0, (out,))
        return y

    assert not torch.allclose(linear()[3:5], expected[3:5])  # vLLM-CPU: base tokens get slot 1's delta
    spare_base_rows(punica)
    torch.testing.assert_close(linear(), expected)


# --- one LoRA server for the module ----------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-logprobs")
    adapter = make_lora_adapter(root / ADAPTER, seed=3, targets=("q_proj", "v_proj", "lm_head"))
    config = ServeConfig.model_validate(
        {
            "model": {"source": "tiny-llama", "adapters": [{"name": ADAPTER, "path": str(adapter)}]},
            "served_model_name": BASE,
            "port": free_port(),
            "adapter_dirs": [str(root)],
            "max_loras": 1,  # the adapter sits in the last slot, where vLLM-CPU's "no adapter" (-1) points
            "engine": {"dtype": "float32", "max_model_len": 512},
        }
    )
    with ServerProcess(config, log_path=root / "vllm.log") as server:
        yield server, adapter, root / "vllm.log"


async def _echo_all(base_url: str, requests: list[tuple[str, list[int]]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        return await asyncio.gather(
            *(
                client.post(
                    "/v1/completions",
                    json={
                        "model": m,
                        "prompt": ids,
                        "echo": True,
                        "logprobs": 1,
                        "max_tokens": 1,
                        "temperature": 0,
                    },
                )
                for m, ids in requests
            )
        )


@pytest.mark.slow
def test_batched_echo_logprobs_base_and_adapter_match_peft_and_the_engine_survives(lora_server):
    server, adapter, _ = lora_server
    requests = [(ADAPTER if i % 2 else BASE, ids) for i, ids in enumerate(prompts())]
    responses = asyncio.run(_echo_all(server.config.base_url, requests))
    assert [r.status_code for r in responses] == [200] * CONCURRENT, responses[0].text

    health = httpx.get(f"{server.config.base_url}/health", timeout=30)
    assert health.status_code == 200
    again = asyncio.run(_echo_all(server.config.base_url, requests[1:2]))[0]
    assert again.status_code == 200
    torch.testing.assert_close(  # alone now, batched before: same numbers up to float noise
        torch.tensor(prompt_logprobs(again, requests[1][1])),
        torch.tensor(prompt_logprobs(responses[1], requests[1][1])),
        atol=TOLERANCE,
        rtol=0,
    )

    loaded = load_model(ModelSpec(source="tiny-llama", adapters=[AdapterSpec(name=ADAPTER, path=adapter)]))
    worst, adapter_effect = 0.0, []
    for (model, ids), response in zip(requests, responses, strict=True):
        served = prompt_logprobs(response, ids)
        expected = reference_logprobs(loaded, ids, adapter=model == ADAPTER)
        worst = max(worst, (torch.tensor(served) - expected).abs().max().item())
        if model == ADAPTER:
            base = reference_logprobs(loaded, ids, adapter=False)
            adapter_effect.append((expected - base).abs().mean().item())
    assert worst <= TOLERANCE, f"prompt logprobs differ from peft by up to {worst:.2e}"
    assert min(adapter_effect) > 50 * TOLERANCE  # the adapter changes them: the check can tell


@pytest.mark.slow
def test_the_fix_is_active_in_the_engine(lora_server):
    _, _, log = lora_server
    assert "prompt logprobs use the per-token LoRA mapping" in log.read_text()
