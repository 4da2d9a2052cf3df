"""Stage ``pos_histogram``: which kind of word do the explanations find most important?
(Goyal et al., "Towards Transparent AI Systems: Interpreting VQA Models", section 4.2, Fig. 3.)

    python -m pipeline.pos_histogram [evaluation.pos_histogram.tagger=textblob]
                                     [evaluation.pos_histogram.methods=[occlusion,hadamard]]

For each model and each method of ``evaluation.pos_histogram.methods``, the most important word
of every valid question is the argmax of the method's word importance over the question's real
tokens (:data:`pipeline.evaluation.pos.QUESTION_IMPORTANCE`: occlusion signed, the word whose
removal lowers the answer's probability most; ties -> the first token; a question whose words all
score the same has no most important word and is left out, and counted). Every token is given a
Penn Treebank tag (:mod:`pipeline.evaluation.pos`). As in Fig. 3, the ``top_tags`` most frequent
tags over the whole split (``evaluation.split``, every question of it, not only the explained
ones) are grouped into categories (WDT, WP, WRB -> wh-words, NN, NNS -> nouns, ...; a tag of no
group is a category of its own), and per category c

    P(most important | c) = #questions whose most important word has a tag of c
                            / #tokens with a tag of c in those questions,

categories sorted by their tags' frequency over the split. The same per tag is kept as detail.

Writes
  reports/tables/pos_histogram.csv (+ .md)     model, method, tagger, category, tags, tag_count,
                                               most_important, p_most_important (Fig. 3)
  reports/tables/pos_histogram_by_tag.csv (+ .md)  the same per tag (tag, group)
  reports/tables/pos_ground_truth.csv (+ .md)  synthetic data: how often the most important word
                                               is one the question's answer depends on
  reports/figures/pos_histogram.png            grouped bars, one panel per model (Fig. 3)
  reports/metrics/pos_histogram.json           the tagger, questions counted, ground-truth shares
"""
from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.common.config import abspath, stage_main
from pipeline.data import processed
from pipeline.evaluation import inputs
from pipeline.evaluation.outputs import bootstrap_settings, json_safe, publish
from pipeline.evaluation.pos import (QUESTION_IMPORTANCE, Tagger, make_tagger, most_important_word, question_importance,
                                     tag_group)
from pipeline.evaluation.stats import summarise
from pipeline.viz.figures import pos_histogram_figure

log = logging.getLogger(__name__)

HISTOGRAM_COLUMNS = ["model", "method", "tagger", "category", "tags", "tag_count", "most_important",
                     "p_most_important"]
BY_TAG_COLUMNS = ["model", "method", "tagger", "tag", "group", "tag_count", "most_important",
                  "p_most_important"]
TRUTH_COLUMNS = ["model", "method", "tagger", "n", "share_ground_truth", "ci_low", "ci_high", "chance",
                 "no_most_important", "invalid"]


def real_length(question: dict, width: int) -> int:
    """Tokens the model saw: the question's tokens, cut at the store's padded length."""
    return min(len(question["tokens"]), width)


def most_important_words(questions: list[dict], importance: np.ndarray, valid: np.ndarray) -> dict:
    """question row -> position of its most important word, for the valid questions that have
    one; also the counts of invalid (non-finite) and constant (no winner) questions."""
    winners, invalid, constant = {}, 0, 0
    for row, question in enumerate(questions):
        if not valid[row]:
            invalid += 1
            continue
        position = most_important_word(importance[row], real_length(question, importance.shape[1]))
        if position is None:
            constant += 1
        else:
            winners[row] = position
    return {"winners": winners, "invalid": invalid, "constant": constant}


def tag_tallies(questions: list[dict], winners: dict[int, int], width: int,
                tagger: Tagger) -> tuple[Counter, Counter]:
    """(tokens per tag, most important words per tag) over the questions in ``winners``."""
    tokens_per_tag, winners_per_tag = Counter(), Counter()
    for row, position in winners.items():
        tags = tagger.tag(questions[row]["tokens"][:real_length(questions[row], width)])
        tokens_per_tag.update(tags)
        winners_per_tag[tags[position]] += 1
    return tokens_per_tag, winners_per_tag


def tag_frequencies(questions: list[dict], width: int, tagger: Tagger) -> Counter:
    """Tokens per tag over every token of every question."""
    counts = Counter()
    for q in questions:
        counts.update(tagger.tag(q["tokens"][:real_length(q, width)]))
    return counts


def frequent_tags(counts: Counter, top: int) -> list[str]:
    """The ``top`` most frequent tags of ``counts`` (ties alphabetical)."""
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def category(tag: str) -> str:
    """Fig. 3's category of a tag: its group (wh-words, nouns, ...), or the tag itself when it
    belongs to none (CC, EX, MD, ...)."""
    group = tag_group(tag)
    return tag if group == "other" else group


def categories(top: list[str], counts: Counter) -> list[tuple[str, list[str]]]:
    """(category, its tags among ``top``), sorted by the tags' summed frequency (ties by name)."""
    members: dict[str, list[str]] = {}
    for tag in top:
        members.setdefault(category(tag), []).append(tag)
    return sorted(members.items(), key=lambda kv: (-sum(counts[t] for t in kv[1]), kv[0]))


