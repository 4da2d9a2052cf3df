"""The ResNet-152 path, end to end (tracker issue 14, item 2), on the tiny synthetic world.

ImageNet weights cannot be downloaded here, so ``backbone.weights`` is the session fixture
``random_init_resnet152_weights``: a random torchvision ResNet-152 with calibrated BatchNorm
statistics. Its features mean nothing; what is checked is that every stage composes on this
backbone: prepare -> pretrain_backbone (nothing to train: it checks the weights) ->
extract_features -> train (both models, one epoch) -> attribute (every configured method) ->
rank_correlation, at 224 px (res5c 7 x 7); the same at 448 px (14 x 14) is marked slow.
"""
import copy
import csv
import json
import time

import numpy as np
import pytest
import torch
from captum.attr import GuidedBackprop, LayerGradCam
from torch import nn

from pipeline import (attribute, extract_features, prepare, pretrain_backbone, rank_correlation,
                      train)
from pipeline.attribution import explain
from pipeline.attribution.store import load_index, load_method
from pipeline.benchmarks.attribution import ImageOnly, ImageOnlyProbabilities
from pipeline.common.config import compose
from pipeline.data.feature_store import FeatureStore
from pipeline.evaluation.inputs import question_batch
from pipeline.models import load_trained_model
from tests.conftest import RES5C_LIMIT

MODELS = ("lstm_cnn", "mlb")
# torchvision's Bottleneck calls its one ReLU module three times; ResNet-152 has 3 + 8 + 36 + 3
# bottlenecks and the stem's ReLU.
BOTTLENECKS = 3 + 8 + 36 + 3
RELU_MODULES, RELU_CALLS = 1 + BOTTLENECKS, 1 + 3 * BOTTLENECKS


def path_overrides(root, weights, size: int, train_images: int, val_images: int, questions: int):
    return [
        "data=synthetic_tiny", "backbone=resnet152", f"backbone.input_size={size}",
        f"backbone.weights={weights}",
        f"data.synthetic.num_images.train2014={train_images}",
        f"data.synthetic.num_images.val2014={val_images}",
        "logger=csv", "model.optim.max_epochs=1", "extract.batch_size=4",
        # every configured method, on the first questions (one image), cheaply: 2 x 2 occlusion
        # patches (4 backbone passes per image), one image step of integrated gradients
        f"attribution.limit={questions}", "attribution.options.occlusion.grid=2",
        "attribution.options.integrated_gradients.image_steps=1",
        "attribution.options.integrated_gradients.question_steps=4",
        "evaluation.bootstrap.samples=50", f"paths.root={root}", "replicates.seeds=[]",
    ]


def run_path(overrides) -> dict:
    """Every stage of the path in order; seconds per stage."""
    seconds = {}
    for name, stage, extra in [("prepare", prepare, []), ("pretrain_backbone", pretrain_backbone, []),
                               ("extract_features", extract_features, []),
                               *[(f"train@{m}", train, [f"model={m}"]) for m in MODELS],
                               *[(f"attribute@{m}", attribute, [f"model={m}"]) for m in MODELS],
                               ("rank_correlation", rank_correlation, [])]:
        start = time.perf_counter()
        stage.run(compose([*overrides, *extra]))
        seconds[name] = time.perf_counter() - start
    return seconds


@pytest.fixture(scope="module")
def world(tmp_path_factory, random_init_resnet152_weights):
    root = tmp_path_factory.mktemp("resnet152_224")
    overrides = path_overrides(root, random_init_resnet152_weights, 224, train_images=6,
                               val_images=2, questions=2)
    seconds = run_path(overrides)
    print("resnet152 path at 224 px, seconds per stage:", json.dumps(seconds))
    return compose(overrides), root


def check_feature_store(cfg, cells: int) -> None:
    features_dir = cfg.paths.features_dir
    for key in ("train", "val"):
        store = FeatureStore.open(features_dir, key)
        assert store.backbone == "resnet152" and store.grid_shape == (2048, cells, cells)
        assert store.index["dtype"] == "float16" and store.index["fc7_channels"] == 2048
        assert "pool5" in store.index["fc7_source"]
        rows = np.arange(len(store))
        grid, pooled, fc7 = store.grid(rows), store.pooled(rows), store.fc7(rows)
        assert grid.shape == (len(store), 2048, cells, cells)
        for values in (grid, pooled, fc7):
            assert torch.isfinite(values).all()
        assert grid.abs().max() < RES5C_LIMIT and grid.std() > 0.1
        # ResNet has no fc6/fc7: fc7 is pool5, the grid's spatial mean, the same values
        torch.testing.assert_close(fc7, pooled, rtol=0, atol=0)
        torch.testing.assert_close(pooled, grid.mean(dim=(2, 3)), rtol=2e-3, atol=2e-3)


