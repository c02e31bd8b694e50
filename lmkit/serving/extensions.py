"""What a method adds to `lmkit serve`, behind one small interface, so `serving/` imports no method.

An extension owns one key of the serve YAML (`prune`, `mola_routers`, ...). It is found through the
`lmkit.serving_extensions` entry points (pyproject.toml) and, when its key is set, it may check
its settings against the rest of the config, replace the model directory vLLM loads, and add vLLM
flags, environment, ASGI middleware and plugins to the launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmkit.serving.config import ServeSettings

ENTRY_POINTS = "lmkit.serving_extensions"


@dataclass(frozen=True)
class Launch:
    """An extension's additions to the vLLM command line and environment."""

    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    middleware: list[str] = field(default_factory=list)  # ASGI classes, "module.Class"
    plugins: list[str] = field(default_factory=list)  # vLLM plugins kept on a VLLM_PLUGINS allow-list
    lora: bool = False  # the engine must start with --enable-lora
    adapter_dirs: list[Path] = field(default_factory=list)  # roots runtime adapter loads may read

    @classmethod
    def combine(cls, launches: list[Launch]) -> Launch:
        """Every active extension's additions, in extension order."""
        return cls(
            argv=[a for launch in launches for a in launch.argv],
            env={k: v for launch in launches for k, v in launch.env.items()},
            middleware=[m for launch in launches for m in launch.middleware],
            plugins=[p for launch in launches for p in launch.plugins],
            lora=any(launch.lora for launch in launches),
            adapter_dirs=[d for launch in launches for d in launch.adapter_dirs],
        )


class ServingExtension:
    """Base class: a key that is unset (None or empty) leaves serving untouched."""

    key: str  # the serve-YAML key it owns
    annotation: Any  # the key's type (a pydantic-validated annotation)
    default: Any = None  # the key's default: the extension is off
    description: str = ""

    def check(self, value: Any, config: ServeSettings) -> None:
        """Checks that need the disk or other keys; raise ConfigError with the fix."""

    def model_dir(self, value: Any, model_dir: Path) -> Path:
        """The directory vLLM loads, given the materialized model's."""
        return model_dir

    def launch(self, value: Any, config: ServeSettings, model_dir: Path) -> Launch:
        return Launch()


@cache
def extensions() -> tuple[ServingExtension, ...]:
    """Every installed extension, sorted by key."""
    found = []
    for point in sorted(entry_points(group=ENTRY_POINTS), key=lambda p: p.name):
        extension = point.load()
        if not isinstance(extension, ServingExtension) or extension.key != point.name:
            raise TypeError(f"entry point {point.value} must be a ServingExtension with key {point.name!r}")
        found.append(extension)
    return tuple(found)


def active(config: ServeSettings) -> list[tuple[ServingExtension, Any]]:
    """The extensions whose key is set in `config`, with their values."""
    return [(ext, value) for ext in extensions() if (value := getattr(config, ext.key, None))]
