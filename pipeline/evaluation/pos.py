"""Part-of-speech tags of question tokens and the "most important word" of an explanation
(Goyal et al., "Towards Transparent AI Systems", section 4.2 and Fig. 3; docs/evaluation.md).

Tags are Penn Treebank tags. Two taggers give them offline:

* ``nltk``: NLTK's averaged perceptron tagger, when its model is installed
  (``python -m nltk.downloader averaged_perceptron_tagger_eng``; nothing is downloaded here);
* ``textblob``: TextBlob's bundled Pattern lexicon tagger (its lexicon ships inside the
  ``textblob`` package, so it always works offline).

``tagger: auto`` takes NLTK when its data is there and otherwise TextBlob, with a warning. The
tagger's name and version go into every table, because taggers disagree on some words (Pattern's
lexicon tags the shape "cross" VB and "left" VBN, for instance) and the histogram moves with them.

The tagger sees the question's token list (what the model saw), joined as one sentence so that
context informs each tag, and returns exactly one tag per token. The question-mark token "?"
(``data.question_mark``, :func:`pipeline.data.vocab.tokenize`) is tagged "." (the Penn Treebank
tag of sentence-final punctuation) whatever the tagger: Pattern's lexicon tags it so, and the tag
is fixed after tagging so that no tagger model (an NLTK model trained on other data, say) can
give it another. Its group is "punctuation".
"""
from __future__ import annotations

import importlib.metadata
import logging
from typing import Sequence

import numpy as np

from pipeline.common.errors import DataError
from pipeline.data.vocab import QUESTION_MARK

log = logging.getLogger(__name__)

NLTK_RESOURCE = "taggers/averaged_perceptron_tagger_eng/"
NLTK_INSTALL = "python -m nltk.downloader averaged_perceptron_tagger_eng"

# Goyal et al. group the Penn Treebank tags (section 4.2, Fig. 3); here each tag keeps its own bar
# and is labelled with its group (docs/evaluation.md, POS histogram).
_EXACT_GROUPS = {
    "WDT": "wh-words", "WP": "wh-words", "WP$": "wh-words", "WRB": "wh-words",
    "NN": "nouns", "NNS": "nouns", "NNP": "nouns", "NNPS": "nouns",
    "DT": "determiners", "PDT": "determiners",
    "IN": "prepositions",
    "CD": "numbers",
    "PRP": "pronouns", "PRP$": "pronouns",
    # Penn Treebank punctuation tags; of them our tokens only ever give "." (the "?" token).
    ".": "punctuation", ",": "punctuation", ":": "punctuation", "``": "punctuation",
    "''": "punctuation", "-LRB-": "punctuation", "-RRB-": "punctuation",
}
_PREFIX_GROUPS = (("VB", "verbs"), ("JJ", "adjectives"), ("RB", "adverbs"))
NOUN_TAGS = frozenset(t for t, g in _EXACT_GROUPS.items() if g == "nouns")
QUESTION_MARK_TAG = "."  # the Penn Treebank tag of "?", whatever a tagger says


def tag_group(tag: str) -> str:
    """The word class of a Penn Treebank tag (CC, EX, MD, UH, ... -> "other")."""
    if tag in _EXACT_GROUPS:
        return _EXACT_GROUPS[tag]
    for prefix, group in _PREFIX_GROUPS:
        if tag.startswith(prefix):
            return group
    return "other"


def is_noun(tag: str) -> bool:
    return tag in NOUN_TAGS


