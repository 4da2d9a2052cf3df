"""Occlusion (Goyal et al. 2016, section 3.2) against Captum's Occlusion and plain loops."""
import pytest
import torch
from captum.attr import Occlusion
from torch import nn

from pipeline.attribution import explain
from pipeline.attribution.base import ExplainContext
from tests.test_models import tiny_model

QUESTIONS = ["what color is the circle", "how many squares", "what", "what color"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' passes are far smaller than the cost of keeping two threads busy: on a
    loaded 2-core machine, intra-op threads make these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sensitive_model(name, seed=0):
    """A tiny model whose answers depend on the image enough for occlusion to matter: its random
    backbone's batch-norm statistics are fitted to random images (else the grid is ~1e-3 and every
    patch changes p by rounding noise only) and the head's image and answer weights amplified."""
    model = tiny_model(name, seed)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum, m.training = None, True  # cumulative average over one batch
        torch.manual_seed(100)
        model.backbone(torch.randn(16, 3, 32, 32))
        for m in norms:
            m.training = False
        model.head.image_projection.weight.mul_(5)
        model.head.classifier.weight.mul_(10)
    return model


def setup(name, seed=0):
    model = sensitive_model(name, seed)
    torch.manual_seed(seed + 1)
    images = torch.randn(len(QUESTIONS), 3, 32, 32)
    return model, images, model.encode_questions(QUESTIONS)


def occlusion(model, images, tokens, **options):
    return explain(model, images, tokens, methods=["occlusion"], options={"occlusion": options})["occlusion"]


def captum_occlusion(model, images, tokens, patch, baselines=0.0, perturbations_per_eval=1):
    """Captum's p(orig) - p(occluded) for the predicted answer, per pixel and channel."""
    def probabilities(x, t):
        return torch.softmax(model(x, t), dim=1)

    target = model(images, tokens).argmax(1)
    return Occlusion(probabilities).attribute(
        images, sliding_window_shapes=(3, patch, patch), strides=(3, patch, patch),
        baselines=baselines, target=target, additional_forward_args=(tokens,),
        perturbations_per_eval=perturbations_per_eval)


@pytest.mark.parametrize("perturbations_per_eval", [1, 4])
@pytest.mark.parametrize("grid", [2, 4])
@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_image_map_matches_captum(name, grid, perturbations_per_eval):
    model, images, tokens = setup(name)
    ours = occlusion(model, images, tokens, grid=grid)
    assert ours.image_map_raw.shape == (len(QUESTIONS), grid, grid)
    assert ours.image_map.shape == (len(QUESTIONS), 32, 32)
    expected = captum_occlusion(model, images, tokens, 32 // grid,
                                perturbations_per_eval=perturbations_per_eval)
    assert expected.abs().max() > 1e-2  # the occlusions matter, so the comparison means something
    torch.testing.assert_close(ours.image_map[:, None].expand_as(expected), expected,
                               rtol=1e-4, atol=1e-6)
    patch = 32 // grid
    torch.testing.assert_close(ours.image_map_raw, ours.image_map[:, ::patch, ::patch])


def test_patch_value_and_batch_size():
    """A per-channel patch colour (normalised units) is Captum's baseline; splitting the 16
    copies into batches of 5 changes nothing."""
    model, images, tokens = setup("mlb")
    colour = (0.5, -1.0, 2.0)
    ours = occlusion(model, images, tokens, grid=4, patch_value=colour, batch_size=5)
    expected = captum_occlusion(model, images, tokens, 8,
                                baselines=torch.tensor(colour)[:, None, None].expand(3, 32, 32)[None])
    torch.testing.assert_close(ours.image_map[:, None].expand_as(expected), expected,
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="patch_value"):
        occlusion(model, images, tokens, grid=4, patch_value=(0.5, 1.0))


def word_dropping_by_hand(model, images, tokens, target):
    """p(a | I, Q) - p(a | I, Q without word t), one full forward per question and word."""
    expected = torch.zeros(tokens.shape)
    with torch.no_grad():
        for b in range(len(tokens)):
            words = [w for w in tokens[b].tolist() if w != 0]
            p0 = torch.softmax(model(images[b:b + 1], torch.tensor([words])), 1)[0, target[b]]
            for t in range(len(words)):
                rest = words[:t] + words[t + 1:] or [0]  # an empty question is one padding token
                p = torch.softmax(model(images[b:b + 1], torch.tensor([rest])), 1)[0, target[b]]
                expected[b, t] = p0 - p
    return expected


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_question_map_matches_a_plain_loop(name):
    model, images, tokens = setup(name)
    ours = occlusion(model, images, tokens, grid=2)
    expected = word_dropping_by_hand(model, images, tokens, model(images, tokens).argmax(1))
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(ours.question_map, expected, rtol=1e-4, atol=1e-6)
    assert (ours.question_map[tokens == 0] == 0).all()


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_flips_are_the_answers_that_change(name):
    model, images, tokens = setup(name)
    grid, patch = 4, 8
    ours = occlusion(model, images, tokens, grid=grid)
    extras = ours.extras
    prediction = model(images, tokens).argmax(1)
    assert torch.equal(extras["prediction"], prediction)
    # The recorded answers are the model's own answers on explicitly occluded images.
    for i in range(grid):
        for j in range(grid):
            occluded = images.clone()
            occluded[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] = 0
            assert torch.equal(extras["answers_image"][:, i, j], model(occluded, tokens).argmax(1))
    assert torch.equal(extras["image_flips"], extras["answers_image"] != prediction[:, None, None])
    assert torch.equal(extras["question_flips"], extras["answers_question"] != prediction[:, None])
    assert not extras["question_flips"][tokens == 0].any()
    assert extras["image_flips"].dtype == extras["question_flips"].dtype == torch.bool
    counts = extras["flip_counts"]
    assert counts["image"].dtype == counts["question"].dtype == torch.long
    assert torch.equal(counts["image"], extras["image_flips"].sum((1, 2)))
    assert torch.equal(counts["question"], extras["question_flips"].sum(1))
    assert counts["image"].sum() + counts["question"].sum() > 0  # some occlusion does flip


@pytest.fixture
def backbone_batches(monkeypatch):
    """Batch sizes of every backbone pass: the model's own and occlusion's BN-folded copy."""
    def watch(model):
        sizes = []

        def record(module, inputs, output):
            sizes.append(len(inputs[0]))

        model.backbone.register_forward_hook(record)
        model.backbone._watched = True
        fold = ExplainContext.inference_backbone

        def watched(self, fold_batchnorm=True):
            backbone = fold(self, fold_batchnorm)
            if not getattr(backbone, "_watched", False):
                backbone.register_forward_hook(record)
                backbone._watched = True
            return backbone

        monkeypatch.setattr(ExplainContext, "inference_backbone", watched)
        return sizes
    return watch


def test_folded_backbone_computes_the_same_features():
    model, images, tokens = setup("mlb")
    folded = ExplainContext(model, images, tokens, None).inference_backbone()
    assert folded is not model.backbone
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(images), model.backbone(images), rtol=1e-4, atol=1e-5)


