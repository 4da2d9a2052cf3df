"""Training-seed replicates: every model trained and explained again with other values of
train.seed (`replicate=k`), and the rank-correlation table's spread across seeds next to its
bootstrap interval, the beats-random verdict required on every seed."""
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from tests.conftest import TINY_PIPELINE
from pipeline import attribute, rank_correlation, report, train
from pipeline.evaluation.report import header
from pipeline.common.config import (REPLICATE_PATHS, ParamsMode, as_replicate, compose, replicate_config,
                             training_seeds, write_params)
from pipeline.common.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_a_replicate_changes_the_training_seed_and_every_output_folder_only():
    cfg = compose(["paths.root=/run"])
    rep = as_replicate(compose(["paths.root=/run", "replicate=2"]))
    assert int(rep.train.seed) == 2 and int(rep.seed) == int(cfg.seed)  # same data, new training
    for key in REPLICATE_PATHS:
        assert rep.paths[key] == f"{cfg.paths[key]}/replicates/seed2"
    for key in ("processed_dir", "features_dir", "backbone_dir", "reports_dir", "data_dir"):
        assert rep.paths[key] == cfg.paths[key]
    assert OmegaConf.to_container(rep.backbone, resolve=True) == OmegaConf.to_container(cfg.backbone, resolve=True)
    assert as_replicate(cfg) is cfg  # replicate=null: the main run


def test_bad_replicate_settings_are_errors():
    with pytest.raises(DataError, match="main run's train.seed"):
        as_replicate(compose(["replicate=0"]))
    with pytest.raises(DataError, match="repeats a seed"):
        training_seeds(compose(["replicates.seeds=[1,1]"]))
    with pytest.raises(DataError, match="repeats a seed"):
        training_seeds(compose(["replicates.seeds=[0,1]"]))
    assert training_seeds(compose(["train.seed=3", "replicates.seeds=[1,2]"])) == [3, 1, 2]


def _fill(template: str, params: dict, item: dict) -> str:
    """A dvc.yaml path template with ${item.*} and ${paths.*} / other keys filled in."""
    import re

    def value(match):
        key = match.group(1)
        if key.startswith("item."):
            return str(item[key[5:]])
        node = params
        for part in key.split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, template)


