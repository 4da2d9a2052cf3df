"""The attribute stage: every method over the validation questions, one store per model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline import attribute
from pipeline.attribution import store
from pipeline.attribution.base import METHODS, Explanation
from pipeline.common.config import compose
from pipeline.common.errors import DataError
from tests.conftest import TINY_PIPELINE

FAST = ["attribution.methods=[gradcam,guided_backprop,guided_gradcam,occlusion,attention,cam,hadamard,random]",
        "attribution.options.occlusion.grid=4"]


# Apart from the default store, which the explained_world fixture fills for the evaluation tests.
STORE = "paths.attributions_dir=${paths.root}/attribute_tests"


def cfg_for(root, *overrides):
    return compose([*TINY_PIPELINE, f"paths.root={root}", *FAST, STORE, *overrides])


def test_attribute_writes_a_store_per_model(trained_world):
    metrics = attribute.run(cfg_for(trained_world, "model=mlb"))
    out = trained_world / "attribute_tests/mlb"
    index = store.load_index(out)
    ids = [q["question_id"] for q in index["questions"]]
    assert ids == sorted(ids) and len(ids) == metrics["questions"] == 60
    row = index["questions"][0]
    assert {"image_id", "predicted", "probability", "accuracy", "correct", "answer_type"} <= set(row)
    gradcam = store.load_method(out, "gradcam")
    assert gradcam["image_map"].shape == (60, 64, 64) and gradcam["image_map_raw"].shape == (60, 4, 4)
    assert (gradcam["question_ids"] == ids).all() and gradcam["valid"].all()
    guided = store.load_method(out, "guided_backprop")
    assert guided["question_map"].shape[0] == 60
    occlusion = store.load_method(out, "occlusion")
    assert occlusion["image_map_raw"].shape == (60, 4, 4)
    assert any(k.startswith("extra/") and "flip" in k for k in occlusion)
    assert metrics["vqa_accuracy"] == pytest.approx(np.mean([q["accuracy"] for q in index["questions"]]))
    saved = json.loads((trained_world / "reports/metrics/attribute_mlb.json").read_text())
    assert saved["methods"]["gradcam"]["nonfinite_questions"] == 0


def test_methods_that_do_not_apply_are_skipped_with_a_reason(trained_world):
    metrics = attribute.run(cfg_for(trained_world, "model=lstm_cnn", "attribution.limit=12"))
    out = trained_world / "attribute_tests/lstm_cnn"
    assert "no attention" in metrics["methods"]["attention"]["skipped"]
    with pytest.raises(DataError, match="skipped"):
        store.load_method(out, "attention")
    assert store.load_method(out, "gradcam")["image_map"].shape[0] == 12


def test_nonfinite_maps_are_counted_and_marked_invalid(trained_world, monkeypatch):
    def broken(ctx):
        maps = ctx.upsample(ctx.images.new_zeros(len(ctx.images), 4, 4))
        maps[0, 0, 0] = float("nan")
        return Explanation("broken", image_map=maps)

    monkeypatch.setitem(METHODS, "broken", broken)
    metrics = attribute.run(cfg_for(trained_world, "model=mlb", "attribution.methods=[broken]",
                                    "attribution.limit=6", "paths.attributions_dir=${paths.root}/broken"))
    assert metrics["methods"]["broken"]["nonfinite_questions"] == 1
    arrays = store.load_method(trained_world / "broken/mlb", "broken")
    assert arrays["valid"].tolist() == [False] + [True] * 5



def assert_same_questions(single: list[dict], ddp: list[dict]):
    """Ids, tokens and predicted answers exactly; floats (probabilities, accuracies) to float32
    rounding: each rank runs its own batch composition, so sums are taken in another order."""
    assert [r["question_id"] for r in single] == [r["question_id"] for r in ddp]
    for a, b in zip(single, ddp):
        assert sorted(a) == sorted(b), a["question_id"]
        for key in a:
            if isinstance(a[key], float) or isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["question_id"], key)
            else:
                assert a[key] == b[key], (a["question_id"], key)


def test_ddp_gives_the_same_arrays_as_one_process(trained_world):
    single = trained_world / "attributions/single"
    attribute.run(cfg_for(trained_world, "model=mlb", "attribution.limit=24",
                          f"paths.attributions_dir={single}"))
    ddp = trained_world / "attributions/ddp"
    env = {**os.environ, "DDP_ACCELERATOR": "cpu", "DDP_PRECISION": "32-true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pipeline.attribute", "trainer=ddp", *TINY_PIPELINE, *FAST, "model=mlb",
         "attribution.limit=24", f"paths.root={trained_world}", f"paths.attributions_dir={ddp}"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_questions(store.load_index(single / "mlb")["questions"],
                          store.load_index(ddp / "mlb")["questions"])
    for method in ("gradcam", "occlusion", "hadamard", "random"):
        a, b = store.load_method(single / "mlb", method), store.load_method(ddp / "mlb", method)
        assert sorted(a) == sorted(b)
        for key in a:
            # Half-precision maps may round a last-digit difference the other way: one ulp.
            rtol = 2e-3 if key == "image_map" or a[key].dtype == np.float16 else 1e-5
            np.testing.assert_allclose(a[key].astype(float), b[key].astype(float), rtol=rtol, atol=1e-6)


def test_the_explaining_trainer_takes_placement_from_the_config_and_runs_in_full_precision(tmp_path):
    cfg = cfg_for(tmp_path, "trainer.lightning.precision=bf16-mixed")
    trainer = attribute.build_trainer(cfg)
    assert type(trainer.accelerator).__name__ == "CPUAccelerator" and trainer.num_devices == 1
    assert trainer.precision == "32-true"  # the methods' gradients, whatever training used
    assert not trainer.predict_loop.inference_mode and trainer.logger is None


def test_missing_model_is_a_clear_error(trained_world, tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline.train"):
        attribute.run(cfg_for(trained_world, "model=mlb", f"paths.models_dir={tmp_path}"))


def test_explain_options_merges_stage_overrides_per_method():
    from omegaconf import OmegaConf

    from pipeline.attribution import explain_options
    a = OmegaConf.create({"score": None, "upsample": "bilinear",
                          "options": {"occlusion": {"grid": 8, "stride": 2}, "gradcam": {}}})
    assert explain_options(a, {"occlusion": {"grid": 4}, "hadamard": None}) == {
        "occlusion": {"grid": 4, "stride": 2}, "gradcam": {}, "hadamard": {},
        "score": None, "upsample": "bilinear"}
    assert explain_options(a)["occlusion"] == {"grid": 8, "stride": 2}
    assert OmegaConf.to_container(a.options)["occlusion"] == {"grid": 8, "stride": 2}  # untouched
