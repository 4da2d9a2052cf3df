"""Stage evidence_slope: the finite difference against a plain per-question loop, the first-order
estimate on a head that is exactly linear, the table and its determinism, data without truth."""
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import evidence_slope
from pipeline.attribution.methods.gradcam import gradcam_map
from pipeline.evaluation import inputs
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
    out = evidence_slope.evidence_slope(head, grid, torch.zeros(5, 2, dtype=torch.long), masks, eps=0.1)
    np.testing.assert_allclose(out["delta"], out["first_order"], rtol=1e-10, atol=1e-12)
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
        # Grad-CAM's weights are W_c / S at every cell: its signed map is W_c . A_s / S.
        cam = (head.weight[c].detach()[:, None, None] * grid[i]).sum(0) / 9
        if 0 < masks[i].sum() < 9:
            expected = cam[masks[i]].mean() - cam[~masks[i]].mean()
            assert out["gradcam_contrast"][i] == pytest.approx(expected.item(), abs=1e-12)
        else:
            assert np.isnan(out["gradcam_contrast"][i])


def test_trained_model_batch_equals_one_question_at_a_time(explained_world):
    cfg = evaluation_config(explained_world)
    model = load_trained_model(cfg, "mlb").eval()
    records, images, tokens = inputs.question_batch(cfg, model, "val", 8)
    with torch.no_grad():
        grid = model.backbone(images)
    truth = inputs.ground_truth_maps(cfg, "val", [r["question_id"] for r in records], grid.shape[-1])
    masks = torch.from_numpy(np.stack([truth[r["question_id"]] >= 0.25 for r in records]))
    assert masks.any()
    batched = evidence_slope.evidence_slope(model.head, grid, tokens, masks, eps=0.1)
    for i in range(len(records)):
        with torch.no_grad():
            logits = model.head(grid[i:i + 1], tokens[i:i + 1])[0]
            c = int(logits.argmax())
            scaled = grid[i:i + 1].clone()
            scaled[0][:, masks[i]] *= 1.1
            delta = model.head(scaled, tokens[i:i + 1])[0, c] - logits[c]
        assert c == batched["target"][i]
        assert batched["delta"][i] == pytest.approx(float(delta), abs=1e-5)
        features = grid[i:i + 1].clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model.head(features, tokens[i:i + 1])[0, c], features)
        cam = gradcam_map(features.detach(), gradient, relu=False)[0]
        if 0 < masks[i].sum() < masks[i].numel():
            expected = cam[masks[i]].mean() - cam[~masks[i]].mean()
            assert batched["gradcam_contrast"][i] == pytest.approx(float(expected), rel=1e-4, abs=1e-7)


def test_stage_table_is_deterministic_and_complete(explained_world, tmp_path):
    tables = []
    for run in ("a", "b"):
        cfg = evaluation_config(explained_world, f"paths.reports_dir={tmp_path / run}",
                                "evaluation.bootstrap.samples=100")
        result = evidence_slope.run(cfg)
        tables.append((tmp_path / run / "tables" / "evidence_slope.csv").read_bytes())
    assert tables[0] == tables[1]
    table = result["table"]
    assert list(table.columns) == evidence_slope.COLUMNS
    records = {r["question_id"]: r for r in inputs.load_store(cfg, "mlb")["questions"]}
    types = sorted({r["answer_type"] for r in records.values()})
    for model in ("lstm_cnn", "mlb"):
        rows = table[table.model == model]
        assert rows.answer_type.tolist() == [*types, "all"]
        per_type = rows[rows.answer_type != "all"]
        total = rows[rows.answer_type == "all"].iloc[0]
        assert per_type.n.sum() + per_type.no_truth.sum() == len(records) == total.n + total.no_truth
        assert ((rows.score_falls >= rows.ci_low) & (rows.score_falls <= rows.ci_high)).all()
        assert rows[["score_falls", "first_order_agrees", "gradcam_negative", "gradcam_agrees"]].stack().between(0, 1).all()
    md = (tmp_path / "a" / "tables" / "evidence_slope.md").read_text()
    assert "score_falls" in md and "1 + 0.1" in md


def test_data_without_ground_truth_writes_the_reason(explained_world, tmp_path):
    cfg = evaluation_config(explained_world, f"paths.reports_dir={tmp_path}", "data.source=vqa")
    result = evidence_slope.run(cfg)
    assert result["table"].empty and "no ground truth" in result["metrics"]["skipped"]
    assert pd.read_csv(tmp_path / "tables" / "evidence_slope.csv").empty
    assert "no ground truth" in (tmp_path / "tables" / "evidence_slope.md").read_text()
