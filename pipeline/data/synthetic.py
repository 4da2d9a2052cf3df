"""The synthetic VQA world: generated multi-object scenes in the real VQA v2 / COCO / VQA-HAT formats.

Each image shows 2..5 non-overlapping coloured shapes on a textured gray background. Questions
come from a few templates (existence, counting, attribute and relative-position questions) whose
answers depend on one or more specific objects, so a model has to look at the right object to
answer (beyond the answer priors). Because the world is generated, its ground truth is exact:

* which objects one must look at to answer a question (``object_indices``, and the pixels of
  those objects in the lossless instance maps),
* which question words matter (``word_indices``: the asked attribute and the words naming the
  object(s), positions in :func:`pipeline.data.vocab.tokenize`),
* same-answer question pairs about different objects of one image (``pairs``).

Human attention maps (VQA-HAT) are *simulated annotators*: blurred, jittered, noisy versions of a
question's ground-truth mask that sometimes miss an object or add a spurious blob.

Everything is deterministic from ``cfg.seed``: every image draws from its own
:class:`numpy.random.SeedSequence` keyed by (seed, split name, image index), so growing one split
never changes the scenes of another, and no file contains a timestamp (same seed, same bytes).
"""
from __future__ import annotations

import functools
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from pipeline.data.vqa_format import ANSWER_TYPES, annotation_file, coco_image_path, question_file
from pipeline.io import read_json, write_json, write_text

__all__ = [
    "SHAPES",
    "SHAPE_PLURALS",
    "COLORS",
    "SIZES",
    "TEMPLATES",
    "SceneObject",
    "Scene",
    "object_mask",
    "render_scene",
    "instance_map",
    "question_text",
    "answer_question",
    "generate_world",
    "load_ground_truth",
    "load_instance_map",
    "question_mask",
]

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

# template -> (answer_type, question_type). question_type follows the real VQA convention of
# naming a question by its opening words.
TEMPLATES = {
    "exists": ("yes/no", "is there a"),
    "count_color": ("number", "how many"),
    "count_shape": ("number", "how many"),
    "color_of_shape": ("other", "what color is the"),
    "shape_of_color": ("other", "what shape is the"),
    "color_of_size_shape": ("other", "what color is the"),
    "color_of_relative": ("other", "what color is the"),
}
# Question kinds per answer type; existence questions are split by answer so that yes and no
# can be balanced.
_KINDS_OF_TYPE = {
    "yes/no": ("yes", "no"),
    "number": ("count_color", "count_shape"),
    "other": ("color_of_shape", "shape_of_color", "color_of_size_shape", "color_of_relative"),
}
SIDES = ("left", "right")
NUM_HUMAN_ANSWERS = 10
# Image ids of the i-th split start at i * IMAGE_ID_STRIDE + 1 (train 1.., val 1_000_001..);
# question ids are image_id * QUESTION_ID_STRIDE + k, as in VQA v2.
IMAGE_ID_STRIDE = 1_000_000
QUESTION_ID_STRIDE = 1000
# Stream tags: independent random streams per purpose, so e.g. changing the HAT settings never
# changes the scenes or questions.
_HAT_STREAM = 1
_HAT_SELECTION_STREAM = 2
_PLACEMENT_ATTEMPTS = 200


# --------------------------------------------------------------------------------------------
# Scenes


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


# --------------------------------------------------------------------------------------------
# Questions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _template_words(template: str, slots: Mapping[str, str]) -> list[tuple[str, bool]]:
    """The question's words, each flagged True when it is a ground-truth important word (the
    asked attribute, or a word naming the object(s) one must look at)."""
    if template == "exists":
        return [("is", False), ("there", False), (_article(slots["color"]), False),
                (slots["color"], True), (slots["shape"], True)]
    if template == "count_color":
        return [("how", False), ("many", True), (slots["color"], True), ("objects", False),
                ("are", False), ("there", False)]
    if template == "count_shape":
        return [("how", False), ("many", True), (SHAPE_PLURALS[slots["shape"]], True),
                ("are", False), ("there", False)]
    if template == "color_of_shape":
        return [("what", False), ("color", True), ("is", False), ("the", False), (slots["shape"], True)]
    if template == "shape_of_color":
        return [("what", False), ("shape", True), ("is", False), ("the", False),
                (slots["color"], True), ("object", False)]
    if template == "color_of_size_shape":
        return [("what", False), ("color", True), ("is", False), ("the", False),
                (slots["size"], True), (slots["shape"], True)]
    if template == "color_of_relative":
        return [("what", False), ("color", True), ("is", False), ("the", False), ("object", False),
                (slots["side"], True), ("of", False), ("the", False), (slots["shape"], True)]
    raise ValueError(f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}")


