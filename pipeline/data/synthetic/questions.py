"""Questions about a scene: the templates, question text and important words, answers,
the candidate questions of a scene and their selection, simulated human answers."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from pipeline.data.synthetic.scenes import COLORS, SHAPE_PLURALS, SHAPES, SIZES, Scene, _relative_margin

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
