"""`lmkit data preview`: the first rendered examples and the label distribution of each split, so a
user sees exactly what a model will be trained and evaluated on before spending any compute."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from lmkit.data.generated import Example


def label_distribution(examples: list[Example]) -> dict[str, Counter[str]]:
    """task -> Counter of targets (answers), in the order tasks first appear."""
    counts: dict[str, Counter[str]] = {}
    for example in examples:
        counts.setdefault(example["task"], Counter())[example["target"]] += 1
    return counts


def print_preview(console: Console, splits: dict[str, list[Example]], count: int) -> None:
    for split, examples in splits.items():
        shown = Table(title=f"{split}: first {min(count, len(examples))} of {len(examples)} examples")
        for column in ("task", "input (as rendered)", "target"):
            shown.add_column(column, overflow="fold")
        for example in examples[:count]:
            shown.add_row(example["task"], example["input"], example["target"])
        console.print(shown)
        labels = Table(title=f"{split}: targets per task")
        for column in ("task", "examples", "targets (count, share)"):
            labels.add_column(column, overflow="fold")
        for task, counter in label_distribution(examples).items():
            total = sum(counter.values())
            top = counter.most_common(8)
            text = ", ".join(f"{t!r} {c} ({c / total:.0%})" for t, c in top)
            if len(counter) > len(top):
                text += f", ... {len(counter) - len(top)} more distinct"
            labels.add_row(task, str(total), text)
        console.print(labels)
