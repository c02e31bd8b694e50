"""`vlm.align_stopping`: stage 2 of the tiny VLM stops on a held-out loss and keeps its best weights."""

from __future__ import annotations

import math

import pytest
import torch

from lmkit.loader import load_model
from lmkit.pruning.tiny_vlm import (
    HeldOutChats,
    _answer_loss,
    _trainable_groups,
    _wrap_lora,
    align,
    assemble,
)
from lmkit.pruning.tiny_vlm_vision import pretrain_vision
from lmkit.recipes import load_recipe
from tests.helpers import TINY_VLM


def tiny_model(*overrides: str, lora: str = "null"):
    config = load_recipe("recipes/train_tiny_vlm.yaml", [*TINY_VLM, f"vlm.lora={lora}", *overrides]).vlm
    loaded = load_model(config.lm)
    model, processor = assemble(config, pretrain_vision(config, 0)[0], loaded.model, loaded.tokenizer)
    return config, model, processor


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def worsen(model, batches) -> None:
    """Gradient ascent on the held-out chats' loss: weights surely worse than the measured ones."""
    for _ in range(5):
        model.zero_grad()
        sum(_answer_loss(model, batch) for batch in batches).backward()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter.add_(parameter.grad / (parameter.grad.norm() + 1e-12))


@pytest.mark.parametrize("lora", ["null", "{r: 4, alpha: 8, dropout: 0.0}"], ids=["full", "lora"])
def test_held_out_chats_measure_every_few_steps_and_restore_the_best_weights(lora):
    config, model, processor = tiny_model("vlm.align_stopping={scenes: 3, every: 2, patience: 1}", lora=lora)
    _trainable_groups(config, _wrap_lora(config, model))
    watch = HeldOutChats(config, processor, seed=0)
    assert len(watch.batches) == 2  # 3 scenes at align_stage's batch size 2
    watch.measure(model, 1, last=False)
    assert watch.tracker.losses == []  # not a measuring step
    watch.measure(model, 2, last=False)
    best = trainable(model)
    assert watch.tracker.best_step == 2 and set(watch.best) == set(best)
    worsen(model, watch.batches)
    watch.measure(model, 3, last=True)  # the last step is always measured
    assert [m["step"] for m in watch.tracker.losses] == [2, 3] and watch.tracker.should_stop
    record = watch.restore_best(model)
    assert record["best_step"] == 2 and record["losses"][1]["validation_loss"] > record["best_loss"]
    assert all(torch.equal(best[n], value) for n, value in trainable(model).items())


def test_align_stops_when_the_held_out_loss_stops_falling():
    """At a learning rate that wrecks the model, training stops after `patience` bad measurements
    and ends on the weights of the best one."""
    config, model, processor = tiny_model(
        "vlm.caption_stage=null",
        "vlm.align_stage={steps: 20, batch_size: 2, lr: 3.0, max_grad_norm: 1.0}",
        "vlm.align_stopping={scenes: 2, every: 2, patience: 2}",
    )
    model, losses, record = align(config, model, processor, seed=0)
    measured = [m["step"] for m in record["losses"]]
    assert all(math.isfinite(m["validation_loss"]) for m in record["losses"])
    assert measured == list(range(2, measured[-1] + 1, 2)) and measured[-1] < 20  # stopped early
    assert len(losses["answers"]) == measured[-1]  # no step after the stop
    assert record["bad"] == 2 and record["best_step"] == measured[-3]
    best = min(record["losses"], key=lambda m: m["validation_loss"])
    assert best["step"] == record["best_step"]
    check = HeldOutChats(config, processor, seed=0)  # the same held-out chats, scored again
    check.measure(model, 2, last=False)
    assert abs(check.tracker.best_loss - record["best_loss"]) < 1e-4  # the best weights were kept


def test_without_align_stopping_every_step_runs_and_nothing_is_held_out():
    config, model, processor = tiny_model("vlm.caption_stage=null", "vlm.align_stopping=null")
    _, losses, record = align(config, model, processor, seed=0)
    assert record is None and len(losses["answers"]) == config.align_stage.steps