def check_attributions(cfg, cells: int, size: int, questions: int) -> None:
    methods = list(cfg.attribution.methods)
    grid = int(cfg.attribution.options.occlusion.grid)
    for name in MODELS:
        directory = cfg.paths.attributions_dir + f"/{name}"
        index = load_index(directory)
        assert list(index["methods"]) == methods and len(index["questions"]) == questions
        assert "global-average-pool" in index["methods"]["cam"]["skipped"]  # no CAM head on ResNet
        ran = [m for m in methods if not index["methods"][m].get("skipped")]
        assert set(ran) >= set(methods) - {"cam", "attention"}
        for method in ran:
            assert index["methods"][method]["nonfinite_questions"] == 0, (name, method)
            arrays = load_method(directory, method)
            assert arrays["valid"].all(), (name, method)
            assert arrays["image_map"].shape == (questions, size, size), (name, method)
        # Grad-CAM and its variants at res5c's resolution; occlusion on its patch grid
        for method in ("gradcam", "gradcam_counterfactual", "gated_gradcam"):
            assert load_method(directory, method)["image_map_raw"].shape == (questions, cells, cells)
        occlusion = load_method(directory, "occlusion")
        assert occlusion["image_map_raw"].shape == (questions, grid, grid)
        assert np.abs(occlusion["image_map_raw"]).max() > 0  # occluding the image moves p


def check_rank_correlation(cfg) -> None:
    with open(f"{cfg.paths.reports_dir}/tables/rank_correlation.csv") as f:
        rows = list(csv.DictReader(f))
    for name in MODELS:
        index = load_index(cfg.paths.attributions_dir + f"/{name}")
        ran = {m for m, info in index["methods"].items() if not info.get("skipped")}
        found = {r["method"] for r in rows if r["model"] == name and r["reference"] == "human"}
        assert ran <= found, (name, ran - found)


def test_stages_compose_at_224(world):
    cfg, root = world
    pretrained = json.loads((root / "reports" / "metrics" / "pretrain_backbone.json").read_text())
    assert pretrained == {"backbone": "resnet152", "weights": str(cfg.backbone.weights)}
    metrics = json.loads((root / "reports" / "metrics" / "extract_features.json").read_text())
    assert metrics["grid_shape"] == [2048, 7, 7] and metrics["dtype"] == "float16"
    check_feature_store(cfg, cells=7)
    for name in MODELS:
        model = load_trained_model(cfg, name)
        assert model.backbone.name == "resnet152" and model.backbone.input_size == 224
    check_attributions(cfg, cells=7, size=224, questions=2)
    check_rank_correlation(cfg)


class ExplicitGuidedReLU(nn.Module):
    """An out-of-place ReLU whose backward is guided: the oracle's own implementation (neither
    the probe's hooks nor Captum's)."""

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clamp(min=0)

        @staticmethod
        def backward(ctx, grad):
            x, = ctx.saved_tensors
            return grad.clamp(min=0) * (x > 0)

    def forward(self, x):
        return self._Fn.apply(x)


def with_explicit_guided_relus(model):
    """A copy of ``model`` with every ``nn.ReLU`` module replaced by :class:`ExplicitGuidedReLU`
    (a module called several times is replaced once, as it is one attribute)."""
    guided = copy.deepcopy(model)
    for parent in list(guided.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, ExplicitGuidedReLU())
    return guided


