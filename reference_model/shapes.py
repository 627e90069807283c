"""The reference model's world: one coloured shape in one quadrant on a plain background, 64x64.

Captions read "a red circle at the top left on a blue background". The same module renders training
images and reads generated ones back (background, shape colour, quadrant, shape), which is how the
model's prompt-following is measured.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle")
SHAPE_COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 220, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
BACKGROUNDS = {
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128), "pink": (240, 170, 200),
    "cyan": (80, 210, 220), "brown": (120, 80, 40), "blue": (40, 80, 220), "green": (40, 170, 60),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
PALETTE = {**SHAPE_COLORS, **BACKGROUNDS}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} at the {self.position} on a {self.background} background"


def all_scenes() -> list[Scene]:
    return [
        Scene(shape, color, position, background)
        for shape, color, position, background in itertools.product(SHAPES, SHAPE_COLORS, POSITIONS, BACKGROUNDS)
        if color != background
    ]


def split(held_out: int = 48, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """(train, held-out): the held-out combinations are never seen in training."""
    scenes = all_scenes()
    order = np.random.default_rng(seed).permutation(len(scenes))
    test = {int(i) for i in order[:held_out]}
    return [s for i, s in enumerate(scenes) if i not in test], [s for i, s in enumerate(scenes) if i in test]


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """uint8 (64, 64, 3). Size and placement jitter inside the quadrant."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    half = SIZE // 2
    size = int(rng.integers(16, 23))
    row, col = (0 if "top" in scene.position else 1), (0 if "left" in scene.position else 1)
    cx = col * half + half // 2 + int(rng.integers(-3, 4))
    cy = row * half + half // 2 + int(rng.integers(-3, 4))
    box = (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)
    fill = SHAPE_COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return np.asarray(image)


def _nearest(color: np.ndarray, names) -> str:
    return min(names, key=lambda name: float(np.sum((np.asarray(PALETTE[name]) - color) ** 2)))


def read(image: np.ndarray) -> dict[str, str | None]:
    """What a 64x64 uint8 image shows, by the same rules the renderer follows."""
    image = np.asarray(image, dtype=np.float64)
    border = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3),
                             image[:, :3].reshape(-1, 3), image[:, -3:].reshape(-1, 3)])
    bg_color = np.median(border, axis=0)
    background = _nearest(bg_color, BACKGROUNDS)
    mask = np.sqrt(((image - bg_color) ** 2).sum(-1)) > 70
    if mask.sum() < 25:
        return {"background": background, "color": None, "position": None, "shape": None}
    ys, xs = np.nonzero(mask)
    vertical = "top" if ys.mean() < SIZE / 2 else "bottom"
    horizontal = "left" if xs.mean() < SIZE / 2 else "right"
    color = _nearest(np.median(image[mask], axis=0), [c for c in SHAPE_COLORS if c != background])
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.68 else "triangle"
    return {"background": background, "color": color, "position": f"{vertical} {horizontal}", "shape": shape}


def accuracy(scenes: list[Scene], images: list[np.ndarray]) -> dict[str, float]:
    """Fraction of images whose background, colour, position and shape match their scene."""
    hits = {"background": 0, "color": 0, "position": 0, "shape": 0, "color+position": 0, "all": 0}
    for scene, image in zip(scenes, images):
        seen = read(image)
        ok = {key: seen[key] == getattr(scene, key) for key in ("background", "color", "position", "shape")}
        for key, value in ok.items():
            hits[key] += value
        hits["color+position"] += ok["color"] and ok["position"]
        hits["all"] += all(ok.values())
    return {key: value / max(len(scenes), 1) for key, value in hits.items()}
