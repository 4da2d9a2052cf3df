"""Question tokenisation, the question vocabulary (with UNK) and the top-K answer vocabulary."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from pipeline.common.files import read_json, write_json

if TYPE_CHECKING:
    import torch

PAD = "<pad>"
UNK = "<unk>"

# Hyphens and slashes separate words ("left-most" -> "left most"); other punctuation is dropped,
# except "?" when it is kept as a token of its own (question_mark=True).
_SEPARATORS = re.compile(r"[-/]")
_DROP = re.compile(r"[^a-z0-9' ]")
_DROP_BUT_QUESTION_MARK = re.compile(r"[^a-z0-9'? ]")
QUESTION_MARK = "?"


def tokenize(question: str, question_mark: bool = True) -> list[str]:
    """Lowercase word tokens of a question, each "?" a token of its own:
    "What colour is the red-ish cube?" -> ["what", "colour", "is", "the", "red", "ish", "cube", "?"];
    with ``question_mark=False`` the "?" is dropped like other punctuation:
    -> ["what", "colour", "is", "the", "red", "ish", "cube"].

    "?" is kept by default because the papers' models see it: Kim et al. ("Visual explanations
    from Hadamard product in multimodal deep networks", Figs. 2-5) print a z-score for the "?" of
    every question, and the VQA_LSTM_CNN preprocessing behind Goyal et al.'s model splits on
    punctuation keeping the delimiters, "?" included (the config key ``data.question_mark``).
    Every "?" is one token ("why??" -> ["why", "?", "?"]), wherever it stands.

    Hyphens and slashes separate words; other punctuation is dropped. Apostrophes stay inside
    words ("what's") so that contractions remain one token. The synthetic world's ground-truth
    word indices are positions in this list (its questions end with their only "?", so the
    positions are the same either way).
    """
    text = _SEPARATORS.sub(" ", question.lower())
    if question_mark:
        text = _DROP_BUT_QUESTION_MARK.sub(" ", text).replace(QUESTION_MARK, f" {QUESTION_MARK} ")
    else:
        text = _DROP.sub(" ", text)
    return [t.strip("'") for t in text.split() if t.strip("'")]


def pad_token_ids(sequences: Sequence[Sequence[int]], width: int | None = None) -> "torch.Tensor":
    """Questions' token ids as one N x ``width`` LongTensor: row i is ``sequences[i]`` cut to
    ``width`` tokens, then padding (id 0, :attr:`QuestionVocab.pad_id`) to the end. ``width``
    None: the longest sequence's length, at least 1."""
    import torch  # here, so that tokenising and building vocabularies do not need torch

    if width is None:
        width = max(1, max(map(len, sequences), default=1))
    tokens = torch.zeros(len(sequences), int(width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        ids = list(ids)[:width]
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens


@dataclass
class QuestionVocab:
    """Token <-> id map. Id 0 is padding, id 1 is the unknown word."""

    tokens: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.tokens[:2] != [PAD, UNK]:
            raise ValueError(f"a question vocabulary starts with {PAD!r}, {UNK!r}")
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, questions: Iterable[Sequence[str]], min_count: int = 1) -> "QuestionVocab":
        """Vocabulary of tokens seen at least ``min_count`` times, most frequent first
        (ties alphabetical, so the same data always gives the same ids)."""
        counts = Counter(t for q in questions for t in q)
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        return cls([PAD, UNK, *kept], {t: counts[t] for t in kept})

    def encode(self, tokens: Sequence[str], max_length: int | None = None) -> list[int]:
        """Token ids, unknown words as UNK, truncated to ``max_length`` (no padding)."""
        ids = [self.index.get(t, self.unk_id) for t in tokens]
        return ids if max_length is None else ids[:max_length]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids if i != self.pad_id]

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "counts": self.counts}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "QuestionVocab":
        d = read_json(path)
        return cls(list(d["tokens"]), dict(d.get("counts", {})))


@dataclass
class AnswerVocab:
    """The K most frequent (normalised) answers; index = class id of the classifier."""

    answers: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(set(self.answers)) != len(self.answers):
            raise ValueError("answer vocabulary has duplicates")
        self.index = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    @classmethod
    def build(cls, answers: Iterable[str], top_k: int) -> "AnswerVocab":
        """Top-K answers by frequency (ties alphabetical). ``answers`` are already normalised;
        VQA practice counts each question's ``multiple_choice_answer``."""
        counts = Counter(answers)
        ranked = sorted(counts, key=lambda a: (-counts[a], a))[:top_k]
        return cls(ranked, {a: counts[a] for a in ranked})

    def top(self, k: int) -> "AnswerVocab":
        """The first ``k`` answers (a model with fewer output classes than the data vocabulary)."""
        kept = self.answers[:k]
        return AnswerVocab(kept, {a: self.counts.get(a, 0) for a in kept})

    def to_json(self) -> dict:
        return {"answers": self.answers, "counts": self.counts}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "AnswerVocab":
        d = read_json(path)
        return cls(list(d["answers"]), dict(d.get("counts", {})))
