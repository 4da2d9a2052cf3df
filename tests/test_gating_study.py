"""Stage gating_study (Ummettuguli Tables 1-6 and the top-n sweep): neuron scores against a plain
autograd loop, the one-pass sweep against ``explain`` at each gate size (full width = Grad-CAM
to float32 rounding), the tables against scipy / plain-loop recomputations, determinism, bad input."""
import itertools
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from pipeline import gating_study
from pipeline.attribution import explain
from pipeline.attribution.probe import Probe
from pipeline.common.config import abspath
from pipeline.data import processed
from pipeline.common.errors import DataError
from pipeline.data.images import ImageTransform
from pipeline.data.vqa_format import load_image
from pipeline.evaluation import gating, inputs
from pipeline.evaluation.outputs import tables_dir
from pipeline.models import load_model
from tests.conftest import evaluation_config

MODELS = ("lstm_cnn", "mlb")


def stage_config(root, tmp_path, *overrides):
    return evaluation_config(root, f"paths.reports_dir={tmp_path / 'reports'}", *overrides)


def model_and_batch(cfg, model_name, question_ids, max_length=None):
    """The trained model and the (images, tokens) of ``question_ids``, as the attribute stage
    builds them (tokens padded to ``data.max_question_length``)."""
    processed_dir = abspath(cfg.paths.processed_dir)
    qv, av = processed.load_vocabs(processed_dir)
    model = load_model(abspath(cfg.paths.models_dir) / model_name / "model.pt",
                       question_vocab=qv, answer_vocab=av).eval()
    if cfg.backbone.get("channels_last"):  # as the stages run it (float rounding differs)
        model.backbone.to(memory_format=torch.channels_last)
    records = {r["question_id"]: r for r in processed.load_question_table(processed_dir, "val")}
    transform = ImageTransform(model.backbone.input_size, model.backbone.mean, model.backbone.std)
    images = torch.stack([transform(load_image(abspath(cfg.data.root) / records[q]["image"]))
                          for q in question_ids])
    length = max_length or int(cfg.data.max_question_length)
    tokens = torch.zeros(len(question_ids), length, dtype=torch.long)
    for i, q in enumerate(question_ids):
        ids = records[q]["token_ids"][:length]
        tokens[i, :len(ids)] = torch.tensor(ids)
    return model, images, tokens


@pytest.fixture(scope="module")
def stage_run(explained_world, tmp_path_factory):
    """One run of the stage on the explained tiny world: (config, metrics)."""
    out = tmp_path_factory.mktemp("gating")
    cfg = stage_config(explained_world, out)
    return cfg, gating_study.run(cfg)


def read(cfg, name):
    return pd.read_csv(tables_dir(cfg) / f"{name}.csv")


# --------------------------------------------------------------------------------------------
# library


def test_top_neurons_and_jaccard_match_plain_python():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(6, 12)).astype(float)  # many ties
    top, values = gating.top_neurons(scores, 4)
    for row, (t, v) in enumerate(zip(top, values)):
        expected = sorted(range(12), key=lambda i: (-scores[row, i], i))[:4]
        assert t.tolist() == expected
        assert v.tolist() == [scores[row, i] for i in expected]
    # the method's own ordering (torch stable sort, descending) gives the same sets
    order = torch.sort(torch.tensor(scores), dim=1, descending=True, stable=True).indices[:, :4]
    assert order.tolist() == top.tolist()
    pairs = np.array([[0, 1], [2, 3], [4, 4]])
    j = gating.pair_jaccard(top, pairs)
    for (a, b), value in zip(pairs, j):
        sa, sb = set(top[a].tolist()), set(top[b].tolist())
        assert value == len(sa & sb) / len(sa | sb)
    assert j[2] == 1.0
    rho = gating.pair_spearman(scores, pairs[:2])
    assert rho[0] == pytest.approx(spearmanr(scores[0], scores[1])[0], abs=1e-12)


