"""The hadamard_study stage (Kim et al. Fig. 2-5): Spearman values against scipy, noun shares
against a plain recount, figures, the skip of models without attention, determinism."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from pipeline import hadamard_study
from pipeline.evaluation import hadamard, inputs, pos
from tests.conftest import evaluation_config

# The columns of hadamard.csv the report and readers use, written out (not the module's own
# list): renaming or dropping one fails the tests below.
HADAMARD_COLUMNS = ["model", "measure", "reference", "n", "mean", "ci_low", "ci_high", "undefined",
                    "chance", "tagger"]


def test_upsampled_glimpses_keep_their_shape_and_mass_location():
    raw = np.zeros((2, 2, 4, 4), np.float32)
    raw[0, 0, 0, 0] = 1.0
    raw[1, 1, 3, 3] = 1.0
    up = hadamard.upsample_glimpses(raw, (16, 16), "bilinear")
    assert up.shape == (2, 2, 16, 16)
    assert up[0, 0, 0, 0] == up[0, 0].max() == 1.0 and up[0, 0, 8:, 8:].max() == 0.0
    assert up[1, 1, 15, 15] == up[1, 1].max() == 1.0 and up[1, 1, :8, :8].max() == 0.0
    nearest = hadamard.upsample_glimpses(raw, (8, 8), "nearest")
    assert nearest[0, 0, :2, :2].min() == 1.0 and nearest[0, 0].sum() == 4.0


def test_pick_questions_is_deterministic_and_cycles_answer_types():
    questions = [{"question_id": i, "image_id": i // 2, "answer_type": t, "correct": c}
                 for i, (t, c) in enumerate([("yes/no", True), ("number", True), ("other", False),
                                             ("other", True), ("yes/no", True), ("number", True),
                                             ("other", True), ("yes/no", False)])]
    usable = np.ones(len(questions), bool)
    usable[3] = False
    rows = hadamard.pick_questions(questions, usable, 6)
    # correct ones first, answer types in turn (number, other, yes/no), one per image while
    # new images remain; then the rest of the correct ones; then the incorrect ones.
    assert rows == [1, 6, 4, 5, 0, 2]
    assert hadamard.pick_questions(questions, usable, 6) == rows
    assert len(hadamard.pick_questions(questions, usable, 50)) == usable.sum()


def _stage(explained_world, tmp_path, *overrides):
    reports = tmp_path / "reports"
    cfg = evaluation_config(explained_world, f"paths.reports_dir={reports}",
                            "evaluation.bootstrap.samples=200", "evaluation.hadamard_study.figures=2",
                            "evaluation.hadamard_study.rows=3", "evaluation.hadamard_study.tagger=textblob",
                            *overrides)
    return cfg, reports, hadamard_study.run(cfg)


def test_spearman_and_noun_shares_match_an_independent_computation(explained_world, tmp_path):
    cfg, reports, result = _stage(explained_world, tmp_path)
    table = pd.read_csv(reports / "tables" / "hadamard.csv")
    assert list(table.columns) == HADAMARD_COLUMNS
    assert set(table.model) == {"mlb"}
    assert result["skipped"].keys() == {"lstm_cnn"} and "attention" in result["skipped"]["lstm_cnn"]

    index = inputs.load_store(cfg, "mlb")
    had = inputs.read_method(cfg, "mlb", "hadamard")
    att = inputs.read_method(cfg, "mlb", "attention")
    valid = had["valid"] & att["valid"]
    qids = [q["question_id"] for q in index["questions"]]
    truth = inputs.ground_truth_maps(cfg, "val", qids, 16)
    humans = inputs.human_maps(cfg, "val", qids, 16)
    size = had["image_map"].shape[-2:]
    expected = {name: [] for name in ("glimpse_1", "glimpse_2", "mean_attention", "ground_truth", "human")}
    import torch
    import torch.nn.functional as nnf

    for row, qid in enumerate(qids):
        if not valid[row]:
            continue
        h = np.abs(inputs.to_resolution(had["image_map"][row], 16)).ravel()
        grid = torch.tensor(att["image_map_raw"][row].astype(np.float32))[:, None]
        glimpses = nnf.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)[:, 0].numpy()
        references = {"glimpse_1": inputs.to_resolution(glimpses[0], 16),
                      "glimpse_2": inputs.to_resolution(glimpses[1], 16),
                      "mean_attention": inputs.to_resolution(att["image_map"][row], 16),
                      "ground_truth": truth[qid]}
        for name, ref in references.items():
            expected[name].append(spearmanr(h, np.abs(ref).ravel())[0])
        if qid in humans:
            per_annotator = [spearmanr(h, m.ravel())[0] for m in humans[qid]]
            per_annotator = [v for v in per_annotator if np.isfinite(v)]
            expected["human"].append(np.mean(per_annotator) if per_annotator else np.nan)
    for name, values in expected.items():
        values = np.asarray(values, dtype=np.float64)
        row = table[(table.measure == "spearman_hadamard") & (table.reference == name)].iloc[0]
        assert row.n == np.isfinite(values).sum() > 0
        assert row.undefined == np.isnan(values).sum()
        assert row["mean"] == pytest.approx(np.nanmean(values), abs=1e-6)
        assert row.ci_low <= row["mean"] <= row.ci_high

    tagger = pos.make_tagger("textblob")
    top1, top2, nouns, tokens = [], [], 0, 0
    for row, q in enumerate(index["questions"]):
        if not valid[row]:
            continue
        words = q["tokens"][:had["question_map"].shape[1]]
        z = had["question_map"][row, :len(words)].astype(np.float64)
        tags = tagger.tag(words)
        order = sorted(range(len(words)), key=lambda i: (-z[i], i))
        top1.append(tags[order[0]].startswith("NN"))
        if len(words) >= 2:
            top2.append(sum(tags[i].startswith("NN") for i in order[:2]) / 2)
        nouns += sum(t.startswith("NN") for t in tags)
        tokens += len(words)
    for measure, values in (("noun_share_top1", top1), ("noun_share_top2", top2)):
        row = table[table.measure == measure].iloc[0]
        assert row.n == len(values)
        assert row["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert row.chance == pytest.approx(nouns / tokens, abs=1e-6)
        assert row.tagger == tagger.name

    metrics = json.loads((reports / "metrics" / "hadamard_study.json").read_text())
    assert metrics["tagger"] == tagger.name
    assert metrics["results"]["mlb"]["spearman_hadamard/glimpse_1"]["mean"] == pytest.approx(
        np.nanmean(expected["glimpse_1"]), abs=1e-6)
    assert metrics["results"]["mlb"]["spearman_hadamard/glimpse_1"]["chance"] is None  # not NaN

    for k in (1, 2):
        png = reports / "figures" / f"hadamard_{k}.png"
        assert png.stat().st_size > 10_000
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.size[0] > 600 and im.size[1] > 3 * 250  # 3 rows of 4 panels
    assert not (reports / "figures" / "hadamard_3.png").exists()


def test_models_without_attention_are_skipped_with_a_reason(explained_world, tmp_path, caplog):
    with caplog.at_level("INFO"):
        cfg, reports, result = _stage(explained_world, tmp_path, "evaluation.models=[lstm_cnn]")
    assert "no learned attention" in result["skipped"]["lstm_cnn"]
    assert "hadamard_study skips lstm_cnn" in caplog.text
    table = pd.read_csv(reports / "tables" / "hadamard.csv")
    assert table.empty and list(table.columns) == HADAMARD_COLUMNS
    metrics = json.loads((reports / "metrics" / "hadamard_study.json").read_text())
    assert metrics["results"] == {} and "lstm_cnn" in metrics["skipped"]
    assert not list(reports.glob("figures/hadamard_*.png"))


def test_two_runs_give_byte_identical_tables(explained_world, tmp_path):
    tables = []
    for k in range(2):
        _, reports, _ = _stage(explained_world, tmp_path / str(k), "evaluation.hadamard_study.figures=1")
        tables.append((reports / "tables" / "hadamard.csv").read_bytes())
    assert tables[0] == tables[1] and tables[0].count(b"\n") == 8  # header + 7 rows
