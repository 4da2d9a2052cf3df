"""The report stage: README.md assembles every table and figure with the published values and
their citations, index.html shows the sampled questions with overlays that exist and open,
missing inputs name the stage that writes them, and the output is byte-identical run to run."""
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import report
from pipeline.common.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation.outputs import write_table
from pipeline.evaluation.report import published_lookup, sections
from pipeline.evaluation.published import PUBLISHED, OurValue, PublishedValue
from pipeline.viz.gallery import correctness, render_entry_images, sample_questions
from tests.conftest import evaluation_config

TAGGER = "test-tagger 1.0"


def fake_tables() -> dict[str, pd.DataFrame]:
    """Small stand-ins for what the evaluation stages write (only the columns the report relies
    on are the documented ones; the rest is free-form, as the report must render any table)."""
    rank_rows = []
    verdicts = {("lstm_cnn", "gradcam"): False, ("lstm_cnn", "occlusion"): True,
                ("lstm_cnn", "guided_backprop"): False, ("mlb", "gradcam"): True,
                ("mlb", "occlusion"): True, ("mlb", "guided_backprop"): True, ("mlb", "attention"): False}
    for reference in ("human", "ground_truth"):
        for model in ("lstm_cnn", "mlb"):
            methods = ["random", "gradcam", "occlusion", "guided_backprop"] + (["attention"] if model == "mlb" else [])
            for k, method in enumerate(methods):
                beats = "" if method == "random" else verdicts[(model, method)]
                if reference == "human" and method != "random":
                    beats = True  # against humans everything beats random: the report must use ground truth
                # mlb's guided backprop beats random with the main run's model, not on every seed.
                every = beats if (model, method, reference) != ("mlb", "guided_backprop", "ground_truth") else False
                rank_rows.append({"model": model, "method": method, "reference": reference, "resolution": 16,
                                  "n": 12, "mean": 0.1 * k + (0.01 if model == "mlb" else 0.0),
                                  "ci_low": 0.1 * k - 0.02, "ci_high": 0.1 * k + 0.02, "beats_random": beats,
                                  "seeds": 3, "seed_mean": 0.1 * k, "seed_sd": 0.01, "seed_min": 0.1 * k - 0.01,
                                  "seed_max": 0.1 * k + 0.01,
                                  "beats_random_seeds": "" if method == "random" else ("2/3" if every != beats else
                                                                                       f"{3 * bool(beats)}/3"),
                                  "beats_random_every_seed": every})
        rank_rows.append({"model": "human", "method": "human", "reference": reference, "resolution": 16,
                          "n": 12, "mean": 0.61 if reference == "human" else 0.7, "ci_low": 0.5,
                          "ci_high": 0.7, "beats_random": ""})
    by_type_rows = []
    for model, method, means in (("lstm_cnn", "random", (0.0, 0.01)), ("lstm_cnn", "gradcam", (-0.25, 0.2)),
                                 ("lstm_cnn", "guided_backprop", (0.05, 0.02)), ("lstm_cnn", "occlusion", (0.4, 0.4)),
                                 ("lstm_cnn", "gradcam_counterfactual", (0.26, -0.13)),
                                 ("mlb", "random", (0.0, 0.01)), ("mlb", "attention", (0.0, 0.3)),
                                 ("mlb", "gradcam_counterfactual", (0.2, 0.0))):
        for answer_type, mean in zip(("number", "other"), means):
            beats = "" if method == "random" else mean - 0.03 > 0.03
            by_type_rows.append({"model": model, "method": method, "reference": "ground_truth",
                                 "answer_type": answer_type, "n": 6, "mean": mean, "ci_low": mean - 0.03,
                                 "ci_high": mean + 0.03, "beats_random": beats})
    by_seed = [{"model": r["model"], "method": r["method"], "reference": r["reference"], "seed": seed,
                "n": 12, "mean": r["mean"] + 0.01 * seed, "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                "beats_random": r["beats_random"]} for r in rank_rows if r["model"] != "human" for seed in (0, 1, 2)]
    return {
        "rank_correlation": pd.DataFrame(rank_rows),
        "rank_correlation_by_seed": pd.DataFrame(by_seed),
        "rank_correlation_by_answer_type": pd.DataFrame(by_type_rows),
        "pos_histogram": pd.DataFrame({"model": ["mlb", "mlb"], "method": ["occlusion"] * 2,
                                       "tagger": [TAGGER] * 2, "category": ["nouns", "wh-words"],
                                       "tags": ["NN NNS", "WP WRB"], "tag_count": [26, 15],
                                       "most_important": [13, 2], "p_most_important": [0.5, 0.133]}),
        "pos_histogram_by_tag": pd.DataFrame({"model": ["mlb", "mlb"], "method": ["occlusion"] * 2,
                                              "tagger": [TAGGER] * 2, "tag": ["NN", "WP"],
                                              "group": ["nouns", "wh-words"], "tag_count": [20, 12],
                                              "most_important": [11, 1], "p_most_important": [0.55, 0.083]}),
        "pos_ground_truth": pd.DataFrame({"model": ["mlb"], "method": ["occlusion"], "share": [0.71], "chance": [0.3]}),
        "failure_prediction": pd.DataFrame({"model": ["lstm_cnn", "lstm_cnn"], "feature_set": ["flip_count", "flips+confidence"],
                                            "accuracy": [0.6875, 0.75], "majority": [0.6, 0.6]}),
        "hadamard": pd.DataFrame({"model": ["mlb"], "comparison": ["glimpse 1"], "mean": [0.42]}),
        "gating_top_neurons": pd.DataFrame({"model": ["mlb"] * 60, "rank": list(range(1, 61)),
                                            "neuron": list(range(60)), "score": np.linspace(1, 0, 60)}),
        "gating_score_correlation": pd.DataFrame({"model": ["mlb"], "case": ["same_question"], "mean": [0.9]}),
        "gating_sweep": pd.DataFrame({"model": ["mlb"], "n": [10], "own_mask": [0.3]}),
        "sanity": pd.DataFrame({"model": ["mlb"], "method": ["gradcam"], "step": [1], "mean": [0.1], "flagged": [False]}),
        "evidence_slope": pd.DataFrame({"model": ["mlb", "mlb"], "answer_type": ["number", "all"], "n": [5, 12],
                                        "score_falls": [0.8, 0.5], "gradcam_agrees": [0.9, 0.7]}),
        # lstm_cnn's gradcam is more faithful than random with the mean fill, not with road.
        "faithfulness": pd.DataFrame(
            [{"model": "lstm_cnn", "method": m, "modality": "image", "order": "morf", "fill": f, "n": 12,
              "auc": 0.3, "ci_low": 0.2, "ci_high": 0.4, "kept": 0.5, "more_faithful_than_random": v}
             for m, f, v in (("random", "mean", ""), ("random", "road", ""), ("gradcam", "mean", True),
                             ("gradcam", "road", False), ("occlusion", "mean", False), ("occlusion", "road", False))]),
        "faithfulness_plausibility": pd.DataFrame(
            [{"model": "lstm_cnn", "method": "gradcam", "reference": "ground_truth", "rank_correlation": 0.1,
              "plausible": False, "faithful": "depends on the fill"},
             {"model": "lstm_cnn", "method": "occlusion", "reference": "ground_truth", "rank_correlation": 0.4,
              "plausible": True, "faithful": "no"},
             {"model": "mlb", "method": "gradcam", "reference": "ground_truth", "rank_correlation": 0.0,
              "plausible": False, "faithful": "yes"}]),
        "faithfulness_pixel_check": pd.DataFrame({"model": ["mlb"], "curves": [10], "spearman_auc": [0.9]}),
    }


FIGURES = ["rank_correlation", "rank_correlation_by_answer_type", "pos_histogram", "failure_prediction", "hadamard_1", "hadamard_2",
           "gating_sweep", "sanity", "faithfulness_vs_plausibility", "faithfulness_image", "faithfulness_question"]


def make_reports(world: Path, tmp_path: Path) -> Path:
    """A reports folder in tmp_path (the fixture world stays read-only): the fake tables and
    figures plus the world's real metrics files (training accuracy)."""
    reports = tmp_path / "reports"
    for name, frame in fake_tables().items():
        write_table(frame, reports / "tables" / f"{name}.csv")
    for k, name in enumerate(FIGURES):
        (reports / "figures").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 10), (k * 30, 0, 0)).save(reports / "figures" / f"{name}.png")
    shutil.copytree(world / "reports" / "metrics", reports / "metrics")
    # Per-question deletion curves for the gallery: every store question, every method, two fills.
    rows = [{"model": m, "question_id": int(q["question_id"]), "method": method, "fill": fill,
             **{f"p{f / 10:g}": 1 - f / 10 for f in range(11)}}
            for m in ("lstm_cnn", "mlb") for q in inputs.load_store(config(world, reports), m)["questions"]
            for method in ("random", "gradcam") for fill in ("mean", "road")]
    write_table(pd.DataFrame(rows), reports / "faithfulness" / "question_curves.csv", markdown=False)
    return reports