def test_groups_and_unrelated_pairs():
    rows = [{"question_id": q, "image_id": i, "tokens": t.split(), "question": t}
            for q, i, t in [(1, 10, "a b"), (2, 10, "c d"), (3, 11, "a b"), (4, 12, "a b"),
                            (5, 12, "c d"), (6, 13, "e"), (7, 12, "a b")]]
    same_q = gating.same_question_groups(rows)
    assert same_q == [("a b", [0, 2, 3]), ("c d", [1, 4])]  # question 7 repeats 4 on image 12
    same_i = gating.same_image_groups(rows)
    assert same_i == [(10, [0, 1]), (12, [3, 4])]
    assert gating.within_group_pairs(same_i).tolist() == [[0, 1], [3, 4]]
    pairs = gating.unrelated_pairs(rows, 100, seed=0)
    brute = {(i, j) for i, j in itertools.combinations(range(len(rows)), 2)
             if rows[i]["image_id"] != rows[j]["image_id"] and rows[i]["tokens"] != rows[j]["tokens"]}
    assert {tuple(p) for p in pairs.tolist()} == brute  # asked for more than exist: all of them
    assert len(pairs) == len(brute)
    few = gating.unrelated_pairs(rows, 3, seed=1)
    assert len(few) == 3 and {tuple(p) for p in few.tolist()} <= brute
    assert few.tolist() == gating.unrelated_pairs(rows, 3, seed=1).tolist()


def test_gate_sizes():
    assert gating_study.gate_sizes([1, 5, 100, "full", 2000], 256) == [1, 5, 100, 256]
    with pytest.raises(ValueError):
        gating_study.gate_sizes([0], 10)


# --------------------------------------------------------------------------------------------
# against autograd and explain


@pytest.mark.parametrize("model_name", MODELS)
def test_stored_neuron_scores_equal_a_plain_autograd_loop(explained_world, tmp_path, model_name):
    cfg = stage_config(explained_world, tmp_path)
    rows, scores = gating_study.load_neuron_scores(cfg, model_name)
    picked = [0, len(rows) - 1]
    model, images, tokens = model_and_batch(cfg, model_name, [rows[i]["question_id"] for i in picked])
    probe = Probe(model, images, tokens, guided=False)
    F, q = probe["F"], probe["q"]
    for b, row in enumerate(picked):
        loop = np.array([torch.autograd.grad(F[b, i], q, retain_graph=True)[0][b].abs().sum().item()
                         for i in range(F.shape[1])])
        assert loop.max() > 0
        np.testing.assert_allclose(scores[row], loop, rtol=1e-4, atol=1e-7 * loop.max())


@pytest.mark.parametrize("model_name", MODELS)
def test_sweep_equals_explain_at_each_gate_size_and_gradcam_at_full_width(explained_world, tmp_path,
                                                                         model_name):
    cfg = stage_config(explained_world, tmp_path)
    qids = [r["question_id"] for r in processed.load_question_table(abspath(cfg.paths.processed_dir), "val")]
    model, images, tokens = model_and_batch(cfg, model_name, qids)
    # Questions whose Grad-CAM map is not all zero (through LSTM-CNN's fc6-fc7 layers a barely
    # trained model's signed map is often negative everywhere), so the comparison means something.
    gradcam_maps = explain(model, images, tokens, ["gradcam"])["gradcam"].image_map_raw
    kept = gradcam_maps.flatten(1).abs().amax(1) > 0
    assert kept.sum() >= 3, f"only {int(kept.sum())} questions with a non-zero Grad-CAM map"
    images, tokens = images[kept][:6], tokens[kept][:6]
    width = model.head.classifier.in_features
    full = explain(model, images, tokens, ["gradcam", "gated_gradcam"],
                   options={"gated_gradcam": {"top_n": width}})
    scores = full["gated_gradcam"].extras["neuron_scores"]
    sizes = [1, 3, 10, width]
    logits, target, gradcam, gated = gating.gated_gradcam_sweep(model, images, tokens, scores, sizes)
    assert torch.equal(target, logits.argmax(1))  # answer ids: exact
    # The sweep and explain reach each map by different autograd routes (one shared forward
    # pass for every n, or one pass per method): equal to float32 rounding, stated relative to
    # Grad-CAM's largest value (1e-5 of it, ~80 float32 steps) plus 1e-4 relative.
    scale = full["gradcam"].image_map_raw.abs().max().item()
    assert scale > 0
    atol = 1e-5 * scale

    def assert_same_map(actual, expected, n):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol, msg=lambda m: f"n={n}: {m}")

    assert_same_map(gradcam, full["gradcam"].image_map_raw, "gradcam")
    assert_same_map(gated[width], gradcam, width)  # every neuron kept: Grad-CAM
    assert_same_map(gated[width], full["gated_gradcam"].image_map_raw, width)
    for n in sizes[:-1]:
        reference = explain(model, images, tokens, ["gated_gradcam"], target=target,
                            options={"gated_gradcam": {"top_n": n}})["gated_gradcam"]
        assert_same_map(gated[n], reference.image_map_raw, n)
    # the gate does something, far beyond the tolerance
    assert (gated[1] - gradcam).abs().max().item() > 100 * atol


