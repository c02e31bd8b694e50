"""The vLLM server as a supervised child process: start, watch, restart on engine death, stop.

`lmkit serve` has to behave like a daemon under systemd or Kubernetes: SIGTERM ends it within the
grace period, a dead engine never stays hidden behind a live API, and a restart on the same port
works at once. Signal handlers here only record the signal; all waiting happens in the main loop
(a handler that waited on the child deadlocked on Popen's internal wait lock).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from lmkit.errors import LmkitError
from lmkit.serving.config import ServeSettings
from lmkit.serving.launch import build_command, prepare_model_dir

logger = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class EngineDied(LmkitError):
    """The engine died and the restart policy does not (or no longer) allow another start."""


def _stop_with_parent() -> None:
    """Runs in the child before exec: Linux sends it SIGTERM when the launching process dies,
    so a killed test run or CLI never leaves an engine behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def check_port_free(host: str, port: int) -> None:
    """Bind and listen the way uvicorn (vLLM) does, with SO_REUSEADDR: sockets in TIME_WAIT left by a
    crashed server do not block a restart, while a socket that is really listening still does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen()
        except OSError as exc:
            raise LmkitError(
                f"Cannot serve on {host}:{port}: {exc.strerror}. Fix: stop whatever uses that port "
                "or pick another one (port=NNNN)."
            ) from None


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, read from /proc (Linux; elsewhere [])."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if state != "Z" and int(pgrp) == pgid:
            members.append(int(entry.name))
    return members


class ServerProcess:
    """A vLLM server: start (blocks until /health answers 200), run (supervise), stop (graceful, then kill).

    The server runs in its own session, so its whole tree (API server, engine core, helpers) is one
    process group that stop() signals and waits for.
    """

    grace_s = 30.0  # SIGTERM -> SIGKILL
    health_every_s = 2.0
    unhealthy_after_s = 10.0  # /health failing this long with the API process alive = a dead engine
    tick_s = 0.2

    def __init__(
        self, config: ServeSettings, log_path: Path | None = None, argv: list[str] | None = None
    ) -> None:
        """`argv` replaces the command built from `config` (benchmarks launch plain vLLM this way)."""
        self.config = config
        self.log_path = log_path
        self.argv = argv
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self._log: IO[str] | None = None
        self._signal: int | None = None  # the stop signal received while run() supervises

    def start(self) -> ServerProcess:
        check_port_free(self.config.host, self.config.port)
        argv, extra_env = build_command(self.config, prepare_model_dir(self.config))
        argv = self.argv or argv
        if self.log_path is not None:  # else vLLM logs to this process's stdout/stderr
            # appended after a restart, so the log of the engine that died is kept
            self._log = self.log_path.open("a" if self.starts else "w")  # noqa: SIM115  (server's lifetime)
        self.starts += 1
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

    def health(self, timeout: float = 5) -> int | None:
        """The status /health answers (vLLM: 503 once the engine is dead), None when nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.config.base_url}/health", timeout=timeout) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def _wait_until_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline and self._signal is None:
            if self.process.poll() is not None:
                raise LmkitError(
                    f"vLLM exited with status {self.process.returncode} while starting. "
                    f"Last log lines:\n{self._log_tail()}"
                )
            if self.health(timeout=2) == 200:
                return
            time.sleep(1)
        if self._signal is not None:
            return  # run() stops it
        self.stop()
        raise LmkitError(
            f"vLLM did not become healthy within {self.config.startup_timeout_s:.0f}s. "
            f"Last log lines:\n{self._log_tail()}"
        )

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the server's process group (vLLM drains and exits) and wait for every member;
        SIGKILL what is left after `timeout` (default: grace_s). Returns the API server's status."""
        if self.process is None:
            return None
        pgid = self.process.pid
        deadline = time.monotonic() + (self.grace_s if timeout is None else timeout)

        def running() -> bool:  # the group id stays reserved while any member lives, so never stale
            return self.process.poll() is None or bool(group_members(pgid))

        if running():
            self._signal_group(pgid, signal.SIGTERM)
        while running() and time.monotonic() < deadline:
            time.sleep(self.tick_s)  # a stop signal arriving now only sets a flag
        if running():
            self._signal_group(pgid, signal.SIGKILL)
        self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    @staticmethod
    def _signal_group(pgid: int, signum: int) -> None:
        # ProcessLookupError: the group is gone; PermissionError: only zombies left (some kernels)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signal = signum  # nothing else: the main loop notices within tick_s

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; False as soon as a stop signal arrived."""
        deadline = time.monotonic() + seconds
        while self._signal is None and time.monotonic() < deadline:
            time.sleep(min(self.tick_s, max(0.0, deadline - time.monotonic())))
        return self._signal is None

    def _watch(self) -> str | None:
        """Block until a stop signal (None) or a dead engine (returns the cause, one line)."""
        assert self.process is not None
        failing_since: float | None = None
        next_probe = time.monotonic() + self.health_every_s
        while self._sleep(self.tick_s):
            if (code := self.process.poll()) is not None:
                return f"the vLLM API server exited with status {code}"
            if time.monotonic() < next_probe:
                continue
            status = self.health()
            now = next_probe = time.monotonic()
            next_probe += self.health_every_s
            if status == 200:
                failing_since = None
                continue
            failing_since = failing_since or now
            if now - failing_since >= self.unhealthy_after_s:
                answer = f"HTTP {status}" if status else "no answer"
                return f"/health failed ({answer}) for {now - failing_since:.0f}s while the API process lived"
        return None

    def run(
        self, on_ready: Callable[[], None] = lambda: None, log: Callable[[str], None] = logger.warning
    ) -> int:
        """Start and supervise until SIGTERM/SIGINT (then stop within grace_s and return 0).

        A dead engine (API process exited, or /health failing for unhealthy_after_s) is stopped for
        good and restarted as `config.restart` allows; past that, EngineDied names the cause.
        """
        policy = self.config.restart
        self._signal = None
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self.start()
            if self._signal is None:
                on_ready()
            while (cause := self._watch()) is not None:
                self.stop()
                if self.starts > policy.max:
                    used = f"all {policy.max} restarts used" if policy.max else "restart.max is 0"
                    where = f"; log: {self.log_path}" if self.log_path else ""
                    raise EngineDied(f"The vLLM engine died: {cause}. Not restarted: {used}{where}")
                wait = f"{policy.backoff_s:g} s"
                log(f"vLLM engine died ({cause}); restart {self.starts}/{policy.max} after {wait}")
                if not self._sleep(policy.backoff_s):
                    break
                self.start()
                if self._signal is None:
                    log(f"vLLM restarted; serving again at {self.config.base_url}")
            return 0
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
