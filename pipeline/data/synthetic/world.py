"""The world on disk: validated settings, per-image random streams, generating each split's
scenes and questions, writing them in the VQA v2 / COCO / VQA-HAT formats with the ground
truth, and the world's README (:func:`generate_world`)."""
from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from pipeline.data.synthetic.hat import _hat_map
from pipeline.data.synthetic.questions import (
    TEMPLATES,
    _human_answers,
    _Question,
    _select_questions,
    question_text,
)
from pipeline.data.synthetic.scenes import (
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    _object_margin,
    _random_scene,
    instance_map,
    render_scene,
)
from pipeline.data.vqa_format import ANSWER_TYPES, annotation_file, coco_image_path, question_file
from pipeline.common.files import write_json, write_text

# Image ids of the i-th split start at i * IMAGE_ID_STRIDE + 1 (train 1.., val 1_000_001..);
# question ids are image_id * QUESTION_ID_STRIDE + k, as in VQA v2.
IMAGE_ID_STRIDE = 1_000_000
QUESTION_ID_STRIDE = 1000
# Stream tags: independent random streams per purpose, so e.g. changing the HAT settings never
# changes the scenes or questions.
_HAT_STREAM = 1
_HAT_SELECTION_STREAM = 2


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
