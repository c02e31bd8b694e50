"""The tiny VLM's settings: config defaults, stage schedules, the training record that guards a
saved model's reuse, and the check that a trained model reads the image."""

from __future__ import annotations

import json

import pytest
import torch

from lmkit.errors import ConfigError
from lmkit.pruning.tiny_vlm_vision import StageOptimizer
from lmkit.pruning.vlm_config import StageSpec, TinyVLMConfig
from lmkit.pruning.vlm_recipe import (
    TRAINING_RECORD,
    check_trained_as,
    loss_curve,
    reads_image,
    training_settings,
)
from lmkit.recipes import load_recipe
from tests.helpers import TINY_VLM


def test_a_model_near_its_priors_is_flagged_as_not_reading_the_image():
    assert reads_image(0.838, 0.428)  # seed 0's model
    assert not reads_image(0.496, 0.426) and not reads_image(0.450, 0.428)  # stage 2 stalled
    assert reads_image(0.7, 0.5) and reads_image(0.6, 0.4)  # exactly the margin, despite float subtraction


def test_the_config_defaults_are_the_recipe_s_measured_settings():
    assert load_recipe("recipes/train_tiny_vlm.yaml").vlm == TinyVLMConfig()  # no stale default to trip on


def test_loss_curve_has_one_mean_per_tenth_whatever_the_step_count():
    for steps in (2, 10, 25, 605):
        curve = loss_curve([float(i) for i in range(steps)])
        assert curve["steps"] == steps and len(curve["mean_per_chunk"]) == min(steps, 10)
    assert loss_curve([1.0] * 20 + [3.0] * 80)["mean_per_chunk"][:3] == [1.0, 1.0, 3.0]


def test_stage_optimizer_warms_up_decays_and_clips():
    weight = torch.nn.Parameter(torch.zeros(3))
    stage = StageSpec(steps=6, batch_size=1, lr=0.1, warmup_steps=2, schedule="cosine", max_grad_norm=0.5)
    optimizer = StageOptimizer([weight], stage)
    lrs = []
    for _ in range(stage.steps):
        lrs.append(optimizer.optimizer.param_groups[0]["lr"])
        optimizer.step((weight * torch.tensor([30.0, 40.0, 0.0])).sum())  # gradient norm 50
        assert weight.grad.norm().item() == pytest.approx(0.5)  # clipped before the update
    assert lrs[:3] == pytest.approx([0.0, 0.05, 0.1])  # linear warm-up, then the peak
    assert lrs[3] > lrs[4] > lrs[5] > 0 and optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(0)
    held = StageOptimizer([weight], StageSpec(steps=4, batch_size=1, lr=0.1))
    held.step(weight.sum())
    assert held.optimizer.param_groups[0]["lr"] == 0.1  # constant, no warm-up


def test_a_warmup_as_long_as_the_stage_is_a_clear_error(tmp_path):
    overrides = [
        *TINY_VLM,
        f"output_dir={tmp_path}",
        "vlm.align_stage={steps: 2, batch_size: 2, lr: 1.0e-3, warmup_steps: 2}",
    ]
    with pytest.raises(ConfigError, match="warmup_steps 2 must be fewer than steps 2"):
        load_recipe("recipes/train_tiny_vlm.yaml", overrides)
    with pytest.raises(ConfigError, match="captions_per_step 2 leaves no questioned scene"):
        load_recipe("recipes/train_tiny_vlm.yaml", [*TINY_VLM, "vlm.captions_per_step=2"])


def test_a_saved_model_is_reused_only_by_the_settings_that_trained_it(tmp_path, capsys):
    config = load_recipe("recipes/train_tiny_vlm.yaml", TINY_VLM).vlm
    record = {"settings": training_settings(config, 0), "seconds": {"align": 1.0}}
    del record["settings"]["vlm"]["questions_per_scene"]  # as if saved before the key existed: its default
    (tmp_path / TRAINING_RECORD).write_text(json.dumps(record))
    same = config.model_copy(
        update={"eval_questions": 7, "lm": config.lm.model_copy(update={"device_map": "cpu"})}
    )
    assert check_trained_as(tmp_path, same, 0)["seconds"] == {"align": 1.0}  # eval size, placement: free
    full = config.model_copy(update={"lora": None})  # fine-tuned fully instead of a LoRA
    with pytest.raises(ConfigError, match=r"vlm\.lora\.r: saved 16, recipe None") as refused:
        check_trained_as(tmp_path, full, 0)
    assert "choose another output_dir" in str(refused.value)
    del record["settings"]["vlm"]["align_stopping"]  # saved before stage 2 could stop: it ran every step
    (tmp_path / TRAINING_RECORD).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"vlm\.align_stopping\.every: saved None, recipe 1"):
        check_trained_as(tmp_path, config, 0)
    assert check_trained_as(tmp_path, config.model_copy(update={"align_stopping": None}), 0)
    (tmp_path / TRAINING_RECORD).write_text(json.dumps({"seconds": {}}))
    with pytest.raises(ConfigError, match="cannot be read as this lmkit's tiny-VLM settings"):
        check_trained_as(tmp_path, config, 0)
    (tmp_path / TRAINING_RECORD).unlink()
    assert check_trained_as(tmp_path, config, 0) is None and "cannot check" in capsys.readouterr().out
