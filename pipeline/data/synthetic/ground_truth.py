"""Reading a generated world's ground truth back: the scene descriptions and question records
of a split, an image's instance map, the pixels one must look at to answer a question."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.synthetic.scenes import Scene
from pipeline.common.files import read_json


def _load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


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