def question_text(template: str, slots: Mapping[str, str]) -> tuple[str, list[int]]:
    """The question string of a template and its important-word positions (in ``tokenize``).
    The "?" is the last token when kept (``data.question_mark``), so the positions are the same
    either way, and it is never an important word."""
    words = _template_words(template, slots)
    return " ".join(w for w, _ in words) + "?", [i for i, (_, key) in enumerate(words) if key]


def _relative_target(scene: Scene, side: str, shape: str) -> int | None:
    """Index of the object nearest to the (unique) ``shape`` among those clearly ``side`` of it.

    None when the question would be ambiguous: the reference shape is not unique, no object is
    clearly on that side, an object sits near the dividing line (|dx| < margin), or the two
    nearest candidates are within a margin of the same distance.
    """
    refs = [o for o in scene.objects if o.shape == shape]
    if len(refs) != 1 or side not in SIDES:
        return None
    ref = refs[0]
    margin = _relative_margin(scene)
    sign = -1 if side == "left" else 1
    others = [o for o in scene.objects if o.index != ref.index]
    if any(abs(o.center[0] - ref.center[0]) < margin for o in others):
        return None
    candidates = sorted(
        (float(np.hypot(o.center[0] - ref.center[0], o.center[1] - ref.center[1])), o.index)
        for o in others
        if sign * (o.center[0] - ref.center[0]) >= margin
    )
    if not candidates or (len(candidates) > 1 and candidates[1][0] - candidates[0][0] < margin):
        return None
    return candidates[0][1]


def answer_question(scene: Scene, spec: Mapping[str, Any]) -> str:
    """Recompute the answer of a question from the scene description.

    ``spec`` holds ``template`` and ``slots`` (a ground-truth question record works as is).
    Raises ValueError when the question is ill-posed for the scene (e.g. "what color is the
    circle?" with two circles), which generated questions never are.
    """
    template, slots = spec["template"], spec["slots"]
    objs = scene.objects
    if template == "exists":
        return "yes" if any(o.color == slots["color"] and o.shape == slots["shape"] for o in objs) else "no"
    if template == "count_color":
        return str(sum(o.color == slots["color"] for o in objs))
    if template == "count_shape":
        return str(sum(o.shape == slots["shape"] for o in objs))
    if template in ("color_of_shape", "shape_of_color", "color_of_size_shape"):
        attribute = {"color_of_shape": ("shape",), "shape_of_color": ("color",),
                     "color_of_size_shape": ("size", "shape")}[template]
        matches = [o for o in objs if all(getattr(o, a) == slots[a] for a in attribute)]
        if len(matches) != 1:
            raise ValueError(f"{template} {dict(slots)}: {len(matches)} matching objects, need exactly 1")
        return matches[0].shape if template == "shape_of_color" else matches[0].color
    if template == "color_of_relative":
        target = _relative_target(scene, slots["side"], slots["shape"])
        if target is None:
            raise ValueError(f"{template} {dict(slots)}: no unambiguous target in image {scene.image_id}")
        return objs[target].color
    raise ValueError(f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}")


@dataclass
class _Question:
    """A generated question before ids are assigned."""

    template: str
    slots: dict
    answer: str
    object_indices: list[int]

    @property
    def text(self) -> str:
        return question_text(self.template, self.slots)[0]

    @property
    def answer_type(self) -> str:
        return TEMPLATES[self.template][0]


