"""Recipes: one YAML = one run. Methods are found by name through the `lmkit.methods` entry points.

A method's package is imported only when a recipe names it, so a method whose optional extra is
missing (opacus for FDKT, flwr for its Flower runner) costs the others nothing; it fails when used,
with the extra to install named.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator
from rich.console import Console
from rich.syntax import Syntax

from lmkit.config import StrictModel, apply_overrides, read_yaml, to_yaml, validate
from lmkit.errors import ConfigError
from lmkit.io import is_main_process, write_text_atomic

ENTRY_POINTS = "lmkit.methods"


class Recipe(StrictModel):
    """Keys every recipe has. A method adds the sections it uses (`model`, `data`, `train`, its own).

    One seed rule: a section's `seed` left unset takes the recipe's `seed`; set it only to vary one
    part alone (e.g. `data.generate.seed` fixed while the training seed changes).
    """

    method: str = Field(description="the method to run (lmkit methods lists them)")
    output_dir: Path = Field(description="where everything the run writes goes")
    seed: int = Field(0, description="one seed for the run; sections inherit it")

    @model_validator(mode="after")
    def _inherit_seed(self) -> Recipe:
        for section in _sections_with_seed(self):
            if section.seed is None:
                section.seed = self.seed
        return self


def _sections_with_seed(model: BaseModel) -> Iterator[Any]:
    """Sections (and their sub-sections) that declare an optional `seed`."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            if "seed" in type(value).model_fields:
                yield value
            yield from _sections_with_seed(value)


RunFn = Callable[[Any, bool], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """What a method package exports as `METHOD` for its entry point."""

    recipe: type[Recipe]
    run: RunFn  # (recipe, resume) -> results dict, written by the method
    description: str
    requires: dict[str, str] = field(default_factory=dict)  # import name -> extra that installs it


def method_names() -> list[str]:
    names = sorted(ep.name for ep in entry_points(group=ENTRY_POINTS))
    if not names:
        raise ConfigError(
            "no lmkit methods are registered: lmkit's package metadata is missing. Fix: install it "
            "(make setup, or pip install -e .)."
        )
    return names


def get_method(name: object, source: str = "recipe") -> Method:
    """The method registered as `name`, imported now."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}
    if name not in found:
        known = ", ".join(method_names())
        raise ConfigError(
            f"{source}: method {name!r} is not a known method. Fix: set method to one of: {known}."
        )
    method = found[str(name)].load()
    if not isinstance(method, Method):
        raise TypeError(f"entry point {found[str(name)].value} must name a lmkit.recipes.Method")
    return method


def check_requirements(name: str, method: Method) -> None:
    """Refuse, before any work, a method whose optional dependencies are not installed."""
    missing = {
        module: extra for module, extra in method.requires.items() if not importlib.util.find_spec(module)
    }
    if missing:
        extras = ",".join(sorted(set(missing.values())))
        raise ConfigError(
            f"method {name} needs {', '.join(sorted(missing))}, which is not installed. "
            f"Fix: pip install 'lmkit[{extras}]' (make setup installs it)."
        )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; all problems are reported together with their key paths."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return validate(get_method(data.get("method"), str(path)).recipe, data, str(path))


def run_recipe(recipe: Recipe, resume: bool = False, console: Console | None = None) -> dict[str, Any]:
    method = get_method(recipe.method)
    check_requirements(recipe.method, method)
    recipe.output_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        console = console or Console()
        console.rule(f"lmkit run: {recipe.method}")
        resolved = to_yaml(recipe)
        console.print(Syntax(resolved, "yaml", theme="ansi_dark", background_color="default"))
        write_text_atomic(recipe.output_dir / "recipe.resolved.yaml", resolved)
    return method.run(recipe, resume)
