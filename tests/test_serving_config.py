"""Serve config checks, the vLLM command line, and the adapter-path guard: no engine needed."""

import asyncio
import json
import socket
from pathlib import Path

import pytest
from helpers import free_port, hide_module, make_lora_adapter

from lmkit.errors import ConfigError, LmkitError, ModelSourceError
from lmkit.serving import ServerProcess, build_command, load_serve_config
from lmkit.serving.guard import ALLOWED_DIRS_ENV, AdapterPathGuard

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "serve" / "smollm2.yaml"


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_lora_adapter(root / "a", seed=1)
    return root


def test_default_config_maps_to_vllm_flags(adapter_root):
    a = adapter_root / "a"
    config = load_serve_config(
        DEFAULT,
        [
            "model.source=tiny-llama",
            f"adapter_dirs=[{adapter_root}]",
            f"model.adapters=[{{name: a, path: {a}}}, {{name: b, path: {a}}}]",
            "engine.tensor_parallel_size=2",
            "engine.distributed_executor_backend=ray",
            "engine.extra_args=[--enforce-eager]",
            "runtime_adapters=true",
        ],
    )
    argv, env = build_command(config, Path("/models/x"))
    joined = " ".join(argv)
    assert "-m vllm.entrypoints.openai.api_server --model /models/x" in joined
    assert "--served-model-name smollm2" in joined
    lora = f"--enable-lora --max-lora-rank 16 --max-loras 4 --lora-modules a={a} b={a}"
    assert lora in joined and argv.count("--lora-modules") == 1  # vLLM keeps only the last repeated flag
    assert "--tensor-parallel-size 2" in joined and "--distributed-executor-backend ray" in joined
    assert argv[-1] == "--enforce-eager"
    assert "--middleware lmkit.serving.guard.AdapterPathGuard" in joined
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env[ALLOWED_DIRS_ENV] == str(adapter_root.resolve())
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_api_key_comes_from_the_environment_not_the_command_line(monkeypatch):
    config = load_serve_config(DEFAULT, ["api_key_env=TEST_LMKIT_KEY"])
    monkeypatch.setenv("TEST_LMKIT_KEY", "s3cret")
    argv, env = build_command(config, Path("/m"))
    assert env["VLLM_API_KEY"] == "s3cret" and "s3cret" not in argv
    monkeypatch.delenv("TEST_LMKIT_KEY")
    with pytest.raises(ConfigError, match="export TEST_LMKIT_KEY"):
        build_command(config, Path("/m"))


def test_adapter_outside_adapter_dirs_is_rejected(adapter_root, tmp_path):
    with pytest.raises(ConfigError, match=r"outside adapter_dirs"):
        load_serve_config(
            DEFAULT,
            [
                f"adapter_dirs=[{tmp_path}]",
                f"model.adapters=[{{name: a, path: {adapter_root}/../{adapter_root.name}/a}}]",
            ],
        )


def test_adapter_rank_above_max_lora_rank_is_rejected(adapter_root):
    with pytest.raises(ConfigError, match="rank 4 > max_lora_rank 2"):
        load_serve_config(
            DEFAULT,
            [
                f"adapter_dirs=[{adapter_root}]",
                "max_lora_rank=2",
                f"model.adapters=[{{name: a, path: {adapter_root / 'a'}}}]",
            ],
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.quantization=int8", "in flight to 4-bit only"),
        ("runtime_adapters=true", "runtime_adapters needs adapter_dirs"),
        ("port=70000", "port: Input should be less than 65536"),
    ],
)
def test_bad_serve_configs(override, message):
    overrides = [override] if "runtime" not in override else [override, "adapter_dirs=[]"]
    with pytest.raises(ConfigError, match=message):
        load_serve_config(DEFAULT, overrides)


def test_nf4_maps_to_vllm_bitsandbytes_and_needs_the_plugin(monkeypatch):
    config = load_serve_config(DEFAULT, ["model.quantization=nf4"])
    argv, _ = build_command(config, Path("/m"))
    assert " ".join(argv).count("--quantization bitsandbytes") == 1
    hide_module(monkeypatch, "vllm_bnb_plugin")
    with pytest.raises(ConfigError, match="pip install --no-deps vllm-bnb-plugin"):
        load_serve_config(DEFAULT, ["model.quantization=nf4"])


def test_port_in_use_fails_before_starting_vllm():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_serve_config(DEFAULT, [f"port={port}", "model.source=tiny-llama"])
        with pytest.raises(LmkitError, match=rf"Cannot serve on 127.0.0.1:{port}.*pick another"):
            ServerProcess(config).start()


def test_missing_model_fails_before_starting_vllm(tmp_path):
    config = load_serve_config(DEFAULT, [f"model.source={tmp_path}/nope", f"port={free_port()}"])
    with pytest.raises(ModelSourceError, match="not found"):
        ServerProcess(config).start()