def _candidates(scene: Scene) -> dict[str, list[_Question]]:
    """Every well-posed question about a scene, grouped by kind ("yes", "no", template name),
    each with its answer and ground-truth objects derived from the objects it is built from."""
    objs = scene.objects
    by_shape: dict[str, list[int]] = {}
    by_color: dict[str, list[int]] = {}
    for o in objs:
        by_shape.setdefault(o.shape, []).append(o.index)
        by_color.setdefault(o.color, []).append(o.index)
    out: dict[str, list[_Question]] = {k: [] for kinds in _KINDS_OF_TYPE.values() for k in kinds}
    for color, shape in sorted({(o.color, o.shape) for o in objs}):
        idx = [o.index for o in objs if o.color == color and o.shape == shape]
        out["yes"].append(_Question("exists", {"color": color, "shape": shape}, "yes", idx))
    for shape, idx in sorted(by_shape.items()):
        # "no": a shape that is present, in a colour none of its instances has; the objects one
        # must inspect to say no are all instances of that shape.
        used = {objs[i].color for i in idx}
        for color in COLORS:
            if color not in used:
                out["no"].append(_Question("exists", {"color": color, "shape": shape}, "no", idx))
    for color, idx in sorted(by_color.items()):
        out["count_color"].append(_Question("count_color", {"color": color}, str(len(idx)), idx))
        if len(idx) == 1:
            shape = objs[idx[0]].shape
            out["shape_of_color"].append(_Question("shape_of_color", {"color": color}, shape, idx))
    for shape, idx in sorted(by_shape.items()):
        out["count_shape"].append(_Question("count_shape", {"shape": shape}, str(len(idx)), idx))
        if len(idx) == 1:
            out["color_of_shape"].append(_Question("color_of_shape", {"shape": shape}, objs[idx[0]].color, idx))
            for side in SIDES:
                target = _relative_target(scene, side, shape)
                if target is not None:
                    out["color_of_relative"].append(_Question(
                        "color_of_relative", {"side": side, "shape": shape},
                        objs[target].color, sorted([target, idx[0]])))
        else:
            # Size disambiguates a repeated shape only when that size occurs once for it.
            for size in SIZES:
                sized = [i for i in idx if objs[i].size == size]
                if len(sized) == 1:
                    out["color_of_size_shape"].append(_Question(
                        "color_of_size_shape", {"size": size, "shape": shape}, objs[sized[0]].color, sized))
    return out


def _pair_questions(scene: Scene) -> tuple[_Question, _Question]:
    """The deliberate pair: "what color is the {a}?" / "... the {b}?" for two unique shapes that
    share a colour (the scene was generated to contain them)."""
    counts = Counter(o.shape for o in scene.objects)
    unique = [o for o in scene.objects if counts[o.shape] == 1]
    for i, a in enumerate(unique):
        for b in unique[i + 1:]:
            if a.color == b.color:
                return tuple(  # type: ignore[return-value]
                    _Question("color_of_shape", {"shape": o.shape}, o.color, [o.index]) for o in (a, b)
                )
    raise RuntimeError(f"image {scene.image_id}: no two unique shapes share a colour")


def _pick(rng: np.random.Generator, items: list) -> Any:
    return items[int(rng.integers(len(items)))]


def _select_questions(
    rng: np.random.Generator, scene: Scene, count: int, pair: bool, answer_types: tuple[str, ...],
) -> tuple[list[_Question], tuple[int, int] | None]:
    """Choose ``count`` distinct questions of the given ``answer_types``, balancing them within
    the image (the least used type next, ties at random), yes/no answers within it, and count
    values among the counting questions. Returns the questions and the positions of the
    deliberate pair."""
    pool = _candidates(scene)
    chosen: list[_Question] = []
    pair_positions = None
    if pair:
        chosen.extend(_pair_questions(scene))
        pair_positions = (0, 1)
    seen = {q.text for q in chosen}
    for kind in pool:
        pool[kind] = [q for q in pool[kind] if q.text not in seen]
    used = Counter(q.answer_type for q in chosen)
    used_answers = Counter(q.answer for q in chosen if q.answer_type == "yes/no")
    while len(chosen) < count:
        available = [t for t in answer_types if any(pool[k] for k in _KINDS_OF_TYPE[t])]
        if not available:
            break
        fewest = min(used[t] for t in available)
        answer_type = _pick(rng, [t for t in available if used[t] == fewest])
        kinds = [k for k in _KINDS_OF_TYPE[answer_type] if pool[k]]
        if answer_type == "yes/no":
            fewest = min(used_answers[k] for k in kinds)
            kinds = [k for k in kinds if used_answers[k] == fewest]
        wanted = None
        if answer_type == "number":
            # Most colours and shapes occur once, so uniform sampling would make "1" the answer
            # to most counting questions; drawing the count first (uniformly among those the
            # scene offers) keeps the answer prior from solving them.
            wanted = _pick(rng, sorted({q.answer for k in kinds for q in pool[k]}))
            kinds = [k for k in kinds if any(q.answer == wanted for q in pool[k])]
        kind = _pick(rng, kinds)
        positions = [i for i, q in enumerate(pool[kind]) if wanted in (None, q.answer)]
        question = pool[kind].pop(_pick(rng, positions))
        chosen.append(question)
        used[answer_type] += 1
        if answer_type == "yes/no":
            used_answers[question.answer] += 1
    return chosen, pair_positions