class Tagger:
    """Penn Treebank tags of token lists, one per token, cached per question (token tuple)."""

    def __init__(self, kind: str):
        if kind == "nltk":
            from nltk.tag.perceptron import PerceptronTagger

            self._tagger = PerceptronTagger(lang="eng")
            self.name = f"nltk {importlib.metadata.version('nltk')} averaged_perceptron_tagger_eng"
            self._tag = lambda tokens: [t for _, t in self._tagger.tag(list(tokens))]
        elif kind == "textblob":
            from textblob.en.taggers import PatternTagger

            self._tagger = PatternTagger()
            self.name = f"textblob {importlib.metadata.version('textblob')} PatternTagger"
            # tokenize=False: Pattern splits on spaces only, so each of our tokens (no spaces;
            # "?" is already a token of its own: pipeline.data.vocab.tokenize) stays one token.
            self._tag = lambda tokens: [t for _, t in self._tagger.tag(" ".join(tokens), tokenize=False)]
        else:
            raise ValueError(f"unknown tagger {kind!r}: use auto, nltk or textblob")
        self.kind = kind
        self._cache: dict[tuple[str, ...], tuple[str, ...]] = {}

    def tag(self, tokens: Sequence[str]) -> tuple[str, ...]:
        key = tuple(tokens)
        if key not in self._cache:
            tags = tuple(self._tag(key)) if key else ()
            if len(tags) != len(key):
                raise ValueError(f"{self.name} returned {len(tags)} tags for the {len(key)} tokens "
                                 f"{list(key)}")
            self._cache[key] = tuple(QUESTION_MARK_TAG if token == QUESTION_MARK else tag
                                     for token, tag in zip(key, tags))
        return self._cache[key]


def nltk_available() -> bool:
    import nltk

    try:
        nltk.data.find(NLTK_RESOURCE)
    except LookupError:
        return False
    return True


def make_tagger(choice: str = "auto") -> Tagger:
    """``auto`` | ``nltk`` | ``textblob``; ``nltk`` without its data is an error that says how
    to install it, ``auto`` then falls back to TextBlob with a warning."""
    choice = str(choice)
    if choice == "nltk":
        if not nltk_available():
            raise DataError(f"tagger=nltk needs NLTK's '{NLTK_RESOURCE}' data, which is not "
                               f"installed: run `{NLTK_INSTALL}` (or use tagger=textblob)")
        return Tagger("nltk")
    if choice == "auto":
        if nltk_available():
            return Tagger("nltk")
        tagger = Tagger("textblob")
        log.warning("NLTK's averaged perceptron tagger is not installed (`%s`); tagging with the "
                    "fallback %s", NLTK_INSTALL, tagger.name)
        return tagger
    if choice == "textblob":
        return Tagger("textblob")
    raise ValueError(f"unknown tagger {choice!r}: use auto, nltk or textblob")


# How each method's store arrays say which word matters (section 4.2: "the most important word").
# guided_backprop: per-token gradient norm (>= 0); hadamard: the token z-scores of Eq. 11;
# occlusion: p(a | question) - p(a | word dropped), signed, so the argmax is the word whose removal
# lowers the answer's probability most; integrated_gradients: sum over dimensions of |IG|, or
# |question_map| in stores written before that extra existed; random: the random baseline.
QUESTION_IMPORTANCE = {
    "guided_backprop": "question_map",
    "hadamard": "question_map",
    "occlusion": "question_map",
    "integrated_gradients": "extra/question_attr_abs",
    "random": "question_map",
}


def question_importance(method: str, arrays: dict) -> np.ndarray:
    """N x T word importance of ``method`` (higher = more important) from its store arrays."""
    if method not in QUESTION_IMPORTANCE:
        raise ValueError(f"no most-important-word convention for method {method!r}; "
                         f"known: {sorted(QUESTION_IMPORTANCE)}")
    key = QUESTION_IMPORTANCE[method]
    if key in arrays:
        return np.asarray(arrays[key], dtype=np.float64)
    if method == "integrated_gradients" and "question_map" in arrays:
        return np.abs(np.asarray(arrays["question_map"], dtype=np.float64))
    raise KeyError(f"{method} has no {key!r} array (a question map is needed)")


def most_important_word(importance: np.ndarray, length: int) -> int | None:
    """Position of the largest of the first ``length`` (real-token) scores; the first on ties
    (``np.argmax``); None when they are all equal (no word stands out) or not all finite."""
    scores = np.asarray(importance, dtype=np.float64)[:length]
    if length < 1 or not np.isfinite(scores).all() or (scores == scores[0]).all():
        return None
    return int(np.argmax(scores))


def top_words(importance: np.ndarray, length: int, k: int) -> list[int]:
    """Positions of the ``k`` largest of the first ``length`` scores, largest first, earlier
    positions first on ties (a stable sort)."""
    scores = np.asarray(importance, dtype=np.float64)[:length]
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
