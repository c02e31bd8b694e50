"""Task data: the project's own seeded generators, or the user's JSONL/CSV files.

Every record is `{"task", "input", "target"}`. Generated data is written next to the run's
outputs so anyone can see exactly what a model was trained and evaluated on.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from lmkit.config import StrictModel
from lmkit.errors import ConfigError

Example = dict[str, Any]  # task, input, target (str); optional choices (list[str])
TaskGenerator = Callable[[random.Random], tuple[str, str]]
TASKS: dict[str, TaskGenerator] = {}


def register_task(name: str) -> Callable[[TaskGenerator], TaskGenerator]:
    def wrap(generator: TaskGenerator) -> TaskGenerator:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = generator
        return generator

    return wrap


_POSITIVE = ["wonderful", "delightful", "excellent", "superb", "lovely", "fantastic", "pleasant", "great"]
_NEGATIVE = ["awful", "dreadful", "terrible", "disappointing", "horrible", "poor", "bland", "unpleasant"]
_SUBJECTS = [
    "The soup",
    "This film",
    "The hotel room",
    "Our guide",
    "The concert",
    "The service",
    "This book",
    "The new phone",
    "The train ride",
    "The bakery",
]
_FRAMES = ["{s} was {a}.", "Honestly, {s} felt {a}.", "{s} turned out {a} overall.", "I thought {s} was {a}."]


@register_task("sentiment")
def _sentiment(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    adjective = rng.choice(_POSITIVE if label == "positive" else _NEGATIVE)
    frame, subject = rng.choice(_FRAMES), rng.choice(_SUBJECTS)
    if not frame.startswith("{s}"):
        subject = subject[0].lower() + subject[1:]
    review = frame.format(s=subject, a=adjective)
    return f"Is this review positive or negative? Review: {review}", label


@register_task("arithmetic")
def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return f"What is {a} plus {b}? Answer with the number only.", str(a + b)


@register_task("uppercase")
def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(
        ["river", "stone", "cloud", "maple", "ember", "quartz", "harbor", "lantern", "meadow"], 2
    )
    text = " ".join(words)
    return f"Write this in capital letters: {text}", text.upper()


@register_task("reverse_words")
def _reverse_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(["apple", "bridge", "candle", "desert", "falcon", "garden", "island", "jungle"], 3)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


_NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jade", "Kofi", "Lena"]
_CITIES = ["Lisbon", "Oslo", "Lima", "Seoul", "Cairo", "Quito", "Perth", "Riga"]
_WEATHER = ["sunny", "windy", "rainy", "cold", "warm", "foggy"]


@register_task("retrieval")
def _retrieval(rng: random.Random) -> tuple[str, str]:
    """A long context (3 code records among 20 distractor sentences), a blank line, then the question."""
    names = rng.sample(_NAMES, 3)
    codes = {name: str(rng.randint(1000, 9999)) for name in names}
    lines = [f"The code of {name} is {code}." for name, code in codes.items()]
    lines += [f"In {rng.choice(_CITIES)} the day was {rng.choice(_WEATHER)}." for _ in range(20)]
    rng.shuffle(lines)
    asked = rng.choice(names)
    question = f"What is the code of {asked}? Answer with the number only."
    return f"{' '.join(lines)}\n\n{question}", codes[asked]


def generate_examples(tasks: list[str], size: int, seed: int) -> list[Example]:
    """`size` examples cycling through `tasks`, reproducible from `seed`."""
    rng = random.Random(seed)
    rows = []
    for index in range(size):
        task = tasks[index % len(tasks)]
        prompt, target = TASKS[task](rng)
        rows.append({"task": task, "input": prompt, "target": target})
    return rows


class GeneratedData(StrictModel):
    tasks: list[str] = Field(["sentiment"], min_length=1)
    train_size: int = Field(256, gt=0)
    eval_size: int = Field(32, gt=0)
    seed: int | None = Field(None, description="unset: the recipe's seed")

    @model_validator(mode="after")
    def _known_tasks(self) -> GeneratedData:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown generated task(s) {unknown}; available: {sorted(TASKS)}")
        return self


class DataSpec(StrictModel):
    """Either `generate` (seeded, built in) or `train_file` (+ optional `eval_file`), JSONL or CSV."""

    generate: GeneratedData | None = None
    train_file: Path | None = None
    eval_file: Path | None = None
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="held out of train_file when eval_file is unset"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.generate is None) == (self.train_file is None):
            raise ValueError("set exactly one of data.generate or data.train_file")
        if self.eval_file is not None and self.train_file is None:
            raise ValueError("data.eval_file needs data.train_file")
        return self


def _check_record(record: object, where: str) -> Example:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected an object with input/target, got {type(record).__name__}.")
    missing = [k for k in ("input", "target") if not isinstance(record.get(k), str) or not record.get(k)]
    if missing:
        raise ConfigError(
            f"{where}: field(s) {missing} missing or not a non-empty string. "
            "Each record needs string fields input and target (task is optional)."
        )
    row = {"task": str(record.get("task") or "default"), "input": record["input"], "target": record["target"]}
    if "choices" in record:  # multiple-choice records
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ConfigError(f"{where}: choices must be a list of at least two strings.")
        row["choices"] = choices
    return row


def read_examples(path: Path) -> list[Example]:
    """Read JSONL (one object per line) or CSV (header with input,target[,task]); errors name file:line."""
    if not path.is_file():
        raise ConfigError(f"Data file not found: {path}. Fix: check data.train_file / data.eval_file.")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [_check_record(row, f"{path}:{i + 2}") for i, row in enumerate(csv.DictReader(handle))]
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path}:{number}: not valid JSON ({exc.msg}). Fix: one object per line."
                ) from None
            rows.append(_check_record(record, f"{path}:{number}"))
    else:
        raise ConfigError(f"{path}: unsupported data format {path.suffix!r}; use .jsonl or .csv.")
    if not rows:
        raise ConfigError(f"{path} holds no records.")
    return rows


def load_data(spec: DataSpec) -> tuple[list[Example], list[Example]]:
    """Return (train, eval) examples."""
    if spec.generate is not None:
        gen = spec.generate
        return (
            generate_examples(gen.tasks, gen.train_size, gen.seed or 0),
            generate_examples(gen.tasks, gen.eval_size, (gen.seed or 0) + 1),
        )
    assert spec.train_file is not None
    train = read_examples(spec.train_file)
    if spec.eval_file is not None:
        return train, read_examples(spec.eval_file)
    shuffled = train[:]
    random.Random(0).shuffle(shuffled)
    held_out = max(1, int(len(shuffled) * spec.eval_fraction))
    if held_out >= len(shuffled):
        raise ConfigError(f"{spec.train_file} has too few records ({len(train)}) to hold out an eval split.")
    return shuffled[held_out:], shuffled[:held_out]
