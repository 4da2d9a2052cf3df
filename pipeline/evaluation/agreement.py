"""The library under the ``rank_correlation`` stage (Goyal et al. 2016, section 4.1, Table 1):
Spearman agreement of maps with reference maps (human attention, ground truth), the inter-human
row, the beats-random verdicts, the paper's all-questions mean, the per-answer-type breakdown,
the spread over training seeds, and the tables' readable (Markdown) views."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pipeline.attribution.methods.random import NAME as RANDOM
from pipeline.evaluation.stats import has_ties, is_constant, spearman_rows, summarise

HUMAN = "human"
GROUND_TRUTH = "ground_truth"
SEED_COLUMNS = ["seeds", "seed_mean", "seed_sd", "seed_min", "seed_max", "beats_random_seeds",
                "beats_random_every_seed"]
BY_TYPE_COLUMNS = ["model", "method", "reference", "answer_type", "n", "mean", "ci_low", "ci_high",
                   "beats_random"]


def _per_question_mean(rho_pairs: np.ndarray, pair_question: np.ndarray, n: int) -> np.ndarray:
    """Mean of the defined (finite) pair correlations of each question; NaN where none is."""
    finite = np.isfinite(rho_pairs)
    sums = np.bincount(pair_question, weights=np.where(finite, rho_pairs, 0.0), minlength=n)
    counts = np.bincount(pair_question, weights=finite.astype(np.float64), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def score_maps(maps: np.ndarray, valid: np.ndarray, question_ids: list[int],
               references: dict[int, np.ndarray]) -> tuple[np.ndarray, dict]:
    """Per-question rho of ``maps`` (N x r x r, already |.| and resized) against ``references``
    (question id -> A x r x r, one per annotator), averaged over annotators, and the counts.

    Returns (N rho, NaN for every excluded question; counts): ``invalid`` non-finite maps,
    ``no_reference_map`` questions without a reference, ``constant`` maps (rho undefined),
    ``constant_reference`` questions whose every reference map is constant, ``ties`` kept maps
    with repeated values. The categories are exclusive, checked in that order."""
    n = len(question_ids)
    flat = maps.reshape(n, -1)
    # A single reference map (the ground truth, r x r) is one "annotator".
    references = {q: m.reshape(-1, flat.shape[1]) for q, m in references.items()}
    has_reference = np.array([q in references for q in question_ids], dtype=bool)
    usable = valid & has_reference
    constant = usable & is_constant(flat)
    scored = usable & ~constant
    # One row per (question, annotator) pair: every pair correlated in one vectorised call.
    pair_question = np.array([i for i in np.flatnonzero(scored)
                              for _ in range(len(references[question_ids[i]]))], dtype=np.int64)
    rho = np.full(n, np.nan)
    if len(pair_question):
        reference_rows = np.concatenate([references[question_ids[i]] for i in np.flatnonzero(scored)])
        rho_pairs = spearman_rows(flat[pair_question], reference_rows)
        rho = _per_question_mean(rho_pairs, pair_question, n)
    constant_reference = scored & ~np.isfinite(rho)
    counts = {"constant": int(constant.sum()),
              "ties": int((scored & np.isfinite(rho) & has_ties(flat)).sum()),
              "no_reference_map": int((valid & ~has_reference).sum()),
              "invalid": int((~valid).sum()),
              "constant_reference": int(constant_reference.sum())}
    return rho, counts


def score_humans(humans: dict[int, np.ndarray], question_ids: list[int],
                 truth: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """The human row. Without ``truth``: inter-human agreement, rho between each pair of
    annotators of a question, averaged per question (questions with fewer than two annotators
    have no such pair: counted as ``no_reference_map``). With ``truth``: each annotator's map
    against the truth, averaged per question. ``constant`` counts questions whose every pair is
    undefined because of a constant annotator map."""
    n = len(question_ids)
    pair_question, left, right = [], [], []
    no_reference = np.zeros(n, dtype=bool)
    any_ties = np.zeros(n, dtype=bool)
    for i, q in enumerate(question_ids):
        maps = humans.get(q)
        if truth is None:
            if maps is None or len(maps) < 2:
                no_reference[i] = True
                continue
            pairs = [(maps[a], maps[b]) for a in range(len(maps)) for b in range(a + 1, len(maps))]
        else:
            if maps is None or q not in truth:
                no_reference[i] = True
                continue
            pairs = [(m, truth[q]) for m in maps]
        any_ties[i] = bool(has_ties(maps.reshape(len(maps), -1)).any())
        for a, b in pairs:
            pair_question.append(i)
            left.append(a.ravel())
            right.append(b.ravel())
    rho = np.full(n, np.nan)
    constant_reference = 0
    if pair_question:
        pair_question = np.asarray(pair_question, dtype=np.int64)
        left, right = np.stack(left), np.stack(right)
        rho = _per_question_mean(spearman_rows(left, right), pair_question, n)
        if truth is not None:
            truth_constant = np.array([q in truth and bool(is_constant(truth[q].ravel()))
                                       for q in question_ids])
            constant_reference = int((~no_reference & truth_constant).sum())
    undefined = ~no_reference & ~np.isfinite(rho)
    counts = {"constant": int(undefined.sum()) - constant_reference,
              "ties": int((np.isfinite(rho) & any_ties).sum()),
              "no_reference_map": int(no_reference.sum()),
              "invalid": 0,
              "constant_reference": constant_reference}
    return rho, counts


def beats_random_flags(table: pd.DataFrame, within: tuple[str, ...] = ("reference",),
                       below: bool = False) -> list:
    """Per row: does its interval lie entirely above the random row's of the same model and the
    same ``within`` columns (the reference; and the answer type in the breakdown)? Empty for
    random itself. The human row is compared with the random rows of every model (it must lie
    above all of them). With ``below``: entirely below (a score where lower is better)."""
    flags = []
    for row in table.itertuples(index=False):
        if row.method == RANDOM:
            flags.append("")
            continue
        models = table["model"] != HUMAN if row.model == HUMAN else table["model"] == row.model
        same = np.logical_and.reduce([table[c] == getattr(row, c) for c in within])
        random_rows = table[models & (table["method"] == RANDOM) & same]
        if random_rows.empty or math.isnan(row.ci_low) or random_rows[["ci_low", "ci_high"]].isna().any().any():
            flags.append("")
            continue
        flags.append(bool(row.ci_high < random_rows["ci_low"].min()) if below
                     else bool(row.ci_low > random_rows["ci_high"].max()))
    return flags


def all_questions_mean(table: pd.DataFrame) -> pd.Series:
    """The mean over every question with a map and a reference, a constant map (or a constant
    reference: rho undefined) scoring 0: Goyal et al. average over all 1,374 VQA-HAT pairs
    (section 4.1), while ``mean`` leaves the undefined ones out (and counts them)."""
    n = table["n"].to_numpy(dtype=np.float64)
    total = n + (table["constant"] + table["constant_reference"]).to_numpy(dtype=np.float64)
    scored_sum = np.where(n > 0, table["mean"].to_numpy(dtype=np.float64) * n, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.Series(np.where(total > 0, scored_sum / total, np.nan), index=table.index)


def seed_cell(row) -> str:
    """"mean ± sd [min, max] (n seeds)" of a row's per-seed means; "–" without seeds."""
    if pd.isna(row.seeds) or not row.seeds or math.isnan(row.seed_mean):
        return "–"
    if row.seeds == 1:
        return f"{row.seed_mean:.3f} (1 seed)"
    return (f"{row.seed_mean:.3f} ± {row.seed_sd:.3f} [{row.seed_min:.3f}, {row.seed_max:.3f}] "
            f"({row.seeds} seeds)")


