"""Serving on vLLM's own OpenAI-compatible server; lmkit adds config, model materialization and checks."""

from lmkit.serving.config import ServeConfig, load_serve_config
from lmkit.serving.launch import build_command
from lmkit.serving.process import ServerProcess

__all__ = ["ServeConfig", "ServerProcess", "build_command", "load_serve_config"]
