"""Procedural scenes with known object positions, for measuring visual-token pruning on a model
trained here (no trained vision-language weights can be downloaded on lmkit's machines).

A scene is a cluttered background (grey strokes and dots) with 2-4 objects of given shape, colour
and size. Each object keeps its pixel mask and its patch mask on the vision tower's grid: a patch
belongs to an object when at least `min_cover` of its pixels do. Questions need one object (its
colour, its side, whether it is there) or one shape (how many), and name which objects answer them,
so a pruned model's kept tokens can be checked against the patches that matter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 80, 220),
    "yellow": (235, 205, 35),
    "purple": (145, 60, 190),
    "orange": (240, 135, 30),
}
# Radius as a share of the image side; at 224 px / patch 14 a small object spans ~3.5 patches.
# Smaller (0.08 / 0.14) objects left the stage-1 tower unable to tell shapes apart
# (evals/results/tiny_vlm_training.md).
SIZES = {"small": 0.11, "large": 0.17}
COUNTS = ["zero", "one", "two", "three", "four"]


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    center: tuple[int, int]
    mask: np.ndarray  # [H, W] bool
    patches: np.ndarray  # [grid, grid] bool


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    grid: int


@dataclass
class Question:
    kind: str  # colour | side | count | exists (| caption: training only)
    text: str
    answer: str
    targets: list[int] = field(default_factory=list)  # objects whose patches answer it


def _draw(draw: ImageDraw.ImageDraw, shape: str, center: tuple[int, int], radius: int, fill) -> None:
    x, y = center
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=fill)
    else:  # cross
        arm = max(2, radius // 3)
        draw.rectangle((x - radius, y - arm, x + radius, y + arm), fill=fill)
        draw.rectangle((x - arm, y - radius, x + arm, y + radius), fill=fill)


def patch_mask(mask: np.ndarray, patch: int, min_cover: float) -> np.ndarray:
    """[grid, grid]: the patches at least `min_cover` covered by `mask` (raster order = token order)."""
    grid = mask.shape[0] // patch
    cover = mask[: grid * patch, : grid * patch].reshape(grid, patch, grid, patch).mean(axis=(1, 3))
    return cover >= min_cover


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    for _ in range(rng.randint(25, 45)):
        grey = rng.randint(90, 200)
        start = (rng.randrange(size), rng.randrange(size))
        end = (start[0] + rng.randint(-size // 4, size // 4), start[1] + rng.randint(-size // 4, size // 4))
        draw.line([start, end], fill=(grey, grey, grey), width=rng.randint(1, 2))
    for _ in range(rng.randint(20, 40)):
        grey, x, y, r = rng.randint(80, 210), rng.randrange(size), rng.randrange(size), rng.randint(1, 3)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(grey, grey, grey))


def make_scene(
    rng: random.Random, size: int = 224, patch: int = 14, objects: tuple[int, int] = (2, 4), min_cover=0.1
) -> Scene:
    """A scene of `objects` (min, max) non-overlapping objects, none straddling the vertical midline."""
    if size % patch:
        raise ValueError(f"image size {size} must be a multiple of the patch size {patch}")
    base = rng.randint(225, 245)
    image = Image.new("RGB", (size, size), (base, base, base))
    draw = ImageDraw.Draw(image)
    _clutter(draw, rng, size)
    placed: list[SceneObject] = []
    for _ in range(rng.randint(*objects)):
        for _attempt in range(50):
            size_name = rng.choice(list(SIZES))
            radius = round(SIZES[size_name] * size)
            center = (rng.randint(radius, size - radius - 1), rng.randint(radius, size - radius - 1))
            clear_of_midline = abs(center[0] - size / 2) > radius + 2
            apart = all(
                max(abs(center[0] - o.center[0]), abs(center[1] - o.center[1]))
                > radius + round(SIZES[o.size] * size) + 3
                for o in placed
            )
            if clear_of_midline and apart:
                break
        else:
            continue
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        canvas = Image.new("L", (size, size), 0)
        _draw(ImageDraw.Draw(canvas), shape, center, radius, 255)
        mask = np.asarray(canvas) > 127
        _draw(draw, shape, center, radius, COLOURS[colour])
        placed.append(SceneObject(shape, colour, size_name, center, mask, patch_mask(mask, patch, min_cover)))
    return Scene(image, placed, size // patch)


def side_of(scene: Scene, obj: SceneObject) -> str:
    """Left or right as the questions define it: the object's centre in that half of the image."""
    return "left" if obj.center[0] < scene.image.width / 2 else "right"


def describe(scene: Scene) -> Question:
    """The scene's objects from left to right, each as "size colour shape on the side": a caption
    whose every object word must be read from the image (stage 2's caption phase)."""
    ordered = sorted(range(len(scene.objects)), key=lambda i: scene.objects[i].center[0])
    text = ", ".join(
        f"{o.size} {o.colour} {o.shape} on the {side_of(scene, o)}"
        for o in (scene.objects[i] for i in ordered)
    )
    return Question("caption", "List the objects from left to right.", text or "none", ordered)


def asked_shape(question: Question) -> str:
    """The shape a question names (every question names exactly one)."""
    return next(shape for shape in SHAPES if shape in question.text)


def ask(rng: random.Random, scene: Scene) -> Question:
    """One question about the scene whose answer is a single word."""
    objects = scene.objects
    shapes = [o.shape for o in objects]
    kinds = ["count", "exists"]
    unique_shape = [i for i, o in enumerate(objects) if shapes.count(o.shape) == 1]
    pairs = [(o.colour, o.shape) for o in objects]
    unique_pair = [i for i, o in enumerate(objects) if pairs.count((o.colour, o.shape)) == 1]
    kinds += ["colour"] * bool(unique_shape) + ["side"] * bool(unique_pair)
    kind = rng.choice(kinds)
    if kind == "colour":
        i = rng.choice(unique_shape)
        return Question(kind, f"What colour is the {objects[i].shape}?", objects[i].colour, [i])
    if kind == "side":
        i = rng.choice(unique_pair)
        side = side_of(scene, objects[i])
        text = f"Is the {objects[i].colour} {objects[i].shape} on the left or the right?"
        return Question(kind, text, side, [i])
    if kind == "count":
        shape = rng.choice(SHAPES)
        targets = [i for i, s in enumerate(shapes) if s == shape]
        return Question(kind, f"How many {shape}s are there?", COUNTS[len(targets)], targets)
    if rng.random() < 0.5 and objects:
        i = rng.randrange(len(objects))
        return Question(kind, f"Is there a {objects[i].colour} {objects[i].shape}?", "yes", [i])
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
    colour, shape = rng.choice(absent)
    return Question(kind, f"Is there a {colour} {shape}?", "no", [])


def target_patches(scene: Scene, question: Question) -> np.ndarray:
    """[grid * grid] bool in token order: the patches of the objects that answer `question`."""
    union = np.zeros((scene.grid, scene.grid), dtype=bool)
    for i in question.targets:
        union |= scene.objects[i].patches
    return union.reshape(-1)
