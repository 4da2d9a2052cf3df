"""The evaluation library: statistics against scipy, maps at one resolution, the store readers."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from pipeline.common.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation.outputs import markdown_table, write_table
from pipeline.evaluation.stats import bootstrap_ci, has_ties, is_constant, spearman_rows, summarise
from tests.conftest import evaluation_config


def test_spearman_rows_matches_scipy_with_ties_and_constant_rows():
    rng = np.random.default_rng(0)
    a = rng.random((6, 30))
    b = rng.random((6, 30))
    a[1, :10] = 0.0                       # ties
    b[2] = np.round(b[2], 1)              # many ties
    a[3] = a[3] ** 3                      # monotone of itself below
    b[3] = a[3]
    a[4] = 0.5                            # constant: undefined
    rho = spearman_rows(a, b)
    for i in (0, 1, 2, 3, 5):
        assert rho[i] == pytest.approx(spearmanr(a[i], b[i])[0], abs=1e-12)
    assert rho[3] == pytest.approx(1.0)
    assert np.isnan(rho[4])
    assert has_ties(a).tolist() == [False, True, False, False, True, False]
    assert is_constant(a).tolist() == [False, False, False, False, True, False]


def test_bootstrap_is_deterministic_and_covers_the_mean():
    values = np.random.default_rng(1).normal(0.3, 0.1, 400)
    lo, hi = bootstrap_ci(values, samples=500, seed=3)
    assert (lo, hi) == bootstrap_ci(values, samples=500, seed=3)
    assert lo < values.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * values.std() / np.sqrt(400), rel=0.25)
    s = summarise(np.append(values, np.nan), samples=500, seed=3)
    assert s["n"] == 400 and s["ci_low"] == lo


def test_maps_of_any_size_are_area_averaged():
    m = np.zeros((64, 48))
    m[:32] = 1.0
    r = inputs.to_resolution(m, 16)
    assert r.shape == (16, 16)
    assert r[:8].min() == 1.0 and r[8:].max() == 0.0
    odd = inputs.to_resolution(np.ones((3, 37, 53)), 14)
    assert odd.shape == (3, 14, 14) and np.allclose(odd, 1.0)


def test_tables_are_written_as_csv_and_markdown(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"method": ["a", "b"], "mean": [0.12345, float("nan")], "n": [3, 4]})
    csv, md = write_table(df, tmp_path / "t.csv")
    assert pd.read_csv(csv)["n"].tolist() == [3, 4]
    assert md.read_text() == markdown_table(df)
    assert "| a | 0.123 | 3 |" in md.read_text() and "| b | – | 4 |" in md.read_text()


def test_store_and_maps_of_the_explained_world(explained_world):
    cfg = evaluation_config(explained_world)
    index = inputs.load_store(cfg, "mlb")
    qids = [q["question_id"] for q in index["questions"]]
    assert "attention" in inputs.methods_that_ran(index)
    assert "attention" not in inputs.methods_that_ran(inputs.load_store(cfg, "lstm_cnn"))
    humans = inputs.human_maps(cfg, "val", qids, 16)
    assert humans and all(m.shape[1:] == (16, 16) for m in humans.values())
    truth = inputs.ground_truth_maps(cfg, "val", qids, 16)
    assert set(truth) == set(qids)
    assert all(0 <= t.min() and t.max() <= 1 and t.max() > 0 for t in truth.values())


def test_missing_store_names_the_stage(tmp_path):
    cfg = evaluation_config(tmp_path)
    with pytest.raises(DataError, match="pipeline.attribute"):
        inputs.load_store(cfg, "mlb")


def test_store_keeps_small_maps_apart_and_round_trips_their_scale(tmp_path):
    """Half precision relative to each map's own maximum: gradients of 1e-9 do not underflow
    into ties, and load_method gives back the maps to float16 precision."""
    import torch

    from pipeline.attribution.base import Explanation
    from pipeline.attribution.store import explanation_arrays, read_arrays

    maps = torch.stack([torch.linspace(0, 1, 64).view(8, 8) * 1e-9,
                        torch.linspace(-5, 3, 64).view(8, 8), torch.zeros(8, 8)])
    arrays, info = explanation_arrays(Explanation("m", image_map=maps), 3)
    np.savez_compressed(tmp_path / "m.npz", **arrays)
    back = read_arrays(tmp_path / "m.npz")["image_map"]
    assert len(np.unique(back[0])) == 64  # no underflow: every value distinct
    np.testing.assert_allclose(back, maps.numpy(), rtol=1e-3, atol=0)
    assert info["nonfinite_questions"] == 0
