"""Stage faithfulness: the curves on a head whose answer depends only on known cells and words
(the ground-truth order is the steepest deletion and the flattest insertion, a random map in
between), the area under the curve against a hand-written trapezoid, ROAD's imputation on a
linear ramp, the verdict rule, and the stage end to end on the explained tiny world."""
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import faithfulness, rank_correlation
from pipeline.evaluation import faithfulness as lib
from pipeline.evaluation import perturbation
from tests.conftest import evaluation_config

FRACTIONS = [k / 10 for k in range(11)]
G, C, T, ANSWERS = 4, 3, 6, 2
UNK = 1
# The answer depends on these cells (weights 4, 3, 2, 1; no two of them neighbours, so that ROAD
# imputes a removed one from background) and on the words at positions 1 and 3.
EVIDENCE_CELLS = {0: 4.0, 2: 3.0, 8: 2.0, 10: 1.0}
EVIDENCE_WORDS = {1: 3.0, 3: 2.0}


class KnownEvidenceHead(torch.nn.Module):
    """logit(answer 0) = sum over the evidence cells of weight x channel 0, plus the evidence
    words' weights when they are not <unk>; logit(answer 1) = 8, so that the explained answer
    (0) is sure with all the evidence and loses with little of it. Everything else is ignored."""

    def forward(self, grid, tokens):
        flat = grid[:, 0].flatten(1)
        image = sum(w * flat[:, c] for c, w in EVIDENCE_CELLS.items())
        words = sum(w * ((tokens[:, p] != UNK) & (tokens[:, p] != 0)).float() for p, w in EVIDENCE_WORDS.items())
        return torch.stack([image + words, torch.full_like(image, 8.0)], dim=1)


def known_world(n: int = 24):
    torch.manual_seed(0)
    grid = torch.zeros(n, C, G, G)
    grid[:, 0] = 0.05 * torch.rand(n, G, G)              # the evidence's channel: background low,
    for cell in EVIDENCE_CELLS:                          # evidence cells high
        grid[:, 0].view(n, -1)[:, cell] += 1.0
    grid[:, 1:] = torch.rand(n, C - 1, G, G)
    tokens = torch.randint(2, 20, (n, T))
    targets = torch.zeros(n, dtype=torch.long)
    truth = np.zeros((n, G * G))
    for cell, weight in EVIDENCE_CELLS.items():
        truth[:, cell] = weight
    words = np.zeros((n, T))
    for position, weight in EVIDENCE_WORDS.items():
        words[:, position] = weight
    return grid, tokens, targets, truth, words


def test_ground_truth_order_is_steepest_to_delete_and_flattest_to_keep():
    grid, tokens, targets, truth, words = known_world()
    rng = np.random.default_rng(3)
    image_maps = {"truth": truth, "random": rng.random(truth.shape), "inverse": -truth + rng.random(truth.shape) * 1e-3}
    head = KnownEvidenceHead().eval()
    mean = grid.mean((0, 2, 3))
    curves = perturbation.image_curves(head, grid, tokens, targets, image_maps, FRACTIONS, ["mean", "road"],
                                       mean, 0.0, seed=0, batch_size=64)
    for fill in ("mean", "road"):
        auc = {(name, order): perturbation.trapezoid(curves[(name, order, fill)][0], FRACTIONS).mean()
               for name in image_maps for order in perturbation.ORDERS}
        assert auc[("truth", "morf")] < auc[("random", "morf")] < auc[("inverse", "morf")], fill
        assert auc[("truth", "lerf")] > auc[("random", "lerf")] > auc[("inverse", "lerf")], fill
        probability, kept = curves[("truth", "morf", fill)]
        assert np.all((kept == 0) | (kept == 1)) and kept[:, 0].all()
        if fill == "mean":   # each removal replaces an evidence value by the mean: never up
            assert np.all(np.diff(probability, axis=1) <= 1e-9)
    word_maps = {"truth": words, "random": rng.random(words.shape)}
    for word_fill in ("unk", "pad"):
        curves = perturbation.question_curves(head, grid, tokens, targets, word_maps, FRACTIONS, word_fill, UNK,
                                              seed=0, batch_size=64)
        morf = {n: perturbation.trapezoid(curves[(n, "morf", word_fill)][0], FRACTIONS).mean() for n in word_maps}
        lerf = {n: perturbation.trapezoid(curves[(n, "lerf", word_fill)][0], FRACTIONS).mean() for n in word_maps}
        if word_fill == "unk":      # deleting words shifts positions: the toy head reads positions
            assert morf["truth"] < morf["random"] and lerf["truth"] > lerf["random"]
        # Nothing removed and everything removed are the same input whatever the map.
        for n in word_maps:
            np.testing.assert_allclose(curves[(n, "morf", word_fill)][0][:, [0, -1]],
                                       curves[("truth", "lerf", word_fill)][0][:, [0, -1]])


