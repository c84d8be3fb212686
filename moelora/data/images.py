"""Images for the multimodal suite: scikit-learn's bundled handwritten digits and generated shape pictures.

Every image is a float tensor [3, IMAGE_SIZE, IMAGE_SIZE] in [0, 1]:

* digits: the 1,797 8x8 greyscale scans that scikit-learn ships (`load_digits`, no download), upsampled 2x
  (nearest) and repeated over the 3 channels. `digit_pools()` splits them once, by a fixed rule that does
  not depend on the run's seed, into a training pool and a held-out pool (every 5th image), so the
  held-out split of every digit task shows scans never seen in training.
* shapes: 1-4 coloured squares, crosses or triangles (5x5 pixels each) in distinct cells of a 3x3 grid on
  a black canvas, drawn from a `ShapeScene` description, so a scene is fully determined by its fields.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from moelora.errors import DataError

IMAGE_SIZE = 16  # 2x the digits' 8x8; room for a 3x3 grid of 5-pixel shapes
SHAPES = ("square", "cross", "triangle")
COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.3, 1.0),
          "yellow": (1.0, 1.0, 0.0), "white": (1.0, 1.0, 1.0)}
_CELL = 5  # pixels per grid cell; the grid starts at pixel 0 and leaves a 1-pixel border at the far side
_HELD_OUT_EVERY = 5  # digit scans i with i % 5 == 0 are held out for evaluation


@functools.lru_cache(maxsize=1)
def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the multimodal suite's digit images need scikit-learn (pip install scikit-learn)") from None
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    return images, [int(t) for t in data.target]


def digit_image(index: int) -> torch.Tensor:
    """Digit scan `index` as a [3, 16, 16] image."""
    images, _ = _digits()
    img = images[index].repeat_interleave(2, 0).repeat_interleave(2, 1)
    return img.unsqueeze(0).expand(3, -1, -1).contiguous()


def digit_label(index: int) -> int:
    return _digits()[1][index]


def digit_pools() -> dict[str, dict[int, list[int]]]:
    """{"train"|"eval": {digit: [scan indices]}}: a fixed split, held-out scans never in training."""
    _, labels = _digits()
    pools: dict[str, dict[int, list[int]]] = {"train": {d: [] for d in range(10)}, "eval": {d: [] for d in range(10)}}
    for i, d in enumerate(labels):
        pools["eval" if i % _HELD_OUT_EVERY == 0 else "train"][d].append(i)
    return pools


@dataclass(frozen=True)
class ShapeScene:
    """A picture: shapes[i] of colors[i] in grid cell cells[i] (0..8, row-major), shifted by `offset` pixels."""

    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    cells: tuple[int, ...]
    offset: tuple[int, int] = (0, 0)

    def __post_init__(self):
        if not (len(self.shapes) == len(self.colors) == len(self.cells)) or not self.shapes:
            raise DataError(f"ShapeScene needs as many shapes, colors and cells (at least one): {self}")
        if len(set(self.cells)) != len(self.cells) or not all(0 <= c < 9 for c in self.cells):
            raise DataError(f"ShapeScene cells must be distinct grid cells 0..8: {self.cells}")
        if not all(0 <= o <= IMAGE_SIZE - 3 * _CELL for o in self.offset):
            raise DataError(f"ShapeScene offset must be in 0..{IMAGE_SIZE - 3 * _CELL}: {self.offset}")


def _stencil(shape: str) -> torch.Tensor:
    m = torch.zeros(_CELL, _CELL)
    if shape == "square":
        m[1:4, 1:4] = 1
    elif shape == "cross":
        m[2, :] = 1
        m[:, 2] = 1
    elif shape == "triangle":
        m[1, 2] = 1
        m[2, 1:4] = 1
        m[3, 0:5] = 1
    else:
        raise DataError(f"unknown shape '{shape}'; known: {', '.join(SHAPES)}")
    return m


def render_scene(scene: ShapeScene) -> torch.Tensor:
    """The scene as a [3, 16, 16] image."""
    img = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    for shape, color, cell in zip(scene.shapes, scene.colors, scene.cells):
        if color not in COLORS:
            raise DataError(f"unknown colour '{color}'; known: {', '.join(COLORS)}")
        y = (cell // 3) * _CELL + scene.offset[0]
        x = (cell % 3) * _CELL + scene.offset[1]
        rgb = torch.tensor(COLORS[color]).view(3, 1, 1)
        img[:, y:y + _CELL, x:x + _CELL] = torch.maximum(img[:, y:y + _CELL, x:x + _CELL], _stencil(shape) * rgb)
    return img