def _human_answers(rng: np.random.Generator, question: _Question, max_objects: int, noise: float) -> list[dict]:
    """Ten simulated human answers: each independently replaced, with probability ``noise``, by
    a plausible wrong answer of the same type (the other yes/no, a count off by one, another
    colour or shape). Wrong answers are given with confidence "maybe"."""
    true = question.answer
    if question.answer_type == "yes/no":
        wrong = ["no" if true == "yes" else "yes"]
    elif question.answer_type == "number":
        wrong = [str(n) for n in (int(true) - 1, int(true) + 1) if 1 <= n <= max_objects]
    elif true in COLORS:
        wrong = [c for c in COLORS if c != true]
    else:
        wrong = [s for s in SHAPES if s != true]
    answers = []
    for k in range(NUM_HUMAN_ANSWERS):
        if wrong and rng.random() < noise:
            answer, confidence = _pick(rng, wrong), "maybe"
        else:
            answer, confidence = true, ("yes" if rng.random() < 0.9 else "maybe")
        answers.append({"answer": answer, "answer_confidence": confidence, "answer_id": k + 1})
    return answers


# --------------------------------------------------------------------------------------------
# Simulated VQA-HAT annotators


def _shift(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Translate a 2-D array by (dx, dy) pixels, filling with zeros (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


def _hat_map(
    rng: np.random.Generator, instances: np.ndarray, object_indices: list[int], hat: Mapping[str, Any]
) -> np.ndarray:
    """One simulated annotator's attention map (uint8, hat.size square).

    The question's ground-truth mask, minus (with probability ``miss_probability``) one needed
    object when several are needed, shifted by a random jitter, plus up to ``spurious_blobs``
    random blobs elsewhere; downsampled to the map size, plus pixel noise, Gaussian-blurred with
    a sigma drawn from ``blur_sigma`` (image pixels, scaled to the map), rescaled to 0..255.
    """
    image_size = instances.shape[0]
    kept = list(object_indices)
    if len(kept) > 1 and rng.random() < hat["miss_probability"]:
        kept.pop(int(rng.integers(len(kept))))
    # Lookup table from instance label to attention (label k + 1 is object k).
    table = np.zeros(256, dtype=np.float32)
    table[np.asarray(kept, dtype=np.int64) + 1] = 1.0
    jitter = int(hat["jitter"])
    attention = _shift(table[instances], *(int(v) for v in rng.integers(-jitter, jitter + 1, size=2)))
    coords = np.arange(image_size, dtype=np.float32)
    for _ in range(int(rng.integers(int(hat["spurious_blobs"]) + 1))):
        cx, cy = rng.uniform(0, image_size, size=2)
        radius = rng.uniform(SIZES["small"], SIZES["large"]) * image_size
        inside = (coords[None, :] - cx) ** 2 + (coords[:, None] - cy) ** 2 <= radius**2
        attention[inside] = np.maximum(attention[inside], rng.uniform(0.3, 0.8))
    size = int(hat["size"])
    scale = size / image_size
    small = np.asarray(Image.fromarray(attention).resize((size, size), Image.BOX), dtype=np.float64)
    sigma = rng.uniform(*hat["blur_sigma"]) * scale
    # Noise goes in *before* the blur: a person's deblurring strokes are smooth, so their
    # disagreement is spatially smooth too, not independent per pixel (which would make the
    # flat background rank at random and sink inter-annotator agreement far below VQA-HAT's).
    small += rng.normal(0.0, hat["noise"], size=small.shape)
    small = gaussian_filter(small, sigma)
    small -= small.min()
    peak = small.max()
    if peak > 0:
        small *= 255.0 / peak
    return np.rint(small).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# The world on disk


def _settings(cfg: Any) -> dict:
    """Plain, validated copy of the ``data.synthetic`` config node (or an equivalent dict)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    s = OmegaConf.to_container(cfg, resolve=True)
    if int(s["seed"]) < 0:
        raise ValueError(f"data.synthetic.seed must be >= 0, got {s['seed']}")
    if not 1 <= s["min_objects"] <= s["max_objects"]:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {s['min_objects']}, {s['max_objects']}")
    if not 1 <= s["questions_per_image"] < QUESTION_ID_STRIDE:
        raise ValueError(f"questions_per_image must be in 1..{QUESTION_ID_STRIDE - 1}")
    if s["pair_fraction"] > 0 and s["questions_per_image"] < 2:
        raise ValueError("a deliberate pair needs questions_per_image >= 2")
    s["answer_types"] = _answer_types(s["answer_types"], s["pair_fraction"])
    for split, n in s["num_images"].items():
        _hat_role(split)
        if not 0 <= n < IMAGE_ID_STRIDE:
            raise ValueError(f"num_images.{split} must be in 0..{IMAGE_ID_STRIDE - 1}, got {n}")
    return s


def _answer_types(asked: Any, pair_fraction: float) -> tuple[str, ...]:
    """The answer types the world asks, validated, in the canonical order of ``ANSWER_TYPES``:
    the world depends on which types are asked, not on the order they are listed in."""
    if isinstance(asked, str) or not asked:
        raise ValueError(f"data.synthetic.answer_types must be a non-empty list, a subset of "
                         f"{list(ANSWER_TYPES)}; got {asked!r}")
    unknown = sorted(set(map(str, asked)) - set(ANSWER_TYPES))
    if unknown or len(set(asked)) != len(asked):
        raise ValueError(f"data.synthetic.answer_types must list each of {list(ANSWER_TYPES)} at most "
                         f"once; got {list(asked)}" + (f" (unknown: {unknown})" if unknown else ""))
    if pair_fraction > 0 and "other" not in asked:
        raise ValueError("the deliberate pairs are \"what color is the {shape}?\" questions (answer "
                         "type other): keep `other` in data.synthetic.answer_types or set "
                         "data.synthetic.pair_fraction=0")
    return tuple(t for t in ANSWER_TYPES if t in asked)


def _hat_role(split: str) -> str:
    """The VQA-HAT role of a split, "train" or "val": which folder and sampling rule its maps follow."""
    for role in ("train", "val"):
        if split.startswith(role):
            return role
    raise ValueError(f"split {split!r}: names must start with 'train' or 'val' (e.g. train2014)")


def _image_rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (scene + questions, human answers) streams of one image."""
    scene_seq, answer_seq = np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]).spawn(2)
    return np.random.default_rng(scene_seq), np.random.default_rng(answer_seq)


