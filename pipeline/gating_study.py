"""Stage ``gating_study``: does the question decide which fusion neurons pass gradient, and does
the question-gated Grad-CAM map move with the question? (Ummettuguli, "Towards visual
explanations that ground multiple modalities": Tables 1-4, Tables 5-6 and the top-n sweep.)

    python -m pipeline.gating_study [evaluation.models=[mlb]] [evaluation.gating_study.top_k=5]

Per model, from the neuron scores s_i = sum_j |dF_i/dq_j| that the attribute stage stored with
``gated_gradcam`` (``extra/neuron_scores``, B x D over the fusion width D):

1. Tables 1-4 analogue, ``gating_top_neurons``: the top-k neurons (index and score) of
   (a) ``same_question``: the most frequent question texts asked about >= 2 different images
   (one question per image) and (b) ``same_image``: the images with the most different
   questions, every one of them. ``gating_top_neuron_overlap``: the mean Jaccard overlap of the
   top-k sets within each listed group. The paper's reading: the question picks the neurons, so
   the same question on different images overlaps much, different questions on one image less.
2. Tables 5-6 analogue, ``gating_score_correlation``: over ALL such pairs in the split, Spearman's
   rho between the full score vectors and the top-k Jaccard, for same question / different
   images, different questions / same image, the synthetic world's deliberate same-answer pairs
   (two questions about different objects of one image with the same answer) and a baseline of
   unrelated pairs (different question, different image). Pairs share questions, so the
   bootstrap over pairs is somewhat optimistic about the intervals.
3. The sweep (synthetic data only: it needs the ground-truth masks and the deliberate pairs),
   ``gating_sweep`` + figure: for every deliberate pair and gate size n (``sweep.top_n``, ``full`` =
   D, which is Grad-CAM exactly), the map of each question against its OWN question's ground-
   truth mask (``own_mask``) and against the OTHER question's (``other_mask``), their difference
   (``own_minus_other`` > 0: the map follows the question it explains), and how different the two
   questions' maps are (``pair_difference`` = 1 - rho(map_a, map_b): 0 the same ranking, 1
   unrelated, 2 reversed); |map| at r x r
   (``evaluation.resolution``), Spearman over the cells. Grad-CAM rows are the reference. The
   target is the model's prediction (both questions of a pair have the same answer by design).
   Every gate size is computed from one forward pass with the stored neuron scores
   (:func:`pipeline.evaluation.gating.gated_gradcam_sweep`, tested to equal ``explain`` with
   ``gated_gradcam`` at each n); the store is first checked to belong to the current model file.

Every table row: n, mean and a percentile bootstrap interval (``evaluation.bootstrap``); values
that are undefined (a constant map or score vector: Spearman has no ranking) are counted in
``undefined``, never scored. Writes ``reports/tables/gating_*.{csv,md}``,
``reports/figures/gating_sweep.png`` and ``reports/metrics/gating_study.json``.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.attribution import explain_options
from pipeline.attribution.base import method_score, upsample_maps
from pipeline.common.config import abspath, stage_main
from pipeline.data import processed
from pipeline.common.errors import DataError
from pipeline.data.images import ImageTransform
from pipeline.data.vocab import pad_token_ids
from pipeline.data.vqa_format import load_image
from pipeline.evaluation import gating, inputs
from pipeline.evaluation.gating import CHANGE_MEASURE, METHOD, SWEEP_MEASURES
from pipeline.evaluation.outputs import bootstrap_settings, figures_dir, json_safe, not_measured_figure, publish
from pipeline.evaluation.stats import spearman_rows, summarise
from pipeline.models import load_trained_model
from pipeline.models.checkpoint import trained_model_path
from pipeline.viz.figures import gating_sweep_figure

log = logging.getLogger(__name__)

STAGE = "gating_study"
TOP_COLUMNS = ["model", "case", "group", "question_id", "image_id", "question", "rank", "neuron", "score"]
OVERLAP_COLUMNS = ["model", "case", "group", "questions", "n", "mean", "ci_low", "ci_high"]
CORRELATION_COLUMNS = ["model", "case", "measure", "n", "mean", "ci_low", "ci_high", "undefined"]
SWEEP_COLUMNS = ["model", "method", "top_n", "full_width", "measure", "n", "mean", "ci_low",
                 "ci_high", "undefined"]


def load_neuron_scores(cfg, model: str) -> tuple[list[dict], np.ndarray]:
    """(index rows, N x D neuron scores) of the questions whose gated Grad-CAM is valid."""
    index = inputs.load_store(cfg, model)
    arrays = inputs.read_method(cfg, model, METHOD, ("valid", "extra/neuron_scores"), index=index)
    rows = index["questions"]
    valid = arrays["valid"].astype(bool) & np.isfinite(arrays["extra/neuron_scores"]).all(1)
    if (~valid).any():
        log.warning("%s: %d question(s) with non-finite %s maps or scores left out", model,
                    int((~valid).sum()), METHOD)
    return [r for r, ok in zip(rows, valid) if ok], arrays["extra/neuron_scores"][valid].astype(np.float64)


def _summary_row(values: np.ndarray, boot: dict) -> dict:
    s = summarise(values, **boot)
    s["undefined"] = int(np.isnan(np.asarray(values, dtype=np.float64)).sum())
    return s


# --------------------------------------------------------------------------------------------
# Parts 1 and 2


def top_neuron_tables(model: str, rows: list[dict], scores: np.ndarray, settings, boot: dict):
    """Tables 1-4 analogue: per listed question its top-k neurons; per listed group the mean
    Jaccard overlap of the top-k sets."""
    top, values = gating.top_neurons(scores, int(settings.top_k))
    question_groups = [("same_question", key, members[:int(settings.same_question.questions_per_group)])
                       for key, members
                       in gating.same_question_groups(rows)[:int(settings.same_question.groups)]]
    image_groups = [("same_image", str(image), members)
                    for image, members in gating.same_image_groups(rows)[:int(settings.same_image.groups)]]
    top_rows, overlap_rows = [], []
    for case, key, members in question_groups + image_groups:
        for i in members:
            r = rows[i]
            for rank, (neuron, value) in enumerate(zip(top[i], values[i]), start=1):
                top_rows.append({"model": model, "case": case, "group": key,
                                 "question_id": r["question_id"], "image_id": r["image_id"],
                                 "question": r["question"], "rank": rank, "neuron": int(neuron),
                                 "score": float(value)})
        overlaps = gating.pair_jaccard(top, gating.within_group_pairs([(key, members)]))
        s = summarise(overlaps, **boot)
        overlap_rows.append({"model": model, "case": case, "group": key, "questions": len(members), **s})
    return top_rows, overlap_rows


def comparison_pairs(rows: list[dict], pairs_truth, settings, seed: int) -> dict[str, np.ndarray]:
    """Row-index pairs of each case of Tables 5-6 (at most ``max_pairs`` each, seeded)."""
    limit = settings.get("max_pairs")
    same_question = gating.subsample_pairs(gating.within_group_pairs(gating.same_question_groups(rows)), limit, seed)
    same_image = gating.subsample_pairs(gating.within_group_pairs(gating.same_image_groups(rows)), limit, seed)
    row_of = {r["question_id"]: i for i, r in enumerate(rows)}
    deliberate = np.array([(row_of[a], row_of[b]) for a, b in pairs_truth if a in row_of and b in row_of],
                          dtype=np.int64).reshape(-1, 2)
    cases = {"same_question_different_images": same_question,
             "different_questions_same_image": same_image}
    if len(pairs_truth):
        cases["same_answer_pairs"] = deliberate
    baseline_size = max(len(same_question), len(same_image), 1)
    cases["unrelated"] = gating.unrelated_pairs(rows, baseline_size if limit is None else min(baseline_size, int(limit)), seed)
    return cases


def correlation_table(model: str, scores: np.ndarray, cases: dict[str, np.ndarray], top_k: int,
                      boot: dict) -> list[dict]:
    top, _ = gating.top_neurons(scores, top_k)
    out = []
    for case, pairs in cases.items():
        for measure, values in (("spearman", gating.pair_spearman(scores, pairs)),
                                (f"top{top_k}_jaccard", gating.pair_jaccard(top, pairs))):
            out.append({"model": model, "case": case, "measure": measure,
                        **_summary_row(values, boot)})
    return out


# --------------------------------------------------------------------------------------------
# Part 3: the sweep


def gate_sizes(requested, width: int) -> list[int]:
    """The sweep's gate sizes for fusion width D: ``full`` (or any n >= D) means D; sorted,
    without repeats."""
    sizes = set()
    for n in requested:
        n = width if str(n).lower() == "full" else int(n)
        if n < 1:
            raise ValueError(f"gating_study.sweep.top_n: gate sizes must be >= 1 or 'full', got {n}")
        sizes.add(min(n, width))
    return sorted(sizes)


def sweep(cfg, model_name: str, rows: list[dict], scores: np.ndarray, pairs_truth, settings,
          boot: dict) -> tuple[list[dict], dict]:
    """Part 3 for one model: the rows of ``gating_sweep`` and its headline numbers."""
    row_of = {r["question_id"]: i for i, r in enumerate(rows)}
    pairs = [(a, b) for a, b in pairs_truth if a in row_of and b in row_of]
    if len(pairs) < len(pairs_truth):
        log.info("%s: %d of %d same-answer pairs are in the store (the others were not explained "
                 "or have invalid maps)", model_name, len(pairs), len(pairs_truth))
    if not pairs:
        raise DataError(f"none of the {len(pairs_truth)} same-answer pairs of the split is in the "
                        f"attribution store of {model_name}: {inputs.rerun_attribute(cfg, model_name)} without "
                        "attribution.limit", inputs.attribution_dir(cfg, model_name))
    processed_dir = abspath(cfg.paths.processed_dir)
    model = load_trained_model(cfg, model_name)
    model_path = trained_model_path(cfg, model_name)  # named in the errors below
    records = {r["question_id"]: r for r in processed.load_question_table(processed_dir, str(cfg.evaluation.split))}
    transform = ImageTransform(model.backbone.input_size, model.backbone.mean, model.backbone.std)
    data_root = abspath(cfg.data.root)
    resolution = int(cfg.evaluation.resolution)
    # The sweep is question-gated Grad-CAM: its score as the attribute stage used it.
    score_kind = method_score(explain_options(cfg.attribution), "gated_gradcam")
    upsample_mode = str(cfg.attribution.upsample)

    qids = [q for pair in pairs for q in pair]  # a0, b0, a1, b1, ...
    masks = inputs.ground_truth_maps(cfg, str(cfg.evaluation.split), qids, resolution)
    width = scores.shape[1]
    sizes = gate_sizes(settings.sweep.top_n, width)
    maps = {"gradcam": [], **{n: [] for n in sizes}}
    stale = 0.0
    batch = max(2, int(settings.sweep.batch_size) // 2 * 2)  # whole pairs per batch
    for start in tqdm(range(0, len(qids), batch), desc=f"gating sweep ({model_name})", unit="batch"):
        chunk = qids[start:start + batch]
        images = torch.stack([transform(load_image(data_root / records[q]["image"])) for q in chunk])
        tokens = pad_token_ids([records[q]["token_ids"] for q in chunk])
        chunk_scores = torch.as_tensor(scores[[row_of[q] for q in chunk]], dtype=torch.float32)
        logits, target, gradcam, gated = gating.gated_gradcam_sweep(model, images, tokens, chunk_scores,
                                                                    sizes, score=score_kind)
        # The stored scores must come from this model: its answer probabilities must be the ones
        # the attribute stage recorded (a retrained model differs far beyond float noise).
        confidence = torch.softmax(logits, dim=1).max(1).values
        for i, q in enumerate(chunk):
            stale = max(stale, abs(float(confidence[i]) - rows[row_of[q]]["probability"]))
        if stale > 1e-3:
            raise DataError(f"the attribution store of {model_name} was made with another model than "
                            f"{model_path} (answer probabilities differ by up to {stale:.3g}): "
                            f"{inputs.rerun_attribute(cfg, model_name)}", inputs.attribution_dir(cfg, model_name))
        size = tuple(images.shape[-2:])
        maps["gradcam"].append(inputs.to_resolution(upsample_maps(gradcam, size, upsample_mode).numpy(), resolution))
        for n in sizes:
            maps[n].append(inputs.to_resolution(upsample_maps(gated[n], size, upsample_mode).numpy(), resolution))
    mask_a = np.stack([masks[a] for a, _ in pairs])
    mask_b = np.stack([masks[b] for _, b in pairs])
    out, headline = [], {}
    full_difference = None
    for key, chunks in maps.items():
        stacked = np.concatenate(chunks)
        measures = gating.pair_map_measures(stacked[0::2], stacked[1::2], mask_a, mask_b)
        method = "gradcam" if key == "gradcam" else METHOD
        n = width if key == "gradcam" else key
        for measure in SWEEP_MEASURES:
            row = {"model": model_name, "method": method, "top_n": n, "full_width": n == width,
                   "measure": measure, **_summary_row(measures[measure], boot)}
            out.append(row)
            headline[f"{method}/{n}/{measure}"] = row["mean"]
        if key == width:
            full_difference = float(np.abs(np.concatenate(maps[width]) - np.concatenate(maps["gradcam"])).max())
    largest = None
    for previous, n in zip(sizes, sizes[1:]):
        a, b = np.concatenate(maps[previous]), np.concatenate(maps[n])
        change = 1.0 - spearman_rows(a.reshape(len(a), -1), b.reshape(len(b), -1))
        row = {"model": model_name, "method": METHOD, "top_n": n, "full_width": n == width,
               "measure": CHANGE_MEASURE, **_summary_row(change, boot)}
        out.append(row)
        if row["n"] and (largest is None or row["mean"] > largest[2]):
            largest = (previous, n, row["mean"])
    if largest is not None:
        headline["largest_change_from"], headline["largest_change_to"], headline["largest_change"] = largest
    headline["pairs"] = len(pairs)
    headline["full_width_max_abs_difference_from_gradcam"] = full_difference
    return out, headline


# --------------------------------------------------------------------------------------------


NO_SWEEP = "no ground-truth masks or same-answer pairs on this data (synthetic data only)"


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    evaluation = cfg.evaluation
    settings, boot = evaluation.gating_study, bootstrap_settings(cfg)
    truth = inputs.ground_truth_questions(cfg, str(evaluation.split))
    top_rows, overlap_rows, correlation_rows, sweep_rows = [], [], [], []
    metrics = {"models": {}}
    for model in evaluation.models:
        model = str(model)
        rows, scores = load_neuron_scores(cfg, model)
        log.info("%s: neuron scores of %d questions over %d fusion neurons", model, len(rows), scores.shape[1])
        t, o = top_neuron_tables(model, rows, scores, settings, boot)
        top_rows += t
        overlap_rows += o
        cases = comparison_pairs(rows, truth["pairs"], settings, boot["seed"])
        correlation = correlation_table(model, scores, cases, int(settings.top_k), boot)
        correlation_rows += correlation
        m = {"questions": len(rows), "fusion_width": int(scores.shape[1]),
             "score_correlation": {f"{r['case']}/{r['measure']}": r["mean"] for r in correlation}}
        if truth["pairs"]:
            rows_sweep, headline = sweep(cfg, model, rows, scores, truth["pairs"], settings, boot)
            sweep_rows += rows_sweep
            m["sweep"] = headline
        else:
            log.info("%s: top-n sweep skipped: %s", model, NO_SWEEP)
            m["sweep"] = {"skipped": NO_SWEEP}
        metrics["models"][model] = m

    tables = {"gating_top_neurons": pd.DataFrame(top_rows, columns=TOP_COLUMNS),
              "gating_top_neuron_overlap": pd.DataFrame(overlap_rows, columns=OVERLAP_COLUMNS),
              "gating_score_correlation": pd.DataFrame(correlation_rows, columns=CORRELATION_COLUMNS)}
    figures = {}
    if sweep_rows:
        tables["gating_sweep"] = pd.DataFrame(sweep_rows, columns=SWEEP_COLUMNS)
        figures["gating_sweep"] = gating_sweep_figure(tables["gating_sweep"])
    else:
        # The sweep's outputs say why it is missing (dvc.yaml declares them; no table from an
        # earlier run on the synthetic world may stay behind).
        tables["gating_sweep"] = (pd.DataFrame(columns=SWEEP_COLUMNS), f"Not measured: {NO_SWEEP}.\n")
        not_measured_figure(figures_dir(cfg) / "gating_sweep.png", NO_SWEEP)
    metrics = json_safe(metrics)
    summary = {f"{model}/{k}": v for model, m in metrics["models"].items()
               for k, v in {**m["score_correlation"], **{f"sweep/{a}": b for a, b in m["sweep"].items()}}.items()
               if isinstance(v, (int, float)) and v is not None}
    publish(cfg, STAGE, tables=tables, figures=figures, metrics=metrics, summary=summary, start=start,
            note=f"models {list(metrics['models'])}")
    return metrics


main = stage_main(run)

if __name__ == "__main__":
    main()
