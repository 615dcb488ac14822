"""`shapes`: procedural coloured shapes, rendered exactly at any resolution.

Each image is a pure function of (index, seed): its parameters come from a random generator
seeded with both, so the set is reproducible, unlimited and needs no storage. The shape is a
signed distance field (SDF) evaluated at the pixel centres, and its anti-aliased coverage is the
SDF ramp over one pixel: a 64x64 image shows the same shape with sharper edges than a 32x32 one,
never an upsampled blur. That is what token-count scaling (resolution x patch size) needs.

References: exact 2-D SDFs of boxes and polygons, Inigo Quilez,
https://iquilezles.org/articles/distfunctions2d/ ; coverage from the distance in pixels,
"Improved Alpha-Tested Magnification" (Green, SIGGRAPH 2007).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "ring",
    "cross",
    "diamond",
    "star",
    "hexagon",
    "horizontal_bars",
    "vertical_bars",
)
SHAPES_SEED = 0  # the data seed: fixed, so `shapes` is one data set whatever the run seed

# Rendered images are cached as uint8 while the whole cache would stay under this size; beyond it
# (large resolutions) rendering costs little next to a training step anyway.
_CACHE_BYTES = 512 * 2**20


# --------------------------------------------------------------------------------------------
# Signed distance functions in a unit frame: negative inside, every shape within radius 1.
# --------------------------------------------------------------------------------------------


def _box(x: np.ndarray, y: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    dx, dy = np.abs(x) - half_w, np.abs(y) - half_h
    outside = np.hypot(np.maximum(dx, 0.0), np.maximum(dy, 0.0))
    return outside + np.minimum(np.maximum(dx, dy), 0.0)


def _polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Exact SDF of a simple polygon: distance to the nearest edge, sign from a crossing count."""
    # All edges at once, on a leading axis: edge k runs from vertex k to vertex k-1.
    vx, vy = vertices[:, 0, None, None], vertices[:, 1, None, None]
    ex, ey = np.roll(vx, 1, axis=0) - vx, np.roll(vy, 1, axis=0) - vy
    wx, wy = x - vx, y - vy
    t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    dist2 = ((wx - ex * t) ** 2 + (wy - ey * t) ** 2).min(axis=0)
    # An edge crosses the ray from the point towards +x when all three hold or none does.
    up, down, left = y >= vy, y < vy + ey, ex * wy > ey * wx
    crossings = ((up & down & left) | ~(up | down | left)).sum(axis=0)
    return np.where(crossings % 2 == 1, -1.0, 1.0) * np.sqrt(dist2)


def _star_polygon(points: int, outer: float, inner: float) -> np.ndarray:
    angles = np.pi / 2 + np.pi * np.arange(2 * points) / points  # first point straight up
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _regular_polygon(sides: int, radius: float) -> np.ndarray:
    angles = np.pi / 2 + 2 * np.pi * np.arange(sides) / sides
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


_TRIANGLE = _regular_polygon(3, 0.95)
_HEXAGON = _regular_polygon(6, 0.9)
_STAR = _star_polygon(5, 0.95, 0.4)
_DIAMOND = np.array([[0.0, 0.95], [-0.55, 0.0], [0.0, -0.95], [0.55, 0.0]])  # tall rhombus
_BAR_OFFSETS = (-0.5, 0.0, 0.5)

_SDF: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda x, y: np.hypot(x, y) - 0.9,
    "square": lambda x, y: _box(x, y, 0.64, 0.64),
    "triangle": lambda x, y: _polygon(x, y, _TRIANGLE),
    "ring": lambda x, y: np.abs(np.hypot(x, y) - 0.68) - 0.22,
    "cross": lambda x, y: np.minimum(_box(x, y, 0.85, 0.24), _box(x, y, 0.24, 0.85)),
    "diamond": lambda x, y: _polygon(x, y, _DIAMOND),
    "star": lambda x, y: _polygon(x, y, _STAR),
    "hexagon": lambda x, y: _polygon(x, y, _HEXAGON),
    "horizontal_bars": lambda x, y: np.min([_box(x, y - o, 0.7, 0.15) for o in _BAR_OFFSETS], 0),
    "vertical_bars": lambda x, y: np.min([_box(x - o, y, 0.15, 0.7) for o in _BAR_OFFSETS], 0),
}