@pytest.mark.parametrize("name", MODELS)
def test_guided_backprop_through_torchvision_inplace_relus(world, name):
    """torchvision's ReLUs are in place, and each Bottleneck calls one ReLU module three times:
    the probe's guided hooks must still see every call. Checked against Captum's GuidedBackprop
    and an explicit guided-ReLU copy of the model, on the trained model as the stage loads it
    (channels-last)."""
    cfg, _ = world
    model = load_trained_model(cfg, name)
    relus = [m for m in model.backbone.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == RELU_MODULES and all(m.inplace for m in relus)
    _, images, tokens = question_batch(cfg, model, "val", 1, int(cfg.data.max_question_length))
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in relus]
    maps = explain(model, images, tokens, methods=["gradcam", "guided_backprop"])
    for h in handles:
        h.remove()
    assert len(calls) == RELU_CALLS  # one guided forward serves both methods
    ours = maps["guided_backprop"].image_map_raw
    target = model(images, tokens).argmax(1)

    captum = GuidedBackprop(ImageOnlyProbabilities(model, tokens)).attribute(images, target=target)
    explicit_model = with_explicit_guided_relus(model)
    assert not any(isinstance(m, nn.ReLU) for m in explicit_model.modules())
    pixels = images.clone().requires_grad_(True)
    score = torch.softmax(explicit_model(pixels, tokens), 1).gather(1, target[:, None]).sum()
    explicit, = torch.autograd.grad(score, pixels)
    pixels = images.clone().requires_grad_(True)
    score = torch.softmax(model(pixels, tokens), 1).gather(1, target[:, None]).sum()
    plain, = torch.autograd.grad(score, pixels)

    assert torch.isfinite(ours).all() and ours.abs().max() > 0
    scale = captum.abs().max().item()
    torch.testing.assert_close(ours, captum, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(ours, explicit, rtol=1e-4, atol=1e-5 * scale)
    # guided is not the plain gradient: the ReLUs' negative gradients were dropped
    assert (ours - plain).abs().max() > 0.1 * scale
    # Grad-CAM at res5c, as Captum's LayerGradCam
    conv = model.analysis_points()["conv"]
    cam = LayerGradCam(ImageOnly(model, tokens), conv).attribute(images, target=target,
                                                                 relu_attributions=True)[:, 0]
    assert cam.shape == (1, 7, 7)
    torch.testing.assert_close(maps["gradcam"].image_map_raw, cam, rtol=1e-4,
                               atol=1e-5 * cam.abs().max().item())


def test_occlusion_runs_through_the_backbone(world):
    """Image occlusion's map equals a plain loop over the occluded images through the whole
    model (backbone included); with BatchNorm folded into ResNet-152's convolutions (torch.fx on
    torchvision's modules) it agrees to float rounding."""
    cfg, _ = world
    model = load_trained_model(cfg, "mlb")
    _, images, tokens = question_batch(cfg, model, "val", 1, int(cfg.data.max_question_length))
    grid, half = 2, 112
    with torch.no_grad():
        probabilities = torch.softmax(model(images, tokens), 1)
        target = probabilities.argmax(1)
        copies = images.repeat(grid * grid, 1, 1, 1)
        for k in range(grid * grid):
            i, j = divmod(k, grid)
            copies[k, :, i * half:(i + 1) * half, j * half:(j + 1) * half] = 0  # the ImageNet mean
        occluded = torch.softmax(model(copies, tokens.expand(grid * grid, -1)), 1)[:, target[0]]
    expected = (probabilities[0, target[0]] - occluded).view(1, grid, grid)
    assert expected.abs().max() > 0
    for fold in (False, True):
        options = {"occlusion": {"grid": grid, "fold_batchnorm": fold, "modalities": ["image"]}}
        found = explain(model, images, tokens, methods=["occlusion"], target=target,
                        options=options)["occlusion"].image_map_raw
        torch.testing.assert_close(found, expected, rtol=0,
                                   atol=(1e-6 if not fold else 1e-3) * probabilities.max().item())


@pytest.mark.slow
def test_stages_compose_at_448(tmp_path, random_init_resnet152_weights):
    """The papers' input size: res5c is 14 x 14 (MLB's grid, Kim et al.)."""
    from pipeline.models.backbones import ResNet152

    state = torch.load(random_init_resnet152_weights, weights_only=True)
    with torch.inference_mode():
        res5c = ResNet152(448, state).freeze()(torch.randn(1, 3, 448, 448))
    assert res5c.shape == (1, 2048, 14, 14) and torch.isfinite(res5c).all()
    assert res5c.abs().max() < RES5C_LIMIT and res5c.std() > 0.1
    overrides = path_overrides(tmp_path, random_init_resnet152_weights, 448, train_images=3,
                               val_images=1, questions=1)
    run_path(overrides)
    cfg = compose(overrides)
    check_feature_store(cfg, cells=14)
    check_attributions(cfg, cells=14, size=448, questions=1)
    check_rank_correlation(cfg)
