"""Read a source with 🤗 `datasets` and render its rows to examples; errors name file, row and column."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmkit.data.generated import Example
from lmkit.data.spec import SourceSpec, label_key, local_format
from lmkit.errors import ConfigError

_TEMPLATES = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


class DataError(ConfigError):
    """A data file or row that lmkit cannot turn into examples (exit 2, like any config error)."""


def describe(spec: SourceSpec, source: str, split: str) -> str:
    """How errors and previews name a source: the file, or the hub id with its config and split."""
    if local_format(source):
        return source
    return f"{source}{f' ({spec.config})' if spec.config else ''} split {split}"


def load_rows(spec: SourceSpec, key: str, source: str | None = None, split: str | None = None) -> Any:
    """The raw `datasets.Dataset` of a source (or of its eval `source`/`split`), nothing renamed;
    rows whose label is in `drop_labels` are left out."""
    rows = _load_dataset(spec, key, source, split)
    if not spec.drop_labels:
        return rows
    column, dropped = spec.columns.target, set(spec.drop_labels)
    if column not in rows.column_names:
        raise DataError(
            f"{key}.drop_labels: the file has no column {column!r} (columns.target). "
            f"Columns: {', '.join(rows.column_names)}. Fix: set columns.target."
        )
    return rows.filter(lambda row: label_key(row[column]) not in dropped)


def _load_dataset(spec: SourceSpec, key: str, source: str | None, split: str | None) -> Any:
    import datasets

    datasets.disable_progress_bars()
    source, split = source or spec.source, split or spec.split
    builder = local_format(source)
    try:
        if builder:
            if not Path(source).is_file():
                raise DataError(f"{key}.source: data file not found: {source}. Fix: check the path.")
            return datasets.load_dataset(builder, data_files=source, split=split)
        return datasets.load_dataset(source, spec.config, split=split)
    except DataError:
        raise
    except (ConnectionError, OSError) as exc:
        if builder:
            raise DataError(f"{key}.source: cannot read {source}: {exc}") from None
        raise DataError(
            f"{key}.source: cannot load hub dataset {describe(spec, source, split)}: {exc}. It is not a "
            "local file (.jsonl, .json, .csv, .parquet) and the hub is not reachable from here. Fix: "
            "download it where the hub is reachable (datasets' cache is then used offline) or point "
            "source at a local file."
        ) from None
    except ValueError as exc:  # unknown split or config
        raise DataError(f"{key}: {describe(spec, source, split)}: {exc}") from None
    except Exception as exc:  # malformed file: find the line for the user when it is JSON lines
        raise DataError(_malformed(source, builder, key, exc)) from None


def _malformed(source: str, builder: str | None, key: str, exc: Exception) -> str:
    if builder == "json":
        lines = Path(source).read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                if line.strip() and not isinstance(json.loads(line), dict):
                    return f"{source}:{number}: expected a JSON object per line. Fix: one object per line."
            except json.JSONDecodeError as err:
                return f"{source}:{number}: not valid JSON ({err.msg}). Fix: one JSON object per line."
    return f"{key}.source: {source} could not be read as {builder or 'a dataset'}: {exc}"


def sample(indices: list[int], limit: int | None, seed: int) -> list[int]:
    """A seeded sample of `limit` indices, kept in file order (all of them when there are fewer)."""
    if limit is None or limit >= len(indices):
        return indices
    return sorted(random.Random(seed).sample(indices, limit))


def hold_out(n_rows: int, fraction: float, seed: int, where: str) -> tuple[list[int], list[int]]:
    """(train, eval) row indices: a seeded `fraction` of the rows is held out for evaluation."""
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    held = max(1, int(n_rows * fraction))
    if held >= n_rows:
        raise DataError(f"{where} has too few rows ({n_rows}) to hold out an eval split. Fix: add rows.")
    return sorted(order[held:]), sorted(order[:held])


def render(spec: SourceSpec, rows: Any, indices: list[int], where: str, key: str) -> list[Example]:
    """Examples `{task, input, target[, choices]}` from the chosen rows, checked one by one."""
    try:
        template = _TEMPLATES.from_string(spec.template) if spec.template else None
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"{key}.template: not a valid jinja template ({exc.message}).") from None
    columns, names = spec.columns, spec.label_names
    choices = list(dict.fromkeys(names.values())) if names else None
    examples = []
    for index in indices:
        # `datasets` gives every row every column, None where a row lacks it: treat None as absent
        row = {k: v for k, v in rows[index].items() if v is not None}
        at = f"{where} row {index + 1}"
        target = _target(row, at, key, columns.target, names)
        example: Example = {
            "task": _task(row, at, key, spec),
            "input": _input(row, at, key, spec, template),
            "target": target,
        }
        if columns.choices:
            example["choices"] = _column_choices(row, at, key, columns.choices, target)
        elif choices:
            example["choices"] = choices
        examples.append(example)
    return examples


def _column(row: dict, at: str, key: str, column: str, role: str) -> Any:
    if column not in row:
        have = ", ".join(row)
        raise DataError(
            f"{at}: no value in column {column!r} (the {role}). Columns with a value there: {have}. "
            f"Fix: set {key}.columns.{role} to one of them, or fill the row."
        )
    return row[column]


def _target(row: dict, at: str, key: str, column: str, names: dict[str, str] | None) -> str:
    raw = _column(row, at, key, column, "target")
    if names is not None:
        if label_key(raw) not in names:
            raise DataError(
                f"{at}, column {column!r}: label {raw!r} is not in label_names "
                f"({', '.join(names)}). Fix: add it to {key}.label_names."
            )
        return names[label_key(raw)]
    text = label_key(raw).strip()
    if not text:
        raise DataError(f"{at}, column {column!r}: the target is empty. Fix: fill or drop the row.")
    return text


def _input(row: dict, at: str, key: str, spec: SourceSpec, template: jinja2.Template | None) -> str:
    if template is None:
        text = str(_column(row, at, key, spec.columns.input, "input"))
        origin = f"column {spec.columns.input!r}"
    else:
        try:
            text = template.render(**row)
        except jinja2.UndefinedError as exc:
            raise DataError(
                f"{at}: {key}.template uses something the row lacks ({exc.message}). Columns with a value: "
                f"{', '.join(row)}. Fix: use those names in the template."
            ) from None
        origin = f"{key}.template"
    if not text.strip():
        raise DataError(f"{at}: the input ({origin}) is empty. Fix: fill or drop the row.")
    return text


def _task(row: dict, at: str, key: str, spec: SourceSpec) -> str:
    if spec.columns.task is None:
        return spec.task or "default"
    name = str(_column(row, at, key, spec.columns.task, "task") or "").strip()
    if not name:
        raise DataError(f"{at}, column {spec.columns.task!r}: the task name is empty.")
    return name


def _column_choices(row: dict, at: str, key: str, column: str, target: str) -> list[str]:
    options = _column(row, at, key, column, "choices")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(c, str) for c in options):
        raise DataError(f"{at}, column {column!r}: choices must be a list of at least two strings.")
    if target not in options:
        raise DataError(f"{at}: the target {target!r} is not one of its choices {options}.")
    return options