def config(world, reports, *overrides):
    return evaluation_config(world, f"paths.reports_dir={reports}", *overrides)


@pytest.fixture
def reported(explained_world, tmp_path):
    reports = make_reports(explained_world, tmp_path)
    cfg = config(explained_world, reports)
    return cfg, reports, report.run(cfg)


def test_readme_has_every_table_figure_and_published_citation(reported, explained_world):
    cfg, reports, result = reported
    readme = (reports / "README.md").read_text()
    # Loud synthetic note, models with the accuracy from their training metrics, tagger, seeds.
    assert "NOT on VQA / COCO / VQA-HAT" in readme
    for model in ("lstm_cnn", "mlb"):
        acc = pd.read_json(explained_world / "reports" / "metrics" / "train" / f"{model}.json", typ="series")["val/acc"]
        assert re.search(rf"\| {model} \| {acc:.3f} \|", readme), model
    assert TAGGER in readme and f"evaluation seed {cfg.evaluation.seed}" in readme
    # Every table embedded as the stage wrote it (the long one folded, still complete).
    for name in fake_tables():
        assert (reports / "tables" / f"{name}.md").read_text() in readme, name
    assert "<details><summary>table gating_top_neurons (60 rows)" in readme
    # Every figure linked relatively, and the link resolves.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert sorted(Path(l).stem for l in links) == sorted(FIGURES)
    assert all((reports / l).is_file() for l in links)
    # Sections in the order of docs/evaluation.md: the four papers, then the checks.
    order = [readme.index(s.title) for s in sections.SECTIONS]
    assert order == sorted(order)
    # Every published entry with its citation, the number as the paper prints it, and the data
    # and model it was computed on. Goyal et al.'s Table 1 and the 72% are there by value.
    for p in PUBLISHED:
        assert p.verified, p.key
        assert f"| {p.quantity} |" in readme and p.where in readme and p.paper in readme
        row = next(line for line in readme.splitlines() if line.startswith(f"| {p.quantity} |"))
        assert f"| {p.shown} |" in row and p.data in row and p.model in row, row
    for printed in ("0.00007", "0.07164", "0.12277", "0.62289", "-0.08836", "72%"):
        assert f"| {printed} |" in readme, printed
    assert readme.count(published_lookup.NOT_VERIFIED) == 0
    # Our counterparts located in the tables: lstm_cnn occlusion vs human = 0.2, failure 0.6875.
    assert "| rank correlation with human attention: occlusion | 0.200 (lstm_cnn, occlusion vs human)" in readme
    assert "0.688 (lstm_cnn, flip count alone)" in readme
    assert result["tables_included"] == len(fake_tables()) and result["absent_sections"] == []