# --------------------------------------------------------------------------------------------
# the stage's tables


def test_top_neuron_table_and_overlaps_match_plain_loops(stage_run):
    cfg, _ = stage_run
    top = read(cfg, "gating_top_neurons")
    overlap = read(cfg, "gating_top_neuron_overlap")
    k = int(cfg.evaluation.gating_study.top_k)
    assert set(top["case"]) == {"same_question", "same_image"}
    for model in MODELS:
        rows, scores = gating_study.load_neuron_scores(cfg, model)
        row_of = {r["question_id"]: i for i, r in enumerate(rows)}
        stored = inputs.read_method(cfg, model, "gated_gradcam")
        stored_row = {q: i for i, q in enumerate(stored["question_ids"].tolist())}
        t = top[top["model"] == model]
        for (_, _, qid), g in t.groupby(["case", "group", "question_id"]):
            s = scores[row_of[qid]]
            expected = sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]
            assert g.sort_values("rank")["neuron"].tolist() == expected
            np.testing.assert_allclose(g.sort_values("rank")["score"], s[expected], rtol=1e-5)
            # the stage's ranking is the method's own (stored top neurons, top_n of the store)
            n_stored = stored["extra/top_neurons"].shape[1]
            assert expected[:n_stored] == stored["extra/top_neurons"][stored_row[qid]][:k].tolist()
        same_q = t[t["case"] == "same_question"]
        for text, g in same_q.groupby("group"):
            assert g["image_id"].nunique() == g["question_id"].nunique() >= 2
            assert {" ".join(rows[row_of[q]]["tokens"]) for q in g["question_id"]} == {text}
        same_i = t[t["case"] == "same_image"]
        for image, g in same_i.groupby("group"):
            assert set(g["image_id"]) == {int(image)}
        o = overlap[overlap["model"] == model]
        for _, row in o.iterrows():
            g = t[(t["case"] == row["case"]) & (t["group"].astype(str) == str(row["group"]))]
            sets = [set(x["neuron"]) for _, x in g.groupby("question_id")]
            values = [len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2)]
            assert row["n"] == len(values) and row["questions"] == len(sets)
            assert row["mean"] == pytest.approx(np.mean(values), abs=1e-6)


