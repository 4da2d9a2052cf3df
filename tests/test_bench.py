"""The benchmark's measuring function on a tiny model: every key, positive times, and our image
occlusion map equal to Captum's. No speed is asserted (timings depend on the machine)."""
import json

import pytest
import torch

from captum.attr import GuidedBackprop, GuidedGradCam, LayerGradCam

from pipeline.attribution import explain
from pipeline.benchmarks.attribution import TARGETS, ImageOnly, ImageOnlyProbabilities, format_table, measure
from pipeline.common.files import write_json
from tests.test_attribution_occlusion import captum_occlusion, sensitive_model

QUESTIONS = ["what color is the circle", "how many squares"]
PPE = [1, 16, 64, 256]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_measure_reports_every_key_and_agrees_with_captum(tmp_path):
    # A model whose answers depend on the image (occlusion moves p by up to ~0.2): a plain random
    # tiny model moves it by 1e-5, which float rounding alone nearly matches.
    model = sensitive_model("mlb")
    torch.manual_seed(1)
    images = torch.randn(len(QUESTIONS), 3, 32, 32)
    tokens = model.encode_questions(QUESTIONS)
    result = measure(model, images, tokens, repeats=1, batch_size=2, grid=8, perturbations_per_eval=PPE)
    result = {"model": "tiny_mlb", **result}
    path = write_json(tmp_path / "bench.json", result)
    saved = json.loads(path.read_text())

    assert {"model", "questions", "repeats", "threads", "grid", "ms_per_question", "ratios",
            "agreement", "notes"} <= set(saved)
    assert saved["questions"] == 2 and saved["repeats"] == 1 and saved["threads"] >= 1
    times = saved["ms_per_question"]
    for key in ("baseline", "ours_gradient_family", "captum_gradient_family", "ours_word_dropping",
                "captum_word_occlusion", "ours_image_occlusion", "captum_best_image_occlusion"):
        assert times[key] > 0, key
    by_ppe = times["captum_image_occlusion_by_perturbations_per_eval"]
    assert set(by_ppe) == {str(p) for p in PPE} and all(v > 0 for v in by_ppe.values())
    assert times["captum_best_image_occlusion"] == min(by_ppe.values())
    assert times["captum_best_perturbations_per_eval"] in PPE

    assert set(saved["ratios"]) == set(TARGETS)
    for name, ratio in saved["ratios"].items():
        assert ratio["value"] > 0 and isinstance(ratio["meets_target"], bool), name
        assert {"target", "comparison"} <= set(ratio)

    # Agreement, recomputed here from maps this test makes itself (Captum's Occlusion and
    # explain() on the same two questions), with the test's own tolerance, instead of being
    # read from the benchmark's `agrees` flags.
    eps = torch.finfo(torch.float32).eps
    with torch.no_grad():
        logits = model(images, tokens)
    target, probability = logits.argmax(1), torch.softmax(logits, dim=1).max(1).values
    ours = explain(model, images, tokens, ["occlusion"], target=target,
                   options={"occlusion": {"grid": 8, "modalities": ["image"]}})["occlusion"].image_map
    image = saved["agreement"]["image_occlusion"]
    assert set(image["by_perturbations_per_eval"]) == {str(p) for p in PPE}
    for ppe in PPE:
        theirs = captum_occlusion(model, images, tokens, 32 // 8, perturbations_per_eval=ppe)
        largest = theirs.abs().max().item()
        # differences of float32 probabilities: 8 float32 steps of the largest p, plus 1e-4 of
        # the largest effect (the logits' rounding, amplified by this model's large weights)
        atol = 8 * eps * probability.max().item() + 1e-4 * largest
        assert largest > 1e-2 and atol < 1e-3 * largest  # a wrong map cannot hide in the tolerance
        mine = (ours[:, None].expand_as(theirs) - theirs).abs().max().item()
        assert mine <= atol, (ppe, mine, atol)
        recorded = image["by_perturbations_per_eval"][str(ppe)]
        # what the benchmark recorded is what it compared: Captum's map and one within tolerance
        assert recorded["max_abs_value"] == pytest.approx(largest, rel=1e-6), ppe
        assert recorded["max_abs_difference"] <= atol, (ppe, recorded)
        assert recorded["max_abs_difference"] == pytest.approx(mine, abs=atol), ppe
        # and its flag is its stated criterion (allclose with its rtol and atol) on these maps
        assert recorded["agrees"] == torch.allclose(ours[:, None].expand_as(theirs), theirs,
                                                    rtol=image["rtol"], atol=image["atol"]), ppe
    assert image["max_abs_difference"] == max(a["max_abs_difference"]
                                              for a in image["by_perturbations_per_eval"].values())

    # The gradient family: Captum's three maps, made here, against explain()'s.
    wrapper, conv = ImageOnly(model, tokens), model.analysis_points()["conv"]
    family = explain(model, images, tokens, ["gradcam", "guided_backprop", "guided_gradcam"])
    expected = {
        "gradcam": LayerGradCam(wrapper, conv).attribute(images, target=target, relu_attributions=True)[:, 0],
        "guided_backprop": GuidedBackprop(ImageOnlyProbabilities(model, tokens)).attribute(images, target=target),
        "guided_gradcam": GuidedGradCam(wrapper, conv).attribute(images, target=target,
                                                                 interpolate_mode="bilinear"),
    }
    gradient = saved["agreement"]["gradient_family"]
    assert set(gradient) == set(expected)
    for name, theirs in expected.items():
        largest = theirs.abs().max().item()
        assert largest > 0, name
        atol = 1e-5 * largest  # one autograd pass each: float32 rounding of the map's scale
        torch.testing.assert_close(family[name].image_map_raw, theirs, rtol=1e-4, atol=atol)
        assert gradient[name]["max_abs_value"] == pytest.approx(largest, rel=1e-6), name
        assert gradient[name]["max_abs_difference"] <= atol + 1e-4 * largest, (name, gradient[name])
    assert "tiny_mlb" in format_table(saved)


def test_interleaved_timing_runs_every_computation_in_each_round():
    from pipeline.benchmarks.attribution import timed_interleaved

    calls = []
    out = timed_interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
                            repeats=3)
    assert {k: v[1] for k, v in out.items()} == {"a": 1, "b": 2}
    rounds = len(calls) // 2
    assert rounds >= 4 and calls == ["a", "b"] * rounds  # warm-up round + at least 3 timed
    assert all(v[0] >= 0 for v in out.values())