def test_methods_not_beating_random_use_the_ground_truth_rows(reported):
    _, reports, result = reported
    readme = (reports / "README.md").read_text()
    section = readme[readme.index("## Which methods do not beat random"):readme.index("## Faithful or only plausible?")]
    assert "| lstm_cnn | gradcam, guided_backprop | occlusion | (none) |" in section
    # The verdict must hold on every training seed: mlb's guided backprop beats random on 2 of 3.
    assert "| mlb | guided_backprop (2/3 seeds), attention | gradcam, occlusion | (none) |" in section
    assert result["not_beating_random"] == {"lstm_cnn": ["gradcam", "guided_backprop"],
                                            "mlb": ["guided_backprop", "attention"]}
    # Where they fail: each failing method's answer types next to random's, from the breakdown.
    assert "Where they fail, per answer type" in section
    assert "| lstm_cnn | random | 0.000 [-0.030, 0.030] | 0.010 [-0.020, 0.040] |" in section
    assert ("| lstm_cnn | gradcam | -0.250 [-0.280, -0.220] (does not) | 0.200 [0.170, 0.230] (beats random) |"
            in section)
    assert "| mlb | attention | 0.000 [-0.030, 0.030] (does not) | 0.300 [0.270, 0.330] (beats random) |" in section
    assert "occlusion |" not in section.split("Where they fail")[1]  # beats random: not listed
    # Grad-CAM fails on lstm_cnn: its counterfactual is listed there for comparison, not on mlb.
    assert ("| lstm_cnn | gradcam_counterfactual | 0.260 [0.230, 0.290] (beats random) | "
            "-0.130 [-0.160, -0.100] (does not) |") in section
    assert "| mlb | gradcam_counterfactual |" not in section