def test_patches_over_blank_background_change_nothing(backbone_batches):
    model, images, tokens = setup("mlb")
    images[:, :, :, :16] = 0  # the normalised mean colour over the two left patch columns
    sizes = backbone_batches(model)
    ours = occlusion(model, images, tokens, grid=4, batch_size=64)
    # Gradient pass (for the target), original, then per image only the 8 patches that change
    # a pixel: occluding the others cannot change anything.
    assert sizes == [4, 4, 8, 8, 8, 8]
    assert (ours.image_map_raw[:, :, :2] == 0).all()
    assert not ours.extras["image_flips"][:, :, :2].any()
    assert (ours.image_map_raw[:, :, 2:] != 0).any()
    # Not a dead region: a patch of another colour there does matter.
    grey = occlusion(model, images, tokens, grid=4, patch_value=0.5)
    assert (grey.image_map_raw[:, :, :2] != 0).any()


def test_backbone_runs_each_occluded_copy_once(backbone_batches):
    model, images, tokens = setup("mlb")
    image, question = images[:1], tokens[:1]
    target = model(image, question).argmax(1)

    sizes = backbone_batches(model)
    occlusion(model, image, question, grid=4, batch_size=64)
    assert sizes == [1, 1, 16]  # the gradient pass that predicts the target, original, copies
    sizes.clear()
    explain(model, image, question, methods=["occlusion"], target=target,
            options={"occlusion": {"grid": 4}})
    assert sizes == [1, 16]  # word dropping reuses the original grid

    # Two questions about one image (a copy, not the same storage): its original grid and its
    # copies run once.
    sizes.clear()
    both = occlusion(model, image.repeat(2, 1, 1, 1), tokens[:2], grid=4, batch_size=5)
    assert sizes == [2, 1, 5, 5, 5, 1]
    alone = occlusion(model, image, tokens[1:2], grid=4)
    torch.testing.assert_close(both.image_map_raw[1], alone.image_map_raw[0], rtol=1e-4, atol=1e-6)


def test_folded_backbone_is_cached_until_the_weights_change():
    model, images, tokens = setup("mlb")
    fold = lambda: ExplainContext(model, images, tokens, None).inference_backbone()  # noqa: E731
    first = fold()
    assert fold() is first  # not traced again for every explain call
    with torch.no_grad():
        conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
        conv.weight.mul_(-1)  # in place, as a randomisation or a state-dict load does
    again = fold()
    assert again is not first
    with torch.no_grad():
        torch.testing.assert_close(again(images), model.backbone(images), rtol=1e-4, atol=1e-5)


def test_one_modality_alone_skips_the_other(backbone_batches):
    model, images, tokens = setup("mlb")
    target = model(images, tokens).argmax(1)
    full = explain(model, images, tokens, ["occlusion"], target=target)["occlusion"]
    sizes = backbone_batches(model)
    words = explain(model, images, tokens, ["occlusion"], target=target,
                    options={"occlusion": {"modalities": ["question"]}})["occlusion"]
    assert sizes == [len(torch.unique(images.flatten(1), dim=0))]  # the original pass only
    assert words.image_map is None and "image_flips" not in words.extras
    torch.testing.assert_close(words.question_map, full.question_map)
    patches = explain(model, images, tokens, ["occlusion"], target=target,
                      options={"occlusion": {"modalities": ["image"]}})["occlusion"]
    assert patches.question_map is None and "question_flips" not in patches.extras
    torch.testing.assert_close(patches.image_map, full.image_map)
    with pytest.raises(ValueError, match="modalities"):
        explain(model, images, tokens, ["occlusion"], target=target,
                options={"occlusion": {"modalities": ["audio"]}})


def test_grid_must_tile_the_image():
    model, images, tokens = setup("lstm_cnn")
    with pytest.raises(ValueError, match="grid 5 does not tile 32 x 32"):
        occlusion(model, images, tokens, grid=5)


def test_maps_can_be_normalised_in_place():
    model, images, tokens = setup("lstm_cnn")
    ours = occlusion(model, images, tokens, grid=2)
    ours.image_map /= ours.image_map.abs().max()
    ours.question_map -= 1
    assert not ours.image_map.is_inference() and not ours.question_map.is_inference()
