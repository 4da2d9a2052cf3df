"""Faithfulness of explanations by perturbation (stage ``faithfulness``): what the curves are
computed on (the explained questions' grids, tokens and answers; every map pooled to the grid;
the references), how they are summarised (area under the curve, bootstrap interval, the verdict
against the random map) and how they are set against plausibility (the rank-correlation table).
The curves themselves: :mod:`pipeline.evaluation.perturbation`.

References next to the stored methods, all ranked the same way:

* ``random``: a uniform random score per cell (per word), drawn from ``evaluation.seed``; the
  store's own ``random`` method is left out so that the reference exists whatever
  ``attribution.methods`` holds (a random ranking is a random ranking);
* ``human``: the mean of a question's human attention maps (VQA-HAT; the simulated annotators
  on the synthetic world), pooled to the grid; image only (humans marked no words);
* ``ground_truth`` (synthetic world only): the share of each cell covered by the objects the
  question is about, and for the question its important words (``word_indices``: 1, others 0).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from pipeline.common.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation.agreement import beats_random_flags
from pipeline.evaluation.perturbation import seeded, trapezoid
from pipeline.evaluation.stats import summarise

log = logging.getLogger(__name__)

IMAGE, QUESTION = "image", "question"
RANDOM, HUMAN, GROUND_TRUTH = "random", "human", "ground_truth"
REFERENCES = (RANDOM, HUMAN, GROUND_TRUTH)
COLUMNS = ["model", "method", "modality", "order", "fill", "n", "no_map", "auc", "ci_low", "ci_high",
           "kept", "more_faithful_than_random"]


def explained_inputs(cfg, model, index: dict, positions: np.ndarray) -> dict:
    """The questions at ``positions`` of the store's index as the attribute stage explained them:
    images (normalised), their backbone grid (the head's input, one backbone pass per image),
    token ids, and the explained answer (the store's ``predicted`` answer: the attribute stage
    explains the model's prediction). ``prediction_differs`` counts questions whose unperturbed
    argmax is not that answer (0 unless the float path changed since)."""
    wanted = [int(index["questions"][p]["question_id"]) for p in positions]
    records, images, tokens = inputs.question_batch(cfg, model, str(cfg.evaluation.split))
    at = {int(r["question_id"]): i for i, r in enumerate(records)}
    missing = [q for q in wanted if q not in at]
    if missing:
        raise DataError(f"questions {missing[:5]} of the attribution store are not in the processed "
                        f"{cfg.evaluation.split} split: {inputs.rerun_attribute(cfg, model.name)}",
                        inputs.attribution_dir(cfg, model.name))
    rows = [at[q] for q in wanted]
    images, tokens = images[rows], tokens[rows]
    first = {}
    for k, i in enumerate(rows):
        first.setdefault(records[i]["image"], k)
    unique = list(first.values())
    grids = []
    with torch.no_grad():
        for start in range(0, len(unique), 64):
            grids.append(model.backbone(images[unique[start:start + 64]]).float().contiguous())
    grid_of = dict(zip(first, torch.cat(grids)))
    grid = torch.stack([grid_of[records[i]["image"]] for i in rows])
    answers = model.answer_vocab.index
    targets = torch.tensor([answers[str(index["questions"][p]["predicted"])] for p in positions])
    with torch.no_grad():
        predicted = model.head(grid, tokens).argmax(1)
    return {"question_ids": np.array(wanted), "images": images, "grid": grid, "tokens": tokens,
            "targets": targets, "prediction_differs": int((predicted != targets).sum())}


def feature_statistics(cfg, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Per-channel mean and standard deviation of the grid features over every cell of every
    training image (the feature store's ``train`` split, read in chunks, summed in float64), the
    ``mean`` fill and ROAD's noise scale; when that store is missing or holds another grid, the
    cells of ``grid`` (the split evaluated) instead. Returns (mean, sd, where they come from)."""
    from pipeline.common.config import abspath
    from pipeline.data.feature_store import FeatureStore

    try:
        store = FeatureStore.open(abspath(cfg.paths.features_dir), "train")
        if tuple(store.grid_shape) != tuple(grid.shape[1:]):
            raise DataError(f"its grid is {store.grid_shape}, the model's {tuple(grid.shape[1:])}")
        total = np.zeros(grid.shape[1])
        squares = np.zeros(grid.shape[1])
        for start in range(0, len(store), 256):
            rows = store.grid(np.arange(start, min(start + 256, len(store)))).double()
            total += rows.sum((0, 2, 3)).numpy()
            squares += (rows * rows).sum((0, 2, 3)).numpy()
        cells = len(store) * grid.shape[2] * grid.shape[3]
        source = f"training split's feature store ({len(store)} images)"
    except DataError as e:
        log.warning("mean feature from the evaluated split: no usable training feature store (%s)", e)
        flat = grid.double().transpose(0, 1).reshape(grid.shape[1], -1)
        total, squares, cells = flat.sum(1).numpy(), (flat * flat).sum(1).numpy(), flat.shape[1]
        source = f"evaluated split's grids ({len(grid)} questions; no training feature store)"
    mean = total / cells
    sd = np.sqrt(np.maximum(squares / cells - mean * mean, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(sd).float(), source


def image_relevance(cfg, model: str, index: dict, positions: np.ndarray, question_ids: np.ndarray,
                    size: int, methods, absolute: bool, seed: int) -> tuple[dict, dict]:
    """name -> N x size^2 relevance of every stored method with an image map (optionally only
    ``methods``), each map (|map| with ``absolute``) area-averaged to the size x size grid, then the
    references; a question without a (finite) map has a NaN row. Also name -> why a reference is
    left out."""
    out, absent = {}, {}
    n, split = len(positions), str(cfg.evaluation.split)
    for method in stored_methods(index, "image_map", methods):
        arrays = inputs.read_method(cfg, model, method, ("image_map", "valid"), index=index)
        maps = arrays["image_map"][positions].astype(np.float32)
        small = inputs.to_resolution(np.abs(maps) if absolute else maps, size).reshape(n, -1)
        small[~arrays["valid"][positions].astype(bool)] = np.nan
        out[method] = small
    out[RANDOM] = seeded(seed, RANDOM, IMAGE).random((n, size * size))
    human = inputs.human_maps(cfg, split, question_ids, size)
    if human:
        out[HUMAN] = np.stack([human[int(q)].mean(0).reshape(-1) if int(q) in human
                               else np.full(size * size, np.nan) for q in question_ids])
    else:
        absent[HUMAN] = f"no human attention map for any question ({cfg.data.name} has no HAT maps)"
    if cfg.data.source == "synthetic":
        truth = inputs.ground_truth_maps(cfg, split, question_ids, size)
        out[GROUND_TRUTH] = np.stack([truth[int(q)].reshape(-1) for q in question_ids])
    else:
        absent[GROUND_TRUTH] = f"{cfg.data.name} has no ground truth of where to look (synthetic data only)"
    return out, absent


def question_relevance(cfg, model: str, index: dict, positions: np.ndarray, question_ids: np.ndarray,
                       width: int, methods, absolute: bool, seed: int) -> tuple[dict, dict]:
    """name -> N x ``width`` word relevance of every stored method with a question map, then the
    references (``random``; ``ground_truth``: 1 on the question's important words); as
    :func:`image_relevance`. Human attention maps mark no words: no human reference here."""
    out, absent = {}, {HUMAN: "human attention maps (VQA-HAT) mark image regions, not words"}
    n = len(positions)
    for method in stored_methods(index, "question_map", methods):
        arrays = inputs.read_method(cfg, model, method, ("question_map", "valid"), index=index)
        maps = np.full((n, width), np.nan)
        stored = arrays["question_map"][positions].astype(np.float64)[:, :width]
        maps[:, :stored.shape[1]] = np.abs(stored) if absolute else stored
        maps[~arrays["valid"][positions].astype(bool)] = np.nan
        out[method] = maps
    out[RANDOM] = seeded(seed, RANDOM, QUESTION).random((n, width))
    truth = inputs.ground_truth_questions(cfg, str(cfg.evaluation.split))["questions"]
    if truth:
        words = np.zeros((n, width))
        for row, q in enumerate(question_ids):
            record = truth.get(int(q))
            if record is None:
                words[row] = np.nan
                continue
            words[row, [i for i in record["word_indices"] if int(i) < width]] = 1.0
        out[GROUND_TRUTH] = words
    else:
        absent[GROUND_TRUTH] = f"{cfg.data.name} has no ground truth of which words matter (synthetic data only)"
    return out, absent


def stored_methods(index: dict, array: str, methods) -> list[str]:
    """Methods that ran on the model and stored ``array``, in the store's order, without the
    store's random map (the stage draws its own) and, when ``methods`` is given, only those."""
    keep = None if methods is None else {str(m) for m in methods}
    return [m for m in inputs.methods_that_ran(index)
            if m != RANDOM and array in index["methods"][m].get("arrays", []) and (keep is None or m in keep)]


def summary_rows(model: str, modality: str, curves: dict, fractions, boot: dict) -> tuple[list, dict]:
    """One row per (method, order, fill) of ``curves`` ((name, order, fill) -> (probability, kept),
    N x F): n questions with a map, ``no_map``, the mean area under the probability curve
    (trapezoid over ``fractions``) with its bootstrap interval, and ``kept``, the mean share of
    fractions at which the answer is still the argmax. Also (name, order, fill) -> per-question AUC."""
    rows, aucs = [], {}
    for (name, order, fill), (probability, kept) in curves.items():
        auc = trapezoid(probability, fractions)
        aucs[(name, order, fill)] = auc
        stats = summarise(auc, **boot)
        has = np.isfinite(auc)
        rows.append({"model": model, "method": name, "modality": modality, "order": order, "fill": fill,
                     "n": stats["n"], "no_map": int((~has).sum()), "auc": stats["mean"],
                     "ci_low": stats["ci_low"], "ci_high": stats["ci_high"],
                     "kept": float(np.nanmean(kept[has])) if has.any() else float("nan")})
    return rows, aucs


def faithful_flags(table: pd.DataFrame) -> list:
    """``more_faithful_than_random`` per row, on non-overlapping intervals against the random
    map's row of the same model, modality, order and fill (:func:`~pipeline.evaluation.agreement.
    beats_random_flags`, the rank-correlation table's rule): for ``morf`` the interval lies entirely
    below random's (the answer collapses sooner), for ``lerf`` entirely above (it survives
    longer). Empty for random itself and where an interval is undefined."""
    within = ("modality", "order", "fill")
    above = beats_random_flags(table, within=within)
    below = beats_random_flags(table, within=within, below=True)
    return [b if order == "morf" else a for order, a, b in zip(table["order"], above, below)]


def mean_curve_rows(model: str, modality: str, curves: dict, fractions) -> list[dict]:
    """The mean curve of every (method, order, fill): one row per fraction (mean probability of
    the explained answer and mean answer-kept share over the questions with a map)."""
    rows = []
    for (name, order, fill), (probability, kept) in curves.items():
        has = np.isfinite(probability).all(1)
        for f, fraction in enumerate(fractions):
            rows.append({"model": model, "method": name, "modality": modality, "order": order, "fill": fill,
                         "fraction": float(fraction), "n": int(has.sum()),
                         "probability": float(probability[has, f].mean()) if has.any() else float("nan"),
                         "kept": float(kept[has, f].mean()) if has.any() else float("nan")})
    return rows


def fill_dependent(table: pd.DataFrame) -> list[str]:
    """``model/method/modality/order`` whose verdict differs between the fills (image rows)."""
    out = []
    keys = ["model", "method", "modality", "order"]
    for key, group in table[table["more_faithful_than_random"] != ""].groupby(keys, sort=False):
        verdicts = dict(zip(group["fill"], group["more_faithful_than_random"]))
        if len(set(verdicts.values())) > 1:
            out.append("/".join(key) + " (" + ", ".join(f"{f}: {'yes' if v else 'no'}"
                                                        for f, v in verdicts.items()) + ")")
    return out


def plausibility_table(table: pd.DataFrame, rank: pd.DataFrame) -> pd.DataFrame:
    """Per model and stored method: plausibility (the rank-correlation mean against the ground
    truth where there is one, else the human maps; beats random as the report judges it: on
    every training seed when the table has that column) beside faithfulness (image ``morf``
    AUC and verdict per fill). ``faithful``: yes / no when every fill agrees, else
    "depends on the fill"."""
    needed = {"model", "method", "reference", "mean", "beats_random"}
    if not needed <= set(rank.columns):
        raise DataError(f"the rank-correlation table lacks {sorted(needed - set(rank.columns))}: rerun "
                        "`python -m pipeline.rank_correlation`")
    reference = GROUND_TRUTH if (rank["reference"] == GROUND_TRUTH).any() else HUMAN
    column = "beats_random_every_seed" if "beats_random_every_seed" in rank.columns else "beats_random"
    plausible = rank[rank["reference"] == reference].set_index(["model", "method"])
    image = table[(table["modality"] == IMAGE) & (table["order"] == "morf") & ~table["method"].isin(REFERENCES)]
    rows = []
    for (model, method), group in image.groupby(["model", "method"], sort=False):
        if (model, method) not in plausible.index:
            continue
        p = plausible.loc[(model, method)]
        verdicts = [v for v in group["more_faithful_than_random"] if v != ""]
        row = {"model": model, "method": method, "reference": reference, "rank_correlation": float(p["mean"]),
               "plausible": inputs.as_bool(p[column])}
        for fill, r in zip(group["fill"], group.itertuples(index=False)):
            row[f"auc_{fill}"] = r.auc
            row[f"faithful_{fill}"] = r.more_faithful_than_random
        row["faithful"] = ("" if not verdicts else "yes" if all(verdicts) else "no" if not any(verdicts)
                           else "depends on the fill")
        rows.append(row)
    return pd.DataFrame(rows)


def verdict_sentences(plausibility: pd.DataFrame, dependent: list[str]) -> list[str]:
    """The report's sentences: per model, the methods plausible but not faithful, faithful but
    not plausible, and the verdicts that depend on the fill."""
    lines = []
    for model, group in plausibility.groupby("model", sort=False):
        only_plausible = group[(group["plausible"] == True) & (group["faithful"] == "no")]["method"].tolist()  # noqa: E712
        only_faithful = group[(group["plausible"] == False) & (group["faithful"] == "yes")]["method"].tolist()  # noqa: E712
        lines.append(f"- **{model}**: plausible but not faithful (beat random in rank correlation, not "
                     f"more faithful than random on image deletion with either fill): "
                     f"{', '.join(only_plausible) or 'none'}; faithful but not plausible: "
                     f"{', '.join(only_faithful) or 'none'}.")
    lines.append("- Verdicts that depend on the fill (`mean` vs `road`): "
                 + ("; ".join(dependent) if dependent else "none") + ".")
    return lines


def pixel_check(model, data: dict, relevance: dict, fractions, grid_curves: dict, seed: int,
                batch_size: int, count: int) -> dict:
    """Do grid-space curves stand for pixel-space ones? For the first ``count`` questions of
    ``data`` and every map and order, the image pixels under the removed cells are set to 0 in
    normalised space (the backbone's normalisation mean, e.g. ImageNet's) and the full model runs
    (backbone and head); the cells are ranked exactly as in :func:`~pipeline.evaluation.
    perturbation.image_curves` (same tie-breaks). Returns the number of curves, Spearman's rho
    between the pixel-space and grid-space (``mean`` fill) AUCs, and Pearson's r over every point
    of those curves."""
    from scipy.stats import pearsonr, spearmanr

    from pipeline.evaluation.perturbation import (ORDERS, answer_probability, removal_masks,
                                                  removal_order, removed_counts)

    images, tokens, targets = data["images"][:count], data["tokens"][:count], data["targets"][:count]
    n, size = len(images), images.shape[-1]
    g = data["grid"].shape[-1]
    counts = removed_counts(fractions, g * g)
    pixel_points, grid_points, pixel_auc, grid_auc = [], [], [], []
    for name, scores in relevance.items():
        scores = np.asarray(scores, dtype=np.float64)
        valid = np.isfinite(scores).all(1)
        ranking = removal_order(np.where(valid[:, None], scores, 0.0), seeded(seed, name))[:n]
        rows = np.flatnonzero(valid[:n])
        for order in ORDERS:
            if len(rows) == 0:
                continue
            masks = torch.from_numpy(removal_masks(ranking[rows], counts, order)).float()  # n x F x G*G
            cells = masks.reshape(-1, 1, g, g)
            pixels = torch.nn.functional.interpolate(cells, size=(size, size), mode="nearest")
            occluded = images[rows].repeat_interleave(len(counts), 0) * (1 - pixels)
            p, _ = answer_probability(model, occluded, tokens[rows].repeat_interleave(len(counts), 0),
                                      targets[rows].repeat_interleave(len(counts), 0), batch_size)
            p = p.reshape(len(rows), len(counts))
            q = grid_curves[(name, order, "mean")][0][rows]
            pixel_points.append(p.ravel())
            grid_points.append(q.ravel())
            pixel_auc.append(trapezoid(p, fractions))
            grid_auc.append(trapezoid(q, fractions))
    if not pixel_auc:
        return {"curves": 0, "spearman_auc": float("nan"), "pearson_points": float("nan")}
    a, b = np.concatenate(pixel_auc), np.concatenate(grid_auc)
    x, y = np.concatenate(pixel_points), np.concatenate(grid_points)
    return {"curves": int(len(a)), "spearman_auc": float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan"),
            "pearson_points": float(pearsonr(x, y).statistic) if len(x) > 2 else float("nan"),
            "mean_auc_pixel": float(a.mean()), "mean_auc_grid": float(b.mean())}


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """The Markdown view: a model and modality named once per group, the interval as one
    column, the verdict as yes / no."""
    rows, previous = [], (None, None)
    for r in table.itertuples(index=False):
        group = (r.model, r.modality)
        ci = "–" if np.isnan(r.ci_low) else f"[{r.ci_low:.3f}, {r.ci_high:.3f}]"
        rows.append({"model": r.model if group != previous else "",
                     "modality": r.modality if group != previous else "", "method": r.method,
                     "order": r.order, "fill": r.fill, "n": r.n, "AUC": r.auc, "95% CI": ci, "kept": r.kept,
                     "more faithful than random": {True: "yes", False: "no"}.get(r.more_faithful_than_random, "")})
        previous = group
    return pd.DataFrame(rows)


def plausibility_caption() -> str:
    return ("Plausibility beside faithfulness, per model and method: the mean Spearman rho of |image map| "
            "with the reference (`rank_correlation.csv`; `plausible`: beats random, on every training seed "
            "where the table has seeds) and the image deletion (`morf`) AUC per fill with its verdict "
            "(`faithful`: yes / no when the fills agree).\n\n")
