"""Integrated gradients against Captum, its completeness axiom, and CAM against a hand computation."""
import pytest
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients

from pipeline.attribution import available_methods, explain
from pipeline.models.backbones import SceneResNet
from pipeline.models.heads import build_head
from pipeline.models.vqa_model import VQAModel
from tests.test_attribution_gradients import QUESTIONS, setup
from tests.test_models import ARCH, AV, QV

IG = "integrated_gradients"


def ig(model, images, tokens, **options):
    score = options.pop("score", "logit")
    return explain(model, images, tokens, methods=[IG], options={IG: options, "score": score})[IG]


class OnTokens(torch.nn.Module):
    """The model as a function of the tokens (the layer Captum integrates over is q_emb)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, images):
        return self.model(images, tokens)


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_ig_matches_captum_on_each_modality(name, method):
    model, images, tokens, target = setup(name)
    out = ig(model, images, tokens, steps=8, method=method, internal_batch_size=3)
    assert out.extras["target"].tolist() == target.tolist()

    # Image, question fixed: IntegratedGradients; Captum expands the tokens with the steps.
    expected = IntegratedGradients(model).attribute(
        images, baselines=torch.zeros_like(images), target=target, additional_forward_args=(tokens,),
        n_steps=8, method=method)
    torch.testing.assert_close(out.image_map_raw, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.image_map, expected.abs().sum(1), rtol=1e-4, atol=1e-7)

    # Question, image fixed: LayerIntegratedGradients over the q_emb output. Baseline tokens all
    # padding: their embeddings are the zero vectors (padding_idx) and equal the question's own
    # embeddings at its padding, i.e. the method's baseline.
    lig = LayerIntegratedGradients(OnTokens(model), model.analysis_points()["q_emb"])
    expected = lig.attribute(tokens, baselines=torch.zeros_like(tokens), target=target,
                             additional_forward_args=(images,), n_steps=8, method=method)
    mask = (tokens != 0).float()
    torch.testing.assert_close(out.extras["question_map_raw"], expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.question_map, expected.sum(2) * mask, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.extras["question_attr_abs"], expected.abs().sum(2) * mask,
                               rtol=1e-4, atol=1e-7)
    assert (out.question_map[tokens == 0] == 0).all() and (tokens == 0).any()
    assert (out.question_map[tokens != 0] != 0).all()


def test_question_baseline_keeps_nonzero_padding_embeddings():
    """Padding whose embedding is not zero stays at its value: exactly zero attribution there,
    and the integral matches a hand-written loop over the embedding path."""
    model, images, tokens, target = setup("mlb")
    with torch.no_grad():
        model.head.embedding.weight[0] = 0.5  # padding embeds to a non-zero vector
    out = ig(model, images, tokens, steps=8, internal_batch_size=3)
    point = model.analysis_points()["q_emb"]
    captured = {}
    handle = point.register_forward_hook(lambda m, i, o: captured.setdefault("e", o.detach()))
    with torch.no_grad():
        model(images, tokens)
    handle.remove()
    emb = captured["e"]
    baseline = torch.where((tokens != 0)[..., None], torch.zeros_like(emb), emb)
    alphas = torch.linspace(0, 1, 8).tolist()
    weights = [1 / 16] + [1 / 8] * 6 + [1 / 16]
    total = torch.zeros_like(emb)
    for alpha, w in zip(alphas, weights):
        z = (baseline + alpha * (emb - baseline)).requires_grad_(True)
        handle = point.register_forward_hook(lambda m, i, o: z)
        logits = model(images, tokens)
        handle.remove()
        grad, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), z)
        total += w * grad
    expected = total * (emb - baseline)
    torch.testing.assert_close(out.extras["question_map_raw"], expected, rtol=1e-4, atol=1e-7)
    assert (out.question_map[tokens == 0] == 0).all()


def image_matters(model):
    """Make the image matter (a tiny random model barely reads it) and the path well behaved:
    freshly initialised BatchNorm (mean 0, var 1, no bias) leaves the ReLU backbone positively
    homogeneous, so LSTM-CNN's L2-normalised image feature is the same for every alpha > 0 and
    jumps at the zero baseline, where completeness cannot hold. Trained statistics (as in any
    pretrained backbone) remove that degenerate case; a larger image projection makes
    F(x) - F(baseline) large against float32 rounding."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2, generator=generator)
                m.bias.normal_(0, 0.5, generator=generator)
        model.head.image_projection.weight.mul_(5)
        if getattr(model.backbone, "fc", None) is not None:  # LSTM-CNN's fc6-fc7 path
            for m in model.backbone.fc.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(3)
    return model


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_completeness_with_many_steps(name):
    """Sum of attributions = F(x) - F(baseline) within 1% per example and modality. The image
    integrand of a ReLU network has kinks, so it takes 1024 trapezoid steps (256 leave up to
    2% here); Captum's trapezoid weights sum to 1 - 1/n, a -0.1% bias at 1024."""
    model, images, tokens, _ = setup(name)
    image_matters(model)
    with torch.no_grad():
        target = model(images, tokens).argmax(1)
    out = ig(model, images, tokens, steps=1024, internal_batch_size=512)
    completeness = out.extras["completeness"]
    with torch.no_grad():
        f_x = model(images, tokens).gather(1, target[:, None])[:, 0]
        f_image = model(torch.zeros_like(images), tokens).gather(1, target[:, None])[:, 0]
        # zero word vectors, the question's own length (not the all-padding question)
        handle = model.analysis_points()["q_emb"].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        f_question = model(images, tokens).gather(1, target[:, None])[:, 0]
        handle.remove()
    for modality, f_baseline in [("image", f_image), ("question", f_question)]:
        c = completeness[modality]
        difference = f_x - f_baseline
        torch.testing.assert_close(c["score_difference"], difference, rtol=1e-4, atol=1e-6)
        assert (difference.abs() > 2e-5).all()  # else "within 1%" would test float rounding
        attributions = out.image_map_raw if modality == "image" else out.extras["question_map_raw"]
        total = attributions.flatten(1).sum(1)
        torch.testing.assert_close(c["attribution_sum"], total)
        assert ((total - difference).abs() <= 0.01 * difference.abs()).all(), (modality, total, difference)
    torch.testing.assert_close(out.question_map.sum(1), completeness["question"]["attribution_sum"],
                               rtol=1e-4, atol=1e-6)


