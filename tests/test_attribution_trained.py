"""Every method against its independent oracle on the *trained* tiny models (the issue's test
oracle: Captum or a plain loop, agreeing to 1e-4 relative), with real validation images and
questions of the tiny synthetic world. The other attribution test modules check the same on
random-weight models; trained weights give the maps the structure (sparse gradients, saturated
softmax) that random weights lack."""
import pytest
import torch
from captum.attr import (GuidedBackprop, GuidedGradCam, IntegratedGradients, LayerAttribution,
                         LayerGradCam, LayerIntegratedGradients)

from pipeline.attribution import explain
from pipeline.benchmarks.attribution import ImageOnly, ImageOnlyProbabilities, load_questions
from pipeline.models import load_model
from tests.conftest import evaluation_config
from tests.test_attribution_fusion import hadamard_by_hand
from tests.test_attribution_ig_cam import OnTokens
from tests.test_attribution_occlusion import captum_occlusion, word_dropping_by_hand

MODELS = ["lstm_cnn", "mlb"]


@pytest.fixture(scope="module")
def trained(trained_world):
    """name -> (model, images, tokens, predicted answers) on 6 validation questions, the first
    whose Grad-CAM map is not all zero (through LSTM-CNN's fc6-fc7 layers a barely trained
    model's signed map is often negative everywhere, and a zero map would compare nothing)."""
    out = {}
    for name in MODELS:
        cfg = evaluation_config(trained_world, f"model={name}")
        model = load_model(trained_world / "models" / name / "model.pt").eval()
        images, tokens = load_questions(cfg, model, "val", 60)
        nonzero = explain(model, images, tokens, ["gradcam"])["gradcam"].image_map_raw.flatten(1).amax(1) > 0
        assert nonzero.sum() >= 6, f"{name}: only {int(nonzero.sum())} non-zero Grad-CAM maps"
        images, tokens = images[nonzero][:6], tokens[nonzero][:6]
        with torch.no_grad():
            out[name] = (model, images, tokens, model(images, tokens).argmax(1))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_gradient_family_matches_captum(trained, name):
    model, images, tokens, target = trained[name]
    maps = explain(model, images, tokens, ["gradcam", "guided_backprop", "guided_gradcam"])
    wrapper, conv = ImageOnly(model, tokens), model.analysis_points()["conv"]
    cam = LayerGradCam(wrapper, conv).attribute(images, target=target, relu_attributions=True)
    assert cam.abs().max() > 0
    torch.testing.assert_close(maps["gradcam"].image_map_raw, cam[:, 0], rtol=1e-4, atol=1e-6)
    size = tuple(images.shape[-2:])
    torch.testing.assert_close(maps["gradcam"].image_map,
                               LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")[:, 0],
                               rtol=1e-4, atol=1e-6)
    guided = GuidedBackprop(ImageOnlyProbabilities(model, tokens)).attribute(images, target=target)  # Goyal et al.: the probability
    torch.testing.assert_close(maps["guided_backprop"].image_map_raw, guided, rtol=1e-4, atol=1e-7)
    ggc = GuidedGradCam(wrapper, conv).attribute(images, target=target, interpolate_mode="bilinear")
    torch.testing.assert_close(maps["guided_gradcam"].image_map_raw, ggc, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name", MODELS)
def test_image_occlusion_matches_captum(trained, name):
    model, images, tokens, target = trained[name]
    grid = 4
    expected = captum_occlusion(model, images, tokens, images.shape[-1] // grid,
                                perturbations_per_eval=64)
    # Two epochs on 40 images teach the tiny models little about the image: patches move the
    # probability by 1e-4 (MLB) to 1e-3 only. Both sides are differences of two float32
    # probabilities computed in differently sized batches (other GEMM blockings, other kernels
    # on another CPU), so each side carries a few float32 steps of p: the tolerance is stated in
    # those steps (8 eps * the largest explained probability, eps = 2^-23) plus 1e-4 of the
    # largest effect. At p = 0.5 one step is 6e-8, more than 1e-4 of MLB's largest effect.
    with torch.no_grad():
        p = torch.softmax(model(images, tokens), dim=1).gather(1, target[:, None])
    largest = expected.abs().max().item()
    atol = 8 * torch.finfo(torch.float32).eps * p.max().item() + 1e-4 * largest
    # The signal: the comparison means something only if the largest effect is far above the
    # tolerance (a map off by 5% of its largest value must fail).
    assert largest > 1e-5 and atol < 0.05 * largest, (largest, atol)
    exact = explain(model, images, tokens, ["occlusion"], target=target,
                    options={"occlusion": {"grid": grid, "fold_batchnorm": False}})["occlusion"]
    ours = exact.image_map[:, None].expand_as(expected)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=atol)
    # ... and the tolerance does not swallow a wrong map: the map of the next question, or the
    # map with its patches permuted, is far outside it.
    assert ((ours.roll(1, dims=0) - expected).abs() > atol + 1e-4 * expected.abs()).any()
    assert ((ours.flip(-1).flip(-2) - expected).abs() > atol + 1e-4 * expected.abs()).any()
    # The default folds BatchNorm into the convolutions: the same function, rounded differently;
    # the difference stays at float32 rounding of the probabilities.
    folded = explain(model, images, tokens, ["occlusion"], target=target,
                     options={"occlusion": {"grid": grid}})["occlusion"]
    torch.testing.assert_close(folded.image_map[:, None].expand_as(expected), expected,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_word_dropping_matches_a_plain_loop(trained, name):
    model, images, tokens, target = trained[name]
    ours = explain(model, images, tokens, ["occlusion"], target=target,
                   options={"occlusion": {"modalities": ["question"]}})["occlusion"]
    expected = word_dropping_by_hand(model, images, tokens, target)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(ours.question_map, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_hadamard_gradients_match_a_hand_written_loop(trained, name):
    model, images, tokens, _ = trained[name]
    result = explain(model, images, tokens, ["hadamard"])["hadamard"]
    grad_v, grad_q = hadamard_by_hand(model, images, tokens)
    scale_v, scale_q = grad_v.abs().max(), grad_q.abs().max()
    assert scale_v > 0 and scale_q > 0
    torch.testing.assert_close(result.image_map_raw, grad_v, rtol=1e-4, atol=1e-6 * scale_v)
    torch.testing.assert_close(result.extras["question_gradient"], grad_q, rtol=1e-4, atol=1e-6 * scale_q)


@pytest.mark.parametrize("name", MODELS)
def test_integrated_gradients_match_captum(trained, name):
    model, images, tokens, target = trained[name]
    out = explain(model, images, tokens, ["integrated_gradients"],
                  options={"integrated_gradients": {"method": "gausslegendre", "image_steps": 8,
                                                    "question_steps": 16}})["integrated_gradients"]
    expected = IntegratedGradients(model).attribute(
        images, baselines=torch.zeros_like(images), target=target, additional_forward_args=(tokens,),
        n_steps=8, method="gausslegendre")
    torch.testing.assert_close(out.image_map_raw, expected, rtol=1e-4, atol=1e-7)
    lig = LayerIntegratedGradients(OnTokens(model), model.analysis_points()["q_emb"])
    expected = lig.attribute(tokens, baselines=torch.zeros_like(tokens), target=target,
                             additional_forward_args=(images,), n_steps=16, method="gausslegendre")
    torch.testing.assert_close(out.extras["question_map_raw"], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", MODELS)
def test_gated_gradcam_with_every_neuron_is_gradcam(trained, name):
    model, images, tokens, _ = trained[name]
    maps = explain(model, images, tokens, ["gradcam", "gated_gradcam"],
                   options={"gated_gradcam": {"top_n": 10 ** 6}})
    gradcam = maps["gradcam"].image_map_raw
    # A non-trivial map: positive somewhere, and not one value over the whole grid.
    scale = gradcam.abs().max().item()
    assert scale > 0 and (gradcam.flatten(1).amax(1) > gradcam.flatten(1).amin(1)).any()
    # Two autograd routes to the same function (dy/dA directly, and dy/dF * 1 then dF/dA):
    # equal to float32 rounding, 1e-5 of the map's largest value (~80 float32 steps) plus 1e-4
    # relative.
    atol = 1e-5 * scale
    torch.testing.assert_close(maps["gated_gradcam"].image_map_raw, gradcam, rtol=1e-4, atol=atol)
    # The tolerance is far below what a real gate does: keeping half the neurons moves the map
    # well outside it.
    half = model.head.classifier.in_features // 2
    gated = explain(model, images, tokens, ["gated_gradcam"],
                    options={"gated_gradcam": {"top_n": half}})["gated_gradcam"].image_map_raw
    assert (gated - gradcam).abs().max().item() > 100 * atol
    # n beyond the fusion width keeps every neuron
    extras = maps["gated_gradcam"].extras
    assert extras["top_neurons"].shape == extras["neuron_scores"].shape
