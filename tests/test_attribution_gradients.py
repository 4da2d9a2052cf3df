"""The gradient family (Grad-CAM, guided backprop, Guided Grad-CAM) against Captum, the oracle."""
import pytest
import torch
from captum.attr import GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam

from pipeline.attribution import available_methods, explain
from pipeline.benchmarks.attribution import ImageOnly, ImageOnlyProbabilities  # the model as a function of the pixels, as Captum expects
from tests.test_models import tiny_model

QUESTIONS = ["what color is the circle", "how many squares", "what"]


def setup(name, seed=0):
    model = tiny_model(name, seed)
    torch.manual_seed(seed + 1)
    images = torch.randn(len(QUESTIONS), 3, 32, 32)
    tokens = model.encode_questions(QUESTIONS)
    target = model(images, tokens).argmax(1)
    return model, images, tokens, target


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_gradient_family_matches_captum(name):
    model, images, tokens, target = setup(name)
    maps = explain(model, images, tokens, methods=["gradcam", "guided_backprop", "guided_gradcam"])
    wrapper = ImageOnly(model, tokens)
    conv = model.analysis_points()["conv"]

    cam = LayerGradCam(wrapper, conv).attribute(images, target=target, relu_attributions=True)
    torch.testing.assert_close(maps["gradcam"].image_map_raw, cam[:, 0], rtol=1e-4, atol=1e-6)
    upsampled = LayerAttribution.interpolate(cam, (32, 32), interpolate_mode="bilinear")
    torch.testing.assert_close(maps["gradcam"].image_map, upsampled[:, 0], rtol=1e-4, atol=1e-6)

    guided = GuidedBackprop(ImageOnlyProbabilities(model, tokens)).attribute(images, target=target)  # Goyal et al.: the probability
    torch.testing.assert_close(maps["guided_backprop"].image_map_raw, guided, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(maps["guided_backprop"].image_map, guided.abs().sum(1), rtol=1e-4, atol=1e-7)

    ggc = GuidedGradCam(wrapper, conv).attribute(images, target=target, interpolate_mode="bilinear")
    torch.testing.assert_close(maps["guided_gradcam"].image_map_raw, ggc, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_counterfactual_gradcam_matches_captum_on_the_negated_score(name):
    model, images, tokens, target = setup(name)
    maps = explain(model, images, tokens, methods=["gradcam", "gradcam_counterfactual"])
    wrapper = ImageOnly(model, tokens)
    conv = model.analysis_points()["conv"]
    # Captum's Grad-CAM of -y^c: the weights are the means of the negated gradient.
    negated = LayerGradCam(lambda x: -wrapper(x), conv).attribute(images, target=target, relu_attributions=True)
    counterfactual = maps["gradcam_counterfactual"]
    torch.testing.assert_close(counterfactual.image_map_raw, negated[:, 0], rtol=1e-4, atol=1e-6)
    assert counterfactual.image_map.shape == (len(QUESTIONS), 32, 32)
    # ReLU(x) - ReLU(-x) = x: Grad-CAM minus its counterfactual is the signed sum (Captum, no ReLU).
    signed = LayerGradCam(wrapper, conv).attribute(images, target=target, relu_attributions=False)[:, 0]
    torch.testing.assert_close(maps["gradcam"].image_map_raw - counterfactual.image_map_raw, signed,
                               rtol=1e-4, atol=1e-6)
    assert ((maps["gradcam"].image_map_raw > 0) & (counterfactual.image_map_raw > 0)).sum() == 0


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_guided_backprop_question_map_matches_a_plain_loop(name):
    model, images, tokens, target = setup(name)
    maps = explain(model, images, tokens, methods=["guided_backprop"])
    embedding = model.analysis_points()["q_emb"]
    for i in range(len(QUESTIONS)):
        captured = {}
        handle = embedding.register_forward_hook(lambda m, inp, out: captured.setdefault("e", out))
        logits = model(images[i:i + 1], tokens[i:i + 1])
        handle.remove()
        # the answer's probability (Goyal et al. section 3): no ReLU on the language side, so a
        # plain gradient
        grad, = torch.autograd.grad(torch.softmax(logits, dim=1)[0, target[i]], captured["e"])
        expected = grad[0].norm(dim=1) * (tokens[i] != 0)
        torch.testing.assert_close(maps["guided_backprop"].question_map[i], expected, rtol=1e-4, atol=1e-8)


def test_methods_share_one_forward_pass():
    model, images, tokens, target = setup("mlb")
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    explain(model, images, tokens, methods=["gradcam", "guided_backprop", "guided_gradcam"], target=target)
    assert len(calls) == 1


def test_model_that_ignores_the_question_has_a_zero_question_map():
    model, images, tokens, target = setup("lstm_cnn")
    with torch.no_grad():
        model.head.question_projection.weight.zero_()  # Q = tanh(b): no path from the words
    maps = explain(model, images, tokens, methods=["guided_backprop"])
    assert torch.count_nonzero(maps["guided_backprop"].question_map) == 0
    assert maps["guided_backprop"].image_map.abs().sum() > 0


def test_explain_rejects_unknown_methods_and_training_mode():
    model, images, tokens, _ = setup("mlb")
    with pytest.raises(ValueError) as e:
        explain(model, images, tokens, methods=["gradcam", "smoothgrad"])
    assert "smoothgrad" in str(e.value) and all(m in str(e.value) for m in available_methods())
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        explain(model, images, tokens, methods=["gradcam"])


def test_explicit_target_is_explained():
    model, images, tokens, target = setup("mlb")
    other = (target + 1) % 4
    maps = explain(model, images, tokens, methods=["guided_backprop"], target=other)
    guided = GuidedBackprop(ImageOnlyProbabilities(model, tokens)).attribute(images, target=other)
    torch.testing.assert_close(maps["guided_backprop"].image_map_raw, guided, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_each_method_differentiates_its_papers_score(name):
    """Goyal et al. (section 3) take guided backprop of the answer's probability; Grad-CAM (Eq. 1)
    the score before the softmax. Both from one explain() call, checked against Captum on the
    probability and on the logit; a per-method option and a global one override the defaults."""
    model, images, tokens, target = setup(name)
    logits_fn, probs_fn = ImageOnly(model, tokens), ImageOnlyProbabilities(model, tokens)
    conv = model.analysis_points()["conv"]
    on_probability = GuidedBackprop(probs_fn).attribute(images, target=target)
    on_logit = GuidedBackprop(logits_fn).attribute(images, target=target)
    cam_logit = LayerGradCam(logits_fn, conv).attribute(images, target=target, relu_attributions=True)[:, 0]
    cam_probability = LayerGradCam(probs_fn, conv).attribute(images, target=target, relu_attributions=True)[:, 0]
    assert not torch.allclose(on_probability, on_logit, rtol=1e-2, atol=1e-6)   # the choice matters

    maps = explain(model, images, tokens, methods=["gradcam", "guided_backprop", "guided_gradcam"])
    torch.testing.assert_close(maps["guided_backprop"].image_map_raw, on_probability, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(maps["gradcam"].image_map_raw, cam_logit, rtol=1e-4, atol=1e-6)

    own = explain(model, images, tokens, methods=["guided_backprop"],
                  options={"guided_backprop": {"score": "logit"}})["guided_backprop"]
    torch.testing.assert_close(own.image_map_raw, on_logit, rtol=1e-4, atol=1e-7)
    forced = explain(model, images, tokens, methods=["gradcam", "guided_backprop"],
                     options={"score": "probability"})
    torch.testing.assert_close(forced["gradcam"].image_map_raw, cam_probability, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(forced["guided_backprop"].image_map_raw, on_probability, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="guided_backprop"):
        explain(model, images, tokens, methods=["guided_backprop"],
                options={"guided_backprop": {"score": "softmax"}})


def test_lstm_cnn_fc7_path_matches_captum_through_the_fc_layers():
    """The paper's LSTM-CNN reads fc7: Grad-CAM's gradient at `conv` and guided backprop's at the
    pixels flow back through fc6-fc7 (and their ReLUs), checked against Captum on that path."""
    model, images, tokens, target = setup("lstm_cnn")
    assert model.head.feature_kind == "fc7" and model.backbone.fc is not None
    ran = []
    model.backbone.fc.register_forward_hook(lambda *a: ran.append(1))
    maps = explain(model, images, tokens, methods=["gradcam", "guided_backprop", "guided_gradcam"])
    assert ran, "the end-to-end forward did not go through fc6-fc7"
    wrapper = ImageOnly(model, tokens)
    conv = model.analysis_points()["conv"]
    cam = LayerGradCam(wrapper, conv).attribute(images, target=target, relu_attributions=True)
    assert cam.abs().sum() > 0  # a map to compare, not all zeros
    torch.testing.assert_close(maps["gradcam"].image_map_raw, cam[:, 0], rtol=1e-4, atol=1e-6)
    guided = GuidedBackprop(ImageOnlyProbabilities(model, tokens)).attribute(images, target=target)
    torch.testing.assert_close(maps["guided_backprop"].image_map_raw, guided, rtol=1e-4, atol=1e-7)
    # fc6-fc7's ReLUs come after `conv`: guided and plain gradients there differ, so Grad-CAM
    # must not be read from the guided pass.
    grid = model.backbone(images).detach().requires_grad_(True)
    plain = torch.autograd.grad(model.head(grid, tokens).gather(1, target[:, None]).sum(), grid)[0]
    from pipeline.attribution.probe import guided_relus
    with guided_relus(model):
        guided_at_conv = torch.autograd.grad(model.head(grid, tokens).gather(1, target[:, None]).sum(), grid)[0]
    assert not torch.allclose(plain, guided_at_conv)
    # The fc7 the head computes from the grid is the one extraction stores.
    torch.testing.assert_close(model.head(model.backbone.fc7(grid.detach()), tokens),
                               model.head(grid.detach(), tokens))