def readable_table(table: pd.DataFrame) -> pd.DataFrame:
    """The Markdown view: grouped by reference and model (a name shown once per group), the
    interval as one column."""
    rows = []
    previous = (None, None)
    for row in table.itertuples(index=False):
        group = (row.reference, row.model)
        ci = "–" if math.isnan(row.ci_low) else f"[{row.ci_low:.3f}, {row.ci_high:.3f}]"
        rows.append({"reference": row.reference if group[0] != previous[0] else "",
                     "model": row.model if group != previous else "",
                     "method": row.method, "n": row.n, "mean": row.mean, "95% CI": ci,
                     "mean, all questions": row.mean_all_questions,
                     "constant": row.constant, "ties": row.ties,
                     "no reference map": row.no_reference_map, "invalid": row.invalid,
                     "constant reference": row.constant_reference,
                     "beats random": {True: "yes", False: "no"}.get(row.beats_random, ""),
                     "training seeds: mean ± sd [min, max]": seed_cell(row),
                     "beats random on every seed": {True: "yes", False: "no"}.get(
                         row.beats_random_every_seed, "") + (f" ({row.beats_random_seeds})"
                                                             if isinstance(row.beats_random_seeds, str)
                                                             and row.beats_random_seeds else "")})
        previous = group
    return pd.DataFrame(rows)


