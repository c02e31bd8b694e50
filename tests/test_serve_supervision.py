"""`lmkit serve` as a supervisor: stop signals, engine death (exit or restart), the port probe.

The fast tests drive ServerProcess.run with a stand-in server (a few lines of http.server that
answer /health), so the supervision logic is checked in seconds. The slow ones run the real CLI
on tiny-llama and kill vLLM's engine core with SIGKILL, as a crash would.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from helpers import free_port

from lmkit.errors import LmkitError
from lmkit.serving.config import ServeConfig
from lmkit.serving.process import EngineDied, ServerProcess, check_port_free, group_members

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = """
import http.server, pathlib, signal, sys
if sys.argv[3] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
status = pathlib.Path(sys.argv[2])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(int(status.read_text()) if status.exists() else 200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def stand_in(tmp_path: Path, restart: dict | None = None, mode: str = "normal") -> ServerProcess:
    port = free_port()
    config = ServeConfig.model_validate(
        {"model": {"source": "tiny-llama"}, "port": port, "restart": restart or {}}
    )
    argv = [sys.executable, "-c", STAND_IN, str(port), str(tmp_path / "status"), mode]
    server = ServerProcess(config, argv=argv)
    server.health_every_s, server.unhealthy_after_s, server.grace_s = 0.2, 1.0, 2.0
    return server


def test_port_probe_ignores_time_wait_but_not_a_listener():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = listener.accept()
            accepted.close()  # the server side closes first: its port goes to TIME_WAIT
        with pytest.raises(LmkitError, match=rf"Cannot serve on 127.0.0.1:{port}.*pick another"):
            check_port_free("127.0.0.1", port)  # something listens
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the old probe did: refused for a minute
    check_port_free("127.0.0.1", port)  # what uvicorn does: binds at once


def test_a_dead_server_is_restarted_up_to_restart_max_then_reported(tmp_path):
    server = stand_in(tmp_path, restart={"max": 1, "backoff_s": 0})
    events: list[str] = []

    def crash_twice() -> None:  # started by on_ready: run() serves; then again once it says so
        server.process.kill()
        if not wait_for(lambda: any("serving again" in e for e in events), 60):
            os.kill(os.getpid(), signal.SIGTERM)  # ends run() with 0, so the test fails, not hangs
            return
        server.process.kill()

    with pytest.raises(EngineDied, match=r"exited with status -9. Not restarted: all 1 restarts used"):
        server.run(on_ready=threading.Thread(target=crash_twice).start, log=events.append)
    assert "restart 1/1" in events[0] and "serving again" in events[1]
    assert not group_members(server.process.pid)


def test_health_failing_while_the_api_process_lives_is_a_death(tmp_path):
    server = stand_in(tmp_path)
    with pytest.raises(EngineDied, match=r"/health failed \(HTTP 503\).*Not restarted: restart.max is 0"):
        server.run(on_ready=lambda: (tmp_path / "status").write_text("503"))
    assert server.process.returncode is not None and not group_members(server.process.pid)


@pytest.mark.parametrize("mode", ["normal", "stubborn"])
def test_sigterm_during_run_stops_the_server_within_the_grace_period(tmp_path, mode):
    server = stand_in(tmp_path, mode=mode)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    kill = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    assert server.run(on_ready=kill.start) == 0
    assert time.monotonic() - started < 30  # stubborn: SIGKILL after grace_s (2 s)
    assert server.process.returncode == (-signal.SIGKILL if mode == "stubborn" else -signal.SIGTERM)
    assert not group_members(server.process.pid) and signal.getsignal(signal.SIGTERM) is before


# --- the real CLI on tiny-llama --------------------------------------------------------------------


def lmkit_serve(log: Path, port: int, *overrides: str) -> subprocess.Popen:
    """`lmkit serve` in its own process group (so the test can signal that group), logging to `log`."""
    argv = [sys.executable, "-m", "lmkit", "serve", str(ROOT / "serve" / "smollm2.yaml"), f"port={port}"]
    argv += ["model.source=tiny-llama", "engine.dtype=float32", "engine.max_model_len=512"]
    argv += ["engine.extra_args=[--enforce-eager]", *overrides]  # no torch.compile: a faster start
    with log.open("w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def health(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
    except httpx.HTTPError:
        return None


def wait_serving(
    launcher: subprocess.Popen, port: int, log: Path, says: str = "Serving smollm2"
) -> list[psutil.Process]:
    """Wait until the launcher `says` it serves (/health alone may answer before the launcher knows);
    returns its descendants (vLLM API server, engine core, ...) once a completion got 200."""
    said = wait_for(lambda: launcher.poll() is not None or says in log.read_text(), 400)
    assert said and launcher.poll() is None and health(port) == 200, log.read_text()[-3000:]
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": "smollm2", "prompt": "hello", "max_tokens": 4},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return psutil.Process(launcher.pid).children(recursive=True)


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie: an exited child whose parent died is re-parented to PID 1, and a
    container's PID 1 may never reap it, so a zombie counts as gone (as `group_members` counts it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_engine_core(tree: list[psutil.Process]) -> None:
    [core] = [p for p in tree if "EngineCore" in " ".join(p.cmdline())]
    core.kill()  # SIGKILL: what a segfault or the OOM killer does


def assert_stops_cleanly(launcher: subprocess.Popen, port: int, tree: list[psutil.Process], how: str) -> None:
    """SIGTERM -> exit 0 within the grace period, every descendant gone, the port free."""
    if how == "launcher":
        launcher.send_signal(signal.SIGTERM)
    else:  # its process group (a shell's `kill -TERM -PGID`), and every process at once (systemd)
        os.killpg(launcher.pid, signal.SIGTERM)
        for process in tree:
            process.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=ServerProcess.grace_s + 15) == 0
    assert [p for p in tree if alive(p)] == []
    check_port_free("127.0.0.1", port)


@pytest.mark.slow
def test_a_dead_engine_makes_serve_exit_nonzero_and_the_port_serves_again_at_once(tmp_path):
    port, first_log = free_port(), tmp_path / "first.log"
    first = lmkit_serve(first_log, port)
    tree = wait_serving(first, port, first_log)
    kill_engine_core(tree)
    assert wait_for(lambda: health(port) != 200, 10)  # vLLM: 503 once its engine is dead
    assert first.wait(timeout=60) == 2
    errors = [line for line in first_log.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "engine died" in errors[0], errors
    assert [p for p in tree if alive(p)] == []

    second_log = tmp_path / "second.log"  # at once: TIME_WAIT sockets of the dead server must not block
    second = lmkit_serve(second_log, port)
    assert_stops_cleanly(second, port, wait_serving(second, port, second_log), how="launcher")


@pytest.mark.slow
def test_with_restart_a_dead_engine_is_restarted_and_sigterm_to_the_group_stops_serve(tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    launcher = lmkit_serve(log, port, "restart={max: 1, backoff_s: 0}")
    kill_engine_core(wait_serving(launcher, port, log))
    tree = wait_serving(launcher, port, log, says="vLLM restarted")
    assert "restart 1/1" in log.read_text()
    assert_stops_cleanly(launcher, port, tree, how="group")