def _call_guard(path: str, body: dict, roots: list[Path], monkeypatch) -> tuple[int, dict | None, bytes]:
    monkeypatch.setenv(ALLOWED_DIRS_ENV, ":".join(str(r) for r in roots))
    seen: dict = {}

    async def app(scope, receive, send):
        seen["body"] = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST"}
    asyncio.run(AdapterPathGuard(app)(scope, receive, send))
    return sent[0]["status"], seen.get("body"), sent[1]["body"]


def test_guard_blocks_traversal_and_symlinks_and_passes_allowed_paths(tmp_path, monkeypatch):
    allowed = tmp_path / "adapters"
    (allowed / "good").mkdir(parents=True)
    (allowed / "escape").symlink_to(tmp_path)
    for bad in [str(allowed / ".." / "secret"), "/etc", str(allowed / "escape" / "x"), ""]:
        status, forwarded, body = _call_guard(
            "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": bad}, [allowed], monkeypatch
        )
        assert status == 403 and forwarded is None
        assert "outside the allowed adapter directories" in json.loads(body)["error"]["message"]
    status, _, _ = _call_guard("/adapters", {"name": "x", "src": "/etc"}, [allowed], monkeypatch)
    assert status == 403
    good = {"lora_name": "x", "lora_path": str(allowed / "good")}
    status, forwarded, _ = _call_guard("/v1/load_lora_adapter", good, [allowed], monkeypatch)
    assert status == 200 and json.loads(forwarded) == good
    status, _, _ = _call_guard("/v1/completions", {"lora_path": "/etc"}, [allowed], monkeypatch)
    assert status == 200  # other routes are untouched


@pytest.mark.parametrize(
    ("placement", "cores", "expected"),
    [
        ({}, 2, {"OMP_NUM_THREADS": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),  # small: all cores
        ({}, 64, {}),  # large: vLLM's own placement (one core kept for the API process)
        (
            {"threads": 3, "reserved_cpus": 1},
            2,
            {"OMP_NUM_THREADS": "3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"},
        ),
        ({"bind": "0-31|32-63", "reserved_cpus": 2}, 64, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "2"}),
    ],
)
def test_cpu_placement_maps_to_vllm_cpu_settings(placement, cores, expected):
    from lmkit.serving.config import CpuPlacement

    env = CpuPlacement(**placement).env(cores)
    assert env.pop("VLLM_CPU_OMP_THREADS_BIND") == placement.get("bind", "auto")
    assert env == expected


def test_cpu_placement_reaches_the_vllm_environment(monkeypatch):
    import lmkit.serving.launch as launch

    monkeypatch.setattr(launch, "on_cpu", lambda: True)
    config = load_serve_config("serve/smollm2.yaml", ["engine.cpu.threads=1", "engine.cpu.reserved_cpus=0"])
    _, env = build_command(config, Path("/models/x"))
    assert env["OMP_NUM_THREADS"] == "1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setattr(launch, "on_cpu", lambda: False)  # GPU builds: vLLM places its own threads
    _, env = build_command(config, Path("/models/x"))
    assert "OMP_NUM_THREADS" not in env and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env


def test_an_allow_list_keeps_the_lora_prompt_logprobs_fix_when_lora_is_on(adapter_root):
    config = load_serve_config(
        "serve/smollm2.yaml",
        [f"adapter_dirs=[{adapter_root}]", "runtime_adapters=true", "vllm_plugins=[other]"],
    )
    _, env = build_command(config, Path("/models/x"))
    assert env["VLLM_PLUGINS"] == "other,lmkit_lora_prompt_logprobs"


@pytest.mark.parametrize(
    ("flags", "accelerator", "expected"),
    [
        ("avx512f avx512_bf16", None, "bfloat16"),
        ("avx512f amx_bf16", None, "bfloat16"),
        ("avx2 avx512f", None, "float32"),
        ("avx2", "cuda", "bfloat16"),
    ],
)
def test_unset_dtype_is_float32_only_on_cpus_that_emulate_bf16(
    tmp_path, monkeypatch, flags, accelerator, expected
):
    from lmkit.serving import launch

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : fpu sse {flags}\n")
    monkeypatch.setattr(launch, "CPUINFO", cpuinfo)
    monkeypatch.setattr(launch, "on_cpu", lambda: accelerator is None)
    argv, _ = build_command(load_serve_config(DEFAULT, ["model.source=tiny-llama"]), Path("/m"))
    assert argv[argv.index("--dtype") + 1] == expected
    explicit = load_serve_config(DEFAULT, ["model.source=tiny-llama", "engine.dtype=bfloat16"])
    assert build_command(explicit, Path("/m"))[0][argv.index("--dtype") + 1] == "bfloat16"
    nf4 = load_serve_config(DEFAULT, ["model.source=tiny-llama", "model.quantization=nf4"])
    assert build_command(nf4, Path("/m"))[0][argv.index("--dtype") + 1] == "bfloat16"  # bnb loads 16-bit