def test_score_correlation_matches_scipy(stage_run):
    cfg, metrics = stage_run
    table = read(cfg, "gating_score_correlation")
    truth = inputs.ground_truth_questions(cfg, "val")
    assert set(table["case"]) == {"same_question_different_images", "different_questions_same_image",
                                  "same_answer_pairs", "unrelated"}
    for model in MODELS:
        rows, scores = gating_study.load_neuron_scores(cfg, model)
        row_of = {r["question_id"]: i for i, r in enumerate(rows)}
        # the deliberate pairs, recomputed with scipy one pair at a time
        rho = [spearmanr(scores[row_of[a]], scores[row_of[b]])[0] for a, b in truth["pairs"]
               if a in row_of and b in row_of]
        row = table[(table["model"] == model) & (table["case"] == "same_answer_pairs")
                    & (table["measure"] == "spearman")].iloc[0]
        assert row["n"] == len(rho) and row["mean"] == pytest.approx(np.mean(rho), abs=1e-6)
        assert row["ci_low"] <= row["mean"] <= row["ci_high"]
        # same question on different images: every pair, with scipy
        by_text = {}
        for r in rows:
            by_text.setdefault(" ".join(r["tokens"]), {}).setdefault(r["image_id"], row_of[r["question_id"]])
        rho = [spearmanr(scores[i], scores[j])[0] for per_image in by_text.values()
               for i, j in itertools.combinations([per_image[k] for k in sorted(per_image)], 2)]
        row = table[(table["model"] == model) & (table["case"] == "same_question_different_images")
                    & (table["measure"] == "spearman")].iloc[0]
        assert row["n"] == len(rho) and row["mean"] == pytest.approx(np.mean(rho), abs=1e-6)
        m = metrics["models"][model]["score_correlation"]
        assert m["same_answer_pairs/spearman"] == pytest.approx(
            float(table[(table["model"] == model) & (table["case"] == "same_answer_pairs")
                        & (table["measure"] == "spearman")]["mean"].iloc[0]), rel=1e-5)


def test_sweep_table_full_width_is_gradcam_and_matches_a_scipy_loop(stage_run):
    cfg, metrics = stage_run
    table = read(cfg, "gating_sweep")
    truth = inputs.ground_truth_questions(cfg, "val")
    # The gate sizes written out from the config (conf/evaluation/default.yaml
    # gating_study.sweep.top_n: 1, 2, 5 and Ummettuguli's 10 ... 1000, full) and the fusion
    # widths of conf/model/*.yaml (arch.joint: LSTM-CNN 1024, MLB 256); `full` is the width and
    # sizes above it are capped at it.
    paper = [10, 15, 20, 25, 30, 35, 40, 45, 50, 100, 200, 300, 400, 500, 750, 1000]
    expected_sizes = {"lstm_cnn": [1, 2, 5, *paper, 1024],
                      "mlb": [1, 2, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 100, 200, 256]}
    assert list(cfg.evaluation.gating_study.sweep.top_n) == [1, 2, 5, *paper, "full"]
    for model in MODELS:
        t = table[table["model"] == model]
        width = int(metrics["models"][model]["fusion_width"])
        assert width == expected_sizes[model][-1]
        assert sorted(set(t.loc[t["method"] == "gated_gradcam", "top_n"])) == expected_sizes[model]
        reference = t[t["method"] == "gradcam"].set_index("measure")
        full = t[(t["method"] == "gated_gradcam") & (t["top_n"] == width)
                 & (t["measure"] != "change_from_previous")].set_index("measure")
        assert full["full_width"].all()
        assert list(full.index) == list(reference.index)
        # Counts are exact; the Spearman summaries of maps equal to float rounding agree to 1e-4
        # (a rounding-level change moves a rank only between near-equal cells).
        for column in ("n", "undefined"):
            assert full[column].tolist() == reference[column].tolist(), column
        for column in ("mean", "ci_low", "ci_high"):
            np.testing.assert_allclose(full[column].to_numpy(float), reference[column].to_numpy(float),
                                       rtol=0, atol=1e-4, err_msg=column)
        # Grad-CAM's rows recomputed from explain() and scipy, one question at a time.
        qids = [q for pair in truth["pairs"] for q in pair]
        model_obj, images, tokens = model_and_batch(cfg, model, qids)
        maps = explain(model_obj, images, tokens, ["gradcam"])["gradcam"].image_map.detach().numpy()
        small = np.abs(inputs.to_resolution(maps, 16))
        # The full-width maps equal Grad-CAM's to float32 rounding: 1e-5 of the maps' largest
        # value, computed here from explain(), not by the stage (exactly, when every map is zero,
        # as a barely trained LSTM-CNN's Grad-CAM through fc6-fc7 can be on these few pairs).
        full_difference = metrics["models"][model]["sweep"]["full_width_max_abs_difference_from_gradcam"]
        assert 0.0 <= full_difference <= 1e-5 * small.max(), (full_difference, small.max())
        masks = inputs.ground_truth_maps(cfg, "val", qids, 16)
        own, other, difference = [], [], []
        for p, (a, b) in enumerate(truth["pairs"]):
            ma, mb = small[2 * p].ravel(), small[2 * p + 1].ravel()
            own += [spearmanr(ma, masks[a].ravel())[0], spearmanr(mb, masks[b].ravel())[0]]
            other += [spearmanr(ma, masks[b].ravel())[0], spearmanr(mb, masks[a].ravel())[0]]
            difference.append(1 - spearmanr(ma, mb)[0])
        for measure, values in (("own_mask", own), ("other_mask", other), ("pair_difference", difference)):
            finite = [v for v in values if np.isfinite(v)]
            assert reference.loc[measure, "n"] == len(finite)
            assert reference.loc[measure, "undefined"] == len(values) - len(finite)
            assert reference.loc[measure, "mean"] == pytest.approx(np.mean(finite) if finite else np.nan,
                                                                   abs=1e-5, nan_ok=True)


