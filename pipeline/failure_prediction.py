"""Stage ``failure_prediction``: can a model's wrong answers be told from how easily occlusion
flips them? (Goyal et al. 2016, section 4.2: their classifier on answer flips reaches 72%
accuracy on their data.)

    python -m pipeline.failure_prediction [evaluation.failure_prediction.folds=10]

Per question, from the occlusion store of each model (the attribute stage records every
occlusion that changes the predicted answer):

    flip_count           how many occlusions (patches and dropped words) change the answer: the
                         paper's quantity ("the number of times the predicted answer changes")
    image_flips          patches whose occlusion flips the answer / G*G patches occluded
    question_flips       words whose removal flips the answer / number of real words
    image_drop_max/mean  max / mean probability drop over the G x G patches (image_map_raw)
    question_drop_max/mean  max / mean probability drop over the real words (question_map)
    probability          the answer's own probability (a confidence variant, not from occlusion)

Label: the answer is wrong, i.e. its VQA accuracy is 0 (none of the ten humans gave it; index
``correct`` is False); "success" is the opposite. Questions without ground-truth answers are
excluded and counted, and so are questions whose occlusion maps are not finite. The feature set
``flip_count`` (the flip count alone, against the majority baseline) is the paper's row; the
others are richer classifiers beside it. Classifier:
L2 logistic regression on each feature set of ``evaluation.failure_prediction.feature_sets``
(standardised on the training fold), stratified k-fold cross-validation, out-of-fold scores
(:mod:`pipeline.evaluation.failure`). Reported per model and feature set: n, wrong answers, the
majority-class baseline, CV accuracy (threshold 0.5), balanced accuracy, ROC-AUC of "wrong" with
a 95% bootstrap interval over questions, and Spearman's rho (with p-value) between the total
flip count and the answer's VQA accuracy. A model with too few wrong (or right) answers for the
folds gets a row of NaN metrics and a ``note`` saying why.

Writes ``reports/tables/failure_prediction.{csv,md}``, ``reports/figures/failure_prediction.png``
(share of correct answers per bin of the flip count, per model) and
``reports/metrics/failure_prediction.json``.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from pipeline.common.config import stage_main
from pipeline.common.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation.failure import balanced_accuracy, out_of_fold_scores, roc_auc, roc_auc_ci
from pipeline.evaluation.outputs import bootstrap_settings, json_safe, publish
from pipeline.viz.figures import failure_figure

log = logging.getLogger(__name__)

STAGE = "failure_prediction"
METHOD = "occlusion"
FEATURES = ("flip_count", "image_flips", "question_flips", "image_drop_max", "image_drop_mean",
            "question_drop_max", "question_drop_mean", "probability")
NEEDED_ARRAYS = ("valid", "image_map_raw", "question_map",
                 "extra/flip_counts/image", "extra/flip_counts/question")
COLUMNS = ["model", "features", "n", "wrong", "no_label", "invalid", "majority_accuracy",
           "cv_accuracy", "balanced_accuracy", "roc_auc", "roc_auc_ci_low", "roc_auc_ci_high",
           "flips_vqa_accuracy_rho", "flips_vqa_accuracy_p", "note"]


def load_occlusion(cfg, model: str, index: dict) -> dict[str, np.ndarray]:
    """The occlusion arrays the features need, checked against the index."""
    return inputs.read_method(cfg, model, METHOD, NEEDED_ARRAYS, index=index,
                              needs="failure prediction is built on its answer flips (attribute "
                                    "with both occlusion modalities)")


def question_features(arrays: dict[str, np.ndarray], questions: list[dict]) -> pd.DataFrame:
    """One row per question: the features of the module docstring, ``total_flips``, the label
    (``correct``: True / False / None) and ``accuracy``; ``usable`` marks finite features."""
    n = len(questions)
    image = arrays["image_map_raw"].astype(np.float64).reshape(n, -1)  # N x G*G
    question_map = arrays["question_map"].astype(np.float64)
    length = question_map.shape[1]
    # Real words: the tokens the model saw (questions longer than the padded length were cut).
    words = np.array([min(len(q["tokens"]), length) for q in questions])
    real = np.arange(length)[None, :] < words[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        question_max = np.where(real, question_map, -np.inf).max(1)
        question_mean = np.where(real, question_map, 0.0).sum(1) / words
    question_max = np.where(words > 0, question_max, np.nan)
    image_count = arrays["extra/flip_counts/image"].astype(np.int64)
    question_count = arrays["extra/flip_counts/question"].astype(np.int64)
    frame = pd.DataFrame({
        "question_id": [int(q["question_id"]) for q in questions],
        "flip_count": image_count + question_count,
        "image_flips": image_count / image.shape[1],
        "question_flips": np.where(words > 0, question_count / np.maximum(words, 1), np.nan),
        "image_drop_max": image.max(1),
        "image_drop_mean": image.mean(1),
        "question_drop_max": question_max,
        "question_drop_mean": question_mean,
        "probability": [float(q["probability"]) for q in questions],
        "total_flips": image_count + question_count,
        "correct": [q["correct"] for q in questions],
        "accuracy": [np.nan if q["accuracy"] is None else float(q["accuracy"]) for q in questions],
    })
    frame["usable"] = arrays["valid"].astype(bool) & np.isfinite(frame[list(FEATURES)].to_numpy()).all(1)
    return frame


def flip_accuracy_correlation(frame: pd.DataFrame) -> tuple[float, float]:
    """Spearman (rho, p) between the total flip count and the VQA accuracy of the answer; NaN
    when either is constant (no ranking to correlate)."""
    rows = frame[frame["usable"] & frame["accuracy"].notna()]
    flips, accuracy = rows["total_flips"].to_numpy(), rows["accuracy"].to_numpy()
    if len(rows) < 3 or np.ptp(flips) == 0 or np.ptp(accuracy) == 0:
        return float("nan"), float("nan")
    result = spearmanr(flips, accuracy)
    return float(result.statistic), float(result.pvalue)


def evaluate(features: np.ndarray, wrong: np.ndarray, folds: int, l2: float, boot: dict) -> dict:
    """Cross-validated metrics of predicting ``wrong`` from ``features``; NaN metrics and a
    ``note`` when the classes are too small for stratified ``folds``-fold cross-validation."""
    n, n_wrong = len(wrong), int(wrong.sum())
    out = {"n": n, "wrong": n_wrong,
           "majority_accuracy": max(n_wrong, n - n_wrong) / n if n else float("nan"),
           "cv_accuracy": float("nan"), "balanced_accuracy": float("nan"), "roc_auc": float("nan"),
           "roc_auc_ci_low": float("nan"), "roc_auc_ci_high": float("nan"), "note": ""}
    needed = max(2, folds)
    smallest = min(n_wrong, n - n_wrong)
    if smallest < needed:
        which = "wrong" if n_wrong <= n - n_wrong else "correct"
        out["note"] = (f"only {smallest} {which} answer(s): {folds}-fold stratified "
                       f"cross-validation needs at least {needed} of each class")
        return out
    scores = out_of_fold_scores(features, wrong.astype(np.float64), folds, boot["seed"], l2)
    predicted_wrong = scores >= 0.5
    lo, hi = roc_auc_ci(wrong, scores, **boot)
    out.update(cv_accuracy=float(np.mean(predicted_wrong == wrong)),
               balanced_accuracy=balanced_accuracy(wrong, predicted_wrong),
               roc_auc=roc_auc(wrong, scores), roc_auc_ci_low=lo, roc_auc_ci_high=hi)
    return out


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    evaluation = cfg.evaluation
    settings = evaluation[STAGE]
    folds, l2 = int(settings.folds), float(settings.l2)
    feature_sets = OmegaConf.to_container(settings.feature_sets, resolve=True)
    for name, features in feature_sets.items():
        unknown = sorted(set(features) - set(FEATURES))
        if unknown or not features:
            raise ValueError(f"evaluation.failure_prediction.feature_sets.{name}: unknown or no "
                             f"features {unknown}; choose from {list(FEATURES)}")
    boot = bootstrap_settings(cfg)
    models = [str(m) for m in evaluation.models]
    if not models:
        raise DataError("evaluation.models is empty: name at least one model")

    rows, frames, metrics = [], {}, {}
    for model in tqdm(models, desc="failure prediction", unit="model"):
        index = inputs.load_store(cfg, model)
        frame = question_features(load_occlusion(cfg, model, index), index["questions"])
        frames[model] = frame
        labelled = frame["correct"].notna()
        kept = frame[frame["usable"] & labelled]
        wrong = ~kept["correct"].astype(bool).to_numpy()
        rho, p = flip_accuracy_correlation(frame)
        metrics[model] = {"questions": len(kept), "wrong": int(wrong.sum()),
                          "flips_vqa_accuracy_rho": rho}
        for name, features in feature_sets.items():
            result = evaluate(kept[features].to_numpy(dtype=np.float64), wrong, folds, l2, boot)
            rows.append({"model": model, "features": name, **result,
                         "no_label": int((~labelled).sum()),
                         "invalid": int((labelled & ~frame["usable"]).sum()),
                         "flips_vqa_accuracy_rho": rho, "flips_vqa_accuracy_p": p})
            metrics[model][name] = {k: result[k] for k in
                                    ("majority_accuracy", "cv_accuracy", "balanced_accuracy", "roc_auc")}
            if result["note"]:
                log.warning("%s / %s: %s", model, name, result["note"])
    table = pd.DataFrame(rows)[COLUMNS]

    published = publish(cfg, STAGE, tables={STAGE: table}, metrics=metrics, start=start,
                        figures={STAGE: failure_figure(frames, list(settings.flip_bins))}, note=f"{len(models)} model(s)",
                        summary={f"{r.model}/{r.features}/{k}": json_safe(getattr(r, k))
                                 for r in table.itertuples(index=False)
                                 for k in ("cv_accuracy", "majority_accuracy", "balanced_accuracy", "roc_auc")})
    return {"table": table, "metrics": published["metrics"], "frames": frames, "seconds": published["seconds"]}


main = stage_main(run)

if __name__ == "__main__":
    main()
