"""The benchmark's measuring function on a tiny model: every key, positive times, and our image
occlusion map equal to Captum's. No speed is asserted (timings depend on the machine)."""
import json

import pytest
import torch

from pipeline.bench import TARGETS, format_table, measure
from pipeline.io import write_json
from tests.test_models import tiny_model

QUESTIONS = ["what color is the circle", "how many squares"]
PPE = [1, 16, 64, 256]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_measure_reports_every_key_and_agrees_with_captum(tmp_path):
    model = tiny_model("mlb")
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

    image = saved["agreement"]["image_occlusion"]
    assert image["agrees"], image
    # allclose(rtol=1e-4, atol=1e-6), as the occlusion tests: the tiny model's maps are small,
    # so their difference relative to the largest value is mostly float rounding
    assert image["rtol"] == 1e-4 and image["max_abs_difference"] <= 1e-6 + 1e-4 * image["max_abs_value"]
    assert set(image["by_perturbations_per_eval"]) == {str(p) for p in PPE}
    assert all(a["agrees"] for a in image["by_perturbations_per_eval"].values())
    assert all(a["agrees"] for a in saved["agreement"]["gradient_family"].values())
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
