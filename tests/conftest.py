"""Hermetic test setup: no network, and a fresh lmkit cache per test session."""

from __future__ import annotations

import logging
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@pytest.fixture(scope="session", autouse=True)
def lmkit_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every materialized model goes to a per-session cache, so tests never depend on ~/.cache."""
    path = tmp_path_factory.mktemp("lmkit-cache")
    previous = os.environ.get("LMKIT_CACHE")
    os.environ["LMKIT_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("LMKIT_CACHE", None)
    else:
        os.environ["LMKIT_CACHE"] = previous
