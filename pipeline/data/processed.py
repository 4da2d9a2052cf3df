"""The processed dataset that ``prepare`` writes and every later stage reads.

One place names the files, so writer and readers cannot drift apart:

    <processed_dir>/questions_{split}.json  question table (records: ids, image, tokens, ...)
    <processed_dir>/images_{split}.json     images of the split, relative to data.root
    <processed_dir>/hat_{split}.json        question id -> human attention map files
    <processed_dir>/question_vocab.json, answer_vocab.json, skipped.json, config.yaml

``config.yaml`` records how the questions were tokenised (``data.question_mark``), so that a model
trained on the tables encodes text questions the same way (:func:`question_mark`).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from pipeline.common.errors import DataError
from pipeline.data.vocab import AnswerVocab, QuestionVocab
from pipeline.common.files import read_json


def questions_file(processed_dir: Path, split_key: str) -> Path:
    return Path(processed_dir) / f"questions_{split_key}.json"


def images_file(processed_dir: Path, split_key: str) -> Path:
    return Path(processed_dir) / f"images_{split_key}.json"


def hat_file(processed_dir: Path, split_key: str) -> Path:
    return Path(processed_dir) / f"hat_{split_key}.json"


QUESTION_VOCAB = "question_vocab.json"
ANSWER_VOCAB = "answer_vocab.json"
SKIPPED = "skipped.json"
CONFIG = "config.yaml"  # the settings prepare ran with (seed, data)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DataError("processed data not found: run `python -m pipeline.prepare` (or "
                        "`dvc repro prepare`) with the same data= and paths.root settings", path)
    return path


def _read(path: Path) -> dict:
    return read_json(_existing(path))


def load_question_table(processed_dir: Path, split_key: str) -> list[dict]:
    """Records of ``questions_{split_key}.json``, sorted by question id."""
    return _read(questions_file(processed_dir, split_key))["records"]


def load_images(processed_dir: Path, split_key: str) -> list[dict]:
    """[{image_id, image}] of a split; ``image`` is relative to data.root."""
    return _read(images_file(processed_dir, split_key))["images"]


def load_hat_index(processed_dir: Path, split_key: str) -> dict[int, list[str]]:
    """question id -> human attention map files (relative to data.root)."""
    return {int(q): paths for q, paths in _read(hat_file(processed_dir, split_key)).items()}


def question_mark(processed_dir: Path) -> bool:
    """Whether prepare kept "?" as a token (``data.question_mark`` in its ``config.yaml``); False
    for processed data written before the setting existed, which were tokenised without "?"."""
    recorded = OmegaConf.load(_existing(Path(processed_dir) / CONFIG)).get("data", {})
    return bool(recorded.get("question_mark", False))


def load_vocabs(processed_dir: Path) -> tuple[QuestionVocab, AnswerVocab]:
    d = Path(processed_dir)
    for name in (QUESTION_VOCAB, ANSWER_VOCAB):
        _read(d / name)  # the same clear error for a missing vocabulary
    return QuestionVocab.load(d / QUESTION_VOCAB), AnswerVocab.load(d / ANSWER_VOCAB)