def test_ig_options_probability_noise_baseline_and_batching():
    model, images, tokens, target = setup("lstm_cnn")
    out = ig(model, images, tokens, steps=6, method="gausslegendre", image_baseline="uniform_noise",
             seed=3, score="probability", internal_batch_size=2)
    baseline = out.extras["image_baseline"]
    assert baseline.shape == images.shape and baseline.std() > 0.5
    torch.testing.assert_close(ig(model, images, tokens, steps=6, method="gausslegendre",
                                  image_baseline="uniform_noise", seed=3)
                               .extras["image_baseline"], baseline)
    probability = lambda x, t: torch.softmax(model(x, t), dim=1)  # noqa: E731
    expected = IntegratedGradients(probability).attribute(
        images, baselines=baseline, target=target, additional_forward_args=(tokens,), n_steps=6,
        method="gausslegendre")
    torch.testing.assert_close(out.image_map_raw, expected, rtol=1e-4, atol=1e-8)
    one_forward = ig(model, images, tokens, steps=6, method="gausslegendre", image_baseline="uniform_noise",
                     seed=3, score="probability", internal_batch_size=32)
    torch.testing.assert_close(one_forward.image_map_raw, out.image_map_raw, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(one_forward.question_map, out.question_map, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="method"):
        ig(model, images, tokens, method="riemann_sideways")
    with pytest.raises(ValueError, match="image_baseline"):
        ig(model, images, tokens, image_baseline="blur")


def setup_cam(name="mlb"):
    model, images, tokens, target = setup(name)
    with torch.no_grad():
        grid = model.backbone(images)
        labels = model.backbone.classify(images)
    return model, images, tokens, target, grid, labels


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_cam_is_the_classifier_weighted_sum_of_conv_maps(name):
    model, images, tokens, target, grid, labels = setup_cam(name)
    out = explain(model, images, tokens, methods=["cam"])["cam"]
    weight = model.backbone.classifier.weight
    label = labels.argmax(1)
    expected = torch.stack([(weight[c][:, None, None] * grid[b]).sum(0) for b, c in enumerate(label)])
    assert out.extras["label"].tolist() == label.tolist()
    assert "pretraining label" in out.extras["note"]
    torch.testing.assert_close(out.image_map_raw, expected, rtol=1e-5, atol=1e-7)
    assert out.image_map_raw.shape == (3, 2, 2) and (expected < 0).any()  # signed: no ReLU
    upsampled = torch.nn.functional.interpolate(expected[:, None], size=(32, 32), mode="bilinear",
                                                align_corners=False)[:, 0]
    torch.testing.assert_close(out.image_map, upsampled, rtol=1e-5, atol=1e-7)
    # Zhou et al.: the map's spatial mean is the label's logit less the bias.
    torch.testing.assert_close(out.image_map_raw.mean((1, 2)) + model.backbone.classifier.bias[label],
                               labels.gather(1, label[:, None])[:, 0], rtol=1e-5, atol=1e-6)


def test_cam_label_option_and_independence_from_the_answer():
    model, images, tokens, target, grid, labels = setup_cam()
    weight = model.backbone.classifier.weight
    out = explain(model, images, tokens, methods=["cam"], options={"cam": {"label": 2}})["cam"]
    assert out.extras["label"].tolist() == [2, 2, 2]
    torch.testing.assert_close(out.image_map_raw, torch.einsum("k,bkhw->bhw", weight[2], grid))
    other = explain(model, images, tokens, methods=["cam"], target=(target + 1) % 4,
                    options={"cam": {"label": 2}})["cam"]
    torch.testing.assert_close(other.image_map_raw, out.image_map_raw)
    with pytest.raises(ValueError, match="cam.label"):
        explain(model, images, tokens, methods=["cam"], options={"cam": {"label": 3}})


def test_cam_is_skipped_without_a_classifier_head():
    torch.manual_seed(0)
    backbone = SceneResNet((4, 4, 8, 8), input_size=32, num_labels=0).freeze()
    head = build_head("mlb", ARCH["mlb"], len(QV), len(AV), backbone.grid_channels)
    model = VQAModel(backbone, head, QV, AV, max_question_length=6).eval()
    images, tokens = torch.randn(2, 3, 32, 32), model.encode_questions(QUESTIONS[:2])
    maps = explain(model, images, tokens, methods=["cam", "gradcam"])
    assert maps["cam"].skipped == "CAM needs a global-average-pool classifier head; this backbone has none"
    assert maps["cam"].image_map is None and maps["cam"].image_map_raw is None
    assert maps["gradcam"].skipped is None


def test_registered_and_composable_with_other_methods():
    assert {"cam", IG} <= set(available_methods())
    model, images, tokens, target = setup("mlb")
    maps = explain(model, images, tokens, methods=["gradcam", "cam", IG], options={IG: {"steps": 4}})
    assert all(m.skipped is None for m in maps.values())
    assert maps[IG].image_map.shape == (3, 32, 32) and maps[IG].question_map.shape == tokens.shape
