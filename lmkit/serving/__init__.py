"""Serving on vLLM's own OpenAI-compatible server; lmkit adds config, model materialization and checks."""

from typing import Any

from lmkit.serving.config import load_serve_config
from lmkit.serving.launch import build_command
from lmkit.serving.process import ServerProcess

__all__ = ["ServeConfig", "ServerProcess", "build_command", "load_serve_config"]


def __getattr__(name: str) -> Any:
    """`ServeConfig` is built on first use: it loads the serving extensions, which import this
    package themselves, so building it while the package initializes would be a circle."""
    if name == "ServeConfig":
        from lmkit.serving.config import serve_config_type

        return serve_config_type()
    raise AttributeError(name)