@dataclass
class _SplitWorld:
    scenes: list[Scene]
    questions: list[list[_Question]]  # per image
    pairs: list[tuple[int, int] | None]  # per image, positions of the pair


def _generate_split(s: dict, split: str) -> _SplitWorld:
    """Scenes and questions of a split (descriptions only; nothing is rendered or written)."""
    offset = list(s["num_images"]).index(split) * IMAGE_ID_STRIDE
    world = _SplitWorld([], [], [])
    for index in range(s["num_images"][split]):
        rng, _ = _image_rngs(s["seed"], split, index)
        pair = bool(rng.random() < s["pair_fraction"])
        num_objects = int(rng.integers(s["min_objects"], s["max_objects"] + 1))
        if pair:
            num_objects = max(num_objects, 2)
        scene = _random_scene(rng, offset + index + 1, s["image_size"], num_objects, pair)
        questions, pair_positions = _select_questions(rng, scene, s["questions_per_image"], pair,
                                                      s["answer_types"])
        world.scenes.append(scene)
        world.questions.append(questions)
        world.pairs.append(pair_positions)
    return world


def _question_id(image_id: int, k: int) -> int:
    return image_id * QUESTION_ID_STRIDE + k


def _hat_question_ids(s: dict, split: str, world: _SplitWorld) -> set[int]:
    """Questions that get HAT maps: all of a val split; an exact ``train_fraction`` share of a
    train split, drawn from the split's own stream."""
    qids = [_question_id(sc.image_id, k) for sc, qs in zip(world.scenes, world.questions) for k in range(len(qs))]
    if _hat_role(split) == "val":
        return set(qids)
    n = round(s["hat"]["train_fraction"] * len(qids))
    rng = np.random.default_rng([s["seed"], _HAT_SELECTION_STREAM, zlib.crc32(split.encode())])
    return {qids[int(i)] for i in rng.choice(len(qids), size=n, replace=False)}


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG")


