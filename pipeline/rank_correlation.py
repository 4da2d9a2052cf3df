"""Stage ``rank_correlation``: how well each explanation's image map agrees with where humans
look (Goyal et al. 2016, section 4.1, Table 1; extended to every method and both models).

    python -m pipeline.rank_correlation [evaluation.resolution=14] [evaluation.models=[mlb]]

For every model and every method that ran on it, each valid question's |image_map| is brought
to r x r (``evaluation.resolution``, 16 as Goyal et al.; 14 as VQA-HAT) by area averaging, and
Spearman's rho over the r*r cells is taken with each human attention map of the question (val
has several annotators); a question's score is the mean over its annotators, and a row is the
mean over questions with a percentile bootstrap interval. Rows: the random baseline, every
method in the order the attribute stage ran them (MLB attention included), and a ``human`` row,
the inter-human agreement (rho between each pair of annotators of one question, averaged per
question), as in Table 1.

On synthetic data the same is done against a second reference, the exact ground truth (the share
of each cell covered by the objects one needs to look at): ``reference`` = human | ground_truth;
the human row against the ground truth is each annotator's map against the truth, i.e. how good
the simulated humans are.

Nothing is hidden: constant maps (rho undefined; excluded), maps with ties (kept, average
ranks), questions without a reference map (excluded), non-finite maps (excluded) and constant
reference maps (e.g. "how many" with answer 0: nothing to look at; excluded) are counted in their
own columns. ``beats_random``: the method's interval lies entirely above the random map's
interval of the same model and reference. ``mean_all_questions`` is the paper's average over
every question with a map and a reference, an undefined rho (constant map or reference) scoring 0.

The same scores are also summarised per answer type (VQA's yes/no, number, other), because a
method can localise for one kind of question and not another: a gradient-weighted map such as
Grad-CAM explains *the local slope* of the answer's score, and on counting questions the
answer's logit mostly falls when the counted objects' features grow (stage ``evidence_slope``
measures this; growing features is not adding objects). ``rank_correlation_by_answer_type`` makes
that visible instead of averaging it away.

Training seeds. The bootstrap interval is over questions for one trained model; a model trained
with another seed (or on another CPU, whose float path is another training run) moves every
number. Every model is therefore also trained and explained with each of ``replicates.seeds``
(stages train_replicate@ / attribute_replicate@), and every row gets the spread of its mean over
the main run and the replicates (``seed_mean``, ``seed_sd`` with ddof 1, ``seed_min``,
``seed_max``) and ``beats_random_seeds`` (on how many seeds its interval lies above that seed's
random interval); ``beats_random_every_seed`` is the verdict the report uses: a method beats
random only if it does so on every seed. ``mean`` / ``ci_*`` / ``beats_random`` stay the main
run's (``train.seed``). ``rank_correlation_by_seed`` has each seed's row.

Writes ``reports/tables/rank_correlation.{csv,md}``,
``reports/tables/rank_correlation_by_seed.{csv,md}``,
``reports/tables/rank_correlation_by_answer_type.{csv,md}``,
``reports/figures/rank_correlation{,_by_answer_type}.png`` and
``reports/metrics/rank_correlation.json``.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.attribution.methods.random import NAME as RANDOM
from pipeline.config import replicate_config, stage_main, training_seeds
from pipeline.data.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation.outputs import bootstrap_settings, json_safe, markdown_table, publish
from pipeline.evaluation.stats import has_ties, is_constant, spearman_rows, summarise
from pipeline.viz.plots import pyplot

log = logging.getLogger(__name__)

STAGE = "rank_correlation"
HUMAN = "human"
GROUND_TRUTH = "ground_truth"
SEED_COLUMNS = ["seeds", "seed_mean", "seed_sd", "seed_min", "seed_max", "beats_random_seeds",
                "beats_random_every_seed"]
COLUMNS = ["model", "method", "reference", "n", "mean", "ci_low", "ci_high", "mean_all_questions",
           "constant", "ties", "no_reference_map", "invalid", "constant_reference", "beats_random",
           *SEED_COLUMNS]
BY_SEED = f"{STAGE}_by_seed"
BY_SEED_COLUMNS = ["model", "method", "reference", "seed", "n", "mean", "ci_low", "ci_high",
                   "beats_random"]
BY_TYPE = f"{STAGE}_by_answer_type"
BY_TYPE_COLUMNS = ["model", "method", "reference", "answer_type", "n", "mean", "ci_low", "ci_high",
                   "beats_random"]


def load_image_maps(cfg, model: str, method: str, index: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N x H x W image maps as float32, N valid flags) of one method, in index order. Only the
    arrays needed are decompressed (the raw maps and extras are most of the file)."""
    arrays = inputs.read_method(cfg, model, method, ("image_map", "valid"), index=index)
    return arrays["image_map"].astype(np.float32), arrays["valid"].astype(bool)


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


