"""Fusion-level methods (Hadamard visualisation, question-gated Grad-CAM) and the two baselines
(the model's attention, a random map), each against a hand-written computation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from torch import nn

from pipeline.attribution import explain
from tests.test_models import tiny_model

# Real-token counts 5, 3, 1 and 2: padding in every row but the first, and a one-word question.
QUESTIONS = ["what color is the circle", "how many squares", "what", "what color"]
JOINT = 16  # tiny_model's fusion width
FOUR = ["hadamard", "gated_gradcam", "attention", "random"]


def setup(name, seed=0):
    model = tiny_model(name, seed)
    torch.manual_seed(seed + 1)
    images = torch.randn(len(QUESTIONS), 3, 32, 32)
    tokens = model.encode_questions(QUESTIONS)
    return model, images, tokens


def capture(model, names):
    """Forward hooks on analysis points: returns (store, handles)."""
    store, points = {}, model.analysis_points()
    handles = [points[n].register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, o))
               for n in names]
    return store, handles


def guided_hook(module, grad_input, grad_output):
    # As Captum's GuidedBackprop: clamp the ReLU's input gradient at 0.
    return tuple(None if g is None else g.clamp(min=0) for g in grad_input)


def hadamard_by_hand(model, images, tokens, guided=True):
    """Per example: (V - F) dV/dI through guided ReLUs, and (Q - F) dQ/dq_emb, plain."""
    grad_v, grad_q = [], []
    for i in range(len(images)):
        hooks = [m.register_full_backward_hook(guided_hook)
                 for m in model.modules() if isinstance(m, nn.ReLU)] if guided else []
        store, handles = capture(model, ["V", "F"])
        x = images[i:i + 1].clone().requires_grad_(True)
        model(x, tokens[i:i + 1])
        for h in handles + hooks:
            h.remove()
        g, = torch.autograd.grad(store["V"], x, grad_outputs=(store["V"] - store["F"]).detach())
        grad_v.append(g[0])

        store, handles = capture(model, ["Q", "F", "q_emb"])
        model(images[i:i + 1], tokens[i:i + 1])
        for h in handles:
            h.remove()
        g, = torch.autograd.grad(store["Q"], store["q_emb"],
                                 grad_outputs=(store["Q"] - store["F"]).detach())
        grad_q.append(g[0])
    return torch.stack(grad_v), torch.stack(grad_q)


# ---------------------------------------------------------------- Hadamard (Kim & Zhang)

@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_hadamard_gradients_match_a_hand_written_loop(name):
    model, images, tokens = setup(name)
    result = explain(model, images, tokens, methods=["hadamard"])["hadamard"]
    grad_v, grad_q = hadamard_by_hand(model, images, tokens)
    scale_v, scale_q = grad_v.abs().max(), grad_q.abs().max()
    assert scale_v > 0 and scale_q > 0
    torch.testing.assert_close(result.image_map_raw, grad_v, rtol=1e-4, atol=1e-6 * scale_v)
    torch.testing.assert_close(result.extras["question_gradient"], grad_q, rtol=1e-4, atol=1e-6 * scale_q)
    # The guided ReLUs matter: the plain gradient is a different map.
    plain_v, _ = hadamard_by_hand(model, images, tokens, guided=False)
    assert not torch.allclose(plain_v, grad_v, rtol=1e-2, atol=1e-3 * scale_v)


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_hadamard_post_processing_matches_numpy(name):
    model, images, tokens = setup(name)
    result = explain(model, images, tokens, methods=["hadamard"])["hadamard"]

    g = result.image_map_raw.numpy().astype(np.float64)
    standardised = (g - g.mean(axis=(2, 3), keepdims=True)) / g.std(axis=(2, 3), ddof=1, keepdims=True)
    np.testing.assert_allclose(result.image_map.numpy(), np.abs(standardised).sum(1), rtol=1e-4, atol=1e-5)

    gq = result.extras["question_gradient"].numpy().astype(np.float64)
    real = (tokens != 0).numpy()
    sums = np.abs(gq).sum(2) * real
    np.testing.assert_allclose(result.extras["token_saliency"].numpy(), sums, rtol=1e-5, atol=1e-10)
    expected = np.zeros_like(sums)
    for b in range(len(sums)):
        s = sums[b, real[b]]
        if len(s) > 1:
            expected[b, real[b]] = (s - s.mean()) / s.std(ddof=1)   # sample std, as Kim et al.
    np.testing.assert_allclose(result.question_map.numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_hadamard_token_zscores_are_standardised_over_real_tokens(name):
    model, images, tokens = setup(name)
    result = explain(model, images, tokens, methods=["hadamard"])["hadamard"]
    z = result.question_map
    real = tokens != 0
    assert torch.all(z[~real] == 0)
    for b in range(len(z)):
        values = z[b, real[b]].double()
        if len(values) > 1:
            assert abs(values.mean().item()) < 1e-5
            assert abs(values.std(correction=1).item() - 1) < 1e-4
        else:  # one real word: nothing to compare it with
            assert torch.all(values == 0)
    assert result.image_map.shape == (len(QUESTIONS), 32, 32) and result.image_map.min() >= 0


# Kim et al., "Visual explanations from Hadamard product in multimodal deep networks", the
# token z-scores (Eq. 11) printed under the examples of Figs. 2-5, one row per question.
KIM_PRINTED_ZSCORES = [
    [-0.7168, -0.6952, -0.5488, 0.5766, 1.7901, -0.4058],
    [-0.8687, -0.9504, -0.0165, 0.5265, -0.3722, -0.1105, 2.1821, -0.3902],
    [-0.6286, -0.8024, -0.0144, 1.7015, -0.256],
    [-0.7498, -0.0464, -0.8698, -0.6084, 1.0919, -0.2107, 1.942, -0.5486],
    [-0.5335, -0.7032, -0.1303, -0.5162, 1.9818, -0.0986],
    [-0.6646, -0.8724, -0.982, 0.2414, 0.7726, 0.7846, 1.6452, -0.9248],
    [-0.7231, -0.645, -0.4939, 0.2585, -0.6541, 0.3053, 2.2652, -0.313],
    [-0.4998, -0.6784, 0.0679, 1.7103, -0.6001],
    [-0.6689, 0.8233, -0.417, 1.9372, -0.5758, -0.6295, -0.4693],
    [-0.9485, -0.7053, -0.5041, 0.965, 1.52, -0.3272],
    [-0.7042, 1.5426, -0.725, -0.2961, 0.9558, -0.7731],
    [-0.7466, -1.0425, -0.5642, 1.6609, 0.0589, 1.0498, -0.4163],
]


@pytest.mark.parametrize("row", KIM_PRINTED_ZSCORES, ids=lambda r: f"{len(r)}_tokens_{r[0]}")
def test_token_zscores_reproduce_kim_et_al_printed_rows(row):
    """A row of z-scores is its own z-score under the paper's convention: re-standardising
    Kim et al.'s printed values gives them back (to their 4 printed decimals) with the sample
    std, and values too large by sqrt(n / (n - 1)) with the population std."""
    from pipeline.attribution.methods.hadamard import token_zscores

    z = torch.tensor([row], dtype=torch.float64)
    mask = torch.ones_like(z, dtype=torch.bool)
    n = len(row)
    assert float((z ** 2).sum()) == pytest.approx(n - 1, abs=2e-3)   # what the paper printed
    torch.testing.assert_close(token_zscores(z, mask), z, rtol=0, atol=3e-4)
    population = token_zscores(z, mask, std="population")
    torch.testing.assert_close(population, z * (n / (n - 1)) ** 0.5, rtol=0, atol=3e-4)
    assert (population - z).abs().max() > 1e-2   # the two conventions are told apart
    # Padding changes nothing: the z-scores are over the real tokens only.
    padded = torch.cat([z, torch.zeros(1, 3, dtype=torch.float64)], dim=1)
    out = token_zscores(padded, padded != 0)
    torch.testing.assert_close(out[:, :n], z, rtol=0, atol=3e-4)
    assert torch.all(out[:, n:] == 0)


def test_hadamard_std_option_is_validated():
    from pipeline.attribution.methods.hadamard import token_zscores

    with pytest.raises(ValueError, match="sample"):
        token_zscores(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), std="unbiased")


# ---------------------------------------------------------------- question-gated Grad-CAM

@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_gated_gradcam_with_every_neuron_is_gradcam(name):
    model, images, tokens = setup(name)
    for n in (JOINT, 1000):
        maps = explain(model, images, tokens, methods=["gradcam", "gated_gradcam"],
                       options={"gated_gradcam": {"top_n": n}})
        gated, plain = maps["gated_gradcam"], maps["gradcam"]
        assert plain.image_map_raw.abs().sum() > 0
        torch.testing.assert_close(gated.image_map_raw, plain.image_map_raw, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(gated.image_map, plain.image_map, rtol=1e-6, atol=1e-9)
        assert gated.extras["top_neurons"].shape == (len(QUESTIONS), JOINT)
    # Also when gated_gradcam runs alone (its own passes, same target).
    alone = explain(model, images, tokens, methods=["gated_gradcam"],
                    options={"gated_gradcam": {"top_n": JOINT}})["gated_gradcam"]
    torch.testing.assert_close(alone.image_map_raw, plain.image_map_raw, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_gated_gradcam_neuron_scores_match_a_loop_over_neurons(name):
    model, images, tokens = setup(name)
    result = explain(model, images, tokens, methods=["gated_gradcam"])["gated_gradcam"]
    scores = result.extras["neuron_scores"]
    assert scores.shape == (len(QUESTIONS), JOINT)
    expected = torch.zeros(len(QUESTIONS), JOINT)
    for b in range(len(QUESTIONS)):
        store, handles = capture(model, ["F", "q"])
        model(images[b:b + 1], tokens[b:b + 1])
        for h in handles:
            h.remove()
        for i in range(JOINT):
            g, = torch.autograd.grad(store["F"][0, i], store["q"], retain_graph=True)
            expected[b, i] = g.abs().sum()
    assert expected.min() > 0
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-8)

    # Default n = 10: the ten best neurons by score, best first.
    order = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(result.extras["top_neurons"].numpy(), order)
    np.testing.assert_array_equal(result.extras["top_values"].numpy(),
                                  np.take_along_axis(scores.numpy(), order, axis=1))


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_gated_gradcam_with_one_neuron_differs_from_gradcam(name):
    model, images, tokens = setup(name)
    maps = explain(model, images, tokens, methods=["gradcam", "gated_gradcam"],
                   options={"gated_gradcam": {"top_n": 1}})
    gated, plain = maps["gated_gradcam"].image_map_raw, maps["gradcam"].image_map_raw
    assert maps["gated_gradcam"].extras["top_neurons"].shape == (len(QUESTIONS), 1)
    assert any(not torch.allclose(gated[b], plain[b], rtol=1e-3, atol=1e-6) for b in range(len(gated)))


# ---------------------------------------------------------------- baselines

def test_attention_is_the_models_alpha():
    model, images, tokens = setup("mlb")
    store, handles = capture(model, ["alpha"])
    with torch.no_grad():
        model(images, tokens)
    for h in handles:
        h.remove()
    alpha = store["alpha"]  # B x G x S, S = 2 x 2 cells
    result = explain(model, images, tokens, methods=["attention"])["attention"]
    B, G, _ = alpha.shape
    torch.testing.assert_close(result.image_map_raw, alpha.reshape(B, G, 2, 2), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(result.image_map_raw.sum(dim=(2, 3)), torch.ones(B, G))
    mean = nnf.interpolate(alpha.mean(1).reshape(B, 1, 2, 2), size=(32, 32), mode="bilinear",
                           align_corners=False)[:, 0]
    torch.testing.assert_close(result.image_map, mean, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(result.image_map_raw[:, 0], result.image_map_raw[:, 1])


def test_attention_is_skipped_for_a_model_without_attention():
    model, images, tokens = setup("lstm_cnn")
    result = explain(model, images, tokens, methods=["attention"])["attention"]
    assert result.skipped and "attention" in result.skipped
    assert result.image_map is None and result.image_map_raw is None and result.question_map is None


def test_random_baseline_is_seeded_and_respects_padding():
    model, images, tokens = setup("mlb")

    def run(seed=None):
        torch.manual_seed(1234 if seed is None else seed + 99)  # the global RNG must not matter
        options = {} if seed is None else {"random": {"seed": seed}}
        return explain(model, images, tokens, methods=["random"], options=options)["random"]

    a, b, c, default = run(3), run(3), run(4), run()
    torch.testing.assert_close(a.image_map_raw, b.image_map_raw, rtol=0, atol=0)
    torch.testing.assert_close(a.question_map, b.question_map, rtol=0, atol=0)
    torch.testing.assert_close(default.image_map_raw, run(0).image_map_raw, rtol=0, atol=0)
    assert not torch.equal(a.image_map_raw, c.image_map_raw)
    assert not torch.equal(a.question_map, c.question_map)
    assert a.image_map_raw.shape == (len(QUESTIONS), 2, 2) and a.image_map.shape == (len(QUESTIONS), 32, 32)
    assert a.image_map_raw.min() >= 0 and a.image_map_raw.max() < 1
    real = tokens != 0
    assert torch.all(a.question_map[~real] == 0) and torch.all(a.question_map[real] > 0)


# ---------------------------------------------------------------- through explain

@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_all_four_through_explain_share_one_forward(name):
    model, images, tokens = setup(name)
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    maps = explain(model, images, tokens, methods=FOUR)
    # One shared (guided) forward for all four; on LSTM-CNN the fc6-fc7 ReLUs run after the
    # conv point, so Grad-CAM's plain gradient there needs a forward of its own.
    assert len(calls) == (2 if name == "lstm_cnn" else 1)
    B, T = tokens.shape
    for method in FOUR:
        result = maps[method]
        if name == "lstm_cnn" and method == "attention":
            assert result.skipped
            continue
        assert result.skipped is None, method
        assert result.image_map.shape == (B, 32, 32), method
        assert torch.isfinite(result.image_map).all() and result.image_map.min() >= 0, method
        assert not result.image_map.requires_grad, method
        if result.question_map is not None:
            assert result.question_map.shape == (B, T)
            assert torch.all(result.question_map[tokens == 0] == 0), method
    assert maps["hadamard"].question_map is not None and maps["random"].question_map is not None


def test_random_maps_do_not_depend_on_batching():
    from pipeline.attribution import explain
    from tests.test_models import tiny_model

    model = tiny_model("mlb")
    torch.manual_seed(3)
    images = torch.randn(3, 3, 32, 32)
    tokens = model.encode_questions(["what color is the circle", "how many squares", "what"])
    together = explain(model, images, tokens, methods=["random"])["random"]
    for i in range(3):
        alone = explain(model, images[i:i + 1], tokens[i:i + 1, :], methods=["random"])["random"]
        torch.testing.assert_close(alone.image_map_raw[0], together.image_map_raw[i])
    assert not torch.equal(together.image_map_raw[0], together.image_map_raw[1])
