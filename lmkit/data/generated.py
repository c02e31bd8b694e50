"""lmkit's own seeded task generators: small templated tasks for demos, tests and CI.

Real data comes in through `lmkit.data.sources`; these stay as one more source kind
(`data.generate`), reproducible from a seed with nothing to download.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from pydantic import Field, model_validator

from lmkit.config import StrictModel

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


def load_generated(spec: GeneratedData) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples: two seeded draws, so eval examples are generated apart from train."""
    seed = spec.seed or 0
    return (
        generate_examples(spec.tasks, spec.train_size, seed),
        generate_examples(spec.tasks, spec.eval_size, seed + 1),
    )
