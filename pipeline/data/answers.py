"""Official VQA answer normalisation and accuracy.

Reimplements the behaviour of the VQA challenge evaluation script (``vqaEval.py`` of the VQA
API) so that numbers computed here match the leaderboard definition:

    Acc(ans) = 1/10 * sum over the 10 leave-one-annotator-out subsets of min(#matches / 3, 1)

(Antol et al. 2015, section 3; the "10-choose-9" average). Quirks of the official script are
kept on purpose and marked below: matching published numbers matters more than tidiness.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!"]
# Official pattern, typo included: "(?!<=\d)" is a negative *lookahead* for the literal "<=d",
# so in practice it strips every period not followed by a digit ("2.5" keeps its period).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official script calls periodStrip.sub("", text, re.UNICODE), which passes re.UNICODE
# (= 32) as the *count* argument: at most 32 periods are removed.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Punctuation step of the official normalisation (``processPunctuation``)."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Number-word, article and contraction step of the official normalisation."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Full official normalisation of one answer string ("Two dogs." -> "2 dogs")."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one predicted answer against the human answers (usually 10).

    Follows ``vqaEval.evaluate``: when the humans disagree, their answers get the punctuation
    step and the prediction gets the full normalisation; when they all agree, only whitespace
    is stripped from the prediction (the official script's behaviour). Then for each human
    answer left out in turn, the score is min(#matching remaining answers / 3, 1), averaged.
    """
    if len(human_answers) == 0:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [process_punctuation(h) for h in humans]
        pred = process_digit_article(process_punctuation(pred))
    total = 0.0
    for left_out in range(len(humans)):
        matches = sum(1 for j, h in enumerate(humans) if j != left_out and h == pred)
        total += min(1.0, matches / 3.0)
    return total / len(humans)


def answer_scores(human_answers: Sequence[str]) -> dict[str, float]:
    """Soft training targets: the official accuracy every distinct answer would earn.

    For an answer given by c of n humans, the leave-one-out average is
    (c * min((c-1)/3, 1) + (n-c) * min(c/3, 1)) / n, the same quantity that
    :func:`vqa_accuracy` reports, so the loss optimises the metric the papers report.
    Answers are normalised first so that "two" and "2" pool their votes.
    """
    n = len(human_answers)
    counts = Counter(normalize_answer(a) for a in human_answers)
    return {
        ans: (c * min((c - 1) / 3.0, 1.0) + (n - c) * min(c / 3.0, 1.0)) / n
        for ans, c in counts.items()
    }


def majority_answer(human_answers: Iterable[str]) -> str:
    """Most frequent normalised answer (ties broken by first appearance, deterministic)."""
    counts = Counter(normalize_answer(a) for a in human_answers)
    if not counts:
        raise ValueError("no answers")
    return max(counts.items(), key=lambda kv: kv[1])[0]
