"""Stage evidence_slope: the finite difference against a plain per-question loop, the first-order
estimate on a head that is exactly linear, the table and its determinism, data without truth."""
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import evidence_slope
from pipeline.attribution.methods.gradcam import gradcam_map
from pipeline.evaluation import inputs, slope
from pipeline.models import load_trained_model
from tests.conftest import evaluation_config


class LinearHead(torch.nn.Module):
    """logits = W mean_s(A_s): exactly linear in the grid, so the first-order change is exact."""

    def __init__(self, channels: int, answers: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(answers, channels, dtype=torch.float64))

    def forward(self, grid, tokens):
        return grid.mean(dim=(2, 3)) @ self.weight.T


def test_linear_head_first_order_is_exact_and_matches_a_loop():
    torch.manual_seed(0)
    head = LinearHead(6, 4)
    grid = torch.rand(5, 6, 3, 3, dtype=torch.float64)
    masks = torch.rand(5, 3, 3) > 0.6
    masks[0] = False          # no ground-truth cell: contrast undefined
    masks[1] = True           # every cell: contrast undefined
    out = slope.evidence_slope(head, grid, torch.zeros(5, 2, dtype=torch.long), masks, eps=0.1)
    np.testing.assert_allclose(out["delta"], out["first_order"], rtol=1e-10, atol=1e-12)
    # A linear score is a slope, never a peak: scaling down by eps moves it by exactly -delta.
    np.testing.assert_allclose(out["delta_down"], -out["delta"], rtol=1e-10, atol=1e-12)
    for i in range(5):
        c = int(out["target"][i])
        before = (grid[i].mean((1, 2)) @ head.weight[c]).item()
        scaled = grid[i].clone()
        for y in range(3):
            for x in range(3):
                if masks[i, y, x]:
                    scaled[:, y, x] *= 1.1
        after = (scaled.mean((1, 2)) @ head.weight[c]).item()
        assert out["delta"][i] == pytest.approx(after - before, abs=1e-12)
        logits_before = grid[i].mean((1, 2)) @ head.weight.T
        logits_after = scaled.mean((1, 2)) @ head.weight.T
        expected_logprob = (torch.log_softmax(logits_after, 0)[c] - torch.log_softmax(logits_before, 0)[c]).item()
        assert out["delta_logprob"][i] == pytest.approx(expected_logprob, abs=1e-12)
        # Grad-CAM's weights are W_c / S at every cell: its signed map is W_c . A_s / S.
        cam = (head.weight[c].detach()[:, None, None] * grid[i]).sum(0) / 9
        if 0 < masks[i].sum() < 9:
            expected = cam[masks[i]].mean() - cam[~masks[i]].mean()
            assert out["gradcam_contrast"][i] == pytest.approx(expected.item(), abs=1e-12)
        else:
            assert np.isnan(out["gradcam_contrast"][i])
        assert out["relu_kept"][i] == pytest.approx((cam.clamp(min=0).sum() / cam.abs().sum()).item(), abs=1e-12)
        assert out["signed_sum"][i] == pytest.approx((cam.sum() / cam.abs().sum()).item(), abs=1e-12)


class NormalisedHead(LinearHead):
    """logits = W normalize(mean_s(A_s)), LSTM-CNN's "norm I": invariant to scaling the grid."""

    def forward(self, grid, tokens):
        return torch.nn.functional.normalize(grid.mean(dim=(2, 3)), dim=1) @ self.weight.T


def test_scale_invariant_head_has_a_zero_sum_gradcam_map():
    # Euler's theorem for a function homogeneous of degree 0: sum_s A_s . dy/dA_s = 0, and with
    # mean pooling that sum is the signed Grad-CAM sum. The linear head (degree 1) is the control.
    torch.manual_seed(1)
    grid = torch.rand(6, 5, 4, 4, dtype=torch.float64)
    masks = torch.rand(6, 4, 4) > 0.5
    tokens = torch.zeros(6, 2, dtype=torch.long)
    normalised = slope.evidence_slope(NormalisedHead(5, 3), grid, tokens, masks, eps=0.1)
    np.testing.assert_allclose(normalised["signed_sum"], 0.0, atol=1e-12)
    np.testing.assert_allclose(normalised["relu_kept"], 0.5, atol=1e-12)
    linear = slope.evidence_slope(LinearHead(5, 3), grid, tokens, masks, eps=0.1)
    # W_c . mean(A) > 0 for the argmax class of a random W here, so the control's sum is not zero
    assert (np.abs(linear["signed_sum"]) > 1e-3).all()
    assert not np.allclose(linear["relu_kept"], 0.5)