def test_faithfulness_section_names_plausible_but_not_faithful_and_fill_dependence(reported):
    _, reports, _ = reported
    readme = (reports / "README.md").read_text()
    section = readme[readme.index("## Faithful or only plausible?"):readme.index("## Sanity")]
    assert ("**lstm_cnn**: plausible but not faithful (beat random in rank correlation, not more faithful "
            "than random on image deletion with either fill): occlusion; faithful but not plausible: none.") in section
    assert "**mlb**: plausible but not faithful" in section and "faithful but not plausible: gradcam." in section
    assert "depend on the fill (`mean` vs `road`): lstm_cnn/gradcam/image/morf (mean: yes, road: no)." in section
    assert "![faithfulness_vs_plausibility](figures/faithfulness_vs_plausibility.png)" in section
    # The gallery draws each method's deletion curve next to its overlay (the fake curves exist
    # for gradcam and random only).
    page = (reports / "index.html").read_text()
    assert page.count('<svg class="curve"') > 0
    assert page.count('<svg class="curve"') == page.count('data-method="gradcam"') + page.count('data-method="random"')


def test_no_failure_breakdown_when_every_method_beats_random(tmp_path):
    by_type = fake_tables()["rank_correlation_by_answer_type"]
    source = tmp_path / "my_tables" / "rank_correlation_by_answer_type.csv"
    assert sections.failures_by_answer_type(by_type, "ground_truth", {"lstm_cnn": [], "mlb": []}, source) == ""
    assert sections.failures_by_answer_type(None, "ground_truth", {"mlb": ["attention"]}, source) == ""
    with pytest.raises(DataError, match="pipeline.rank_correlation") as error:
        sections.failures_by_answer_type(by_type.drop(columns=["answer_type"]), "ground_truth",
                                       {"mlb": ["attention"]}, source)
    assert "my_tables" in str(error.value)  # names the table it read, wherever the tables live


