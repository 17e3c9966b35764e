"""The synthetic world edgevl-tiny is trained and evaluated on.

A scene is a few coloured shapes (distinct kinds, distinct colours) placed in the cells of a
3x3 grid, with random size and jitter, over a textured, noisy background. Everything is
derived from a seed, so a scene is reproducible from ``(split, index, seed)`` alone.

Splits are assigned by the scene's *layout* (which shape of which colour sits in which cell),
hashed: a layout lands in exactly one split, so no test layout is ever seen in training, only
its parts in other combinations.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (215, 45, 45),
    "green": (45, 170, 60),
    "blue": (45, 80, 225),
    "yellow": (230, 210, 45),
    "purple": (150, 60, 195),
    "orange": (240, 140, 30),
}
# (row, col) of the 3x3 grid -> words; "top left" is row 0, col 0.
POSITIONS = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
SPLITS = ("train", "val", "test")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
MAX_OBJECTS = 4
IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # coverage sampled 4x4 per pixel, so edges are anti-aliased like a camera's


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cell: tuple[int, int]   # (row, col) in the 3x3 grid
    cx: float               # centre, in units of the image side (0..1)
    cy: float
    radius: float           # in units of the image side
    rgb: tuple[int, int, int]  # the colour actually drawn (named colour plus jitter)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    objects: tuple[SceneObject, ...]
    texture_seed: int
    size: int = IMAGE_SIZE

    @property
    def layout_key(self) -> tuple:
        return layout_key(self.objects)

    def image(self) -> np.ndarray:
        """The scene as an RGB uint8 array of shape (size, size, 3)."""
        return render(self)

    def ordered_objects(self) -> list[SceneObject]:
        """Objects in reading order (row by row, left to right): the order captions use."""
        return sorted(self.objects, key=lambda o: o.cell)


def layout_key(objects) -> tuple:
    return tuple(sorted((o.cell, o.shape, o.color) for o in objects))


def split_of_layout(key: tuple) -> str:
    """5% of layouts are test, 5% validation, 90% train; decided by a hash, not by chance."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    bucket = int.from_bytes(digest[:4], "little") % 20
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def _draw_objects(rng: np.random.Generator) -> tuple[SceneObject, ...]:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    colors = rng.choice(len(COLORS), size=n, replace=False)
    cells = rng.choice(9, size=n, replace=False)
    names = list(COLORS)
    objects = []
    for s, c, cell in zip(shapes, colors, cells):
        row, col = divmod(int(cell), 3)
        jitter = rng.uniform(-0.035, 0.035, size=2)
        radius = float(rng.uniform(0.09, 0.13))
        base = np.array(COLORS[names[c]], dtype=np.int64)
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-14, 15, size=3), 0, 255))
        objects.append(SceneObject(
            shape=SHAPES[s], color=names[c], cell=(row, col),
            cx=(col + 0.5) / 3 + float(jitter[0]), cy=(row + 0.5) / 3 + float(jitter[1]),
            radius=radius, rgb=rgb))
    return tuple(objects)


def make_scene(split: str, index: int, seed: int = 0) -> Scene:
    """Scene number ``index`` of ``split``: random access, reproducible, layout-disjoint."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    attempt = 0
    while True:
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, attempt])
        objects = _draw_objects(rng)
        if split_of_layout(layout_key(objects)) == split:
            return Scene(split, index, objects, texture_seed=int(rng.integers(2**31)))
        attempt += 1


def _shape_mask(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    dx, dy, r = xs - obj.cx, ys - obj.cy, obj.radius
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if obj.shape == "triangle":  # apex up; base at +0.8r
        inside_base = dy <= 0.8 * r
        # the two slanted edges run from the apex (0, -r) to (+-r, 0.8r)
        slope = 1.8 * r / r
        return inside_base & (dy + r >= slope * np.abs(dx))
    if obj.shape == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {obj.shape!r}")


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """A muted base colour plus low-frequency gratings (separable, so cheap to draw)."""
    base = rng.uniform(70, 150) + rng.uniform(-15, 15, size=3)
    axis = (np.arange(n, dtype=np.float32) + 0.5) / n
    texture = np.zeros((n, n), dtype=np.float32)
    for _ in range(3):
        fx, fy = rng.uniform(-6, 6, size=2)
        amp, phase = rng.uniform(4, 12), rng.uniform(0, 2 * np.pi)
        # sin(a + b) = sin a cos b + cos a sin b: two outer products instead of n*n sines
        a, b = 2 * np.pi * fx * axis + phase, 2 * np.pi * fy * axis
        texture += amp * (np.outer(np.cos(b), np.sin(a)) + np.outer(np.sin(b), np.cos(a)))
    return base[None, None, :].astype(np.float32) + texture[:, :, None]


def _coverage(obj: SceneObject, n: int) -> tuple[slice, slice, np.ndarray]:
    """Anti-aliased coverage (0..1) of one object over its bounding box of the n x n image,
    sampled at _SUPERSAMPLE^2 points per pixel."""
    lo_x, hi_x = max(0, int((obj.cx - obj.radius) * n) - 1), min(n, int((obj.cx + obj.radius) * n) + 2)
    lo_y, hi_y = max(0, int((obj.cy - obj.radius) * n) - 1), min(n, int((obj.cy + obj.radius) * n) + 2)
    k = _SUPERSAMPLE
    xs = (np.arange(lo_x * k, hi_x * k, dtype=np.float32) + 0.5) / (n * k)
    ys = (np.arange(lo_y * k, hi_y * k, dtype=np.float32) + 0.5) / (n * k)
    mask = _shape_mask(obj, xs[None, :], ys[:, None]).astype(np.float32)
    alpha = mask.reshape(hi_y - lo_y, k, hi_x - lo_x, k).mean(axis=(1, 3))
    return slice(lo_y, hi_y), slice(lo_x, hi_x), alpha


def render(scene: Scene) -> np.ndarray:
    rng = np.random.default_rng(scene.texture_seed)
    n = scene.size
    canvas = _background(rng, n)
    for obj in scene.objects:
        rows, cols, alpha = _coverage(obj, n)
        a = alpha[:, :, None]
        canvas[rows, cols] = canvas[rows, cols] * (1 - a) + np.asarray(obj.rgb, np.float32) * a
    canvas += rng.normal(0.0, 7.0, size=canvas.shape).astype(np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


@dataclass
class SceneSet:
    """A list-like view of ``n`` scenes of one split, built lazily."""
    split: str
    n: int
    seed: int = 0
    offset: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Scene:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if i not in self._cache:
            self._cache[i] = make_scene(self.split, self.offset + i, self.seed)
        return self._cache[i]

    def __iter__(self):
        return (self[i] for i in range(self.n))