def in_table_order(table: pd.DataFrame, references: list[str], models: list[str]) -> pd.DataFrame:
    """Rows per reference, per model, random first then the methods in the model's store order
    (the order they were appended in: the sort is stable); the human row last."""
    model_order = {m: k for k, m in enumerate([*models, HUMAN])}
    reference_order = {r: k for k, r in enumerate(references)}
    keyed = table.assign(_reference=table["reference"].map(reference_order),
                         _model=table["model"].map(model_order),
                         _not_random=table["method"] != RANDOM)
    return (keyed.sort_values(["_reference", "_model", "_not_random"], kind="stable")
            .drop(columns=["_reference", "_model", "_not_random"]).reset_index(drop=True))


def by_answer_type(scores: list[tuple[str, str, str, np.ndarray, list[str]]], boot: dict) -> pd.DataFrame:
    """The per-question scores of every (model, method, reference), summarised per answer type:
    ``scores`` holds (model, method, reference, per-question rho with NaN for excluded questions,
    each question's answer type). Same bootstrap as the main table, so a type's row is the main
    row restricted to that type's questions."""
    rows = []
    for model, method, reference, rho, answer_types in scores:
        types = np.asarray(answer_types, dtype=object)
        for answer_type in sorted(set(answer_types)):
            rows.append({"model": model, "method": method, "reference": reference,
                         "answer_type": answer_type, **summarise(rho[types == answer_type], **boot)})
    table = pd.DataFrame(rows, columns=BY_TYPE_COLUMNS[:-1])
    table["beats_random"] = beats_random_flags(table, within=("reference", "answer_type"))
    return table[BY_TYPE_COLUMNS]


def readable_by_type(table: pd.DataFrame) -> pd.DataFrame:
    """Methods down, answer types across: "mean [low, high]" per cell, a star where the interval
    lies above random's, each type's question count next to it."""
    out = []
    for (reference, model, method), group in table.groupby(["reference", "model", "method"], sort=False):
        row = {"reference": reference, "model": model, "method": method}
        for r in group.itertuples(index=False):
            cell = "–" if math.isnan(r.mean) else f"{r.mean:.3f}"
            if not math.isnan(r.ci_low):
                cell += f" [{r.ci_low:.2f}, {r.ci_high:.2f}]"
            cell += {True: " *", False: ""}.get(r.beats_random, "")
            row[r.answer_type] = cell
            row[f"n {r.answer_type}"] = r.n
        out.append(row)
    return pd.DataFrame(out).fillna("")


def seed_spread(by_seed: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method, reference): how many seeds have a mean, the mean, sd (ddof 1: the
    seeds are a sample of training runs), min and max of the per-seed means, on how many seeds
    the row beats random ("k/n"), and whether it does on every seed (empty when some seed's
    verdict is undetermined)."""
    rows = []
    for (model, method, reference), group in by_seed.groupby(["model", "method", "reference"], sort=False):
        means = group["mean"].to_numpy(dtype=np.float64)
        means = means[np.isfinite(means)]
        verdicts = list(group["beats_random"])
        decided = [v for v in verdicts if isinstance(v, (bool, np.bool_))]
        every = "" if method == RANDOM or len(decided) < len(verdicts) else bool(all(decided))
        rows.append({"model": model, "method": method, "reference": reference,
                     "seeds": int(len(means)),
                     "seed_mean": float(means.mean()) if len(means) else float("nan"),
                     "seed_sd": float(means.std(ddof=1)) if len(means) > 1 else float("nan"),
                     "seed_min": float(means.min()) if len(means) else float("nan"),
                     "seed_max": float(means.max()) if len(means) else float("nan"),
                     "beats_random_seeds": "" if method == RANDOM else f"{sum(map(bool, decided))}/{len(verdicts)}",
                     "beats_random_every_seed": every})
    return pd.DataFrame(rows, columns=["model", "method", "reference", *SEED_COLUMNS])
