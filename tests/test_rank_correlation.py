"""Stage rank_correlation (Goyal et al. 4.1, Table 1): per-question Spearman against scipy in a
plain loop, the counted exclusions, resizing of odd-sized human maps, determinism, the table."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from pipeline import rank_correlation
from pipeline.common.config import abspath
from pipeline.common.errors import DataError
from pipeline.evaluation import agreement, inputs, outputs
from tests.conftest import evaluation_config

MODELS = ("lstm_cnn", "mlb")


def stage_config(root, tmp_path, *overrides):
    """The explained world's config with the reports under ``tmp_path`` (the fixture is shared)."""
    return evaluation_config(root, f"paths.reports_dir={tmp_path / 'reports'}", *overrides)


def copy_world_inputs(cfg, tmp_path):
    """Copies of the attribution stores and of the processed dir, and the overrides that point
    the config at them."""
    attributions = tmp_path / "attributions"
    for model in MODELS:
        shutil.copytree(inputs.attribution_dir(cfg, model), attributions / model)
    processed = tmp_path / "processed"
    shutil.copytree(abspath(cfg.paths.processed_dir), processed)
    return attributions, processed, [f"paths.attributions_dir={attributions}",
                                     f"paths.processed_dir={processed}"]


def loop_question_rho(cfg, model, method, resolution=16):
    """question id -> mean over annotators of scipy's Spearman, one question at a time."""
    index = inputs.load_store(cfg, model)
    qids = [q["question_id"] for q in index["questions"]]
    arrays = inputs.read_method(cfg, model, method)
    humans = inputs.human_maps(cfg, "val", qids, resolution)
    out = {}
    for i, q in enumerate(qids):
        if not arrays["valid"][i] or q not in humans:
            continue
        small = inputs.to_resolution(np.abs(arrays["image_map"][i].astype(np.float32)), resolution)
        if np.all(small == small.flat[0]):
            continue
        values = [spearmanr(small.ravel(), h.ravel())[0] for h in humans[q]]
        values = [v for v in values if np.isfinite(v)]
        if values:
            out[q] = float(np.mean(values))
    return out