def _load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


_INFO = {
    "description": "Synthetic VQA world of vqa-explain, in the VQA v2 format.",
    "version": "2.0",
    "contributor": "vqa-explain (generated)",
}
_LICENSE = {"name": "MIT", "url": "https://opensource.org/licenses/MIT"}


def _write_split(s: dict, split: str, world: _SplitWorld, out_dir: Path, progress: bool) -> dict:
    """Write one split's images, instance maps, HAT maps, VQA JSON and ground truth."""
    (out_dir / split).mkdir()
    instance_dir = out_dir / "ground_truth" / f"{split}_instances"
    instance_dir.mkdir(parents=True)
    role = _hat_role(split)
    hat_dir = out_dir / f"vqahat_{role}"
    hat_dir.mkdir(exist_ok=True)
    hat_qids = _hat_question_ids(s, split, world)
    annotators = int(s["hat"]["annotators"][split])

    questions, annotations, gt_questions, pairs = [], [], [], []
    hat_maps = 0
    items = zip(world.scenes, world.questions, world.pairs)
    for index, (scene, qs, pair) in enumerate(
        tqdm(items, total=len(world.scenes), desc=f"synthetic {split}", disable=not progress)
    ):
        image = render_scene(scene)
        Image.fromarray(image).save(
            out_dir / coco_image_path(split, scene.image_id),
            format="JPEG",
            quality=int(s["jpeg_quality"]),
            # Full-resolution chroma: colour is the answer to many questions and objects are small.
            subsampling=0,
        )
        instances = instance_map(scene)
        _save_png(instance_dir / f"{scene.image_id}.png", instances)
        _, answer_rng = _image_rngs(s["seed"], split, index)
        for k, q in enumerate(qs):
            qid = _question_id(scene.image_id, k)
            text, word_indices = question_text(q.template, q.slots)
            questions.append({"image_id": scene.image_id, "question": text, "question_id": qid})
            annotations.append({
                "question_id": qid,
                "image_id": scene.image_id,
                "question_type": TEMPLATES[q.template][1],
                "answer_type": q.answer_type,
                "answers": _human_answers(answer_rng, q, s["max_objects"], s["answer_noise"]),
                "multiple_choice_answer": q.answer,
            })
            gt_questions.append({
                "question_id": qid,
                "image_id": scene.image_id,
                "template": q.template,
                "slots": dict(sorted(q.slots.items())),
                "answer": q.answer,
                "object_indices": sorted(q.object_indices),
                "word_indices": word_indices,
            })
            if qid in hat_qids:
                hat_rng = np.random.default_rng([s["seed"], _HAT_STREAM, qid])
                for a in range(1, annotators + 1):
                    _save_png(hat_dir / f"{qid}_{a}.png", _hat_map(hat_rng, instances, q.object_indices, s["hat"]))
                    hat_maps += 1
        if pair is not None:
            pairs.append([_question_id(scene.image_id, pair[0]), _question_id(scene.image_id, pair[1])])

    write_json(question_file(out_dir, "v2", split), {
        "info": _INFO,
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": split,
        "license": _LICENSE,
        "questions": questions,
    }, indent=None)
    write_json(annotation_file(out_dir, "v2", split), {
        "info": _INFO,
        "license": _LICENSE,
        "data_type": "mscoco",
        "data_subtype": split,
        "annotations": annotations,
    }, indent=None)
    write_json(out_dir / "ground_truth" / f"{split}.json", {
        "images": [sc.to_json() for sc in world.scenes],
        "questions": gt_questions,
        "pairs": pairs,
    }, indent=None)
    return {
        "images": len(world.scenes),
        "questions": len(questions),
        "answer_types": dict(sorted(Counter(a["answer_type"] for a in annotations).items())),
        "templates": dict(sorted(Counter(q["template"] for q in gt_questions).items())),
        "answers_yes_no": dict(sorted(Counter(
            a["multiple_choice_answer"] for a in annotations if a["answer_type"] == "yes/no").items())),
        "pairs": len(pairs),
        "hat_maps": hat_maps,
        "hat_questions": len(hat_qids),
    }