def test_trained_model_batch_equals_one_question_at_a_time(explained_world):
    cfg = evaluation_config(explained_world)
    model = load_trained_model(cfg, "mlb").eval()
    records, images, tokens = inputs.question_batch(cfg, model, "val", 8)
    with torch.no_grad():
        grid = model.backbone(images)
    truth = inputs.ground_truth_maps(cfg, "val", [r["question_id"] for r in records], grid.shape[-1])
    masks = torch.from_numpy(np.stack([truth[r["question_id"]] >= 0.25 for r in records]))
    assert masks.any()
    batched = slope.evidence_slope(model.head, grid, tokens, masks, eps=0.1)
    for i in range(len(records)):
        with torch.no_grad():
            logits = model.head(grid[i:i + 1], tokens[i:i + 1])[0]
            c = int(logits.argmax())
            scaled = grid[i:i + 1].clone()
            scaled[0][:, masks[i]] *= 1.1
            scaled_logits = model.head(scaled, tokens[i:i + 1])[0]
            delta = scaled_logits[c] - logits[c]
            logprob = torch.log_softmax(scaled_logits, 0)[c] - torch.log_softmax(logits, 0)[c]
            reduced = grid[i:i + 1].clone()
            reduced[0][:, masks[i]] *= 0.9
            delta_down = model.head(reduced, tokens[i:i + 1])[0, c] - logits[c]
        assert c == batched["target"][i]
        assert batched["delta"][i] == pytest.approx(float(delta), abs=1e-5)
        assert batched["delta_logprob"][i] == pytest.approx(float(logprob), abs=1e-5)
        assert batched["delta_down"][i] == pytest.approx(float(delta_down), abs=1e-5)
        features = grid[i:i + 1].clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model.head(features, tokens[i:i + 1])[0, c], features)
        cam = gradcam_map(features.detach(), gradient, relu=False)[0]
        if 0 < masks[i].sum() < masks[i].numel():
            expected = cam[masks[i]].mean() - cam[~masks[i]].mean()
            assert batched["gradcam_contrast"][i] == pytest.approx(float(expected), rel=1e-4, abs=1e-7)


def test_lstm_cnn_gradcam_sums_to_zero_on_the_pooled_feature_only():
    # "norm I" of the grid's spatial mean is scale-invariant in the grid: Euler's theorem makes
    # the signed Grad-CAM map sum to zero. The paper's fc7 path (fc6-fc7 with biases and ReLU
    # between the grid and the norm) is not, so the same head on fc7 has non-zero sums.
    from tests.test_models import ARCH, tiny_model
    torch.manual_seed(3)
    images = torch.randn(6, 3, 32, 32)
    sums = {}
    for kind in ("pooled", "fc7"):
        model = tiny_model("lstm_cnn", arch={**ARCH["lstm_cnn"], "image_feature": kind})
        with torch.no_grad():
            for m in model.backbone.modules():  # trained-like BatchNorm: not homogeneous
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.bias.normal_(0, 0.5)
            grid = model.backbone(images)
        tokens = model.encode_questions(["how many squares"] * 6)
        masks = torch.rand(6, *grid.shape[-2:]) > 0.5
        sums[kind] = slope.evidence_slope(model.head, grid, tokens, masks, eps=0.1)["signed_sum"]
    np.testing.assert_allclose(sums["pooled"], 0.0, atol=1e-5)
    assert (np.abs(sums["fc7"]) > 1e-4).all(), sums["fc7"]


def test_trained_models_gradcam_sums_are_not_zero(explained_world):
    cfg = evaluation_config(explained_world)
    for name in ("lstm_cnn", "mlb"):
        model = load_trained_model(cfg, name).eval()
        records, images, tokens = inputs.question_batch(cfg, model, "val", 16)
        with torch.no_grad():
            grid = model.backbone(images)
        masks = torch.zeros(len(records), *grid.shape[-2:], dtype=torch.bool)
        signed = slope.evidence_slope(model.head, grid, tokens, masks, eps=0.1)["signed_sum"]
        assert np.isfinite(signed).any(), name
        assert (np.abs(signed[np.isfinite(signed)]) > 1e-4).any(), name