def test_outputs_and_determinism(stage_run, explained_world, tmp_path):
    cfg, metrics = stage_run
    names = ["gating_top_neurons", "gating_top_neuron_overlap", "gating_score_correlation", "gating_sweep"]
    for name in names:
        assert (tables_dir(cfg) / f"{name}.md").is_file()
    assert (abspath(cfg.paths.reports_dir) / "figures" / "gating_sweep.png").stat().st_size > 0
    saved = json.loads((abspath(cfg.paths.metrics_dir) / "gating_study.json").read_text())
    assert set(saved["models"]) == set(MODELS)
    again = stage_config(explained_world, tmp_path)
    gating_study.run(again)
    for name in names:
        assert (tables_dir(cfg) / f"{name}.csv").read_bytes() == (tables_dir(again) / f"{name}.csv").read_bytes()


def test_real_data_skips_the_sweep(explained_world, tmp_path):
    cfg = stage_config(explained_world, tmp_path, "data.source=vqa")
    metrics = gating_study.run(cfg)
    # the sweep's outputs exist (dvc.yaml declares them) and say why they are empty
    assert read(cfg, "gating_sweep").empty
    assert (tables_dir(cfg) / "gating_sweep.md").read_text().startswith("Not measured: no ground-truth")
    assert (tables_dir(cfg).parent / "figures" / "gating_sweep.png").stat().st_size > 0
    for m in metrics["models"].values():
        assert "skipped" in m["sweep"]
    assert "same_answer_pairs" not in set(read(cfg, "gating_score_correlation")["case"])


def test_a_store_from_another_model_is_refused(explained_world, tmp_path):
    cfg = stage_config(explained_world, tmp_path)
    attributions = tmp_path / "attributions"
    shutil.copytree(inputs.attribution_dir(cfg, "mlb"), attributions / "mlb")
    index_path = attributions / "mlb" / "index.json"
    index = json.loads(index_path.read_text())
    for q in index["questions"]:
        q["probability"] = q["probability"] * 0.5
    index_path.write_text(json.dumps(index))
    stale = stage_config(explained_world, tmp_path, f"paths.attributions_dir={attributions}",
                         "evaluation.models=[mlb]")
    with pytest.raises(DataError, match="pipeline.attribute model=mlb"):
        gating_study.run(stale)


def test_missing_gated_gradcam_names_the_attribute_stage(explained_world, tmp_path):
    cfg = stage_config(explained_world, tmp_path)
    attributions = tmp_path / "attributions"
    shutil.copytree(inputs.attribution_dir(cfg, "lstm_cnn"), attributions / "lstm_cnn")
    index_path = attributions / "lstm_cnn" / "index.json"
    index = json.loads(index_path.read_text())
    del index["methods"]["gated_gradcam"]
    index_path.write_text(json.dumps(index))
    broken = stage_config(explained_world, tmp_path, f"paths.attributions_dir={attributions}",
                          "evaluation.models=[lstm_cnn]")
    with pytest.raises(DataError, match="attribute"):
        gating_study.run(broken)


