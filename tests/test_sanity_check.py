"""Stage sanity_check (Adebayo et al. 2018, cascading randomisation): the cascade read off the
model, randomisation that changes the model but never the original or the file, step 0 = 1, the
random reference ~0, correlations against an independent scipy recomputation, the flags,
determinism."""
import copy
import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from pipeline import sanity_check
from pipeline.attribution import explain
from pipeline.common.config import abspath
from pipeline.data import processed
from pipeline.evaluation import inputs, outputs, randomisation
from pipeline.evaluation.outputs import tables_dir
from pipeline.models import load_model
from tests.conftest import evaluation_config

MODELS = ("lstm_cnn", "mlb")
SMALL = ["evaluation.sanity_check.questions=8",
         "evaluation.sanity_check.question_limits.occlusion=2",
         "evaluation.sanity_check.question_limits.integrated_gradients=2",
         "evaluation.sanity_check.options.occlusion.grid=4"]


def stage_config(root, tmp_path, *overrides):
    return evaluation_config(root, f"paths.reports_dir={tmp_path / 'reports'}", *SMALL, *overrides)


def trained_model(cfg, name):
    """The model as the stage loads it (channels-last backbone when configured: the same
    function, but float rounding differs, and rank correlations see near-ties)."""
    qv, av = processed.load_vocabs(abspath(cfg.paths.processed_dir))
    model = load_model(abspath(cfg.paths.models_dir) / name / "model.pt", question_vocab=qv,
                       answer_vocab=av).eval()
    if cfg.backbone.get("channels_last"):
        model.backbone.to(memory_format=torch.channels_last)
    return model


def model_file_digest(cfg, name):
    return hashlib.sha256((abspath(cfg.paths.models_dir) / name / "model.pt").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def stage_run(trained_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sanity")
    cfg = stage_config(trained_world, out)
    digests = {m: model_file_digest(cfg, m) for m in MODELS}
    metrics = sanity_check.run(cfg)
    return cfg, metrics, digests


def test_cascade_is_read_off_the_model_top_down(trained_world, tmp_path):
    cfg = stage_config(trained_world, tmp_path)
    for name in MODELS:
        model = trained_model(cfg, name)
        _, images, tokens = inputs.question_batch(cfg, model, "val", 4)
        units = [n for n, _ in randomisation.cascade_units(model, images, tokens)]
        assert units[0] == "head.classifier" and units[-1] == "backbone.stem"
        tops = [u.split(".")[0] for u in units]
        assert tops == sorted(tops, key=lambda t: t != "head")  # the whole head, then the backbone
        assert [u for u in units if u.startswith("backbone.stages")] == \
            [f"backbone.stages.{i}" for i in reversed(range(len(model.backbone.stages)))]
        # pretraining heads never run in forward: nothing to randomise there
        assert "backbone.classifier" not in units and "backbone.cell_classifier" not in units
        # every parameter that takes part in the forward belongs to exactly one unit
        owned = [id(p) for _, m in randomisation.cascade_units(model, images, tokens) for p in m.parameters()]
        assert len(owned) == len(set(owned))
        if name == "mlb":
            assert {"head.attention_glimpses", "head.gru"} <= set(units)


def test_randomisation_changes_the_copy_only(trained_world, tmp_path):
    cfg = stage_config(trained_world, tmp_path)
    model = trained_model(cfg, "mlb")
    _, images, tokens = inputs.question_batch(cfg, model, "val", 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(images, tokens)
    working = copy.deepcopy(model)
    units = dict(working.named_modules())
    for name, _ in randomisation.cascade_units(working, images, tokens):
        randomisation.randomise_unit(name, units[name], seed=0)
    with torch.no_grad():
        assert not torch.allclose(working(images, tokens), logits)
        assert torch.equal(model(images, tokens), logits)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a randomised parameter keeps its scale (mean and std of the trained values)
    trained = model.head.classifier.weight
    fresh = working.head.classifier.weight
    assert not torch.equal(trained, fresh)
    assert float(fresh.detach().std()) == pytest.approx(float(trained.detach().std()), rel=0.1)
    # the same seed gives the same random weights
    again = copy.deepcopy(model)
    randomisation.randomise_unit("head.classifier", again.head.classifier, seed=0)
    assert torch.equal(again.head.classifier.weight, fresh)


def test_correlation_helpers_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4, 4)), rng.normal(size=(5, 4, 4))
    rho = randomisation.image_correlation(a, b)
    for i in range(5):
        assert rho[i] == pytest.approx(spearmanr(np.abs(a[i]).ravel(), np.abs(b[i]).ravel())[0], abs=1e-12)
    qa, qb = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    real = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], bool)
    rho = randomisation.question_correlation(qa, qb, real)
    assert rho[0] == pytest.approx(spearmanr(np.abs(qa[0, :4]), np.abs(qb[0, :4]))[0], abs=1e-12)
    assert rho[1] == pytest.approx(spearmanr(np.abs(qa[1]), np.abs(qb[1]))[0], abs=1e-12)
    assert np.isnan(rho[2])  # one word: no ranking