def beats_random_flags(table: pd.DataFrame, within: tuple[str, ...] = ("reference",)) -> list:
    """Per row: does its interval lie entirely above the random row's of the same model and the
    same ``within`` columns (the reference; and the answer type in the breakdown)? Empty for
    random itself. The human row is compared with the random rows of every model (it must lie
    above all of them)."""
    flags = []
    for row in table.itertuples(index=False):
        if row.method == RANDOM:
            flags.append("")
            continue
        models = table["model"] != HUMAN if row.model == HUMAN else table["model"] == row.model
        same = np.logical_and.reduce([table[c] == getattr(row, c) for c in within])
        random_rows = table[models & (table["method"] == RANDOM) & same]
        if random_rows.empty or math.isnan(row.ci_low) or random_rows["ci_high"].isna().any():
            flags.append("")
            continue
        flags.append(bool(row.ci_low > random_rows["ci_high"].max()))
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


def plot(table: pd.DataFrame, references: list[str], resolution: int,
         by_seed: pd.DataFrame | None = None):
    """Horizontal bars (mean rho) with bootstrap-interval whiskers: one panel per reference,
    one bar per model side by side within each method; a black dot on a bar for each training
    seed's mean (``by_seed``), so the spread across seeds sits next to the interval."""
    plt = pyplot()

    methods = list(dict.fromkeys(table["method"]))
    models = [m for m in dict.fromkeys(table["model"]) if m != HUMAN]
    colours = {m: plt.get_cmap("tab10")(k) for k, m in enumerate(models)}
    colours[HUMAN] = (0.4, 0.4, 0.4, 1.0)
    height = 0.8 / max(1, len(models))
    size = (5.5 * len(references), 0.45 * len(methods) * max(1, len(models)) + 1.5)
    fig, axes = plt.subplots(1, len(references), figsize=size, sharey=True, squeeze=False)
    for ax, reference in zip(axes[0], references):
        part = table[table["reference"] == reference]
        for k, model in enumerate([*models, HUMAN]):
            rows = part[part["model"] == model]
            if rows.empty:
                continue
            y = np.array([methods.index(m) for m in rows["method"]], dtype=float)
            if model != HUMAN:
                y = y - 0.4 + height * (k + 0.5)
            mean = rows["mean"].to_numpy(dtype=float)
            whiskers = np.stack([mean - rows["ci_low"].to_numpy(dtype=float),
                                 rows["ci_high"].to_numpy(dtype=float) - mean])
            ax.barh(y, mean, height=height if model != HUMAN else 0.5, color=colours[model],
                    xerr=np.nan_to_num(whiskers), capsize=2, label=model, error_kw={"lw": 0.8})
            if by_seed is not None and model != HUMAN:
                seeds = by_seed[(by_seed["model"] == model) & (by_seed["reference"] == reference)]
                y_of = dict(zip(rows["method"], y))
                seeds = seeds[seeds["method"].isin(y_of)]
                ax.scatter(seeds["mean"].to_numpy(dtype=float), [y_of[m] for m in seeds["method"]],
                           s=6, color="black", zorder=3, label="training seeds" if k == 0 else None)
        ax.axvline(0, color="black", lw=0.6)
        ax.set_title(f"reference: {reference.replace('_', ' ')}")
        ax.set_xlabel(f"Spearman rho over {resolution}x{resolution} cells (mean, 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(methods)), methods)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Rank correlation of |image map| with where to look (Goyal et al. Table 1)")
    fig.tight_layout()
    return fig


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


def plot_by_type(table: pd.DataFrame, reference: str):
    """One heat map per model: methods x answer types, mean rho against ``reference``, the
    cells whose interval does not lie above random's hatched."""
    plt = pyplot()

    part = table[(table["reference"] == reference) & (table["model"] != HUMAN)]
    models = list(dict.fromkeys(part["model"]))
    types = sorted(set(part["answer_type"]))
    fig, axes = plt.subplots(1, max(1, len(models)), squeeze=False, layout="constrained",
                             figsize=(1.5 + 3.2 * max(1, len(models)) + 0.9 * len(types) * max(1, len(models)),
                                      0.45 * part["method"].nunique() + 1.8))
    image = None
    for ax, model in zip(axes[0], models):
        rows = part[part["model"] == model]
        methods = list(dict.fromkeys(rows["method"]))
        grid = np.full((len(methods), len(types)), np.nan)
        below = np.zeros_like(grid, dtype=bool)
        for r in rows.itertuples(index=False):
            i, j = methods.index(r.method), types.index(r.answer_type)
            grid[i, j] = r.mean
            below[i, j] = r.beats_random is False
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-0.6, vmax=0.6, aspect="auto")
        for i in range(len(methods)):
            for j in range(len(types)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}" + (" ×" if below[i, j] else ""),
                            ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(types)), types)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_title(model)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean Spearman rho")
    fig.suptitle(f"Rank correlation with {reference.replace('_', ' ')} by answer type "
                 "(× : interval not above random's)")
    return fig