# Largest random rotation per class, in degrees. Orientation defines some classes (square vs
# diamond, horizontal vs vertical bars, plus vs x), so those only tilt a little; the shapes whose
# identity survives any rotation turn freely; circles and rings are symmetric.
_MAX_ROTATION = {
    "circle": 0.0,
    "square": 20.0,
    "triangle": 180.0,
    "ring": 0.0,
    "cross": 20.0,
    "diamond": 20.0,
    "star": 180.0,
    "hexagon": 180.0,
    "horizontal_bars": 20.0,
    "vertical_bars": 20.0,
}


# --------------------------------------------------------------------------------------------
# One image: parameters from (index, seed), coverage, colours.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeParams:
    label: int
    scale: float  # radius of the shape's bounding circle, in half image widths
    center: tuple[float, float]  # in [-1, 1]^2, y pointing up
    angle: float  # radians, counter-clockwise
    foreground: tuple[float, float, float]  # RGB in [0, 1]
    background: tuple[float, float, float]


def shape_label(index: int) -> int:
    """Classes take turns, so every class has the same number of images (give or take one)."""
    return index % len(SHAPE_CLASSES)


def sample_params(index: int, seed: int = SHAPES_SEED) -> ShapeParams:
    """The random parameters of image `index`: a pure function of (index, seed)."""
    rng = np.random.default_rng((seed, index))
    label = shape_label(index)
    scale = rng.uniform(0.45, 0.8)
    cx, cy = rng.uniform(scale - 1.0, 1.0 - scale, size=2)  # the whole shape stays in view
    max_angle = np.deg2rad(_MAX_ROTATION[SHAPE_CLASSES[label]])
    angle = rng.uniform(-max_angle, max_angle)
    foreground = rng.uniform(size=3)
    background = rng.uniform(size=3)
    # Redraw the background until it stands out from the shape (distance in RGB space).
    while np.linalg.norm(foreground - background) < 0.5:
        background = rng.uniform(size=3)
    return ShapeParams(
        label=label,
        scale=float(scale),
        center=(float(cx), float(cy)),
        angle=float(angle),
        foreground=tuple(foreground.tolist()),
        background=tuple(background.tolist()),
    )


def coverage(params: ShapeParams, size: int) -> np.ndarray:
    """(size, size) float64 in [0, 1]: the fraction of each pixel the shape covers."""
    grid = (np.arange(size) + 0.5) * (2.0 / size) - 1.0  # pixel centres in [-1, 1]
    dx = grid[None, :] - params.center[0]
    dy = -grid[:, None] - params.center[1]  # rows go down, y goes up
    cos, sin = np.cos(params.angle), np.sin(params.angle)
    # Rotate the pixel grid by -angle and scale it into the shape's unit frame.
    x = (cos * dx + sin * dy) / params.scale
    y = (cos * dy - sin * dx) / params.scale
    distance = params.scale * _SDF[SHAPE_CLASSES[params.label]](x, y)  # in half image widths
    # Fully covered one half pixel inside the edge, empty one half pixel outside, linear between.
    return np.clip(0.5 - distance * (size / 2.0), 0.0, 1.0)


def render(params: ShapeParams, size: int) -> np.ndarray:
    """(3, size, size) uint8: the shape over its background, quantised like a real image."""
    alpha = coverage(params, size)
    fg = np.asarray(params.foreground)[:, None, None]
    bg = np.asarray(params.background)[:, None, None]
    return np.rint((bg + (fg - bg) * alpha) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# The data set.
# --------------------------------------------------------------------------------------------


class ShapesDataset(Dataset):
    """`num_samples` shape images of `image_size` pixels; item i = (image in [-1, 1], label).

    Images render on first access (about 0.1 ms at 32x32) and are kept as uint8 while the cache
    fits in `_CACHE_BYTES`, so later epochs cost a copy. A cached or a fresh item is the same.
    """

    def __init__(self, num_samples: int, image_size: int, seed: int = SHAPES_SEED):
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        cache_bytes = num_samples * 3 * image_size * image_size
        self._cache: dict[int, np.ndarray] | None = {} if cache_bytes <= _CACHE_BYTES else None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"shapes index {index} out of range [0, {self.num_samples})")
        pixels = self._cache.get(index) if self._cache is not None else None
        if pixels is None:
            pixels = render(sample_params(index, self.seed), self.image_size)
            if self._cache is not None:
                self._cache[index] = pixels
        image = torch.from_numpy(pixels).float().div_(127.5).sub_(1.0)
        return image, shape_label(index)
