"""Stage 1 of the tiny VLM (lmkit.pruning.tiny_vlm): the CLIP-style tower learns the scenes alone,
without the LM. Each patch of the feature layer the LM reads names the shape, colour and side of the
object under it (or background); [CLS] names which (colour, shape) objects the scene holds. Cheap,
and it makes [CLS] attention look at objects. When anchoring to `words`, each patch also names its
column phase (column mod 3), which picks the word a patch is anchored to: a tower trained without it
keeps no trace of it (a probe read 0.36, chance 0.33), so no projector could place the words."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, get_scheduler

from lmkit.pruning.scenes import COLOURS, SHAPES, Scene, make_scene, side_of
from lmkit.pruning.vlm_config import StageSpec, TinyVLMConfig

OBJECTS = [(c, s) for c in COLOURS for s in SHAPES]  # what a scene can hold


def image_processor(config: TinyVLMConfig) -> CLIPImageProcessorPil:
    side = config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


class StageOptimizer:
    """AdamW for one training stage, with the stage's warm-up, lr schedule and gradient clipping."""

    def __init__(self, params: list[torch.nn.Parameter] | list[dict], stage: StageSpec) -> None:
        """`params`: parameters, or torch param groups (a group without "lr" gets the stage's lr)."""
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.params = [p for group in groups for p in group["params"]]
        self.max_grad_norm = stage.max_grad_norm
        # copies: torch writes the running lr into the group dicts it is given
        self.optimizer = torch.optim.AdamW([dict(group) for group in groups], lr=stage.lr)
        name = "cosine" if stage.schedule == "cosine" else "constant_with_warmup"
        self.scheduler = get_scheduler(name, self.optimizer, stage.warmup_steps, stage.steps)

    def step(self, loss: torch.Tensor) -> float:
        """One update from `loss`; returns its value."""
        self.optimizer.zero_grad()
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()


PATCH_FACTORS = {"shape": SHAPES, "colour": list(COLOURS), "side": ["left", "right"]}
PHASES = 3  # `anchor_target: words` cycles an object's colour, shape and side words along its columns


def column_phase(grid: int) -> torch.Tensor:
    """[grid^2]: each patch's column mod PHASES, row-major as the LM reads the patches."""
    return torch.arange(grid * grid) % grid % PHASES


def _vision_targets(
    scenes: list[Scene], with_phase: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-patch labels of each factor ({factor: [n, grid^2]}, 0 = background, else 1 + the value's
    index) and per-scene presence [n, classes]. Factored labels let every shape teach the shape head
    whatever its colour (a joint colour x shape class sees 1/24 of the objects); the side keeps where
    an object is readable from its own patches, which the LM (reading tokens) cannot easily recover.
    `with_phase` adds "phase": every patch's column phase (no background class)."""
    labels = {f: np.zeros((len(scenes), scenes[0].grid ** 2), dtype=np.int64) for f in PATCH_FACTORS}
    presence = np.zeros((len(scenes), len(OBJECTS)), dtype=np.float32)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            values = {"shape": obj.shape, "colour": obj.colour, "side": side_of(scene, obj)}
            for factor, names in PATCH_FACTORS.items():
                labels[factor][row, obj.patches.reshape(-1)] = 1 + names.index(values[factor])
            presence[row, OBJECTS.index((obj.colour, obj.shape))] = 1.0
    out = {f: torch.from_numpy(v) for f, v in labels.items()}
    if with_phase:
        out["phase"] = column_phase(scenes[0].grid).expand(len(scenes), -1)
    return out, torch.from_numpy(presence)


def _patch_loss(factor: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The phase is a plain 3-way label on every patch; the object factors are balanced."""
    if factor == "phase":
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    return _balanced_patch_loss(logits, labels)


def _balanced_patch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over object patches and over background patches, then the two halves
    averaged: ~85% of patches are background, which would otherwise dominate."""
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    is_object = labels.flatten() > 0
    halves = [losses[mask].mean() for mask in (is_object, ~is_object) if mask.any()]
    return torch.stack(halves).mean()


def pretrain_vision(config: TinyVLMConfig, seed: int) -> tuple[CLIPVisionModel, dict[str, float]]:
    """Stage 1: the tower alone, supervised per patch (at the LM's feature layer) and per scene
    ([CLS]). Returns the tower and its heads' accuracy on the object patches of 64 fresh scenes."""
    spec = config.vision
    torch.manual_seed(seed)
    tower = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
        )
    )
    classes = {f: 1 + len(names) for f, names in PATCH_FACTORS.items()}
    with_phase = config.anchor_stage is not None and config.anchor_target == "words"  # only it reads it
    if with_phase:
        classes["phase"] = PHASES
    heads = torch.nn.ModuleDict({f: torch.nn.Linear(spec.hidden_size, n) for f, n in classes.items()})
    scene_head = torch.nn.Linear(spec.hidden_size, len(OBJECTS))
    optimizer = StageOptimizer(
        [*tower.parameters(), *heads.parameters(), *scene_head.parameters()], config.vision_stage
    )
    processor, rng = image_processor(config), random.Random(f"vision:{seed}")

    def forward(scenes: list[Scene]):
        pixels = processor([s.image for s in scenes], return_tensors="pt").pixel_values
        out = tower(pixel_values=pixels, output_hidden_states=True)
        features = out.hidden_states[config.feature_layer][:, 1:]  # what LLaVA's "default" strategy reads
        return {f: head(features) for f, head in heads.items()}, scene_head(out.pooler_output)

    def draw(count: int) -> list[Scene]:
        return [make_scene(rng, config.image_size, config.patch_size) for _ in range(count)]

    tower.train()
    for _ in track(range(config.vision_stage.steps), description="tiny VLM: vision tower"):
        scenes = draw(config.vision_stage.batch_size)
        patch_labels, presence = _vision_targets(scenes, with_phase)
        patch_logits, scene_logits = forward(scenes)
        loss = sum(_patch_loss(f, patch_logits[f], labels) for f, labels in patch_labels.items())
        optimizer.step(loss + F.binary_cross_entropy_with_logits(scene_logits, presence))
    tower.eval()
    with torch.no_grad():
        scenes = draw(64)
        patch_labels, _ = _vision_targets(scenes, with_phase)
        patch_logits, _ = forward(scenes)
    probe, is_object = {}, patch_labels["shape"] > 0
    for factor, labels in patch_labels.items():
        hits = patch_logits[factor].argmax(-1)[is_object] == labels[is_object]
        probe[factor] = round(hits.float().mean().item(), 4)
    return tower, probe