def test_defaults_are_the_config_files_values():
    from omegaconf import OmegaConf

    from pipeline.benchmarks.attribution import DEFAULTS, RESNET152_DEFAULTS
    from pipeline.common.config import CONF_DIR, compose

    assert OmegaConf.to_container(OmegaConf.load(CONF_DIR / "bench" / "default.yaml")) == DEFAULTS
    assert OmegaConf.to_container(compose().bench) == DEFAULTS
    assert RESNET152_DEFAULTS == DEFAULTS["resnet152"]


def test_captum_is_imported_only_when_used_and_named_as_the_test_extra(monkeypatch):
    """Captum is a test extra: importing pipeline.benchmarks.attribution does not need it; a comparison without it
    says how to install it."""
    import subprocess
    import sys

    code = "import sys, pipeline.benchmarks.attribution; print('captum' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip() == "False"
    from pipeline.benchmarks import attribution as bench, resnet152

    monkeypatch.setitem(sys.modules, "captum.attr", None)  # import captum.attr fails
    with pytest.raises(ImportError, match=r"pip install -e '\.\[test\]'"):
        bench.captum_attr()


def test_feature_store_benchmark_is_a_hydra_stage_with_its_settings_in_the_config(tmp_path):
    """bench.feature_store's settings, tiny: both stores measured, the report written to
    paths.metrics_dir."""
    from pipeline.benchmarks import feature_store as bench_feature_store
    from pipeline.common.config import compose

    cfg = compose([f"paths.root={tmp_path}", "bench.feature_store.rows=16",
                   "bench.feature_store.scale=2", "bench.feature_store.grid=[4,2,2]",
                   "bench.feature_store.batch_size=8", f"bench.feature_store.workdir={tmp_path}"])
    report = bench_feature_store.run(cfg)
    assert report["grid_shape"] == [4, 2, 2] and report["batch_size"] == 8 and report["scale"] == 2
    assert report["small"]["rows"] == 16 and report["large"]["rows"] == 32
    assert report["peak_rss_ratio"] > 0
    saved = json.loads((tmp_path / "reports" / "metrics" / "bench_feature_store.json").read_text())
    assert saved == json.loads(json.dumps(report))


