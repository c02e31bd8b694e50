"""Recipes: one YAML = one run. Each method registers its recipe schema and run function here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from rich.console import Console
from rich.syntax import Syntax

from lmkit.config import StrictModel, apply_overrides, read_yaml, to_yaml, validate
from lmkit.data import DataSpec
from lmkit.errors import ConfigError
from lmkit.io import write_text_atomic
from lmkit.loader import ModelSpec


class Recipe(StrictModel):
    """Keys every recipe has; methods subclass this and add their own sections."""

    method: str
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    output_dir: Path
    seed: int = 0


RunFn = Callable[[Any, bool], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    recipe: type[Recipe]
    run: RunFn  # (recipe, resume) -> results dict, written by the method
    description: str


METHODS: dict[str, Method] = {}


def register_method(name: str, recipe: type[Recipe], run: RunFn, description: str) -> None:
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = Method(recipe, run, description)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; all problems are reported together with their key paths."""
    import lmkit.methods  # noqa: F401  (registers the built-in methods)

    data = apply_overrides(read_yaml(path), list(overrides or []))
    method = data.get("method")
    if method not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise ConfigError(
            f"{path}: method {method!r} is not a known method. Fix: set method to one of: {known}."
        )
    return validate(METHODS[method].recipe, data, str(path))


def run_recipe(recipe: Recipe, resume: bool = False, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    console.rule(f"lmkit run: {recipe.method}")
    resolved = to_yaml(recipe)
    console.print(Syntax(resolved, "yaml", theme="ansi_dark", background_color="default"))
    recipe.output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(recipe.output_dir / "recipe.resolved.yaml", resolved)
    return METHODS[recipe.method].run(recipe, resume)