def test_per_question_spearman_matches_scipy_in_a_loop(explained_world, tmp_path):
    cfg = stage_config(explained_world, tmp_path)
    for model, method in (("mlb", "guided_backprop"), ("lstm_cnn", "occlusion"), ("mlb", "attention")):
        index = inputs.load_store(cfg, model)
        qids = [q["question_id"] for q in index["questions"]]
        maps, valid = rank_correlation.load_image_maps(cfg, model, method)
        small = inputs.to_resolution(np.abs(maps), 16)
        rho, counts = agreement.score_maps(small, valid, qids, inputs.human_maps(cfg, "val", qids, 16))
        expected = loop_question_rho(cfg, model, method)
        assert len(expected) > 10
        assert set(np.asarray(qids)[np.isfinite(rho)].tolist()) == set(expected)
        for i, q in enumerate(qids):
            if q in expected:
                assert rho[i] == pytest.approx(expected[q], abs=1e-9)
        assert counts["invalid"] == int((~valid).sum())

    # The stage's row is the mean of exactly these per-question values.
    table = rank_correlation.run(cfg)["table"]
    expected = loop_question_rho(cfg, "mlb", "guided_backprop")
    row = table[(table.model == "mlb") & (table.method == "guided_backprop") & (table.reference == "human")].iloc[0]
    assert row["n"] == len(expected)
    assert row["mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
    assert row["ci_low"] < row["mean"] < row["ci_high"]

    # Inter-human row: each pair of annotators of a question, averaged per question.
    index = inputs.load_store(cfg, "mlb")
    humans = inputs.human_maps(cfg, "val", [q["question_id"] for q in index["questions"]], 16)
    per_question = []
    for maps in humans.values():
        pairs = [spearmanr(maps[a].ravel(), maps[b].ravel())[0]
                 for a in range(len(maps)) for b in range(a + 1, len(maps))]
        pairs = [p for p in pairs if np.isfinite(p)]
        if pairs:
            per_question.append(np.mean(pairs))
    human = table[(table.model == "human") & (table.reference == "human")].iloc[0]
    assert human["n"] == len(per_question)
    assert human["mean"] == pytest.approx(np.mean(per_question), abs=1e-12)


def test_by_answer_type_is_the_loop_restricted_to_each_type(explained_world, tmp_path):
    cfg = stage_config(explained_world, tmp_path)
    result = rank_correlation.run(cfg)
    table, by_type = result["table"], result["by_answer_type"]
    # the columns the report and readers use, written out: renaming or dropping one fails here
    assert list(by_type.columns) == ["model", "method", "reference", "answer_type", "n", "mean",
                                     "ci_low", "ci_high", "beats_random"]
    index = inputs.load_store(cfg, "mlb")
    type_of = {q["question_id"]: q["answer_type"] for q in index["questions"]}
    assert set(by_type.answer_type) == set(type_of.values()) and len(set(type_of.values())) > 1
    for method in ("guided_backprop", "gradcam"):
        expected = loop_question_rho(cfg, "mlb", method)
        rows = by_type[(by_type.model == "mlb") & (by_type.method == method) & (by_type.reference == "human")]
        for row in rows.itertuples():
            values = [v for q, v in expected.items() if type_of[q] == row.answer_type]
            assert row.n == len(values)
            assert row.mean == pytest.approx(np.mean(values), abs=1e-12)
        # The types partition the questions of the overall row.
        overall = table[(table.model == "mlb") & (table.method == method) & (table.reference == "human")].iloc[0]
        assert rows.n.sum() == overall["n"]
    # beats_random compares with random's interval of the same model, reference and answer type.
    for row in by_type[(by_type.method != "random") & (by_type.model != "human")].itertuples():
        random_row = by_type[(by_type.model == row.model) & (by_type.method == "random")
                             & (by_type.reference == row.reference)
                             & (by_type.answer_type == row.answer_type)].iloc[0]
        if np.isnan(row.ci_low) or np.isnan(random_row.ci_high):
            assert row.beats_random == ""
        else:
            assert row.beats_random == (row.ci_low > random_row.ci_high)
    reports = tmp_path / "reports"
    assert (reports / "figures" / "rank_correlation_by_answer_type.png").stat().st_size > 1000
    md = (reports / "tables" / "rank_correlation_by_answer_type.md").read_text()
    assert all(f"n {t}" in md for t in set(type_of.values()))


def test_injected_maps_missing_and_odd_sized_human_maps(explained_world, tmp_path):
    base = stage_config(explained_world, tmp_path)
    attributions, processed, overrides = copy_world_inputs(base, tmp_path)
    cfg = stage_config(explained_world, tmp_path, *overrides)
    model, method = "mlb", "guided_backprop"
    index = inputs.load_store(cfg, model)
    qids = [q["question_id"] for q in index["questions"]]
    original = rank_correlation.run(cfg)["table"]
    before = original[(original.model == model) & (original.method == method) & (original.reference == "human")].iloc[0]
    assert before["constant"] == 0 and before["no_reference_map"] == 0 and before["invalid"] == 0

    hat_file = processed / "hat_val.json"
    hat = json.loads(hat_file.read_text())
    data_root = abspath(cfg.data.root)
    same, odd = qids[0], qids[3]  # qids[1]: constant map, qids[2]: invalid
    no_map = qids[4:7]
    # One annotator for `same`, with a map constant on each of the 16 x 16 cells (distinct
    # values), and the method's map made equal to it at the input size: rho exactly 1.
    cells = np.random.default_rng(4).permutation(256).reshape(16, 16).astype(np.uint8)
    same_png = tmp_path / "same" / f"{same}_1.png"
    same_png.parent.mkdir()
    Image.fromarray(np.kron(cells, np.ones((2, 2), np.uint8))).save(same_png)
    hat[str(same)] = [os.path.relpath(same_png, data_root)]
    for q in no_map:
        del hat[str(q)]
    # A human map of another size (and not square): resized like any other, not rejected.
    odd_png = tmp_path / "odd" / f"{odd}_1.png"
    odd_png.parent.mkdir()
    odd_map = np.random.default_rng(5).integers(0, 255, (45, 70), dtype=np.uint8)
    Image.fromarray(odd_map).save(odd_png)
    hat[str(odd)] = [os.path.relpath(odd_png, data_root)]
    hat_file.write_text(json.dumps(hat))

    store = attributions / model / f"{method}.npz"
    with np.load(store) as data:
        arrays = {k: data[k] for k in data.files}
    image_map = arrays["image_map"].astype(np.float32)
    size = image_map.shape[-1]
    image_map[0] = np.kron(cells.astype(np.float32) / 255.0, np.ones((size // 16, size // 16), np.float32))
    image_map[1] = 0.25
    image_map[2, 0, 0] = np.nan
    arrays["valid"][2] = False
    arrays["image_map"] = image_map
    arrays.pop("image_map_scale", None)  # the maps written here are at their own scale
    np.savez_compressed(store, **arrays)

    maps, valid = rank_correlation.load_image_maps(cfg, model, method)
    humans = inputs.human_maps(cfg, "val", qids, 16)
    assert humans[odd].shape == (1, 16, 16)
    assert np.allclose(humans[odd][0], inputs.to_resolution(odd_map / 255.0, 16), atol=1e-6)
    rho, counts = agreement.score_maps(inputs.to_resolution(np.abs(maps), 16), valid, qids, humans)
    assert rho[0] == pytest.approx(1.0, abs=1e-12)
    assert np.isnan(rho[1]) and np.isnan(rho[2])
    assert np.isfinite(rho[3])
    assert counts == {"constant": 1, "ties": counts["ties"], "no_reference_map": 3, "invalid": 1,
                      "constant_reference": 0}

    table = rank_correlation.run(cfg)["table"]
    row = table[(table.model == model) & (table.method == method) & (table.reference == "human")].iloc[0]
    assert (row["constant"], row["no_reference_map"], row["invalid"]) == (1, 3, 1)
    assert row["n"] == len(qids) - 5
    assert row["mean"] == pytest.approx(np.nanmean(rho), abs=1e-12)
    # Against the ground truth every question has a reference: only constant and invalid go.
    truth = table[(table.model == model) & (table.method == method) & (table.reference == "ground_truth")].iloc[0]
    assert (truth["constant"], truth["no_reference_map"], truth["invalid"]) == (1, 0, 1)
    assert truth["n"] == len(qids) - 2 - truth["constant_reference"]
    # The other model's rows saw the same human maps: its missing questions are counted too.
    other = table[(table.model == "lstm_cnn") & (table.method == method) & (table.reference == "human")].iloc[0]
    assert other["no_reference_map"] == 3


def test_exact_copy_of_a_single_annotator_map_has_rho_one():
    rng = np.random.default_rng(0)
    human = rng.random((4, 1, 16, 16))
    maps = human[:, 0].copy()
    maps[3] = 1.0
    rho, counts = agreement.score_maps(maps, np.ones(4, bool), [1, 2, 3, 4],
                                              {q: human[i] for i, q in enumerate([1, 2, 3, 4])})
    assert rho[:3] == pytest.approx(1.0)
    assert np.isnan(rho[3]) and counts["constant"] == 1


def test_stage_is_deterministic_and_writes_the_expected_table(explained_world, tmp_path):
    first = stage_config(explained_world, tmp_path / "a")
    second = stage_config(explained_world, tmp_path / "b")
    result = rank_correlation.run(first)
    rank_correlation.run(second)
    csv_a = tmp_path / "a" / "reports" / "tables" / "rank_correlation.csv"
    csv_b = tmp_path / "b" / "reports" / "tables" / "rank_correlation.csv"
    assert csv_a.read_bytes() == csv_b.read_bytes()

    table = pd.read_csv(csv_a, keep_default_na=False)
    # the columns the report and readers use, written out: renaming or dropping one fails here
    assert list(table.columns) == ["model", "method", "reference", "n", "mean", "ci_low", "ci_high",
                                   "mean_all_questions", "constant", "ties", "no_reference_map",
                                   "invalid", "constant_reference", "beats_random", "seeds", "seed_mean",
                                   "seed_sd", "seed_min", "seed_max", "beats_random_seeds",
                                   "beats_random_every_seed"]
    # Without replicates (the tests' setting) the spread is over the one main run.
    models = table[table["model"] != "human"]
    seeds = models["seeds"].astype(int)
    assert set(seeds) <= {0, 1} and (table.loc[table["model"] == "human", "seeds"] == "").all()
    # (read with keep_default_na=False: an undefined mean is an empty cell)
    seed_mean = pd.to_numeric(models["seed_mean"].replace("", np.nan))
    mean = pd.to_numeric(models["mean"].replace("", np.nan))
    assert seed_mean.equals(mean.where(seeds == 1))
    assert (tmp_path / "a" / "reports" / "figures" / "rank_correlation.png").stat().st_size > 1000
    md = (tmp_path / "a" / "reports" / "tables" / "rank_correlation.md").read_text()
    assert "95% CI" in md and "no reference map" in md
    for reference in ("human", "ground_truth"):
        part = table[table.reference == reference]
        for model in MODELS:
            methods = part[part.model == model].method.tolist()
            stored = inputs.methods_that_ran(inputs.load_store(first, model))
            assert methods == ["random", *[m for m in stored if m != "random"]]
            assert methods[0] == "random" and part[part.model == model].beats_random.iloc[0] == ""
            # A verdict wherever both intervals exist; undetermined ("") only without one (e.g. a
            # method whose maps are constant on almost every question of the tiny world).
            scored = part[(part.model == model) & (part.method != "random")]
            assert set(scored.beats_random) <= {"True", "False", ""}
            assert ((scored.beats_random == "") == (scored.ci_low == "")).all()
        assert ("attention" in part[part.model == "mlb"].method.tolist()
                and "attention" not in part[part.model == "lstm_cnn"].method.tolist())
        assert part.iloc[-1].model == "human" and part.iloc[-1].method == "human"
    # beats_random is the interval comparison, row by row.
    df = result["table"]
    for row in df[(df.method != "random") & (df.model != "human")].itertuples():
        random_row = df[(df.model == row.model) & (df.method == "random") & (df.reference == row.reference)].iloc[0]
        if pd.isna(row.ci_low):
            assert row.beats_random == ""  # no interval: undetermined, never a verdict
        else:
            assert row.beats_random == (row.ci_low > random_row.ci_high)
    metrics = json.loads((tmp_path / "a" / "reports" / "metrics" / "rank_correlation.json").read_text())
    assert set(metrics) == {"lstm_cnn", "mlb", "human", "not_beating_random",
                            "not_beating_random_by_answer_type", "training_seeds",
                            "not_beating_random_on_every_seed", "verdict_differs_across_seeds"}
    assert metrics["training_seeds"] == [0]  # the tests' setting: no replicates
    assert metrics["mlb"]["attention"]["human"] == pytest.approx(
        df[(df.model == "mlb") & (df.method == "attention") & (df.reference == "human")]["mean"].iloc[0])
    assert sorted(metrics["not_beating_random"]) == sorted(
        f"{r.model}/{r.method}/{r.reference}" for r in df.itertuples() if r.beats_random is False)


def test_two_processes_with_different_hash_seeds_write_identical_tables(explained_world, tmp_path):
    """The stage as dvc.yaml runs it, in two separate processes whose PYTHONHASHSEED differ (set
    and dict-of-set iteration orders, str hashes): the same inputs give the same table files,
    byte for byte, and the same metrics."""
    import subprocess
    import sys

    from tests.conftest import TINY_PIPELINE

    outputs = {}
    for hash_seed in ("1", "2"):
        out = tmp_path / f"hash{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.rank_correlation", *TINY_PIPELINE, "threads=1",
             f"paths.root={explained_world}", f"paths.reports_dir={out}/reports",
             f"paths.log_dir={out}/logs"],
            capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        tables = out / "reports" / "tables"
        outputs[hash_seed] = {p.name: p.read_bytes() for p in sorted(tables.iterdir())}
        outputs[hash_seed]["metrics"] = (out / "reports" / "metrics" / "rank_correlation.json").read_bytes()
    assert sorted(outputs["1"]) == ["metrics", "rank_correlation.csv", "rank_correlation.md",
                                    "rank_correlation_by_answer_type.csv",
                                    "rank_correlation_by_answer_type.md",
                                    "rank_correlation_by_seed.csv", "rank_correlation_by_seed.md"]
    for name in outputs["1"]:
        assert outputs["1"][name] == outputs["2"][name], name
    table = pd.read_csv(tmp_path / "hash1" / "reports" / "tables" / "rank_correlation.csv")
    assert len(table) > 10 and table["n"].gt(0).any()  # a real table, not two empty ones


def test_resolution_14_option(explained_world, tmp_path):
    cfg = stage_config(explained_world, tmp_path, "evaluation.resolution=14", "evaluation.models=[mlb]")
    table = rank_correlation.run(cfg)["table"]
    assert set(table.model) == {"mlb", "human"}
    expected = loop_question_rho(cfg, "mlb", "occlusion", resolution=14)
    row = table[(table.method == "occlusion") & (table.reference == "human")].iloc[0]
    assert row["mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)


def test_empty_store_names_the_attribute_stage(explained_world, tmp_path):
    base = stage_config(explained_world, tmp_path)
    attributions, _, overrides = copy_world_inputs(base, tmp_path)
    index_file = attributions / "mlb" / "index.json"
    index = json.loads(index_file.read_text())
    index["questions"] = []
    index_file.write_text(json.dumps(index))
    with pytest.raises(DataError, match="pipeline.attribute"):
        rank_correlation.run(stage_config(explained_world, tmp_path, *overrides))
    with pytest.raises(DataError, match="pipeline.attribute"):
        rank_correlation.run(stage_config(explained_world, tmp_path, f"paths.attributions_dir={tmp_path / 'none'}"))


def _offline_wandb_run(explained_world, tmp_path, monkeypatch):
    """rank_correlation with logger=wandb, offline (no network), into ``tmp_path/logs``: the
    stage's result and what its one offline run holds, read back from the run's files."""
    from tests.wandb_records import offline_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = stage_config(explained_world, tmp_path, "logger=wandb", f"paths.log_dir={tmp_path / 'logs'}",
                       "evaluation.models=[lstm_cnn]")
    assert cfg.logger.mode == "offline"
    result = rank_correlation.run(cfg)
    runs = offline_runs(tmp_path / "logs" / "wandb")
    assert len(runs) == 1
    return result, runs[0]


def test_offline_wandb_run_holds_the_summary_and_figures(explained_world, tmp_path, monkeypatch):
    from tests.wandb_records import logged

    result, run = _offline_wandb_run(explained_world, tmp_path, monkeypatch)
    assert run["job_type"] == "rank_correlation" and run["name"] == "rank_correlation"
    table = result["table"]
    # every row's mean under rank_correlation/<model>/<method>/<reference>, the values of the table
    expected = {f"rank_correlation/{r.model}/{r.method}/{r.reference}": r.mean
                for r in table.itertuples() if not pd.isna(r.mean)}
    assert "rank_correlation/lstm_cnn/gradcam/human" in expected and len(expected) > 10
    for key, value in expected.items():
        assert run["summary"][key] == pytest.approx(value, abs=1e-12), key
    images = {k: v for k, v in logged(run).items() if isinstance(v, dict) and v.get("_type") == "image-file"}
    assert len(images) == 2
    for name in ("rank_correlation.png", "rank_correlation_by_answer_type.png"):
        match = [v for v in images.values() if Path(v["path"]).name.startswith(name[:-4] + "_0_")]
        assert len(match) == 1, name
        assert (run["dir"] / "files" / match[0]["path"]).stat().st_size > 1000


def test_offline_wandb_run_holds_both_tables(explained_world, tmp_path, monkeypatch):
    from tests.wandb_records import logged_tables

    result, run = _offline_wandb_run(explained_world, tmp_path, monkeypatch)
    tables = logged_tables(run)
    for name, frame in (("rank_correlation", result["table"]),
                        ("rank_correlation_by_answer_type", result["by_answer_type"])):
        # under a key naming the stage and the table, with the table's columns and rows
        match = [t for key, t in tables.items() if key.startswith("rank_correlation/") and name in key
                 and t["columns"] == list(frame.columns)]
        assert len(match) == 1, (name, sorted(tables))
        assert len(match[0]["data"]) == len(frame), name
        methods = [row[list(frame.columns).index("method")] for row in match[0]["data"]]
        assert methods == frame["method"].tolist(), name


def test_stage_logs_its_table_and_figure_once(explained_world, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(outputs, "log_to_wandb", lambda *args, **kwargs: calls.append((args, kwargs)))
    result = rank_correlation.run(stage_config(explained_world, tmp_path, "evaluation.models=[lstm_cnn]"))
    assert len(calls) == 1
    (cfg, stage), kwargs = calls[0]
    assert stage == "rank_correlation"
    assert kwargs["tables"]["rank_correlation"].equals(result["table"])
    assert kwargs["figures"]["rank_correlation"].is_file()
    assert kwargs["summary"]["lstm_cnn/random/human"] == pytest.approx(
        result["table"].query("model == 'lstm_cnn' and method == 'random' and reference == 'human'")["mean"].iloc[0])


def test_all_questions_mean_scores_undefined_rho_as_zero():
    """Goyal et al. average over all VQA-HAT pairs; a constant map has no rank correlation and
    scores 0 there. Checked against a plain loop over per-question scores."""
    rng = np.random.default_rng(3)
    maps = rng.random((6, 4, 4))
    maps[1] = 0.5                       # constant map
    references = {q: rng.random((2, 4, 4)) for q in range(6)}
    references[4] = np.ones((1, 4, 4))  # constant reference
    del references[5]                   # no reference: not a question of either mean
    rho, counts = agreement.score_maps(maps, np.ones(6, bool), list(range(6)), references)
    row = pd.DataFrame([{"n": int(np.isfinite(rho).sum()), "mean": float(np.nanmean(rho)), **counts}])
    by_loop = []
    for q in range(5):                  # every question with a map and a reference
        per_annotator = [spearmanr(maps[q].ravel(), r.ravel())[0] for r in references[q]]
        value = np.nanmean(per_annotator) if np.isfinite(per_annotator).any() else np.nan
        by_loop.append(0.0 if np.isnan(value) else value)
    assert counts["constant"] == 1 and counts["constant_reference"] == 1
    expected = float(np.mean(by_loop))
    assert agreement.all_questions_mean(row).iloc[0] == pytest.approx(expected, abs=1e-12)
    assert row["mean"].iloc[0] != pytest.approx(expected)   # the two means differ here
    empty = pd.DataFrame([{"n": 0, "mean": np.nan, "constant": 0, "constant_reference": 0},
                          {"n": 0, "mean": np.nan, "constant": 2, "constant_reference": 0}])
    assert np.isnan(agreement.all_questions_mean(empty).iloc[0])
    assert agreement.all_questions_mean(empty).iloc[1] == 0.0