def score_run(cfg, models: list[str], references: dict[str, dict], boot: dict,
              question_ids: dict[str, list[int]] | None = None) -> tuple[list[dict], list[tuple]]:
    """Rows (model, method, reference, summary, counts) and per-question scores of every method
    with an image map in every model's store of one training run (``cfg``: the main run's or a
    replicate's). ``question_ids``, when given, are the main run's: a replicate's store must hold
    the same questions in the same order."""
    rows, scores = [], []
    for model in models:
        index = inputs.load_store(cfg, model)
        ids = [int(q["question_id"]) for q in index["questions"]]
        if question_ids is not None and ids != question_ids[model]:
            raise DataError(f"the attribution store of {model} covers other questions than the main "
                            f"run's: {inputs.rerun_attribute(cfg, model)}", inputs.attribution_dir(cfg, model))
        answer_types = [str(q.get("answer_type", "unknown")) for q in index["questions"]]
        methods = [m for m in inputs.methods_that_ran(index)
                   if "image_map" in index["methods"][m].get("arrays", [])]
        for method in tqdm(methods, desc=f"rank correlation {model}", unit="method", leave=False):
            maps, valid = load_image_maps(cfg, model, method, index)
            small = inputs.to_resolution(np.abs(maps), int(cfg.evaluation.resolution))
            # A map that is finite at full resolution stays finite after area averaging, but an
            # overflow in float16 would not: recheck.
            valid = valid & np.isfinite(small.reshape(len(small), -1)).all(1)
            for reference, reference_maps in references.items():
                rho, counts = score_maps(small, valid, ids, reference_maps)
                rows.append({"model": model, "method": method, "reference": reference,
                             **summarise(rho, **boot), **counts})
                scores.append((model, method, reference, rho, answer_types))
    return rows, scores