def _readme(s: dict, summary: dict) -> str:
    hat = s["hat"]
    size = s["image_size"]
    lines = [
        "# Synthetic VQA world",
        "",
        "Generated by `pipeline.data.synthetic.generate_world` (deterministic: same config, same bytes).",
        "The files imitate VQA v2, COCO and VQA-HAT so that the real-data loaders read them unchanged.",
        "",
        "## Scenes",
        "",
        f"- {size}x{size} RGB images (JPEG, quality {s['jpeg_quality']}, 4:4:4 chroma) with "
        f"{s['min_objects']}..{s['max_objects']} non-overlapping objects on a textured gray background "
        "(gray level + gradient + faint stripes + pixel noise; never an object colour).",
        f"- shapes: {', '.join(SHAPES)}; colours: {', '.join(COLORS)}; "
        f"sizes: {', '.join(f'{k} (radius {v * size:g} px)' for k, v in SIZES.items())}.",
        f"- objects keep a gap of at least {_object_margin(size)} px between their bounding discs, "
        "so masks never touch.",
        f"- seed {s['seed']}; every image draws from its own stream keyed by (seed, split, image index).",
        "",
        "## Files",
        "",
        "- `v2_OpenEnded_mscoco_{split}_questions.json`, `v2_mscoco_{split}_annotations.json`: VQA v2 format, "
        "10 answers per question.",
        "- `{split}/COCO_{split}_{image_id:012d}.jpg`: images; image ids start at "
        + ", ".join(f"{i * IMAGE_ID_STRIDE + 1} ({split})" for i, split in enumerate(s["num_images"]))
        + f"; question id = image id * {QUESTION_ID_STRIDE} + k.",
        "- `vqahat_val/{question_id}_{k}.png`, `vqahat_train/{question_id}_1.png`: simulated attention maps.",
        "- `ground_truth/{split}.json`: scenes (`images`), per-question `template`, `slots`, `answer`, "
        "`object_indices` (objects one must look at), `word_indices` (important words, positions in "
        "`pipeline.data.vocab.tokenize(question)`), and `pairs` (deliberate same-answer pairs).",
        "- `ground_truth/{split}_instances/{image_id}.png`: lossless instance map, 0 = background, "
        "k + 1 = object k (exactly the pixels drawn in its colour before JPEG compression).",
        "",
        "## Question templates",
        "",
        "| template | question | answer type | ground-truth objects | important words |",
        "|---|---|---|---|---|",
        "| exists | is there a {color} {shape}? | yes/no (balanced) | yes: the matching objects; "
        "no: every object of that shape | colour, shape |",
        "| count_color | how many {color} objects are there? | number | the counted objects | many, colour |",
        "| count_shape | how many {shape}s are there? | number | the counted objects | many, shape |",
        "| color_of_shape | what color is the {shape}? (shape unique) | other | the object | color, shape |",
        "| shape_of_color | what shape is the {color} object? (colour unique) | other | the object | shape, colour |",
        "| color_of_size_shape | what color is the {size} {shape}? (shape repeated, size disambiguates) | other "
        "| the object | color, size, shape |",
        "| color_of_relative | what color is the object {left,right} of the {shape}? | other "
        "| target and reference | color, left/right, shape |",
        "",
        f"Relative position: the target is the object nearest to the (unique) reference among those at least "
        f"{0.08 * size:g} px to its left/right; the question is only asked when no object is within that margin "
        "of the reference's x and the two nearest candidates differ in distance by at least the margin.",
        "",
        f"Deliberate pairs: in a {s['pair_fraction']:g} share of images two objects of different shapes, each "
        "unique in the scene, share a colour, and both \"what color is the {shape}?\" questions are asked "
        "(same answer, different objects); they count toward the questions of the image.",
        "",
        f"Human answers: each of the 10 is independently replaced, with probability {s['answer_noise']:g}, by a "
        "plausible wrong answer of the same type (wrong ones have confidence \"maybe\"); "
        "`multiple_choice_answer` is the true answer.",
        "",
        "## Simulated annotators (VQA-HAT maps)",
        "",
        "The attention maps are not human data. Each is one simulated annotator: the question's ground-truth "
        f"mask, with probability {hat['miss_probability']:g} missing one needed object when several are needed, "
        f"shifted by up to {hat['jitter']} px, with up to {hat['spurious_blobs']} random extra blob(s), "
        f"downsampled to {hat['size']}x{hat['size']}, plus pixel noise of std {hat['noise']:g}, then "
        f"Gaussian-blurred with sigma drawn from {list(hat['blur_sigma'])} image pixels (so disagreement "
        "between annotators is smooth, as a person's strokes are), rescaled to 0..255 "
        "(8-bit grayscale PNG). Every val question has "
        f"{', '.join(str(hat['annotators'][sp]) for sp in s['num_images'] if _hat_role(sp) == 'val')} "
        f"maps; a {hat['train_fraction']:g} share of train questions has one.",
        "",
        "## Counts",
        "",
        "| split | images | questions | yes/no | number | other | pairs | HAT maps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if s["answer_types"] != ANSWER_TYPES:  # said only when the world leaves some out
        at = lines.index("## Question templates") + 1
        lines[at:at] = [
            "", f"Asked answer types: {', '.join(s['answer_types'])} only (`data.synthetic.answer_types`); "
            "the templates of the others are not used."]
    for split, c in summary.items():
        types = c["answer_types"]
        lines.append(
            f"| {split} | {c['images']} | {c['questions']} | {types.get('yes/no', 0)} | {types.get('number', 0)} "
            f"| {types.get('other', 0)} | {c['pairs']} | {c['hat_maps']} |"
        )
    return "\n".join(lines) + "\n"


def generate_world(cfg: Any, out_dir: Path, progress: bool = True) -> dict:
    """Generate the synthetic world into ``out_dir`` (an existing empty directory).

    ``cfg`` is the ``data.synthetic`` config node (or a plain dict with the same keys); its
    ``num_images`` keys are the split names. Returns per-split counts: images, questions,
    answer types, templates, yes/no answers, pairs, HAT maps and questions with HAT maps.
    """
    s = _settings(cfg)
    out_dir = Path(out_dir)
    summary = {}
    for split in s["num_images"]:
        world = _generate_split(s, split)
        summary[split] = _write_split(s, split, world, out_dir, progress)
    write_text(out_dir / "README.md", _readme(s, summary))
    return summary


# --------------------------------------------------------------------------------------------
# Reading the ground truth back


def load_ground_truth(root: str | Path, split: str) -> dict:
    """Ground truth of a split: ``{"images": {image_id: Scene}, "questions": {question_id:
    record}, "pairs": [(qid_a, qid_b), ...]}``; a record has ``template``, ``slots``,
    ``answer``, ``object_indices``, ``word_indices`` (and ``question_id``, ``image_id``)."""
    d = read_json(Path(root) / "ground_truth" / f"{split}.json")
    return {
        "images": {int(sc["image_id"]): Scene.from_json(sc) for sc in d["images"]},
        "questions": {int(q["question_id"]): q for q in d["questions"]},
        "pairs": [(int(a), int(b)) for a, b in d["pairs"]],
    }


@functools.lru_cache(maxsize=8)
def _question_objects(gt_path: str, mtime_ns: int) -> dict[int, tuple[int, tuple[int, ...]]]:
    # Keyed by modification time too, so a regenerated world is re-read.
    d = read_json(gt_path)
    return {int(q["question_id"]): (int(q["image_id"]), tuple(q["object_indices"])) for q in d["questions"]}


def load_instance_map(root: str | Path, split: str, image_id: int) -> np.ndarray:
    """The saved instance map of an image (uint8 HxW: 0 = background, k + 1 = object k)."""
    return _load_png(Path(root) / "ground_truth" / f"{split}_instances" / f"{image_id}.png")


def question_mask(root: str | Path, split: str, question_id: int) -> np.ndarray:
    """Boolean HxW mask of the pixels one must look at to answer a question (the union of its
    ground-truth objects in the lossless instance map)."""
    gt_path = Path(root) / "ground_truth" / f"{split}.json"
    index = _question_objects(str(gt_path.resolve()), gt_path.stat().st_mtime_ns)
    if question_id not in index:
        raise KeyError(f"question {question_id} is not in {gt_path}")
    image_id, object_indices = index[question_id]
    instances = load_instance_map(root, split, image_id)
    return np.isin(instances, np.asarray(object_indices, dtype=np.int64) + 1)
