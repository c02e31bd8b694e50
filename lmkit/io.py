"""Atomic file writes, so an interrupted run never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

WRITE_LOG_ENV = "LMKIT_WRITE_LOG"  # a file; each atomic write appends "<rank>\t<path>" (audits, DDP tests)


def _rank() -> str:
    return os.environ.get("RANK", "0")  # set by torchrun / accelerate for multi-process launches


def is_main_process() -> bool:
    """False on every rank but 0 of a multi-process launch: those ranks compute the same results and
    must not write them a second time."""
    return _rank() == "0"


def _log_write(path: Path) -> None:
    log = os.environ.get(WRITE_LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{_rank()}\t{path.resolve()}\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write to a temp file in the same directory, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _log_write(path)
    return path


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def write_dir_atomic(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Let `fill` populate a fresh sibling temp dir, then swap it in for `target`.

    An existing `target` is replaced only after `fill` succeeded, so a crash keeps the old copy.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log_write(target)
    return target
