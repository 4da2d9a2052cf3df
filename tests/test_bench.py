"""The benchmark's measuring function on a tiny model: every key, positive times, and our image
occlusion map equal to Captum's. No speed is asserted (timings depend on the machine)."""
import json

import pytest
import torch

from captum.attr import GuidedBackprop, GuidedGradCam, LayerGradCam

from pipeline.attribution import explain
from pipeline.bench import TARGETS, ImageOnly, ImageOnlyProbabilities, format_table, measure
from pipeline.io import write_json
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
    from pipeline.bench import timed_interleaved

    calls = []
    out = timed_interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
                            repeats=3)
    assert {k: v[1] for k, v in out.items()} == {"a": 1, "b": 2}
    rounds = len(calls) // 2
    assert rounds >= 4 and calls == ["a", "b"] * rounds  # warm-up round + at least 3 timed
    assert all(v[0] >= 0 for v in out.values())