def test_stage_logs_to_wandb_offline_once(explained_world, tmp_path, monkeypatch):
    """A real offline wandb run (WANDB_MODE=offline from conftest): the tables and the figure are
    accepted by wandb, and the stage logs exactly once."""
    from pipeline.evaluation import outputs

    calls = []
    real = outputs.log_to_wandb
    monkeypatch.setattr(outputs, "log_to_wandb",
                        lambda *a, **k: (calls.append((a, k)), real(*a, **k))[1])
    cfg = stage_config(explained_world, tmp_path, "logger=wandb", f"paths.log_dir={tmp_path / 'logs'}",
                       "evaluation.models=[mlb]")
    metrics = gating_study.run(cfg)
    assert len(calls) == 1
    (_, stage), kwargs = calls[0]
    assert stage == "gating_study"
    assert set(kwargs["tables"]) == {"gating_top_neurons", "gating_top_neuron_overlap",
                                     "gating_score_correlation", "gating_sweep"}
    assert kwargs["figures"]["gating_sweep"].is_file()
    assert kwargs["summary"]["mlb/same_answer_pairs/spearman"] == pytest.approx(
        metrics["models"]["mlb"]["score_correlation"]["same_answer_pairs/spearman"])
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*"))


def test_sweep_includes_the_papers_gate_sizes_and_where_the_map_changes_most(stage_run):
    """Ummettuguli sweeps n = 10 ... 1024 (Figs. 28-77); the default sweep holds those sizes,
    and the change of the map from one size to the next (1 - Spearman) is measured per question
    and recomputed here from explain() and scipy for the largest change the stage reports."""
    cfg, metrics = stage_run
    paper = [10, 15, 20, 25, 30, 35, 40, 45, 50, 100, 200, 300, 400, 500, 750, 1000]
    requested = list(cfg.evaluation.gating_study.sweep.top_n)
    assert all(n in requested for n in paper) and "full" in requested
    table = read(cfg, "gating_sweep")
    truth = inputs.ground_truth_questions(cfg, "val")
    qids = [q for pair in truth["pairs"] for q in pair]
    for model in MODELS:
        t = table[(table["model"] == model) & (table["method"] == "gated_gradcam")]
        sizes = sorted(set(t["top_n"]))
        width = int(metrics["models"][model]["fusion_width"])
        assert sizes[-1] == width and all(min(n, width) in sizes for n in paper)
        change = t[t["measure"] == "change_from_previous"].set_index("top_n")
        assert sorted(change.index) == sizes[1:]          # every size but the smallest
        defined = change["mean"].dropna()  # undefined where every map of a size is zero
        assert len(defined) > 0 and ((defined >= 0) & (defined <= 2)).all()
        headline = metrics["models"][model]["sweep"]
        to = int(change["mean"].idxmax())
        assert headline["largest_change_to"] == to
        assert headline["largest_change_from"] == sizes[sizes.index(to) - 1]
        # Recompute that row: maps of explain() at both sizes, Spearman per question.
        model_obj, images, tokens = model_and_batch(cfg, model, qids)
        maps = {n: inputs.to_resolution(explain(model_obj, images, tokens, ["gated_gradcam"],
                                                options={"gated_gradcam": {"top_n": n}})
                                        ["gated_gradcam"].image_map.detach().numpy(), 16)
                for n in (headline["largest_change_from"], to)}
        a, b = maps[headline["largest_change_from"]], maps[to]
        values = [1 - spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)]
        finite = [v for v in values if np.isfinite(v)]
        assert change.loc[to, "n"] == len(finite)
        assert change.loc[to, "mean"] == pytest.approx(np.mean(finite), abs=1e-4)
        assert headline["largest_change"] == pytest.approx(change.loc[to, "mean"], rel=1e-6)