def test_resnet152_entry_times_extraction_and_every_method_and_projects(tmp_path, monkeypatch):
    """The ``resnet152`` entry run alone, small (64 px, tiny heads, three methods): every figure
    is there, the projection is its stated sum, the rest of bench.json is kept, and without any
    weights the random initialisation is labelled as timing only."""
    from pipeline.benchmarks import attribution as bench, resnet152
    from pipeline.common.config import compose

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no weights anywhere
    metrics = tmp_path / "reports" / "metrics"
    write_json(metrics / "bench.json", {"model": "mlb", "ms_per_question": {"baseline": 1.0}})
    methods = ["gradcam", "guided_backprop", "occlusion", "cam"]
    cfg = compose([f"paths.root={tmp_path}", "bench.threads=1", "bench.resnet152.enabled=true",
                   "bench.resnet152.only=true", "bench.resnet152.input_size=64",
                   "bench.resnet152.models=[lstm_cnn,mlb]", "bench.resnet152.extract_batch_size=2",
                   "bench.resnet152.questions=2", "bench.resnet152.question_vocab=50",
                   f"attribution.methods=[{','.join(methods)}]",
                   "attribution.options.occlusion.grid=2"])
    bench.run(cfg)
    saved = json.loads((metrics / "bench.json").read_text())
    assert saved["model"] == "mlb" and saved["ms_per_question"] == {"baseline": 1.0}  # kept
    entry = saved["resnet152"]
    assert entry["weights"] == resnet152.RANDOM_INIT_LABEL == "random-init weights (timing only)"
    assert entry["weights_kind"] == "random-init" and "random" in entry["notes"]["weights"]
    assert entry["grid_shape"] == [2048, 2, 2] and entry["input_size"] == 64
    assert entry["threads"] == 1 and entry["extract_batch_size"] == 2
    assert entry["extract_ms_per_image"] > 0 and entry["methods"] == methods
    assert set(entry["models"]) == {"lstm_cnn", "mlb"}
    for name, model in entry["models"].items():
        assert list(model["ms_per_question"]) == methods
        assert all(model["ms_per_question"][m] > 0 for m in ("gradcam", "occlusion")), name
        assert "global-average-pool" in model["skipped"]["cam"]
        assert model["ms_per_question_total"] == pytest.approx(sum(model["ms_per_question"].values()))
    p = entry["projection"]
    assert p["vqahat_val_questions"] == p["vqahat_val_images"] == 1374
    expected = (1374 * entry["extract_ms_per_image"]
                + sum(1374 * m["ms_per_question_total"] for m in entry["models"].values())) / 1000
    assert p["projected_vqahat_val_seconds"] == pytest.approx(expected)
    assert p["projected_vqahat_val_hours"] == pytest.approx(expected / 3600)
    for name, model in entry["models"].items():
        assert p["projected_vqahat_val_seconds_by_model"][name] == pytest.approx(
            (1374 * entry["extract_ms_per_image"] + 1374 * model["ms_per_question_total"]) / 1000)
    assert p["note"].startswith("a projection, not a measurement")
    assert entry["seconds"] > 0 and entry["peak_rss_mb"] > 0


def test_resnet152_entry_weights_come_from_the_config_then_the_hub_cache(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from pipeline.benchmarks import attribution as bench, resnet152
    from pipeline.models import backbones, random_init

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(random_init, "random_init_resnet152_state_dict", lambda seed=0: {"random": seed})
    cfg = OmegaConf.create({"seed": 3, "backbone": {"name": "scene_resnet", "weights": "unused.pt"}})
    r = dict(bench.RESNET152_DEFAULTS)
    assert resnet152.resnet152_weights(cfg, r) == ({"random": 3}, "random-init", resnet152.RANDOM_INIT_LABEL)
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save({"w": torch.ones(1)}, hub / backbones.RESNET152_HUB_FILES[0])
    state, kind, where = resnet152.resnet152_weights(cfg, r)
    assert kind == "hub cache" and where == str(hub / backbones.RESNET152_HUB_FILES[0])
    own = tmp_path / "own.pth"
    torch.save({"w": torch.zeros(1)}, own)
    cfg.backbone = {"name": "resnet152", "weights": str(own)}
    assert resnet152.resnet152_weights(cfg, r)[1:] == ("file", str(own))
    r["weights"] = str(tmp_path / "missing.pth")  # a file the user names must exist
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resnet152.resnet152_weights(cfg, r)
