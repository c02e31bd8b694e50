"""Procedural scenes for the trained-VLM pruning benchmark: masks on the patch grid, questions."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmkit.pruning.scenes import COLOURS, COUNTS, ask, make_scene, patch_mask, target_patches


@pytest.mark.parametrize("seed", range(5))
def test_object_masks_line_up_with_the_patch_grid_and_the_pixels(seed):
    scene = make_scene(random.Random(seed), size=224, patch=14)
    pixels = np.asarray(scene.image)
    assert scene.grid == 16 and 2 <= len(scene.objects) <= 4
    for obj in scene.objects:
        assert obj.patches.shape == (16, 16) and obj.patches.any()
        assert (pixels[obj.mask] == COLOURS[obj.colour]).all()  # the mask is exactly the object's paint
        x, y = obj.center
        assert obj.patches[y // 14, x // 14]  # row = y, column = x: raster order, as the ViT reads
        for row, col in zip(*np.nonzero(obj.patches), strict=True):
            block = pixels[row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14]
            assert (block == COLOURS[obj.colour]).all(axis=-1).mean() >= 0.1
    others = [o.mask for o in scene.objects]
    assert sum(m.sum() for m in others) == np.logical_or.reduce(others).sum()  # no overlaps


def test_patch_mask_threshold_counts_covered_pixels():
    mask = np.zeros((28, 28), dtype=bool)
    mask[0:14, 0:2] = True  # 2/14 of patch (0, 0)
    assert patch_mask(mask, 14, 0.1).tolist() == [[True, False], [False, False]]
    assert not patch_mask(mask, 14, 0.2).any()


def test_questions_are_answerable_from_their_target_objects():
    rng = random.Random(0)
    kinds = set()
    for _ in range(200):
        scene = make_scene(rng, size=112, patch=14)
        question = ask(rng, scene)
        kinds.add(question.kind)
        targets = [scene.objects[i] for i in question.targets]
        if question.kind == "colour":
            assert [t.colour for t in targets] == [question.answer]
            assert [o.shape for o in scene.objects].count(targets[0].shape) == 1
        elif question.kind == "side":
            assert question.answer == ("left" if targets[0].center[0] < 56 else "right")
        elif question.kind == "count":
            assert question.answer == COUNTS[len(targets)] and len({t.shape for t in targets}) <= 1
        else:
            assert (question.answer == "yes") == bool(targets)
        assert target_patches(scene, question).shape == (64,)
        assert target_patches(scene, question).any() == bool(targets)
    assert kinds == {"colour", "side", "count", "exists"}
