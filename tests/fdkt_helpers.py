"""A tiny FDKT federation (tiny-llama everywhere): shared by the in-process and the Flower tests."""

from __future__ import annotations

from lmkit.fdkt.config import FDKTConfig

TINY = {"source": "tiny-llama"}


def review_client(domain: str, train: int = 12, test: int = 8) -> dict:
    generate = {"tasks": [f"reviews_{domain}"], "train_size": train, "eval_size": test}
    return {"name": domain, "domain": f"{domain} reviews", "data": {"generate": generate}}


def tiny_fdkt(**overrides) -> FDKTConfig:
    settings = {
        "clients": [review_client("restaurant"), review_client("travel")],
        "generator": TINY,
        "dp": {"epsilon": 4.0, "epochs": 1, "batch_size": 4},
        "synth": {"per_label": 3, "max_new_tokens": 12},
        "server": {"model": TINY, "max_tokens": 16},
        "server_step": {"per_cluster": 2},
        "augment_per_label": 3,
        "prompts_per_label": 2,
        "task": {
            "model": TINY,
            "num_layers": 1,
            "train": {"max_steps": 2, "batch_size": 4, "max_length": 32},
        },
        "canaries": 2,
    }
    return FDKTConfig.model_validate({**settings, **overrides})


# `recipes/fdkt.yaml` shrunk to tiny-llama everywhere (dotted overrides, as on the command line)
TINY_RECIPE_OVERRIDES = [
    "fdkt.generator.source=tiny-llama",
    "fdkt.server.model.source=tiny-llama",
    "fdkt.task.model.source=tiny-llama",
    "fdkt.task.num_layers=1",
    "fdkt.task.train.max_steps=2",
    "fdkt.synth.per_label=2",
    "fdkt.synth.max_new_tokens=8",
    "fdkt.server.max_tokens=8",
    "fdkt.prompts_per_label=1",
    "fdkt.dp.epochs=1",
    "fdkt.clients=[{name: travel, domain: travel reviews, data: {generate: {tasks: [reviews_travel], "
    "train_size: 12, eval_size: 8}}}, {name: restaurant, domain: restaurant reviews, data: {generate: "
    "{tasks: [reviews_restaurant], train_size: 12, eval_size: 8}}}]",
]
