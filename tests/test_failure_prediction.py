"""Failure prediction (Goyal et al. 4.2): the numpy logistic regression against scipy on the
same objective, ROC-AUC against the Mann-Whitney count, stratified folds, and the stage."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import approx_fprime, minimize
from scipy.stats import mannwhitneyu

from pipeline import failure_prediction
from pipeline.common.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation.failure import (balanced_accuracy, fit_logistic, out_of_fold_scores, roc_auc,
                                         roc_auc_ci, stratified_folds)
from tests.conftest import evaluation_config

MODELS = ("lstm_cnn", "mlb")


def loop_objective(params, x, y, l2):
    """L2 logistic loss written one row at a time (the intercept is the last parameter)."""
    w, b = params[:-1], params[-1]
    total = 0.0
    for xi, yi in zip(x, y):
        z = sum(wj * xj for wj, xj in zip(w, xi)) + b
        p = 1.0 / (1.0 + np.exp(-z))
        total -= yi * np.log(p) + (1 - yi) * np.log(1 - p)
    return total + 0.5 * l2 * sum(wj * wj for wj in w)


def test_logistic_regression_matches_scipy_on_the_same_objective():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3)) * [1.0, 5.0, 0.1] + [0.0, 2.0, -1.0]
    y = (x[:, 0] + 0.3 * x[:, 1] + rng.normal(size=80) > 0.5).astype(float)
    model = fit_logistic(x, y, l2=2.0)
    # Standardisation is the training rows' own.
    assert model.mean == pytest.approx(x.mean(0)) and model.scale == pytest.approx(x.std(0))
    xs = (x - x.mean(0)) / x.std(0)
    reference = minimize(loop_objective, np.zeros(4), args=(xs, y, 2.0), method="Nelder-Mead",
                         options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 20000, "maxfev": 20000})
    fitted = np.append(model.weights, model.intercept)
    assert fitted == pytest.approx(reference.x, abs=1e-4)
    # The numerical gradient of the loop objective vanishes at the fitted optimum.
    gradient = approx_fprime(fitted, loop_objective, 1e-7, xs, y, 2.0)
    assert np.abs(gradient).max() < 1e-3
    assert model.predict_proba(x) == pytest.approx(1 / (1 + np.exp(-(xs @ model.weights + model.intercept))))


def test_separable_data_is_predicted_perfectly_out_of_fold():
    rng = np.random.default_rng(1)
    labels = np.array([0] * 40 + [1] * 20, dtype=float)
    features = np.column_stack([labels * 4 + rng.normal(0, 0.5, 60), rng.normal(size=60)])
    scores = out_of_fold_scores(features, labels, folds=5, seed=0, l2=1.0)
    assert roc_auc(labels, scores) > 0.99
    assert np.mean((scores >= 0.5) == labels) == 1.0
    lo, hi = roc_auc_ci(labels, scores, samples=200, seed=0)
    assert 0.97 < lo <= hi <= 1.0
    # A useless feature gives an AUC near one half.
    noise = out_of_fold_scores(rng.normal(size=(60, 1)), labels, folds=5, seed=0)
    assert 0.25 < roc_auc(labels, noise) < 0.75


def test_roc_auc_is_the_mann_whitney_count():
    rng = np.random.default_rng(2)
    labels = rng.random(50) < 0.3
    scores = np.round(rng.random(50), 1)  # many ties
    positives, negatives = scores[labels], scores[~labels]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    assert roc_auc(labels, scores) == pytest.approx(wins / (len(positives) * len(negatives)), abs=1e-12)
    u = mannwhitneyu(positives, negatives).statistic
    assert roc_auc(labels, scores) == pytest.approx(u / (len(positives) * len(negatives)), abs=1e-12)
    assert np.isnan(roc_auc(np.zeros(5), scores[:5]))


def test_balanced_accuracy_is_the_mean_recall():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    predicted = np.array([1, 0, 0, 0, 0, 0, 1, 0])
    assert balanced_accuracy(labels, predicted) == pytest.approx((1 / 3 + 4 / 5) / 2)
    assert balanced_accuracy(labels, np.zeros(8)) == pytest.approx(0.5)


def test_stratified_folds_partition_and_keep_class_ratios():
    labels = np.array([0] * 37 + [1] * 13)
    folds = stratified_folds(labels, 5, seed=3)
    assert folds.shape == labels.shape and set(folds.tolist()) == set(range(5))
    for value, total in ((0, 37), (1, 13)):
        sizes = np.bincount(folds[labels == value], minlength=5)
        assert sizes.sum() == total and sizes.max() - sizes.min() <= 1
    assert np.array_equal(folds, stratified_folds(labels, 5, seed=3))
    assert not np.array_equal(folds, stratified_folds(labels, 5, seed=4))
    with pytest.raises(ValueError):
        stratified_folds(labels, 1, seed=0)


def stage_config(root, tmp_path, *overrides):
    return evaluation_config(root, f"paths.reports_dir={tmp_path / 'reports'}", *overrides)


def test_stage_writes_the_table_and_its_features(explained_world, tmp_path):
    cfg = stage_config(explained_world, tmp_path)
    result = failure_prediction.run(cfg)
    csv = tmp_path / "reports" / "tables" / "failure_prediction.csv"
    table = pd.read_csv(csv, keep_default_na=False)
    sets = list(cfg.evaluation.failure_prediction.feature_sets)
    # Goyal et al. 4.2's row (the flip count alone) is in the default table.
    assert list(cfg.evaluation.failure_prediction.feature_sets["flip_count"]) == ["flip_count"]
    # the columns the report and readers use, written out: renaming or dropping one fails here
    assert list(table.columns) == ["model", "features", "n", "wrong", "no_label", "invalid",
                                   "majority_accuracy", "cv_accuracy", "balanced_accuracy", "roc_auc",
                                   "roc_auc_ci_low", "roc_auc_ci_high", "flips_vqa_accuracy_rho",
                                   "flips_vqa_accuracy_p", "note"]
    assert list(zip(table.model, table.features)) == [(m, s) for m in MODELS for s in sets]
    assert (tmp_path / "reports" / "figures" / "failure_prediction.png").stat().st_size > 1000
    assert (tmp_path / "reports" / "tables" / "failure_prediction.md").is_file()
    metrics = json.loads((tmp_path / "reports" / "metrics" / "failure_prediction.json").read_text())
    assert set(metrics) == set(MODELS)

    for model in MODELS:
        index = inputs.load_store(cfg, model)
        questions = index["questions"]
        arrays = inputs.read_method(cfg, model, "occlusion")
        frame = result["frames"][model]
        grid = arrays["image_map_raw"].shape[-1]
        # Features against a plain per-question computation.
        for i, q in enumerate(questions):
            words = min(len(q["tokens"]), arrays["question_map"].shape[1])
            row = frame.iloc[i]
            assert row["image_flips"] == pytest.approx(arrays["extra/image_flips"][i].sum() / grid ** 2)
            assert row["question_flips"] == pytest.approx(arrays["extra/question_flips"][i].sum() / words)
            assert row["image_drop_max"] == pytest.approx(float(arrays["image_map_raw"][i].astype(float).max()))
            assert row["question_drop_mean"] == pytest.approx(float(arrays["question_map"][i, :words].mean()))
            assert row["total_flips"] == arrays["extra/image_flips"][i].sum() + arrays["extra/question_flips"][i].sum()
            # The paper's feature: the number of answer changes, patches and words together.
            assert row["flip_count"] == arrays["extra/image_flips"][i].sum() + arrays["extra/question_flips"][i].sum()
        labelled = [q for q in questions if q["correct"] is not None]
        rows = result["table"][result["table"].model == model]
        for row in rows.itertuples():
            assert row.n + row.no_label + row.invalid == len(questions)
            assert row.no_label == len(questions) - len(labelled)
            assert row.wrong == sum(not q["correct"] for q in labelled)
            assert row.majority_accuracy == pytest.approx(max(row.wrong, row.n - row.wrong) / row.n)
            if row.note:
                assert np.isnan(row.cv_accuracy) and np.isnan(row.roc_auc)
            else:
                assert 0 <= row.cv_accuracy <= 1 and 0 <= row.roc_auc <= 1
                assert row.roc_auc_ci_low <= row.roc_auc <= row.roc_auc_ci_high


def test_too_few_wrong_answers_is_a_note_not_a_crash(explained_world, tmp_path):
    attributions = tmp_path / "attributions"
    for model in MODELS:
        shutil.copytree(inputs.attribution_dir(evaluation_config(explained_world), model), attributions / model)
    # mlb: every answer right but one; lstm_cnn: a clean, learnable split of right and wrong.
    index_file = attributions / "mlb" / "index.json"
    index = json.loads(index_file.read_text())
    for k, q in enumerate(index["questions"]):
        q["correct"] = k != 0
    index["questions"][1]["correct"] = None
    index_file.write_text(json.dumps(index))
    cfg = stage_config(explained_world, tmp_path, f"paths.attributions_dir={attributions}")
    table = failure_prediction.run(cfg)["table"]
    rows = table[table.model == "mlb"]
    assert (rows.wrong == 1).all() and (rows.no_label == 1).all()
    assert rows.note.str.contains("only 1 wrong answer").all()
    assert rows.cv_accuracy.isna().all() and rows.roc_auc.isna().all()
    assert rows.majority_accuracy.tolist() == pytest.approx([1 - 1 / rows.n.iloc[0]] * len(rows))
    metrics = json.loads((tmp_path / "reports" / "metrics" / "failure_prediction.json").read_text())
    assert metrics["mlb"]["flips"]["cv_accuracy"] is None  # NaN is not valid JSON


def test_stage_is_deterministic(explained_world, tmp_path):
    for run in ("a", "b"):
        failure_prediction.run(stage_config(explained_world, tmp_path / run))
    files = [tmp_path / run / "reports" / "tables" / "failure_prediction.csv" for run in ("a", "b")]
    assert files[0].read_bytes() == files[1].read_bytes()


def test_empty_or_missing_store_names_the_attribute_stage(explained_world, tmp_path):
    attributions = tmp_path / "attributions"
    for model in MODELS:
        shutil.copytree(inputs.attribution_dir(evaluation_config(explained_world), model), attributions / model)
    index_file = attributions / "lstm_cnn" / "index.json"
    index = json.loads(index_file.read_text())
    index["questions"] = []
    index_file.write_text(json.dumps(index))
    with pytest.raises(DataError, match="pipeline.attribute"):
        failure_prediction.run(stage_config(explained_world, tmp_path, f"paths.attributions_dir={attributions}"))
    # A store without occlusion cannot give flips.
    index_file = attributions / "mlb" / "index.json"
    index = json.loads(index_file.read_text())
    del index["methods"]["occlusion"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(DataError, match="pipeline.attribute model=mlb"):
        failure_prediction.run(stage_config(explained_world, tmp_path, f"paths.attributions_dir={attributions}",
                                            "evaluation.models=[mlb]"))
