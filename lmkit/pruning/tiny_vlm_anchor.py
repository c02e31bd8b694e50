"""Stage 1b of the tiny VLM (lmkit.pruning.tiny_vlm): the projector alone learns to place each
object patch near the LM's input embeddings of its colour, shape and side words: LLaVA's
projector-only alignment, with word targets instead of captions, so it needs no LM forward."""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track
from transformers import LlavaForConditionalGeneration as Llava
from transformers import LlavaProcessor

from lmkit.errors import ConfigError
from lmkit.pruning.scenes import COLOURS, SHAPES, Scene, make_scene, side_of
from lmkit.pruning.tiny_vlm_vision import StageOptimizer, column_phase
from lmkit.pruning.vlm_config import TinyVLMConfig


def fresh_scenes(rng: random.Random, count: int, config: TinyVLMConfig) -> list[Scene]:
    return [make_scene(rng, config.image_size, config.patch_size) for _ in range(count)]


def _word_vectors(model: Llava, tokenizer, words: list[str]) -> dict[str, torch.Tensor]:
    """The LM's input embedding of each word as it appears mid-sentence (mean over its tokens)."""
    table = model.get_input_embeddings().weight.detach()
    return {w: table[tokenizer(" " + w, add_special_tokens=False).input_ids].mean(0) for w in words}


def _anchor_targets(
    scenes: list[Scene], words: dict[str, torch.Tensor], form: Literal["blend", "words"] = "blend"
) -> torch.Tensor:
    """[n, grid^2, d]: per object patch, its object's colour, shape and side words (side as the
    questions define it: the object's centre in the left or right half); 'background' elsewhere.
    `blend`: every patch the mean of the three; `words`: one word per patch by its column (colour,
    shape, side for columns 0, 1, 2 mod 3), so along a row the colour sits just before the shape,
    as in text."""
    if form not in ("blend", "words"):
        raise ConfigError(f"vlm.anchor_target: {form!r} is not a target; use blend or words.")
    out = []
    for scene in scenes:
        target = words["background"].repeat(scene.grid * scene.grid, 1)
        phase = column_phase(scene.grid)
        for obj in scene.objects:
            mask = torch.from_numpy(obj.patches.reshape(-1))
            named = [words[obj.colour], words[obj.shape], words[side_of(scene, obj)]]
            if form == "blend":
                target[mask] = (named[0] + named[1] + named[2]) / 3
            else:
                for k, word in enumerate(named):
                    target[mask & (phase == k)] = word
        out.append(target)
    return torch.stack(out)


ANCHOR_WORDS = [*COLOURS, *SHAPES, "left", "right", "background"]


def _projected(config: TinyVLMConfig, model: Llava, processor: LlavaProcessor, scenes: list[Scene]):
    """The projector's output for each patch of `scenes` ([n, grid^2, d]), the tower frozen."""
    pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt").pixel_values
    with torch.no_grad():
        features = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    return model.model.multi_modal_projector(features[config.feature_layer][:, 1:])


def anchor_projector(
    config: TinyVLMConfig, model: Llava, processor: LlavaProcessor, seed: int
) -> list[float]:
    """Stage 1b (LLaVA's projector-only alignment, cheapened): the projector alone learns to map each
    object patch near the LM's embeddings of its colour, shape and side words, background patches
    near 'background'. No LM forward, so it costs little; stage 2 then starts from patches that
    already resemble the question words that ask about them. Returns the loss per step."""
    stage = config.anchor_stage
    if stage is None:
        return []
    words = _word_vectors(model, processor.tokenizer, ANCHOR_WORDS)
    projector = model.model.multi_modal_projector
    optimizer = StageOptimizer(list(projector.parameters()), stage)
    rng, losses = random.Random(f"anchor:{seed}"), []
    projector.train()
    for _ in track(range(stage.steps), description="tiny VLM: projector anchoring"):
        scenes = fresh_scenes(rng, stage.batch_size, config)
        targets = _anchor_targets(scenes, words, config.anchor_target)
        losses.append(optimizer.step(F.mse_loss(_projected(config, model, processor, scenes), targets)))
    return losses


def nearest_own_target(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[n, p] bool: whether each output vector is nearest (cosine) its own target among all the
    distinct targets in `targets` ([n, p, d] both)."""
    candidates, own = targets.flatten(0, 1).unique(dim=0, return_inverse=True)
    similarity = F.normalize(outputs.flatten(0, 1), dim=-1) @ F.normalize(candidates, dim=-1).T
    return (similarity.argmax(-1) == own).view(targets.shape[:2])


def anchor_hits(
    config: TinyVLMConfig, model: Llava, processor: LlavaProcessor, seed: int, scenes: int = 32
) -> dict[str, float]:
    """How well the anchoring landed: the share of single-object patches of fresh scenes whose
    projected vector is nearest its own target (`nearest_own_target`). A low loss can hide a
    projector that cannot tell the targets apart: with `words`, 0.35 before the tower learned the
    column phase. With `words`, also per phase (colour, shape, side). The candidates are the targets
    the drawn scenes hold, so `all` under `blend` and under `words` are not the same measure."""
    words = _word_vectors(model, processor.tokenizer, ANCHOR_WORDS)
    drawn = fresh_scenes(random.Random(f"anchor-check:{seed}"), scenes, config)
    with torch.no_grad():
        outputs = _projected(config, model, processor, drawn)
    hit = nearest_own_target(outputs, _anchor_targets(drawn, words, config.anchor_target))
    owners = np.zeros((len(drawn), drawn[0].grid ** 2), dtype=int)  # objects covering each patch
    for row, scene in enumerate(drawn):
        for obj in scene.objects:
            owners[row] += obj.patches.reshape(-1)
    single = torch.from_numpy(owners == 1)
    groups = {"all": single}
    if config.anchor_target == "words":
        phase = column_phase(drawn[0].grid).expand_as(single)
        groups |= {name: single & (phase == k) for k, name in enumerate(["colour", "shape", "side"])}
    return {name: round(hit[mask].float().mean().item(), 4) for name, mask in groups.items() if mask.any()}
