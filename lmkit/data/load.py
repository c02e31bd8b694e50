"""Train and eval examples for a recipe's `data` section, and for one source (eval task files)."""

from __future__ import annotations

from lmkit.data.generated import Example, load_generated
from lmkit.data.sources import DataError, describe, hold_out, load_rows, render, sample
from lmkit.data.spec import DataSpec, EvalSplit, SourceSpec, TaskSource


def read_source(spec: SourceSpec, key: str, seed: int = 0) -> list[Example]:
    """Every row of one source (a seeded `limit` sample when set), rendered to examples."""
    rows = load_rows(spec, key)
    indices = sample(list(range(len(rows))), spec.limit, seed)
    return render(spec, rows, indices, describe(spec, spec.source, spec.split), key)


def _split_source(
    spec: TaskSource, key: str, eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    rows = load_rows(spec, key)
    where = describe(spec, spec.source, spec.split)
    split = spec.eval or EvalSplit()
    if split.source is None and split.split is None:  # held out of this source's rows
        train_rows, eval_rows = hold_out(len(rows), eval_fraction, seed, where)
        train = render(spec, rows, sample(train_rows, spec.limit, seed), where, key)
        return train, render(spec, rows, sample(eval_rows, split.limit, seed), where, key)
    train = render(spec, rows, sample(list(range(len(rows))), spec.limit, seed), where, key)
    source, name = split.source or spec.source, split.split or spec.split
    if (source, name) == (spec.source, spec.split):
        raise DataError(
            f"{key}.eval names the same source and split as the training rows, so eval rows would "
            "be trained on. Fix: give eval another split or file, or leave both unset to hold rows out."
        )
    eval_rows = load_rows(spec, f"{key}.eval", source, name)
    chosen = sample(list(range(len(eval_rows))), split.limit, seed)
    return train, render(spec, eval_rows, chosen, describe(spec, source, name), f"{key}.eval")


def load_data(spec: DataSpec) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples from every source, in the order the sources are listed."""
    if spec.generate is not None:
        return load_generated(spec.generate)
    assert spec.sources is not None
    train: list[Example] = []
    evaluation: list[Example] = []
    for index, source in enumerate(spec.sources):
        part_train, part_eval = _split_source(
            source, f"data.sources[{index}]", spec.eval_fraction, spec.seed or 0
        )
        train += part_train
        evaluation += part_eval
    return train, evaluation
