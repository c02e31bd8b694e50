"""YAML configs with dotted command-line overrides and aggregated, key-path error messages.

Every config in lmkit (recipes, serve files, eval suites) is a pydantic model with
`extra="forbid"`, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lmkit.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}. Check the path (recipes live in recipes/).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys at the top level, got {type(data).__name__}.")
    return data


FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _parse_value(raw: str) -> Any:
    """YAML scalar parsing, plus `1e-4`-style floats that YAML 1.1 would leave as strings."""
    if FLOAT.match(raw):
        return float(raw)
    return yaml.safe_load(raw) if raw else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`3`, `1e-4`, `true`, `[a, b]`).

    A list item is addressed by its index: `data.sources[1].limit=500`.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"Override {item!r} is not of the form key.path=value (e.g. train.max_steps=20)."
            )
        steps: list[str | int] = []
        for part in key.split("."):
            match = OVERRIDE_PART.match(part)
            if not match:
                raise ConfigError(f"Override {item!r}: {part!r} is not a key (or key[index]).")
            steps.append(match.group(1))
            steps += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]
        node: Any = data
        for depth, step in enumerate(steps[:-1]):
            node = _child(node, step, item, steps[: depth + 1])
        last = steps[-1]
        if isinstance(last, int):
            _child(node, last, item, steps)  # the index must exist
        node[last] = _parse_value(raw)
    return data


OVERRIDE_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def _child(node: Any, step: str | int, item: str, path: list[str | int]) -> Any:
    where = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in path).lstrip(".")
    if isinstance(step, int):
        if not isinstance(node, list) or step >= len(node):
            size = len(node) if isinstance(node, list) else "no"
            raise ConfigError(f"Override {item!r}: {where} does not exist ({size} items there).")
        return node[step]
    child = node.setdefault(step, {})
    if not isinstance(child, dict | list):
        raise ConfigError(f"Override {item!r}: {where} is a value, not a section.")
    return child


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source} has {exc.error_count()} problem(s):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key (check spelling; see the method's documented keys)"
        elif err["type"] == "missing":
            message = "required key is missing"
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
        lines.append(f"  - {where}: {message}{got}")
    return "\n".join(lines)


def validate(model: type[ModelT], data: dict[str, Any], source: str) -> ModelT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def secret_from_env(variable: str, key_path: str) -> str:
    """A secret named by a config key (`api_key_env: NAME`), so keys never sit in YAML files."""
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(
            f"{key_path} is {variable!r} but that environment variable is empty. "
            f"Fix: export {variable}=<key>, or remove {key_path}."
        )
    return value


def to_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config class behind `Section` or `Section | None`, if any."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    models = [o for o in options if isinstance(o, type) and issubclass(o, BaseModel)]
    return models[0] if len(models) == 1 and all(o in (models[0], type(None)) for o in options) else None


def _list_section(annotation: Any) -> type[BaseModel] | None:
    """The item class behind `list[Section]` or `list[Section] | None`, if any."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    lists = [o for o in options if get_origin(o) is list]
    if len(lists) != 1 or not all(o in (lists[0], type(None)) for o in options):
        return None
    (item,) = get_args(lists[0]) or (None,)
    return item if isinstance(item, type) and issubclass(item, BaseModel) else None


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(repr(v) for v in get_args(annotation))
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    return re.sub(r"\b(?:typing|pathlib|[a-z_]+(?:\.[a-z_]+)+)\.", "", str(annotation))


def documented_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) of every key of a config schema, sections flattened."""
    rows = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _section(info.annotation)
        if section is not None:
            optional = "optional " if info.default is None else ""
            doc = info.description or (section.__doc__ or "").strip().split("\n")[0]
            rows.append((path, f"{optional}section", "", doc))
            rows += documented_keys(section, f"{path}.")
            continue
        item = _list_section(info.annotation)
        if item is not None:
            doc = info.description or (item.__doc__ or "").strip().split("\n")[0]
            rows.append((path, "list of sections", repr(info.default), doc))
            rows += documented_keys(item, f"{path}[].")
            continue
        if info.is_required():
            default = "(required)"
        elif info.default_factory is not None:
            default = repr(info.default_factory())  # type: ignore[call-arg]
        else:
            default = repr(info.default)
        rows.append((path, _type_name(info.annotation), default, info.description or ""))
    return rows