def test_step_zero_is_one_and_the_random_reference_is_near_zero(stage_run):
    cfg, metrics, _ = stage_run
    table = pd.read_csv(tables_dir(cfg) / "sanity.csv")
    step0 = table[table["step"] == 0]
    # A map against itself: rho 1, unless every map is constant (e.g. a Grad-CAM variant that is
    # zero everywhere on a tiny model), which is counted as undefined, not scored.
    defined = step0[step0["undefined"] < step0["n"]]
    assert len(defined) and np.allclose(defined["mean"], 1.0, atol=1e-9)
    assert step0.loc[step0["undefined"] == step0["n"], "mean"].isna().all()
    reference = table[(table["method"] == "random") & (table["step"] > 0) & (table["modality"] == "image")]
    assert len(reference) > 5
    assert abs(reference["mean"].mean()) < 0.15  # pooled over steps: independent maps
    assert not table.loc[table["method"] == "random", "flagged"].any()
    for model in MODELS:
        t = table[table["model"] == model]
        m = metrics["models"][model]
        assert t["step"].max() == len(m["cascade"])
        assert t.drop_duplicates("step").sort_values("step")["layers_randomised"].tolist() == ["none", *m["cascade"]]
        assert m["max_logit_change_after_all"] > 0
    assert "attention" in metrics["models"]["lstm_cnn"]["skipped"]
    assert "attention" in set(table.loc[table["model"] == "mlb", "method"])


def test_flags_follow_the_threshold(stage_run):
    cfg, metrics, _ = stage_run
    table = pd.read_csv(tables_dir(cfg) / "sanity.csv")
    threshold = float(cfg.evaluation.sanity_check.threshold)
    for model in MODELS:
        m = metrics["models"][model]
        t = table[table["model"] == model]
        for (method, modality), g in t.groupby(["method", "modality"]):
            after_head = float(g.loc[g["step"] == m["head_steps"], "mean"].iloc[0])
            after_all = float(g.loc[g["step"] == g["step"].max(), "mean"].iloc[0])
            expected = method != "random" and (after_head > threshold or after_all > threshold)
            assert g["flagged"].all() == expected and g["flagged"].any() == expected
            assert (f"{method}/{modality}" in m["flagged"]) == expected
            saved = m["correlation"][f"{method}/{modality}"]["after_all"]
            assert saved is None if np.isnan(after_all) else saved == pytest.approx(after_all, rel=1e-5)


