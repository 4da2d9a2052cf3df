"""The probe's point helpers, ``recording`` and ``replacing``, against the model's own passes."""
import pytest
import torch
from torch import nn

from pipeline.attribution.probe import Probe, recording, replacing
from tests.test_models import tiny_model

QUESTIONS = ["what color is the circle", "how many squares", "what"]


def setup(name):
    model = tiny_model(name)
    torch.manual_seed(1)
    return model, torch.randn(len(QUESTIONS), 3, 32, 32), model.encode_questions(QUESTIONS)


def recurrent_calls(model):
    """A list that grows by one each time the head's question encoder (its GRU or LSTM) runs."""
    calls = []
    for m in model.head.modules():
        if isinstance(m, (nn.GRU, nn.LSTM)):
            m.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_replacing_q_skips_the_encoder_and_equals_the_models_own_pass(name):
    model, images, tokens = setup(name)
    with torch.no_grad(), recording(model, ["q", "conv", "absent"]) as recorded:
        expected = model(images, tokens)
    assert set(recorded) == {"q", "conv"}  # a point the model lacks is simply not recorded
    grid, q = recorded["conv"], recorded["q"]
    calls = recurrent_calls(model)
    with torch.no_grad():
        for b in range(len(tokens)):
            # A 1-row feature stands for every row; the tokens given do not matter any more.
            with replacing(model, "q", q[b:b + 1]):
                logits = model.head(grid[b:b + 1].expand(2, *grid.shape[1:]), tokens[:2])
            torch.testing.assert_close(logits, expected[b:b + 1].expand(2, -1), rtol=1e-5, atol=1e-6)
    assert calls == []
    assert "encode_question" not in vars(model.head)  # the class's method again
    with torch.no_grad():
        assert torch.equal(model(images, tokens), expected)
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_gradient_with_respect_to_a_replacement_is_the_gradient_at_the_point(name):
    model, images, tokens = setup(name)
    probe = Probe(model, images, tokens)
    target = probe.logits.argmax(1)
    expected, = probe.grad(probe.logits.gather(1, target[:, None]).sum(), ["q_emb"])
    z = probe["q_emb"].detach().clone().requires_grad_(True)
    with replacing(model, "q_emb", z):
        logits = model(images, tokens)
    torch.testing.assert_close(logits, probe.logits)
    grad, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), z)
    torch.testing.assert_close(grad, expected)
    # Out of the block the point is the model's own again.
    assert torch.equal(model(images, tokens), probe.logits.detach())


def test_replacing_refuses_missing_points_and_misfits_and_cleans_up():
    model, images, tokens = setup("lstm_cnn")
    with pytest.raises(KeyError, match="alpha"):
        with replacing(model, "alpha", torch.zeros(1)):
            pass
    with pytest.raises(RuntimeError, match="'q_emb' outputs"):
        with replacing(model, "q_emb", torch.zeros(2, 1, 8)), torch.no_grad():
            model(images, tokens)
    with pytest.raises(ValueError, match="inside"):
        with replacing(model, "q", torch.zeros(1, 32)):
            raise ValueError("inside")
    assert "encode_question" not in vars(model.head)
    points = model.analysis_points()
    assert not any(m._forward_hooks for m in points.values())
