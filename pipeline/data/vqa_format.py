"""Readers for the files real users bring: VQA question/annotation JSON, COCO image names and
VQA-HAT human attention maps (docs/formats.md). The synthetic world is written in the same
formats, so these readers serve both.

Every reader reports bad input through a :class:`~pipeline.common.errors.RecordPolicy`, naming the
file and the record; it never silently drops or repairs a record.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.common.errors import DataError, RecordPolicy

log = logging.getLogger(__name__)

# File names of the official releases, by VQA version ("{split}" is e.g. train2014).
QUESTION_FILES = {
    "v1": "OpenEnded_mscoco_{split}_questions.json",
    "v2": "v2_OpenEnded_mscoco_{split}_questions.json",
}
ANNOTATION_FILES = {
    "v1": "mscoco_{split}_annotations.json",
    "v2": "v2_mscoco_{split}_annotations.json",
}
ANSWER_TYPES = ("yes/no", "number", "other")
_HAT_NAME = re.compile(r"^(\d+)_(\d+)\.png$")


def question_file(root: Path, version: str, split: str) -> Path:
    if version not in QUESTION_FILES:
        raise ValueError(f"unknown VQA version {version!r}; expected one of {sorted(QUESTION_FILES)}")
    return Path(root) / QUESTION_FILES[version].format(split=split)


def annotation_file(root: Path, version: str, split: str) -> Path:
    if version not in ANNOTATION_FILES:
        raise ValueError(f"unknown VQA version {version!r}; expected one of {sorted(ANNOTATION_FILES)}")
    return Path(root) / ANNOTATION_FILES[version].format(split=split)


def coco_image_name(split: str, image_id: int) -> str:
    """COCO file name of an image: ``COCO_val2014_000000000042.jpg``."""
    return f"COCO_{split}_{int(image_id):012d}.jpg"


def coco_image_path(split: str, image_id: int) -> str:
    """Image path relative to the data root: ``val2014/COCO_val2014_000000000042.jpg``."""
    return f"{split}/{coco_image_name(split, image_id)}"


@dataclass
class QARecord:
    """One question joined with its annotation."""

    question_id: int
    image_id: int
    question: str
    image: str  # path relative to the data root
    question_type: str = ""
    answer_type: str = ""
    answers: list[str] = field(default_factory=list)  # the human answers as given (usually 10)
    multiple_choice_answer: str = ""


def read_json_file(path: Path) -> object:
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise DataError("file not found", path) from e
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}", path) from e
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e}", path) from e


def _int_field(rec: dict, key: str) -> int:
    value = rec.get(key)
    # bool is an int subclass; a true/false id is a data error, not id 1/0.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field {key!r} must be an integer, got {value!r}")
    return value


def _record_id(rec: object) -> object:
    return rec.get("question_id", "?") if isinstance(rec, dict) else "?"


def _parsed_records(path: Path, key: str, kind: str, policy: RecordPolicy,
                    parse: Callable[[dict], tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    """(question id, parsed record) for each entry of the ``key`` list of a VQA ``kind`` file
    that ``parse`` accepts; an entry that is not an object, or that ``parse`` rejects with a
    ValueError, is a bad ``kind`` record for ``policy`` (raised or skipped and counted)."""
    data = read_json_file(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"not a VQA {kind} file: expected an object with a '{key}' list", path)
    for i, rec in enumerate(data[key]):
        try:
            if not isinstance(rec, dict):
                raise ValueError(f"entry {i} is not an object")
            parsed = parse(rec)
        except ValueError as e:
            policy.bad(kind, _record_id(rec), str(e), path)
            continue
        yield parsed


def load_questions(path: Path, policy: RecordPolicy) -> list[dict]:
    """The ``questions`` list of a VQA question file: dicts with question_id, image_id, question."""
    seen: set[int] = set()

    def parse(rec: dict) -> tuple[int, dict]:
        qid, iid = _int_field(rec, "question_id"), _int_field(rec, "image_id")
        question = rec.get("question")
        if not isinstance(question, str):
            raise ValueError(f"field 'question' must be a string, got {question!r}")
        if qid in seen:
            raise ValueError("duplicate question_id")
        seen.add(qid)
        return qid, {"question_id": qid, "image_id": iid, "question": question}

    return [q for _, q in _parsed_records(path, "questions", "question", policy, parse)]


def load_annotations(path: Path, policy: RecordPolicy) -> dict[int, dict]:
    """Annotations by question id, each with answer_type, question_type, answers (list of str)
    and multiple_choice_answer."""
    out: dict[int, dict] = {}

    def parse(rec: dict) -> tuple[int, dict]:
        qid, iid = _int_field(rec, "question_id"), _int_field(rec, "image_id")
        answers = rec.get("answers")
        if not isinstance(answers, list) or not answers:
            raise ValueError("field 'answers' must be a non-empty list")
        texts = []
        for a in answers:
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise ValueError(f"malformed answer entry {a!r}")
            texts.append(a["answer"])
        answer_type = rec.get("answer_type", "")
        if answer_type and answer_type not in ANSWER_TYPES:
            raise ValueError(f"unknown answer_type {answer_type!r}")
        if qid in out:
            raise ValueError("duplicate question_id")
        return qid, {
            "image_id": iid,
            "question_type": str(rec.get("question_type", "")),
            "answer_type": answer_type,
            "answers": texts,
            "multiple_choice_answer": str(rec.get("multiple_choice_answer", "")),
        }

    for qid, annotation in _parsed_records(path, "annotations", "annotation", policy, parse):
        out[qid] = annotation
    return out


def load_split(root: Path, version: str, split: str, policy: RecordPolicy,
               with_annotations: bool = True) -> list[QARecord]:
    """Questions of one split joined with their annotations, sorted by question id.

    A question without an annotation (or whose annotation names another image) is a bad record.
    ``with_annotations=False`` reads a test split, which has no answers.
    """
    qpath = question_file(root, version, split)
    questions = load_questions(qpath, policy)
    annotations: dict[int, dict] = {}
    apath = annotation_file(root, version, split)
    if with_annotations:
        annotations = load_annotations(apath, policy)
    records = []
    for q in questions:
        qid = q["question_id"]
        rec = QARecord(qid, q["image_id"], q["question"], coco_image_path(split, q["image_id"]))
        if with_annotations:
            ann = annotations.get(qid)
            if ann is None:
                policy.bad("question", qid, f"no annotation in {apath.name}", qpath)
                continue
            if ann["image_id"] != q["image_id"]:
                policy.bad("question", qid,
                           f"annotation says image {ann['image_id']}, question says {q['image_id']}", apath)
                continue
            rec.question_type = ann["question_type"]
            rec.answer_type = ann["answer_type"]
            rec.answers = ann["answers"]
            rec.multiple_choice_answer = ann["multiple_choice_answer"]
        records.append(rec)
    records.sort(key=lambda r: r.question_id)
    return records


def check_image(path: Path) -> tuple[int, int]:
    """Decode the image once; returns (width, height). Raises DataError.

    Reading the header is not enough: a JPEG cut short keeps a valid header and structure and
    fails only when its pixels are decoded, which would stop feature extraction later. JPEGs are
    decoded at 1/8 scale (``draft``): the whole entropy-coded stream is still read, at a fraction
    of the cost of full-size pixels."""
    if not path.is_file():
        raise DataError("image file is missing", path)
    try:
        with Image.open(path) as im:
            size = im.size
            im.draft(im.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
            return size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"unreadable image: {e}", path) from e


def load_image(path: Path) -> Image.Image:
    """The image as RGB (COCO has some grayscale and CMYK files). Raises DataError."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise DataError("image file is missing", path) from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"unreadable image: {e}", path) from e


