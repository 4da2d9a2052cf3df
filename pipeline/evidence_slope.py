"""Stage ``evidence_slope``: does the answer's score rise when the evidence where one must look
grows? A measured answer to why signed-gradient maps (Grad-CAM) rank the ground truth *below*
random on some questions (``rank_correlation_by_answer_type``), beyond the papers.

    python -m pipeline.evidence_slope [evaluation.evidence_slope.eps=0.05]

For every validation question (synthetic data: the exact ground truth is needed) and every
model, on the ``conv`` feature grid A (the layer Grad-CAM reads); the ground-truth cells are
those covered by the question's objects for at least a share ``cell_share``:

* ``delta``: the change of the explained answer's logit y^c when the ground-truth cells'
  features are scaled by 1 + eps, all other cells unchanged (a finite difference);
* ``delta_logprob``: the same change of the answer's log-probability;
* ``delta_down``: the logit's change with those features scaled by 1 - eps (falling both ways:
  a peak; falling one way and rising the other: a slope);
* ``first_order``: eps * sum over those cells of (dy^c/dA_s . A_s), the same change to first order;
* ``gradcam_contrast``: the signed Grad-CAM sum (Selvaraju et al. Eq. 2 without the ReLU)
  averaged over the ground-truth cells minus its average over the other cells;
* ``relu_kept``: sum ReLU(L) / sum |L| of the signed map L (the share Eq. 2's ReLU keeps), and
  ``signed_sum``: sum L / sum |L|.

On an LSTM-CNN that L2-normalises the grid's spatial mean (``model.arch.image_feature=pooled``,
not the paper's fc7), y^c is invariant to scaling the grid and Euler's theorem makes the signed
map sum to zero on every question (``relu_kept`` = 0.5); the paper's fc7 path breaks that
invariance. The argument, and what a mostly negative ``delta`` on counting questions says about
Grad-CAM's negative rank correlation there, are in docs/evaluation.md ("Evidence slope and
Grad-CAM on LSTM-CNN").

The table has one row per model and answer type (and ``all``): ``n`` questions scored,
``no_truth`` questions without ground-truth cells (e.g. a count of 0; excluded), the share of
questions whose score falls (``score_falls``, with a 95% bootstrap interval), the share whose
score falls both ways (``peak``), the share whose probability falls (``prob_falls``), the mean
``delta``, how often the first-order estimate has the sign of ``delta`` (``first_order_agrees``),
how often Grad-CAM's contrast is negative (``gradcam_negative``), how often its sign agrees
with ``delta`` (``gradcam_agrees``), the mean ``relu_kept`` and the share of questions whose signed
Grad-CAM map sums to zero (``zero_sum``: |``signed_sum``| at most ``zero_sum_tolerance``).

Writes ``reports/tables/evidence_slope.{csv,md}`` and ``reports/metrics/evidence_slope.json``.
On data without ground truth both are written empty, with the reason.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.common.config import stage_main
from pipeline.evaluation import inputs
from pipeline.evaluation.outputs import bootstrap_settings, json_safe, markdown_table, publish
from pipeline.evaluation.slope import evidence_slope, summarise_model
from pipeline.models import load_trained_model
from pipeline.common.seeding import seed_everything

log = logging.getLogger(__name__)

STAGE = "evidence_slope"
COLUMNS = ["model", "answer_type", "n", "no_truth", "score_falls", "ci_low", "ci_high", "peak", "prob_falls",
           "mean_delta", "first_order_agrees", "gradcam_negative", "gradcam_agrees", "relu_kept", "zero_sum"]


def measure(cfg, model_name: str, settings) -> pd.DataFrame:
    """Per-question measurements of one model over the whole split (question id order of the
    attribute stage's batches: by image, then question id)."""
    model = load_trained_model(cfg, model_name).eval()
    records, images, tokens = inputs.question_batch(cfg, model, str(cfg.evaluation.split))
    qids = [int(r["question_id"]) for r in records]
    batch, eps, share = int(settings.batch), float(settings.eps), float(settings.cell_share)
    rows = []
    for start in tqdm(range(0, len(records), batch), desc=f"evidence slope {model_name}", unit="batch"):
        stop = min(start + batch, len(records))
        with torch.no_grad():
            grid = model.backbone(images[start:stop])
        truth = inputs.ground_truth_maps(cfg, str(cfg.evaluation.split), qids[start:stop], grid.shape[-1])
        masks = torch.from_numpy(np.stack([truth[q] >= share for q in qids[start:stop]]))
        out = evidence_slope(model.head, grid, tokens[start:stop], masks, eps)
        for k, r in enumerate(records[start:stop]):
            rows.append({"question_id": qids[start + k], "answer_type": str(r["answer_type"]),
                         "truth_cells": int(masks[k].sum()), **{name: v[k] for name, v in out.items()}})
    return pd.DataFrame(rows)


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    evaluation, settings = cfg.evaluation, cfg.evaluation[STAGE]
    boot = bootstrap_settings(cfg)
    seed_everything(int(evaluation.seed))
    if cfg.data.source != "synthetic":
        reason = f"{cfg.data.name} has no ground truth of where to look (synthetic data only)"
        log.warning("evidence slope not measured: %s", reason)
        table = pd.DataFrame(columns=COLUMNS)
        metrics = publish(cfg, STAGE, tables={STAGE: (table, f"Not measured: {reason}.\n")},
                          metrics={"skipped": reason}, start=start)["metrics"]
        return {"table": table, "metrics": metrics}
    rows = []
    for model in [str(m) for m in evaluation.models]:
        rows += summarise_model(model, measure(cfg, model, settings), boot,
                                float(settings.zero_sum_tolerance))
    table = pd.DataFrame(rows, columns=COLUMNS)
    caption = (f"Scaling the ground-truth cells' features (share >= {float(settings.cell_share):g}) by "
               f"1 + {float(settings.eps):g} at `conv`: how often the explained answer's logit falls "
               "(`score_falls`, 95% bootstrap interval), how often it falls when they are scaled "
               f"by 1 - {float(settings.eps):g} as well (`peak`), how often the answer's probability falls "
               "(`prob_falls`), the mean change of the logit, how often the "
               "first-order (gradient) estimate has the same sign, how often the signed Grad-CAM "
               "sum is lower on the ground truth than elsewhere (`gradcam_negative`) and how "
               "often its sign agrees with the measured change (`gradcam_agrees`), the mean share "
               "of the signed Grad-CAM map's mass that its ReLU keeps (`relu_kept`) and how often "
               f"the signed map sums to zero (`zero_sum`: |sum| <= {float(settings.zero_sum_tolerance):g} "
               "x sum of |values|; on a model that L2-normalises the grid's spatial mean it always "
               "does, by Euler's theorem; through fc6-fc7, as LSTM-CNN reads the image by default, "
               "it need not).\n\n")
    kept = ("n", "score_falls", "peak", "prob_falls", "gradcam_agrees", "relu_kept", "zero_sum")
    metrics = json_safe({f"{r['model']}/{r['answer_type']}": {k: r[k] for k in kept} for r in rows})
    publish(cfg, STAGE, tables={STAGE: (table, caption + markdown_table(table))}, metrics=metrics,
            summary={f"{k}/score_falls": v["score_falls"] for k, v in metrics.items()}, start=start,
            note=f"models {list(evaluation.models)}")
    return {"table": table, "metrics": metrics}


main = stage_main(run)

if __name__ == "__main__":
    main()
