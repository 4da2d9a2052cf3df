"""Scenes of the synthetic world: the shapes, colours and sizes, scene descriptions
(:class:`SceneObject`, :class:`Scene`), rendering and instance maps, random placement."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SHAPE_PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
# Saturated, well-separated colours. The background is gray in [BACKGROUND_RANGE], so no
# background pixel can take an object colour (white is kept well above the brightest gray).
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
    "cyan": (30, 220, 230),
    "white": (250, 250, 250),
}
# Object radius as a fraction of the image side: 6.4 / 9.6 px at 64x64, 12.8 / 19.2 px at 128x128.
SIZES = {"small": 0.10, "large": 0.15}
BACKGROUND_RANGE = (50, 190)
_PLACEMENT_ATTEMPTS = 200


@dataclass
class SceneObject:
    """One shape in a scene. ``center`` is (x, y) in pixel indices; ``radius`` in pixels bounds
    the shape (every drawn pixel lies within ``radius`` of the centre)."""

    index: int
    shape: str
    color: str
    size: str
    center: tuple[int, int]
    radius: float

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "center": [int(self.center[0]), int(self.center[1])],
            "radius": float(self.radius),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SceneObject":
        return cls(
            index=int(d["index"]),
            shape=str(d["shape"]),
            color=str(d["color"]),
            size=str(d["size"]),
            center=(int(d["center"][0]), int(d["center"][1])),
            radius=float(d["radius"]),
        )


@dataclass
class Scene:
    """An image as a description: its objects and the parameters of its background texture."""

    image_id: int
    width: int
    height: int
    objects: list[SceneObject]
    background: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "image_id": self.image_id,
            "width": self.width,
            "height": self.height,
            "background": dict(self.background),
            "objects": [o.to_json() for o in self.objects],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Scene":
        return cls(
            image_id=int(d["image_id"]),
            width=int(d["width"]),
            height=int(d["height"]),
            objects=[SceneObject.from_json(o) for o in d["objects"]],
            background=dict(d["background"]),
        )


def object_mask(obj: SceneObject, height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of the pixels an object covers (its shape tested on the pixel grid)."""
    mask = np.zeros((height, width), dtype=bool)
    # Only the object's bounding box can be covered: test the shape there, not on the whole grid.
    reach = int(np.ceil(obj.radius))
    x0, x1 = max(obj.center[0] - reach, 0), min(obj.center[0] + reach + 1, width)
    y0, y1 = max(obj.center[1] - reach, 0), min(obj.center[1] + reach + 1, height)
    if x0 < x1 and y0 < y1:
        mask[y0:y1, x0:x1] = _shape_mask(obj.shape, obj.radius, np.arange(x0, x1) - obj.center[0],
                                         np.arange(y0, y1) - obj.center[1])
    return mask