def test_stage_table_is_deterministic_and_complete(explained_world, tmp_path):
    tables = []
    for run in ("a", "b"):
        cfg = evaluation_config(explained_world, f"paths.reports_dir={tmp_path / run}",
                                "evaluation.bootstrap.samples=100")
        result = evidence_slope.run(cfg)
        tables.append((tmp_path / run / "tables" / "evidence_slope.csv").read_bytes())
    assert tables[0] == tables[1]
    table = result["table"]
    # the columns the report and readers use, written out: renaming or dropping one fails here
    assert list(table.columns) == ["model", "answer_type", "n", "no_truth", "score_falls", "ci_low",
                                   "ci_high", "peak", "prob_falls", "mean_delta", "first_order_agrees",
                                   "gradcam_negative", "gradcam_agrees", "relu_kept", "zero_sum"]
    records = {r["question_id"]: r for r in inputs.load_store(cfg, "mlb")["questions"]}
    types = sorted({r["answer_type"] for r in records.values()})
    for model in ("lstm_cnn", "mlb"):
        rows = table[table.model == model]
        assert rows.answer_type.tolist() == [*types, "all"]
        per_type = rows[rows.answer_type != "all"]
        total = rows[rows.answer_type == "all"].iloc[0]
        assert per_type.n.sum() + per_type.no_truth.sum() == len(records) == total.n + total.no_truth
        assert ((rows.score_falls >= rows.ci_low) & (rows.score_falls <= rows.ci_high)).all()
        shares = ["score_falls", "peak", "prob_falls", "first_order_agrees", "gradcam_negative", "gradcam_agrees",
                  "relu_kept", "zero_sum"]
        assert rows[shares].stack().between(0, 1).all()
        assert (rows.peak <= rows.score_falls).all()  # a peak is a fall one way among others
    lstm = table[table.model == "lstm_cnn"]
    assert (lstm.zero_sum < 1.0).all()  # fc7, not the scale-invariant pooled feature
    md = (tmp_path / "a" / "tables" / "evidence_slope.md").read_text()
    assert "score_falls" in md and "1 + 0.1" in md and "1 - 0.1" in md


def test_data_without_ground_truth_writes_the_reason(explained_world, tmp_path):
    cfg = evaluation_config(explained_world, f"paths.reports_dir={tmp_path}", "data.source=vqa")
    result = evidence_slope.run(cfg)
    assert result["table"].empty and "no ground truth" in result["metrics"]["skipped"]
    assert pd.read_csv(tmp_path / "tables" / "evidence_slope.csv").empty
    assert "no ground truth" in (tmp_path / "tables" / "evidence_slope.md").read_text()


def test_summary_counts_peaks_and_probability_falls_by_hand():
    per_question = pd.DataFrame({
        "question_id": [1, 2, 3, 4, 5],
        "answer_type": ["number"] * 4 + ["other"],
        "truth_cells": [3, 2, 4, 0, 1],          # question 4 has no truth: not scored
        "delta": [-0.2, -0.1, 0.3, -0.5, 0.1],
        "delta_logprob": [-0.1, 0.05, 0.2, -0.4, -0.01],
        "delta_down": [-0.05, 0.1, -0.2, -0.5, -0.1],
        "first_order": [-0.19, -0.12, 0.25, -0.4, -0.1],
        "gradcam_contrast": [-1.0, np.nan, 2.0, 1.0, 0.5],
        "relu_kept": [0.5, 0.7, np.nan, 0.2, 1.0],     # question 3's map is zero everywhere
        "signed_sum": [1e-6, 0.4, np.nan, -0.6, 1.0],
    })
    rows = {r["answer_type"]: r for r in slope.summarise_model(
        "m", per_question, {"samples": 50, "confidence": 0.95, "seed": 0}, zero_sum_tolerance=1e-4)}
    number = rows["number"]
    assert (number["n"], number["no_truth"]) == (3, 1)
    assert number["score_falls"] == pytest.approx(2 / 3)
    assert number["peak"] == pytest.approx(1 / 3)         # question 1 falls both ways
    assert number["prob_falls"] == pytest.approx(1 / 3)   # question 2: logit falls, probability rises
    assert number["first_order_agrees"] == pytest.approx(1.0)
    assert number["gradcam_negative"] == pytest.approx(1 / 2)   # NaN contrast left out
    assert number["gradcam_agrees"] == pytest.approx(1.0)
    assert rows["other"]["first_order_agrees"] == 0.0 and rows["other"]["gradcam_agrees"] == 1.0
    assert number["relu_kept"] == pytest.approx(0.6)     # NaN left out, question 4 not scored
    assert number["zero_sum"] == pytest.approx(1 / 2)    # question 1 of questions 1 and 2
    assert rows["other"]["zero_sum"] == 0.0
    assert rows["all"]["n"] == 4 and rows["all"]["no_truth"] == 1
    assert rows["all"]["relu_kept"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