def test_counterfactual_listed_for_every_relu_of_the_signed_map(tmp_path):
    """Gated and guided Grad-CAM are ReLU(signed Grad-CAM sum) too: when only one of them fails,
    the counterfactual half of the same sum is still shown next to it; a failing method that is
    not such a map (attention) does not bring it."""
    by_type = fake_tables()["rank_correlation_by_answer_type"]
    source = tmp_path / "rank_correlation_by_answer_type.csv"
    gated = by_type[by_type["method"] == "gradcam"].assign(method="gated_gradcam")
    by_type = pd.concat([by_type, gated], ignore_index=True)
    text = sections.failures_by_answer_type(by_type, "ground_truth", {"lstm_cnn": ["gated_gradcam"]}, source)
    assert "| lstm_cnn | gated_gradcam | -0.250" in text
    assert "| lstm_cnn | gradcam_counterfactual | 0.260" in text
    text = sections.failures_by_answer_type(by_type, "ground_truth", {"mlb": ["attention"]}, source)
    assert "| mlb | attention |" in text and "gradcam_counterfactual |" not in text


def test_gallery_shows_the_sampled_questions_with_existing_overlays(reported, explained_world):
    cfg, reports, result = reported
    page = (reports / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    entries = re.findall(r'<div class="entry" data-model="([^"]+)" data-qid="(\d+)" '
                         r'data-answer-type="([^"]+)" data-correct="([^"]+)">', page)
    n = int(cfg.evaluation.report.gallery.questions)
    for model in ("lstm_cnn", "mlb"):
        index = inputs.load_store(cfg, model)
        rows = {q["question_id"]: q for q in index["questions"]}
        shown = [(int(q), t, c) for m, q, t, c in entries if m == model]
        assert len(shown) == min(n, len(rows)) == result["gallery_questions"][model]
        assert len({q for q, _, _ in shown}) == len(shown)
        # Entries agree with the store, and the sample covers every answer type it has.
        for qid, answer_type, status in shown:
            assert rows[qid]["answer_type"] == answer_type and correctness(rows[qid]["correct"]) == status
        assert {t for _, t, _ in shown} == {q["answer_type"] for q in rows.values()}
        methods = inputs.methods_that_ran(index)
        size = inputs.read_method(cfg, model, methods[0])["image_map"].shape[-1]
        for qid, _, _ in shown:
            for method in methods:
                assert f'src="gallery/{model}/{qid}_{method}.png"' in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    n_methods = {m: len(inputs.methods_that_ran(inputs.load_store(cfg, m))) for m in ("lstm_cnn", "mlb")}
    assert len(sources) == sum(result["gallery_questions"][m] * (1 + n_methods[m]) for m in n_methods)
    for src in sources:
        with Image.open(reports / src) as im:
            assert im.size == (size, size) and im.mode == "RGB"
    # One checkbox per method that ran anywhere; the filters exist.
    for method in inputs.methods_that_ran(inputs.load_store(cfg, "mlb")):
        assert f'class="f-method" value="{method}"' in page
    assert 'id="f-model"' in page and 'id="f-type"' in page and "function applyFilters" in page


def test_report_is_byte_identical_across_runs(reported, explained_world, tmp_path):
    cfg, reports, _ = reported
    first = {p: p.read_bytes() for p in [reports / "README.md", reports / "index.html",
                                         *sorted((reports / "gallery").rglob("*.png"))]}
    report.run(cfg)
    second = {p: p.read_bytes() for p in [reports / "README.md", reports / "index.html",
                                          *sorted((reports / "gallery").rglob("*.png"))]}
    assert first.keys() == second.keys() and all(first[p] == second[p] for p in first)


def test_missing_table_or_figure_names_the_stage(explained_world, tmp_path):
    reports = make_reports(explained_world, tmp_path)
    cfg = config(explained_world, reports)
    (reports / "tables" / "gating_sweep.md").unlink()
    with pytest.raises(DataError, match=r"pipeline\.gating_study"):
        report.run(cfg)
    assert not (reports / "README.md").exists() and not (reports / "index.html").exists()
    write_table(fake_tables()["gating_sweep"], reports / "tables" / "gating_sweep.csv")
    (reports / "figures" / "sanity.png").unlink()
    with pytest.raises(DataError, match=r"pipeline\.sanity_check"):
        report.run(cfg)
    (reports / "tables" / "rank_correlation.csv").unlink()
    with pytest.raises(DataError, match=r"rank_correlation\.csv.*pipeline\.rank_correlation"):
        report.run(cfg)


def test_data_without_ground_truth_reports_the_absent_sections(explained_world, tmp_path):
    reports = make_reports(explained_world, tmp_path)
    for name in ("pos_ground_truth", "gating_sweep", "evidence_slope"):
        (reports / "tables" / f"{name}.csv").unlink()
        (reports / "tables" / f"{name}.md").unlink()
    (reports / "figures" / "gating_sweep.png").unlink()
    frame = fake_tables()["rank_correlation"]
    write_table(frame[frame["reference"] == "human"], reports / "tables" / "rank_correlation.csv")
    cfg = config(explained_world, reports, "data.source=vqa")
    result = report.run(cfg)
    readme = (reports / "README.md").read_text()
    assert "NOT on VQA" not in readme
    assert readme.count("has no ground truth") >= 3
    assert result["absent_sections"] == ["pos_ground_truth", "gating_sweep", "evidence_slope"]
    # Without ground truth the verdict falls back, explicitly, on the human maps: all beat random.
    assert "the reference is the human attention maps" in readme
    assert result["not_beating_random"] == {"lstm_cnn": [], "mlb": []}


def test_a_verified_published_value_is_shown_next_to_ours(explained_world, tmp_path, monkeypatch):
    verified = PublishedValue("test_occlusion", "rank_correlation", "occlusion test quantity",
                              "Someone et al. A paper. 2016", "Table 9", "some data",
                              OurValue("rank_correlation", {"model": "mlb", "method": "occlusion",
                                                            "reference": "human"}, ("mean",), "mlb, occlusion"),
                              value=0.173, source="a test copy, p. 4")
    unlocatable = PublishedValue("test_missing", "rank_correlation", "absent quantity", "X et al.", "Table 1",
                                 "d", OurValue("rank_correlation", {"model": "mlb", "method": "no_such"}))
    monkeypatch.setattr(report, "PUBLISHED", (verified, unlocatable))
    reports = make_reports(explained_world, tmp_path)
    report.run(config(explained_world, reports))
    readme = (reports / "README.md").read_text()
    assert ("| occlusion test quantity | 0.210 (mlb, occlusion) | 0.173 | some data | "
            "Someone et al. A paper. 2016; Table 9 (read at a test copy, p. 4) |") in readme
    assert "| absent quantity | not located: no row of rank_correlation matches" in readme
    assert f"| {published_lookup.NOT_VERIFIED} | d |" in readme   # no value: no number shown


def test_locate_finds_one_row_and_refuses_ambiguity():
    frame = pd.DataFrame({"model": ["a", "a", "b"], "feature_set": ["flips", "other", "flips"],
                          "accuracy": [0.5, 0.6, 0.7]})
    p = PublishedValue("k", "s", "q", "P", "T", "D",
                       OurValue("t", {"model": "a", ("features", "feature_set"): "flips"}, ("cv_accuracy", "accuracy")))
    assert published_lookup.locate(p, {"t": frame}) == (0.5, "")
    loose = PublishedValue("k", "s", "q", "P", "T", "D", OurValue("t", {"feature_set": "flips"}, ("accuracy",)))
    value, why = published_lookup.locate(loose, {"t": frame})
    assert value is None and "2 different rows" in why
    nocol = PublishedValue("k", "s", "q", "P", "T", "D", OurValue("t", {"missing": 1}))
    assert "no column missing" in published_lookup.locate(nocol, {"t": frame})[1]


def test_overlay_of_a_left_half_map_is_hot_on_the_left(tmp_path):
    image = np.full((32, 32, 3), 128, np.uint8)
    heat = np.zeros((32, 32), np.float32)
    heat[:, :16] = 1.0
    row = {"question_id": 5, "image_id": 1, "question": "what is it", "tokens": ["what", "is", "it"],
           "answer_type": "other", "predicted": "x", "probability": 0.5, "correct": True}
    entry = render_entry_images(tmp_path, "g", "m", row, image,
                                {"left": {"image_map": heat, "valid": True, "question_map": np.array([0.0, 1.0, -1.0, 0.0])}})
    pixels = np.asarray(Image.open(tmp_path / "5_left.png")).astype(int)
    left, right = pixels[:, :14], pixels[:, 18:]
    # jet: 1 -> dark red (R high, B low), 0 -> dark blue (B high, R low); blended 50/50 with gray.
    assert (left[..., 0] > left[..., 2] + 40).all() and (right[..., 2] > right[..., 0] + 40).all()
    assert entry.methods[0].image_src == "g/5_left.png"
    # The token coloured by the positive score is red-ish, the negative one blue-ish.
    colours = re.findall(r"background:#([0-9a-f]{6})", entry.methods[0].tokens)
    rgb = [tuple(int(c[i:i + 2], 16) for i in (0, 2, 4)) for c in colours]
    assert len(rgb) == 3 and rgb[1][0] > rgb[1][2] and rgb[2][2] > rgb[2][0]


def test_non_finite_map_gets_a_note_not_an_overlay(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    row = {"question_id": 7, "image_id": 1, "question": "q", "tokens": ["q"], "answer_type": "other",
           "predicted": "x", "probability": 0.5, "correct": None}
    entry = render_entry_images(tmp_path, "g", "m", row, image,
                                {"bad": {"image_map": np.full((8, 8), np.nan), "valid": False}})
    assert entry.methods[0].image_src is None and entry.methods[0].note == "map not finite"
    assert not (tmp_path / "7_bad.png").exists()


def test_sample_is_deterministic_and_spread_over_strata():
    rows = []
    qid = 0
    for answer_type, n_right, n_wrong in (("yes/no", 30, 2), ("number", 10, 10), ("other", 5, 1)):
        for correct, count in ((True, n_right), (False, n_wrong)):
            for _ in range(count):
                rows.append({"question_id": qid, "answer_type": answer_type, "correct": correct})
                qid += 1
    sample = sample_questions(rows, 12, seed=3, salt="mlb")
    assert sample == sample_questions(list(reversed(rows)), 12, seed=3, salt="mlb")
    assert len({r["question_id"] for r in sample}) == 12
    strata = {(r["answer_type"], r["correct"]) for r in sample}
    assert len(strata) == 6  # every (answer type, right/wrong) combination, rare ones included
    picked = pd.Series([(r["answer_type"], r["correct"]) for r in sample]).value_counts()
    sizes = pd.Series([(r["answer_type"], r["correct"]) for r in rows]).value_counts()
    # Round robin: 12 over 6 strata gives each stratum 2 unless it has fewer (other/wrong: 1).
    assert all(picked[s] >= min(2, sizes[s]) for s in sizes.index)
    assert sample_questions(rows, 12, seed=4, salt="mlb") != sample
    assert len(sample_questions(rows, 1000, seed=3)) == len(rows)


def test_largest_map_change_names_the_pair_of_gate_sizes():
    rows = []
    for model, means in (("lstm_cnn", {10: 0.1, 25: 0.5, 200: 0.2}), ("mlb", {5: 0.3, 10: 0.05})):
        sizes = sorted(means)
        rows.append({"model": model, "method": "gated_gradcam", "top_n": 1, "measure": "own_mask",
                     "mean": 0.0, "ci_low": 0.0, "ci_high": 0.0})
        for n in sizes:
            rows.append({"model": model, "method": "gated_gradcam", "top_n": n,
                         "measure": "change_from_previous", "mean": means[n],
                         "ci_low": means[n] - 0.01, "ci_high": means[n] + 0.01})
    text = sections.largest_map_change(pd.DataFrame(rows))
    assert "lstm_cnn between n = 10 and n = 25 (1 - rho = 0.500 [0.490, 0.510])" in text
    assert "mlb between n = 1 and n = 5 (1 - rho = 0.300" in text
    assert sections.largest_map_change(pd.DataFrame({"model": ["mlb"], "n": [10]})) == ""