def _shape_mask(shape: str, r: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Shape test on offsets from the centre (``dx`` columns, ``dy`` rows); every covered
    offset lies within distance ``r``."""
    dx = dx.astype(np.float64)[None, :]
    dy = dy.astype(np.float64)[:, None]
    if shape == "circle":
        return dx * dx + dy * dy <= (0.92 * r) ** 2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.7 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":
        # Upward equilateral triangle with circumradius r (centroid at the centre): apex at
        # (0, -r), base at dy = r/2; the sides have slope |dx| / (dy + r) = 1 / sqrt(3).
        return (dy <= 0.5 * r) & (np.abs(dx) <= (dy + r) / np.sqrt(3.0))
    if shape == "cross":
        arm, half_width = 0.92 * r, 0.3 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= half_width) & (ay <= arm)) | ((ay <= half_width) & (ax <= arm))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _render_background(scene: Scene) -> np.ndarray:
    """Gray texture: level + linear gradient + faint stripes + pixel noise, clipped to gray."""
    bg = scene.background
    h, w = scene.height, scene.width
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    gx, gy = bg["gradient"]
    angle = bg["stripe_angle"]
    phase = 2.0 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / bg["stripe_period"]
    noise = np.random.default_rng(bg["seed"]).normal(0.0, bg["noise"], size=(h, w))
    gray = (
        bg["level"]
        + gx * (xs / w - 0.5)
        + gy * (ys / h - 0.5)
        + bg["stripe_amplitude"] * np.sin(phase)
        + noise
    )
    gray = np.clip(np.rint(gray), *BACKGROUND_RANGE).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def render_scene(scene: Scene) -> np.ndarray:
    """RGB uint8 HxWx3 image of a scene: the background, then every object in its flat colour."""
    img = _render_background(scene)
    for obj in scene.objects:
        img[object_mask(obj, scene.height, scene.width)] = COLORS[obj.color]
    return img


def instance_map(scene: Scene) -> np.ndarray:
    """uint8 HxW map: 0 = background, k + 1 = the pixels object k was drawn on."""
    inst = np.zeros((scene.height, scene.width), dtype=np.uint8)
    for obj in scene.objects:
        inst[object_mask(obj, scene.height, scene.width)] = obj.index + 1
    return inst


def _object_margin(image_size: int) -> int:
    """Minimum gap in pixels between the bounding discs of two objects (masks never touch)."""
    return max(2, round(0.04 * image_size))


def _relative_margin(scene: Scene) -> float:
    """How far (in x) an object must be from the reference to count as left or right of it."""
    return 0.08 * scene.width


def _random_background(rng: np.random.Generator, image_size: int) -> dict:
    return {
        "seed": int(rng.integers(2**31)),
        "level": round(float(rng.uniform(95, 145)), 2),
        "gradient": [round(float(v), 2) for v in rng.uniform(-30, 30, size=2)],
        "stripe_angle": round(float(rng.uniform(0, np.pi)), 4),
        "stripe_period": round(float(rng.uniform(0.1, 0.3) * image_size), 2),
        "stripe_amplitude": round(float(rng.uniform(3, 10)), 2),
        "noise": round(float(rng.uniform(3, 8)), 2),
    }


def _place(rng: np.random.Generator, radii: list[float], image_size: int) -> list[tuple[int, int]] | None:
    """Random non-overlapping integer centres for discs of the given radii (largest first), or
    None when random sequential placement fails."""
    margin = _object_margin(image_size)
    centers: list[tuple[int, int]] = []
    placed_radii: list[float] = []
    for r in radii:
        lo, hi = int(np.ceil(r)) + 1, image_size - 2 - int(np.ceil(r))
        for _ in range(_PLACEMENT_ATTEMPTS):
            c = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
            if all(np.hypot(c[0] - p[0], c[1] - p[1]) >= r + q + margin for p, q in zip(centers, placed_radii)):
                centers.append(c)
                placed_radii.append(r)
                break
        else:
            return None
    return centers


def _random_scene(
    rng: np.random.Generator, image_id: int, image_size: int, num_objects: int, pair: bool
) -> Scene:
    """Draw object attributes and positions. A ``pair`` scene has two objects of different
    shapes, each unique in the scene, that share a colour (the deliberate same-answer pair)."""
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=num_objects)]
    color_names, size_names = list(COLORS), list(SIZES)
    colors = [color_names[i] for i in rng.integers(len(color_names), size=num_objects)]
    sizes = [size_names[i] for i in rng.integers(len(size_names), size=num_objects)]
    if pair:
        a, b = (SHAPES[i] for i in rng.choice(len(SHAPES), size=2, replace=False))
        others = [s for s in SHAPES if s not in (a, b)]
        shapes = [a, b] + [others[i] for i in rng.integers(len(others), size=num_objects - 2)]
        colors[1] = colors[0]
    # Random sequential placement, largest first; if a crowded scene does not fit, shrink one
    # large object at a time (deterministically, from the same stream) until it does.
    while True:
        radii = [round(SIZES[s] * image_size, 3) for s in sizes]
        order = sorted(range(num_objects), key=lambda i: -radii[i])
        centers = None
        for _ in range(10):
            centers = _place(rng, [radii[i] for i in order], image_size)
            if centers is not None:
                break
        if centers is not None:
            break
        if "large" not in sizes:
            raise RuntimeError(f"cannot place {num_objects} objects in a {image_size}px image")
        sizes[sizes.index("large")] = "small"
    center_of = dict(zip(order, centers))
    # Shuffle object indices so that an object's index says nothing about its role.
    perm = rng.permutation(num_objects)
    objects = [
        SceneObject(
            index=k,
            shape=shapes[i],
            color=colors[i],
            size=sizes[i],
            center=center_of[i],
            radius=radii[i],
        )
        for k, i in enumerate(int(j) for j in perm)
    ]
    return Scene(image_id, image_size, image_size, objects, _random_background(rng, image_size))
