"""The `data` section: where examples come from and how a row becomes `{task, input, target}`.

A source is a local JSON/JSONL/CSV/Parquet file or a 🤗 hub dataset id, read with `datasets`
as it is: `columns` says which columns hold the text and the label, `label_names` turns raw
labels into the words a model answers with, and a jinja `template` writes the prompt from the
row's columns. Several sources make a multi-task set, one task name each.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from lmkit.config import StrictModel
from lmkit.data.generated import GeneratedData

TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Columns(StrictModel):
    """Which of the row's columns play which part (names as they are in the file)."""

    input: str = Field("input", description="the text, when no template writes the prompt")
    target: str = Field("target", description="the answer or label")
    task: str | None = Field(None, description="per-row task name; unset: the source's task")
    choices: str | None = Field(None, description="per-row answer options (a list), for multiple choice")


class EvalSplit(StrictModel):
    """Where the eval rows of a source come from: another split or file, or (source and split both
    unset) the rows held out of the source itself."""

    source: str | None = Field(None, description="another file or hub id; unset: the same source")
    split: str | None = Field(None, description="e.g. validation; unset: the source's split")
    limit: int | None = Field(None, gt=0, description="a seeded sample of this many eval rows")


class SourceSpec(StrictModel):
    """One file or hub dataset, read as it is and rendered to prompts and answers."""

    source: str = Field(description="local .jsonl/.json/.csv/.parquet path, or a hub dataset id")
    config: str | None = Field(None, description="hub dataset config (e.g. sst2 for glue)")
    split: str = Field("train", description="split to read; a local file's only split is train")
    task: str | None = Field(None, pattern=TASK_NAME, description="task name of every row")
    columns: Columns = Field(default_factory=Columns)
    label_names: dict[str, str] | None = Field(
        None, description="raw label -> answer word, e.g. {0: negative, 1: positive}"
    )
    template: str | None = Field(
        None, description="jinja prompt over the row's columns, e.g. 'Review: {{ text }}'"
    )
    drop_labels: list[str] = Field(
        [], description="raw labels whose rows are left out before sampling, e.g. [1] drops neutral"
    )
    limit: int | None = Field(None, gt=0, description="a seeded sample of this many rows")

    @field_validator("label_names", "drop_labels", mode="before")
    @classmethod
    def _keys_as_text(cls, value: object) -> object:
        """YAML reads `0: negative` with an int key and `True: yes` with a bool one; rows compare as text."""
        if isinstance(value, dict):
            return {label_key(k): v for k, v in value.items()}
        if isinstance(value, list):
            return [label_key(v) for v in value]
        return value

    @field_validator("label_names")
    @classmethod
    def _non_empty_words(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (not value or not all(w.strip() for w in value.values())):
            raise ValueError("label_names must map each raw label to a non-empty word")
        return value

    def resolved(self, base: Path) -> SourceSpec:
        """This spec with a relative path read from `base` (a task file's folder) when it is there."""
        candidate = base / self.source
        if Path(self.source).is_absolute() or not candidate.exists():
            return self
        return self.model_copy(update={"source": str(candidate)})


class TaskSource(SourceSpec):
    """A source in a recipe's `data.sources`: its train rows, and where its eval rows come from."""

    eval: EvalSplit | None = Field(
        None, description="eval rows from another split or file; unset: held out (data.eval_fraction)"
    )


LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataSpec(StrictModel):
    """Exactly one of `sources` (files or hub datasets) or `generate` (lmkit's seeded tasks)."""

    sources: list[TaskSource] | None = Field(None, min_length=1)
    generate: GeneratedData | None = None
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="held out of a source's rows when it has no eval split"
    )
    seed: int | None = Field(None, description="eval hold-out and limit samples; unset: the recipe's seed")

    @model_validator(mode="after")
    def _one_kind(self) -> DataSpec:
        if (self.generate is None) == (self.sources is None):
            raise ValueError("set exactly one of data.sources or data.generate")
        return self


def local_format(source: str) -> str | None:
    """The `datasets` builder for a local data file (json, csv, parquet); None for a hub id or folder."""
    return LOCAL_FORMATS.get(Path(source).suffix.lower())


def label_key(raw: object) -> str:
    """A raw label as text, the same way for YAML keys and file values (1, 1.0, '1' -> '1')."""
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    return str(raw)