def ground_truth_hits(questions: list[dict], winners: dict[int, int], truth: dict,
                      width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per question with a winner and a ground truth: 1 if the winner is one of the important
    words (``word_indices``), else 0; and the chance of that for a uniformly random word
    (#important / #words)."""
    hits, chance = [], []
    for row, position in winners.items():
        record = truth.get(int(questions[row]["question_id"]))
        if record is None:
            continue
        length = real_length(questions[row], width)
        important = {int(i) for i in record["word_indices"] if int(i) < length}
        hits.append(float(position in important))
        chance.append(len(important) / length)
    return np.asarray(hits), np.asarray(chance)


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    evaluation = cfg.evaluation
    settings = evaluation.pos_histogram
    models, methods = [str(m) for m in evaluation.models], [str(m) for m in settings.methods]
    tagger = make_tagger(str(settings.tagger))
    truth = inputs.ground_truth_questions(cfg, str(evaluation.split))["questions"]
    boot = bootstrap_settings(cfg)

    # Fig. 3's tags are the most frequent on the whole split, not on the explained questions.
    split_questions = processed.load_question_table(abspath(cfg.paths.processed_dir), str(evaluation.split))
    histogram_rows, by_tag_rows, truth_rows = [], [], []
    split_counts_by_width: dict[int, Counter] = {}
    metrics = {"tagger": tagger.name, "questions": {}, "ground_truth_share": {}, "skipped": {},
               "split_questions_tagged": len(split_questions)}
    for model in models:
        index = inputs.load_store(cfg, model)
        questions = index["questions"]
        metrics["questions"][model] = len(questions)
        for method in tqdm(methods, desc=f"most important words ({model})", unit="method"):
            reason = index["methods"].get(method, {}).get("skipped")
            if reason:
                log.info("%s / %s skipped by the attribute stage: %s", model, method, reason)
                metrics["skipped"].setdefault(model, {})[method] = reason
                continue
            arrays = inputs.read_method(cfg, model, method, ("valid",), index=index,
                                        optional=("question_map", *QUESTION_IMPORTANCE.values()))
            importance = question_importance(method, arrays)
            width = importance.shape[1]
            found = most_important_words(questions, importance, arrays["valid"])
            tokens_per_tag, winners_per_tag = tag_tallies(questions, found["winners"], width, tagger)
            # Tags and their order depend on the split only (not on the method), so every
            # method's bars share one x axis.
            if width not in split_counts_by_width:  # once per padded length, not per method
                split_counts_by_width[width] = tag_frequencies(split_questions, width, tagger)
            split_counts = split_counts_by_width[width]
            top = frequent_tags(split_counts, int(settings.top_tags))
            for tag in top:
                count = int(tokens_per_tag[tag])
                by_tag_rows.append({
                    "model": model, "method": method, "tagger": tagger.name, "tag": tag,
                    "group": tag_group(tag), "tag_count": count,
                    "most_important": int(winners_per_tag[tag]),
                    "p_most_important": winners_per_tag[tag] / count if count else float("nan")})
            for name, tags in categories(top, split_counts):
                count = sum(int(tokens_per_tag[t]) for t in tags)
                winners = sum(int(winners_per_tag[t]) for t in tags)
                histogram_rows.append({
                    "model": model, "method": method, "tagger": tagger.name, "category": name,
                    "tags": " ".join(tags), "tag_count": count, "most_important": winners,
                    "p_most_important": winners / count if count else float("nan")})
            if truth:
                hits, chance = ground_truth_hits(questions, found["winners"], truth, width)
                s = summarise(hits, **boot)
                truth_rows.append({
                    "model": model, "method": method, "tagger": tagger.name, "n": s["n"],
                    "share_ground_truth": s["mean"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                    "chance": float(chance.mean()) if len(chance) else float("nan"),
                    "no_most_important": found["constant"], "invalid": found["invalid"]})
                metrics["ground_truth_share"].setdefault(model, {})[method] = {
                    k: truth_rows[-1][k]
                    for k in ("n", "share_ground_truth", "ci_low", "ci_high", "chance")}
            log.info("%s / %s: %d questions with a most important word, %d without (all equal), "
                     "%d invalid", model, method, len(found["winners"]), found["constant"], found["invalid"])

    histogram = pd.DataFrame(histogram_rows, columns=HISTOGRAM_COLUMNS)
    # pos_ground_truth is written on real data too (header only: no ground truth there), so the
    # stage's outputs are the same files whatever the data.
    tables = {"pos_histogram": histogram, "pos_histogram_by_tag": pd.DataFrame(by_tag_rows, columns=BY_TAG_COLUMNS),
              "pos_ground_truth": pd.DataFrame(truth_rows, columns=TRUTH_COLUMNS)}
    for r in truth_rows:
        log.info("%s / %s: most important word is a ground-truth word in %.1f%% of %d questions "
                 "(95%% CI %.1f-%.1f; chance %.1f%%)", r["model"], r["method"],
                 100 * r["share_ground_truth"], r["n"], 100 * r["ci_low"], 100 * r["ci_high"],
                 100 * r["chance"])
    published = publish(cfg, "pos_histogram", tables=tables, metrics=metrics, start=start,
                        figures={"pos_histogram": pos_histogram_figure(histogram, models, methods, tagger.name)},
                        summary={"tagger": tagger.name, **{
                            f"ground_truth_share/{m}/{meth}": json_safe(v["share_ground_truth"])
                            for m, per in metrics["ground_truth_share"].items() for meth, v in per.items()}})
    if not truth:
        del tables["pos_ground_truth"]
    return {**published["metrics"], "tables": tables}


main = stage_main(run)

if __name__ == "__main__":
    main()
