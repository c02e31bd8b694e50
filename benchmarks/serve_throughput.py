"""Throughput of `lmkit serve` vs the same vLLM launched directly vs transformers `generate`.

Both servers run at once on different ports and are measured in alternation (the order flips each
round), so machine noise hits them alike; transformers runs last in the same process. Every request
generates exactly `--new-tokens` tokens (vLLM's ignore_eos, transformers' min_new_tokens).

    python benchmarks/serve_throughput.py [--batches 1 8 32] [--rounds 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import openai
import torch

from lmkit.generation import format_prompt
from lmkit.loader import LoadedModel, ModelSpec, load_model, materialize
from lmkit.report import write_report
from lmkit.serving import ServerProcess, load_serve_config
from lmkit.serving.launch import vllm_argv

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


async def _burst(base_url: str, model: str, batch: int, new_tokens: int) -> float:
    """Completion tokens per second for `batch` concurrent requests."""
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=600) as client:
        started = time.perf_counter()
        responses = await asyncio.gather(
            *(
                client.completions.create(
                    model=model,
                    prompt=PROMPT,
                    max_tokens=new_tokens,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                for _ in range(batch)
            )
        )
        elapsed = time.perf_counter() - started
    return sum(r.usage.completion_tokens for r in responses) / elapsed


def _transformers_tokens_per_second(loaded: LoadedModel, batch: int, new_tokens: int) -> float:
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    inputs = tokenizer([format_prompt(tokenizer, PROMPT)] * batch, return_tensors="pt", padding=True)
    with torch.inference_mode():
        started = time.perf_counter()
        loaded.model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return batch * new_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "serve" / "smollm2.yaml"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmarks" / "serve_throughput"))
    args = parser.parse_args()

    lmkit_config = load_serve_config(args.config, ["port=8101"])
    raw_config = load_serve_config(args.config, ["port=8102"])
    model_dir = materialize(lmkit_config.model)
    engine = raw_config.engine
    raw_argv = vllm_argv(raw_config, model_dir)  # the same engine flags, without lmkit's additions
    logs = Path(args.output)
    logs.mkdir(parents=True, exist_ok=True)

    samples: dict[str, dict[int, list[float]]] = {"lmkit": {}, "vllm": {}}
    with (
        ServerProcess(lmkit_config, log_path=logs / "lmkit.log") as lmkit_server,
        ServerProcess(raw_config, log_path=logs / "vllm.log", argv=raw_argv) as raw_server,
    ):
        targets = {"lmkit": lmkit_server.config, "vllm": raw_server.config}
        for config in targets.values():  # warm-up
            asyncio.run(_burst(config.base_url, config.served_model_name, 2, 8))
        for round_index in range(args.rounds):
            for batch in args.batches:
                order = list(targets.items())
                for name, config in order if round_index % 2 == 0 else order[::-1]:
                    time.sleep(1)  # let the other engine's OpenMP threads stop spinning
                    rate = asyncio.run(
                        _burst(config.base_url, config.served_model_name, batch, args.new_tokens)
                    )
                    samples[name].setdefault(batch, []).append(rate)
                    print(
                        f"round {round_index + 1} batch {batch:>2} {name:>5}: {rate:7.1f} tok/s", flush=True
                    )

    hf_model = load_model(ModelSpec(source=str(model_dir), dtype=engine.dtype))  # same weights and dtype
    hf = {b: _transformers_tokens_per_second(hf_model, b, args.new_tokens) for b in args.batches}
    rows, results = [], {"new_tokens": args.new_tokens, "rounds": args.rounds, "batches": {}}
    for batch in args.batches:
        lm, raw = statistics.median(samples["lmkit"][batch]), statistics.median(samples["vllm"][batch])
        results["batches"][batch] = {
            "lmkit_tok_s": lm,
            "vllm_tok_s": raw,
            "transformers_tok_s": hf[batch],
            "lmkit_over_vllm": lm / raw,
            "lmkit_over_transformers": lm / hf[batch],
            "samples": {k: samples[k][batch] for k in samples},
        }
        rows.append(
            [
                batch,
                f"{lm:.1f}",
                f"{raw:.1f}",
                f"{hf[batch]:.1f}",
                f"{lm / raw:.3f}",
                f"{(1 - lm / raw) * 100:+.1f}%",
                f"{lm / hf[batch]:.2f}x",
            ]
        )
    write_report(
        Path(args.output),
        f"Serving throughput, {lmkit_config.model.source}, {args.new_tokens} new tokens",
        results,
        [
            "batch",
            "lmkit tok/s",
            "vLLM tok/s",
            "transformers tok/s",
            "lmkit/vLLM",
            "lmkit overhead",
            "lmkit/transformers",
        ],
        rows,
        [f"median of {args.rounds} alternating rounds; both servers up at once, measured in turn"],
    )


if __name__ == "__main__":
    main()
