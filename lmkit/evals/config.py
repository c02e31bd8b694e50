"""`evals/*.yaml` suites and `evals/tasks/*.yaml` local task files, validated like recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmkit.config import StrictModel, apply_overrides, read_yaml, secret_from_env, validate
from lmkit.data import TASKS, SourceSpec
from lmkit.loader import ModelSpec


class EndpointTarget(StrictModel):
    """An OpenAI-compatible server, e.g. `lmkit serve`."""

    base_url: str = Field(pattern=r"^https?://", description="up to /v1, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="served model or adapter name")
    tokenizer: ModelSpec = Field(
        description="tokenizer source for log-likelihood tasks (the served base model)"
    )
    api_key_env: str | None = None
    prompt_format_from: Path | None = Field(
        None, description="the served adapter's directory: eval follows the prompt format it records"
    )
    num_concurrent: int = Field(8, gt=0)
    timeout_s: float = Field(300, gt=0)

    def api_key(self) -> str:
        return (
            "none"
            if self.api_key_env is None
            else secret_from_env(self.api_key_env, "target.endpoint.api_key_env")
        )


class Target(StrictModel):
    """Exactly one of: an in-process model (the shared loader) or an endpoint."""

    model: ModelSpec | None = None
    endpoint: EndpointTarget | None = None

    @model_validator(mode="after")
    def _one(self) -> Target:
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("set exactly one of target.model or target.endpoint")
        return self


class TaskRef(StrictModel):
    """A local task file (`evals/tasks/NAME.yaml`) or an lm-eval task name (needs its dataset)."""

    local: Path | None = None
    lm_eval: str | None = None

    @model_validator(mode="after")
    def _one(self) -> TaskRef:
        if (self.local is None) == (self.lm_eval is None):
            raise ValueError("each task needs exactly one of local or lm_eval")
        return self


class SpeedConfig(StrictModel):
    """Bounded load against an endpoint: each level sends `requests_per_level` with that many in flight."""

    concurrency: list[int] = Field([1, 8, 32], min_length=1)
    requests_per_level: int = Field(32, gt=0)
    max_tokens: int = Field(32, gt=0)
    prompt: str = "Write a few sentences about the sea."
    timeout_s: float = Field(300, gt=0, description="whole speed suite; it stops itself after this")


class EvalSuite(StrictModel):
    target: Target
    tasks: list[TaskRef] = []
    limit: int | None = Field(None, gt=0, description="examples per task (for quick runs)")
    batch_size: int = Field(8, gt=0)
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples for every task (lm-eval)")
    apply_chat_template: bool | None = Field(
        None, description="unset: as the evaluated adapter was trained (lmkit_prompt.json), else off"
    )
    speed: SpeedConfig | None = None
    memory: bool = Field(True, description="report the in-process model's memory footprint")
    output_dir: Path
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> EvalSuite:
        if self.speed is not None and self.target.endpoint is None:
            raise ValueError("the speed suite measures an endpoint; set target.endpoint or remove speed")
        if not self.tasks and self.speed is None and not (self.memory and self.target.model):
            raise ValueError("nothing to evaluate: add tasks, speed or memory")
        return self


class GeneratedTaskData(StrictModel):
    task: str
    size: int = Field(64, gt=0)
    seed: int = 1234

    @model_validator(mode="after")
    def _known(self) -> GeneratedTaskData:
        if self.task not in TASKS:
            raise ValueError(f"unknown generated task {self.task!r}; available: {sorted(TASKS)}")
        return self


class LocalTask(SourceSpec):
    """A task over examples `{input, target[, choices]}`, scored by lm-eval.

    The examples come from `generate` (lmkit's seeded tasks) or from a file or hub dataset read as
    it is (`source`, `columns`, `label_names`, `template`: the keys of a recipe's data source).
    kinds: `classification` (fixed `choices` labels, log-likelihood), `multiple_choice`
    (per-example `choices`), `generation` (greedy, exact match with `target`).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    kind: Literal["classification", "multiple_choice", "generation"]
    generate: GeneratedTaskData | None = None
    source: str | None = Field(None, description="file (relative to the task file) or hub dataset id")  # type: ignore[assignment]
    prompt: str | None = Field(
        None,
        description="lm-eval prompt (jinja) over an example; unset: '{{input}}' with the chat "
        "template, '{{input}}\\nAnswer:' without",
    )
    target_delimiter: str | None = Field(
        None, description="between prompt and answer; unset: '' with the chat template, ' ' without"
    )
    choices: list[str] | None = Field(
        None, description="labels, for classification; unset: the label_names words"
    )
    max_gen_toks: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _check(self) -> LocalTask:
        if (self.generate is None) == (self.source is None):
            raise ValueError("set exactly one of generate or source")
        if self.kind == "multiple_choice" and self.columns.choices is None:
            self.columns = self.columns.model_copy(update={"choices": "choices"})  # the usual name
        if self.choices is None and self.kind == "classification" and self.label_names:
            self.choices = list(dict.fromkeys(self.label_names.values()))
        if (self.kind == "classification") != bool(self.choices):
            raise ValueError("choices (or label_names) are required for classification and only for it")
        return self


def load_suite(path: str | Path, overrides: list[str] | None = None) -> EvalSuite:
    return validate(EvalSuite, apply_overrides(read_yaml(path), list(overrides or [])), str(path))


def load_local_task(path: Path) -> LocalTask:
    task = validate(LocalTask, read_yaml(path), str(path))
    return task if task.source is None else task.resolved(path.parent)