def test_a_step_matches_an_independent_recomputation(stage_run):
    """Step 2 of the MLB cascade by hand: a fresh copy, the first two units randomised, Grad-CAM
    and guided backprop recomputed, scipy's Spearman one question at a time."""
    cfg, metrics, _ = stage_run
    table = pd.read_csv(tables_dir(cfg) / "sanity.csv")
    model = trained_model(cfg, "mlb")
    _, images, tokens = inputs.question_batch(cfg, model, "val", int(cfg.evaluation.sanity_check.questions))
    with torch.no_grad():
        target = model(images, tokens).argmax(1)
    methods = ["gradcam", "guided_backprop"]
    original = explain(model, images, tokens, methods, target=target)
    working = copy.deepcopy(model)
    modules = dict(working.named_modules())
    for name in metrics["models"]["mlb"]["cascade"][:2]:
        randomisation.randomise_unit(name, modules[name], int(cfg.evaluation.seed))
    randomised = explain(working, images, tokens, methods, target=target)
    for method in methods:
        a = np.abs(inputs.to_resolution(original[method].image_map.detach().numpy(), 16))
        b = np.abs(inputs.to_resolution(randomised[method].image_map.detach().numpy(), 16))
        rho = [spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)]
        rho = [r for r in rho if np.isfinite(r)]
        row = table[(table["model"] == "mlb") & (table["method"] == method)
                    & (table["modality"] == "image") & (table["step"] == 2)].iloc[0]
        assert row["n"] == len(rho)
        assert row["mean"] == pytest.approx(np.mean(rho), abs=1e-6)
    real = (tokens != 0).numpy()
    qa = original["guided_backprop"].question_map.detach().numpy()
    qb = randomised["guided_backprop"].question_map.detach().numpy()
    rho = [spearmanr(np.abs(x[m]), np.abs(y[m]))[0] for x, y, m in zip(qa, qb, real) if m.sum() >= 2]
    rho = [r for r in rho if np.isfinite(r)]
    row = table[(table["model"] == "mlb") & (table["method"] == "guided_backprop")
                & (table["modality"] == "question") & (table["step"] == 2)].iloc[0]
    assert row["mean"] == pytest.approx(np.mean(rho), abs=1e-6)


def test_model_files_untouched_outputs_written_and_deterministic(stage_run, trained_world, tmp_path):
    cfg, metrics, digests = stage_run
    for m in MODELS:
        assert model_file_digest(cfg, m) == digests[m]
    assert (tables_dir(cfg) / "sanity.md").is_file()
    assert (abspath(cfg.paths.reports_dir) / "figures" / "sanity.png").stat().st_size > 0
    assert (abspath(cfg.paths.metrics_dir) / "sanity_check.json").is_file()
    again = stage_config(trained_world, tmp_path)
    sanity_check.run(again)
    assert (tables_dir(cfg) / "sanity.csv").read_bytes() == (tables_dir(again) / "sanity.csv").read_bytes()


def test_threshold_extremes(trained_world, tmp_path):
    cfg = stage_config(trained_world, tmp_path, "evaluation.sanity_check.threshold=-2",
                       "evaluation.models=[mlb]", "evaluation.sanity_check.backbone=false",
                       "evaluation.sanity_check.methods=[gradcam]")
    metrics = sanity_check.run(cfg)
    m = metrics["models"]["mlb"]
    assert all(not u.startswith("backbone") for u in m["cascade"])
    assert m["head_steps"] == len(m["cascade"])
    assert m["flagged"] == ["gradcam/image"]  # everything but the reference is above -2


def test_stage_logs_its_table_and_figure_once(trained_world, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(outputs, "log_to_wandb", lambda *a, **k: calls.append((a, k)))
    cfg = stage_config(trained_world, tmp_path, "evaluation.models=[mlb]", "evaluation.sanity_check.backbone=false",
                       "evaluation.sanity_check.methods=[gradcam,guided_backprop]")
    metrics = sanity_check.run(cfg)
    assert len(calls) == 1
    (_, stage), kwargs = calls[0]
    assert stage == "sanity_check"
    table = pd.read_csv(tables_dir(cfg) / "sanity.csv")
    assert len(kwargs["tables"]["sanity"]) == len(table)
    assert kwargs["figures"]["sanity"].is_file()
    assert kwargs["summary"]["mlb/guided_backprop/image/after_head"] == pytest.approx(
        metrics["models"]["mlb"]["correlation"]["guided_backprop/image"]["after_head"])