def seed_spread(by_seed: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method, reference): how many seeds have a mean, the mean, sd (ddof 1: the
    seeds are a sample of training runs), min and max of the per-seed means, on how many seeds
    the row beats random ("k/n"), and whether it does on every seed (empty when some seed's
    verdict is undetermined)."""
    rows = []
    for (model, method, reference), group in by_seed.groupby(["model", "method", "reference"], sort=False):
        means = group["mean"].to_numpy(dtype=np.float64)
        means = means[np.isfinite(means)]
        verdicts = [v for v in group["beats_random"]]
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


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    e = cfg.evaluation
    resolution = int(e.resolution)
    boot = bootstrap_settings(cfg)
    split = str(e.split)
    models = [str(m) for m in e.models]
    if not models:
        raise DataError("evaluation.models is empty: name at least one model")
    seeds = training_seeds(cfg)
    indexes = {m: inputs.load_store(cfg, m) for m in models}
    question_ids = {m: [int(q["question_id"]) for q in indexes[m]["questions"]] for m in models}
    every_question = sorted({q for ids in question_ids.values() for q in ids})

    references = {HUMAN: inputs.human_maps(cfg, split, every_question, resolution)}
    if cfg.evaluation[STAGE].ground_truth and cfg.data.source == "synthetic":
        references[GROUND_TRUTH] = inputs.ground_truth_maps(cfg, split, every_question, resolution)
    if not references[HUMAN]:
        log.warning("no human attention map for any of the %d questions: every human-reference "
                    "row is empty (does %s have HAT maps?)", len(every_question), cfg.data.name)

    answer_types = {m: [str(q.get("answer_type", "unknown")) for q in indexes[m]["questions"]]
                    for m in models}
    type_of = {q: t for m in models for q, t in zip(question_ids[m], answer_types[m])}
    rows, scores = score_run(cfg, models, references, boot)
    for reference in references:
        rho, counts = score_humans(references[HUMAN], every_question,
                                   None if reference == HUMAN else references[reference])
        rows.append({"model": HUMAN, "method": HUMAN, "reference": reference,
                     **summarise(rho, **boot), **counts})
        scores.append((HUMAN, HUMAN, reference, rho, [type_of[q] for q in every_question]))

    table = in_table_order(pd.DataFrame(rows), list(references), models)
    table["beats_random"] = beats_random_flags(table)
    table["mean_all_questions"] = all_questions_mean(table)

    # The same rows for every training seed: the main run's, then each replicate's.
    per_seed = []
    for seed in seeds:
        if seed == seeds[0]:
            seed_rows = [r for r in rows if r["model"] != HUMAN]
        else:
            log.info("replicate train.seed=%d", seed)
            seed_rows, _ = score_run(replicate_config(cfg, seed), models, references, boot, question_ids)
        seed_table = in_table_order(pd.DataFrame(seed_rows), list(references), models)
        seed_table["beats_random"] = beats_random_flags(seed_table)
        per_seed.append(seed_table.assign(seed=seed))
    by_seed = pd.concat(per_seed, ignore_index=True)[BY_SEED_COLUMNS]
    table = table.merge(seed_spread(by_seed), on=["model", "method", "reference"], how="left")
    # The human row has no training seed: empty cells, as random's beats_random.
    human = table["model"] == HUMAN
    table["seeds"] = table["seeds"].astype(object)
    table.loc[human, ["seeds", "beats_random_seeds", "beats_random_every_seed"]] = ""
    table.loc[~human, "seeds"] = table.loc[~human, "seeds"].astype(int)
    table = table[COLUMNS]

    by_type = in_table_order(by_answer_type(scores, boot), list(references), models)
    metrics: dict = {}
    for row in table.itertuples(index=False):
        metrics.setdefault(row.model, {}).setdefault(row.method, {})[row.reference] = row.mean
    metrics["training_seeds"] = seeds
    metrics["not_beating_random"] = [f"{r.model}/{r.method}/{r.reference}"
                                     for r in table.itertuples(index=False) if r.beats_random is False]
    metrics["not_beating_random_on_every_seed"] = [
        f"{r.model}/{r.method}/{r.reference}" for r in table.itertuples(index=False)
        if r.beats_random_every_seed is False]
    metrics["verdict_differs_across_seeds"] = [
        f"{r.model}/{r.method}/{r.reference} ({r.beats_random_seeds})"
        for r in table.itertuples(index=False)
        if r.beats_random_seeds and r.beats_random_seeds not in (f"0/{len(seeds)}", f"{len(seeds)}/{len(seeds)}")]
    metrics["not_beating_random_by_answer_type"] = [
        f"{r.model}/{r.method}/{r.reference}/{r.answer_type}"
        for r in by_type.itertuples(index=False) if r.beats_random is False]

    type_reference = GROUND_TRUTH if GROUND_TRUTH in references else HUMAN
    published = publish(
        cfg, STAGE, start=start, metrics=metrics,
        note=f"{len(table)} rows over {len(every_question)} questions and {len(seeds)} training seeds",
        tables={
            STAGE: (table, f"Spearman rank correlation of |image map| with each reference over "
                           f"{resolution}x{resolution} cells; mean over questions with a 95% bootstrap "
                           f"interval ({boot['samples']} resamples), for the model trained with seed "
                           f"{seeds[0]}; then the spread of that mean over {len(seeds)} training seeds "
                           f"({', '.join(map(str, seeds))}): mean ± sd [min, max], and on how many seeds "
                           "the interval lies above random's. A method beats random only if it does on "
                           "every seed.\n\n" + markdown_table(readable_table(table))),
            BY_TYPE: (by_type, f"The table above per answer type (the model trained with seed {seeds[0]}): "
                               f"mean Spearman rho over {resolution}x{resolution} cells [95% bootstrap "
                               f"interval]; * where the interval lies entirely above the random map's for "
                               f"the same model, reference and answer type.\n\n"
                               + markdown_table(readable_by_type(by_type))),
            BY_SEED: (by_seed, f"Every training seed's row of the rank-correlation table (mean over "
                               f"questions, 95% bootstrap interval, beats random against the same seed's "
                               f"random map).\n\n" + markdown_table(by_seed))},
        figures={STAGE: plot(table, list(references), resolution, by_seed),
                 BY_TYPE: plot_by_type(by_type, type_reference)},
        summary={f"{r.model}/{r.method}/{r.reference}": json_safe(r.mean) for r in table.itertuples(index=False)})
    return {"table": table, "by_answer_type": by_type, "by_seed": by_seed, "metrics": published["metrics"],
            "seconds": published["seconds"]}


main = stage_main(run)

if __name__ == "__main__":
    main()