def hat_map_files(hat_dir: Path, policy: RecordPolicy) -> dict[int, list[Path]]:
    """VQA-HAT files by question id: ``{question_id}_{k}.png`` -> {question_id: [paths by k]}.

    A PNG whose name does not follow the pattern is a bad record (it would otherwise be ignored
    without anyone knowing)."""
    out: dict[int, list[tuple[int, Path]]] = {}
    for path in sorted(Path(hat_dir).iterdir()):
        if path.name.startswith("."):
            continue
        m = _HAT_NAME.match(path.name)
        if m is None:
            policy.bad("hat_map", path.name, "name is not {question_id}_{k}.png", path)
            continue
        out.setdefault(int(m.group(1)), []).append((int(m.group(2)), path))
    return {qid: [p for _, p in sorted(items)] for qid, items in sorted(out.items())}


def load_hat_map(path: Path) -> np.ndarray:
    """A human attention map as float32 in [0, 1], H x W at the file's own resolution.

    VQA-HAT maps are grayscale PNGs of any size; colour files are converted to luminance."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"), dtype=np.float32)
    except FileNotFoundError as e:
        raise DataError("HAT map file is missing", path) from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"unreadable HAT map: {e}", path) from e
    return arr / 255.0


def image_ids(records: Iterable[QARecord]) -> list[int]:
    return sorted({r.image_id for r in records})