def test_auc_by_hand_equals_numpy():
    rng = np.random.default_rng(0)
    fractions = np.array([0.0, 0.1, 0.25, 0.5, 0.8, 1.0])
    curves = rng.random((5, len(fractions)))
    by_hand = np.zeros(len(curves))
    for i, curve in enumerate(curves):
        for k in range(1, len(fractions)):
            by_hand[i] += (fractions[k] - fractions[k - 1]) * (curve[k] + curve[k - 1]) / 2
    np.testing.assert_allclose(perturbation.trapezoid(curves, fractions), by_hand, rtol=1e-12)
    np.testing.assert_allclose(np.trapezoid(curves, fractions, axis=1), by_hand, rtol=1e-12)


def test_removal_counts_orders_and_ties():
    assert perturbation.removed_counts(FRACTIONS, 16).tolist() == [0, 2, 3, 5, 6, 8, 10, 11, 13, 14, 16]
    order = perturbation.removal_order(np.array([[0.1, 0.9, 0.5, 0.5]]), np.random.default_rng(0))
    assert order[0, 0] == 1 and order[0, -1] == 0 and set(order[0, 1:3]) == {2, 3}
    masks = perturbation.removal_masks(order, np.array([0, 1, 4]), "lerf")
    assert masks[0, 1].tolist() == [True, False, False, False] and masks[0, 2].all() and not masks[0, 0].any()
    # Ties are broken at random, not by position: over many draws both tied cells come first.
    firsts = {int(perturbation.removal_order(np.zeros((1, 4)), np.random.default_rng(s))[0, 0]) for s in range(40)}
    assert firsts == {0, 1, 2, 3}


def test_road_reconstructs_a_linear_ramp_and_leaves_known_cells():
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    ramp = torch.stack([2 * rows + 3 * cols + 1, -rows + 0.5 * cols])[None].double()    # 1 x 2 x 6 x 6
    removed = torch.zeros(1, 6, 6, dtype=torch.bool)
    removed[0, 2, 3] = True                          # an interior cell
    out = perturbation.road_impute(ramp, removed, noise_sd=0.0)
    torch.testing.assert_close(out, ramp, rtol=0, atol=1e-12)
    # A 2 x 2 interior block, solved jointly: still exact on a ramp; known cells untouched.
    removed[0, 2:4, 2:4] = True
    damaged = ramp.clone()
    damaged[:, :, 2:4, 2:4] = 99.0
    out = perturbation.road_impute(damaged, removed, noise_sd=0.0)
    torch.testing.assert_close(out, ramp, rtol=0, atol=1e-10)
    # Noise lands on the removed cells only, and a fully removed grid is left for the mean fill.
    noisy = perturbation.road_impute(damaged, removed, noise_sd=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[:, :, ~removed[0]], damaged[:, :, ~removed[0]])
    assert not torch.allclose(noisy[:, :, removed[0]], ramp[:, :, removed[0]])
    every = torch.ones(1, 6, 6, dtype=torch.bool)
    filled = perturbation.fill_cells(ramp, every, "road", torch.tensor([7.0, -7.0]), 0.0, None)
    assert torch.equal(filled[0, 0], torch.full((6, 6), 7.0, dtype=filled.dtype))


def test_verdict_needs_non_overlapping_intervals_below_for_morf_and_above_for_lerf():
    rows = []
    for order, intervals in (("morf", {"random": (0.5, 0.6), "a": (0.3, 0.45), "b": (0.4, 0.55), "c": (0.7, 0.8)}),
                             ("lerf", {"random": (0.5, 0.6), "a": (0.65, 0.7), "b": (0.55, 0.65), "c": (0.1, 0.2)})):
        for method, (low, high) in intervals.items():
            rows.append({"model": "m", "method": method, "modality": "image", "order": order, "fill": "mean",
                         "auc": (low + high) / 2, "ci_low": low, "ci_high": high})
    rows.append({"model": "m", "method": "a", "modality": "image", "order": "morf", "fill": "road",
                 "auc": 0.4, "ci_low": 0.3, "ci_high": 0.5})   # no random row for this fill: undetermined
    table = pd.DataFrame(rows)
    flags = dict(zip(zip(table["method"], table["order"], table["fill"]), lib.faithful_flags(table)))
    assert flags[("random", "morf", "mean")] == "" and flags[("a", "morf", "road")] == ""
    assert flags[("a", "morf", "mean")] is True and flags[("b", "morf", "mean")] is False
    assert flags[("c", "morf", "mean")] is False
    assert flags[("a", "lerf", "mean")] is True and flags[("b", "lerf", "mean")] is False
    assert flags[("c", "lerf", "mean")] is False
    # The fill decides: a verdict that differs between mean and road is named.
    table = pd.DataFrame([{"model": "m", "method": "a", "modality": "image", "order": "morf", "fill": f,
                           "more_faithful_than_random": v} for f, v in (("mean", True), ("road", False))])
    assert lib.fill_dependent(table) == ["m/a/image/morf (mean: yes, road: no)"]


