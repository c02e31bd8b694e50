"""Serving on vLLM's own OpenAI-compatible server; lmkit adds config, model materialization and checks."""

from lmkit.serving.config import ServeConfig, load_serve_config
from lmkit.serving.launch import ServerProcess, build_command

__all__ = ["ServeConfig", "ServerProcess", "build_command", "load_serve_config"]