def test_dvc_yaml_replicate_outputs_are_where_replicate_config_writes(tmp_path):
    """dvc.yaml's train_replicate / attribute_replicate outs name the files the stages write
    under replicate_config's folders (a mismatch would make DVC lose or miss them)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    write_params(tmp_path / "params.yaml")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    cfg = replicate_config(compose(), 7)
    item = {"model": "mlb", "seed": 7}
    train_outs = [_fill(next(iter(o)) if isinstance(o, dict) else o, params, item)
                  for o in stages["train_replicate"]["outs"]]
    assert train_outs == [f"{cfg.paths.models_dir}/mlb/model.pt", f"{cfg.paths.checkpoints_dir}/mlb"]
    metrics = [_fill(next(iter(o)), params, item) for o in stages["train_replicate"]["metrics"]]
    assert metrics == [f"{cfg.paths.metrics_dir}/train/mlb.json"]
    attribute_outs = [_fill(o, params, item) for o in stages["attribute_replicate"]["outs"]]
    assert attribute_outs == [f"{cfg.paths.attributions_dir}/mlb"]
    assert f"{cfg.paths.models_dir}/mlb/model.pt" in [_fill(d, params, item) for d in
                                                      stages["attribute_replicate"]["deps"]]
    assert "replicate=${item.seed}" in stages["train_replicate"]["cmd"]
    assert "replicate=${item.seed}" in stages["attribute_replicate"]["cmd"]


def test_params_mode_applies_model_overrides_after_choosing_the_model(tmp_path):
    """`model=lstm_cnn model.optim.max_epochs=3` trains lstm_cnn for 3 epochs (the choice of
    models.lstm_cnn used to drop the override silently); `models.<name>.*` still reaches it."""
    params = write_params(tmp_path / "params.yaml")
    mode = ParamsMode.load(params, ["model=lstm_cnn", "model.optim.max_epochs=3",
                                    "models.lstm_cnn.optim.lr=0.5", "replicate=1"],
                           check_stale=False)
    assert mode.config.model.name == "lstm_cnn"
    assert mode.config.model.optim.max_epochs == 3
    assert mode.config.model.optim.lr == 0.5
    assert mode.config.replicate == 1


@pytest.fixture(scope="module")
def replicated_world(explained_world, tmp_path_factory):
    """The tiny world's mlb, trained and explained again with train.seed=1 as `replicate=1` does,
    every output folder of the run moved under ``out`` (the shared world stays untouched)."""
    out = tmp_path_factory.mktemp("replicates")
    shutil.copytree(explained_world / "attributions" / "synthetic_tiny", out / "attributions")
    overrides = [*TINY_PIPELINE, f"paths.root={explained_world}", "replicates.seeds=[1]",
                 "evaluation.models=[mlb]", "evaluation.bootstrap.samples=200", "model=mlb",
                 f"paths.models_dir={out}/models", f"paths.checkpoints_dir={out}/checkpoints",
                 f"paths.metrics_dir={out}/metrics", f"paths.log_dir={out}/logs",
                 f"paths.attributions_dir={out}/attributions", f"paths.reports_dir={out}/reports"]
    replicate = as_replicate(compose([*overrides, "replicate=1"]))
    train.run(replicate)
    attribute.run(replicate)
    return out, overrides


def test_a_replicate_is_another_training_run_on_the_same_data(replicated_world, explained_world):
    out, _ = replicated_world
    main = torch.load(explained_world / "models" / "mlb" / "model.pt", map_location="cpu", weights_only=False)
    again = torch.load(out / "models" / "replicates" / "seed1" / "mlb" / "model.pt", map_location="cpu",
                       weights_only=False)
    # Another initialisation and batch order: other head weights; the same backbone.
    assert any(not torch.equal(main["head_state"][k], again["head_state"][k]) for k in main["head_state"])
    assert all(torch.equal(main["backbone_state"][k], again["backbone_state"][k]) for k in main["backbone_state"])
    main_store = yaml.safe_load((out / "attributions" / "mlb" / "index.json").read_text())
    rep_store = yaml.safe_load((out / "attributions" / "replicates" / "seed1" / "mlb" / "index.json").read_text())
    assert [q["question_id"] for q in main_store["questions"]] == [q["question_id"] for q in rep_store["questions"]]


def test_rank_correlation_reports_the_spread_across_training_seeds(replicated_world):
    out, overrides = replicated_world
    result = rank_correlation.run(compose(overrides))
    table, by_seed = result["table"], result["by_seed"]
    assert sorted(set(by_seed["seed"])) == [0, 1]
    models = table[table["model"] != "human"]
    assert (table.loc[table["model"] == "human", "seeds"] == "").all()
    moved = 0
    for row in models.itertuples(index=False):
        seeds = by_seed[(by_seed["model"] == row.model) & (by_seed["method"] == row.method)
                        & (by_seed["reference"] == row.reference)].sort_values("seed")
        means = seeds["mean"].tolist()
        assert len(means) == 2
        # `seeds` counts the seeds with a mean (a method whose every map is constant has none).
        assert row.seeds == sum(np.isfinite(means))
        if row.seeds < 2:
            continue
        # The main seed's row is the main table's row; the spread is computed independently here.
        assert means[0] == row.mean
        assert row.seed_mean == pytest.approx(statistics.fmean(means), abs=1e-12)
        assert row.seed_sd == pytest.approx(statistics.stdev(means), abs=1e-12)
        assert (row.seed_min, row.seed_max) == (min(means), max(means))
        if row.method == "random":
            assert row.beats_random_every_seed == "" or pd.isna(row.beats_random_every_seed)
            continue
        verdicts = seeds["beats_random"].tolist()
        if all(isinstance(v, (bool, np.bool_)) for v in verdicts):
            assert row.beats_random_every_seed == all(verdicts)
            assert row.beats_random_seeds == f"{sum(verdicts)}/2"
        moved += means[0] != means[1]
    assert (models["seeds"] == 2).sum() >= len(models) - 4
    assert moved > 0  # another training run gives other maps
    reports = out / "reports" / "tables"
    assert "training seeds: mean ± sd [min, max]" in (reports / "rank_correlation.md").read_text()
    written = pd.read_csv(reports / "rank_correlation_by_seed.csv")
    assert len(written) == len(by_seed)
    metrics = result["metrics"]
    assert metrics["training_seeds"] == [0, 1]
    assert set(metrics["not_beating_random_on_every_seed"]) >= {
        f"{r.model}/{r.method}/{r.reference}" for r in models.itertuples(index=False)
        if r.beats_random_every_seed is False}


def test_the_report_shows_accuracy_across_seeds(replicated_world):
    out, overrides = replicated_world
    cfg = compose(overrides)
    table = header.accuracy_across_seeds(cfg, ["mlb"])
    stores = [out / "attributions" / "mlb", out / "attributions" / "replicates" / "seed1" / "mlb"]
    accuracies = [float(np.mean([q["accuracy"] for q in yaml.safe_load((s / "index.json").read_text())["questions"]]))
                  for s in stores]
    assert table.loc[0, "mean"] == pytest.approx(np.mean(accuracies))
    assert table.loc[0, "min"] == min(accuracies) and table.loc[0, "max"] == max(accuracies)


def test_a_missing_replicate_store_names_the_stage_to_run(replicated_world):
    _, overrides = replicated_world
    with pytest.raises(DataError, match=r"replicate=5.*attribute_replicate@mlb-5"):
        rank_correlation.run(compose([*overrides, "replicates.seeds=[1,5]"]))