def stage_config(root, tmp_path, *overrides):
    return evaluation_config(root, f"paths.reports_dir={tmp_path / 'reports'}",
                             "evaluation.faithfulness.questions=20", "evaluation.faithfulness.pixel_questions=4",
                             *overrides)


def test_stage_end_to_end_is_deterministic(explained_world, tmp_path):
    first, second = stage_config(explained_world, tmp_path / "a"), stage_config(explained_world, tmp_path / "b")
    for cfg in (first, second):
        rank_correlation.run(cfg)
    result = faithfulness.run(first)
    faithfulness.run(second)
    for name in ("faithfulness.csv", "faithfulness.md", "faithfulness_curves.csv", "faithfulness_plausibility.csv"):
        a, b = (tmp_path / d / "reports" / "tables" / name for d in ("a", "b"))
        assert a.read_bytes() == b.read_bytes(), name
    reports = tmp_path / "a" / "reports"
    for name in ("faithfulness_image", "faithfulness_question", "faithfulness_vs_plausibility"):
        assert (reports / "figures" / f"{name}.png").stat().st_size > 1000
    table = pd.read_csv(reports / "tables" / "faithfulness.csv")
    assert list(table.columns) == lib.COLUMNS
    image = table[table["modality"] == "image"]
    assert set(image["fill"]) == {"mean", "road"} and set(table["order"]) == {"morf", "lerf"}
    assert set(table.loc[table["modality"] == "question", "fill"]) == {"unk"}
    for model in ("lstm_cnn", "mlb"):
        methods = set(image.loc[image["model"] == model, "method"])
        assert {"random", "human", "ground_truth", "gradcam", "occlusion"} <= methods, model
        assert len(image[image["model"] == model]) == 4 * len(methods)      # 2 orders x 2 fills
    assert "attention" in set(image.loc[image["model"] == "mlb", "method"])
    assert (table["n"] <= 20).all() and (table.loc[table["method"] != "human", "n"] == 20).all()
    assert table["auc"].between(0, 1).all() and (table["ci_low"] <= table["auc"]).all()
    metrics = result["metrics"]
    assert metrics["mlb"]["questions"] == 20 and metrics["mlb"]["ms_per_question"] > 0
    assert metrics["mlb"]["prediction_differs"] == 0
    assert "training split" in metrics["mlb"]["mean_fill_source"]
    assert {r["model"] for r in metrics["pixel_check"]} == {"lstm_cnn", "mlb"}
    assert all(r["curves"] > 0 and -1 <= r["spearman_auc"] <= 1 for r in metrics["pixel_check"])
    curves = pd.read_csv(reports / "faithfulness" / "question_curves.csv")
    assert set(curves["fill"]) == {"mean", "road"}
    assert curves.groupby("model")["question_id"].nunique().tolist() == [20, 20]


def test_stage_without_ground_truth_leaves_the_reference_out(explained_world, tmp_path):
    cfg = stage_config(explained_world, tmp_path, "data.source=vqa", "evaluation.models=[mlb]",
                       "evaluation.faithfulness.pixel_questions=0", "evaluation.faithfulness.fills=[mean]")
    rank_correlation.run(cfg)
    result = faithfulness.run(cfg)
    assert "ground_truth" not in set(result["table"]["method"])
    assert "synthetic data only" in result["metrics"]["mlb"]["absent_references"]["image"]["ground_truth"]
    assert set(result["table"]["fill"]) == {"mean", "unk"}


def test_missing_rank_correlation_names_the_stage(explained_world, tmp_path):
    from pipeline.common.errors import DataError

    with pytest.raises(DataError, match=r"pipeline\.rank_correlation"):
        faithfulness.run(stage_config(explained_world, tmp_path))
