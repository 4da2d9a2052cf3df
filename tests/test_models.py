"""The two VQA models, their analysis points, backbones and model files (no training here)."""
import logging

import pytest
import torch

from pipeline.data.vocab import AnswerVocab, QuestionVocab
from pipeline.models import load_model
from pipeline.models.analysis import POINT_NAMES
from pipeline.models.backbones import RESNET152_HUB_FILES, ResNet152, SceneResNet, build_backbone
from pipeline.models.checkpoint import CheckpointError, model_metadata, save_model
from pipeline.models.heads import HEADS, build_head, head_feature_kind, register_head
from pipeline.models.vqa_model import VQAModel
from omegaconf import OmegaConf

QV = QuestionVocab.build([["what", "color", "is", "the", "circle"], ["how", "many", "squares"]])
AV = AnswerVocab(["yes", "no", "red", "2"])
ARCH = {
    "lstm_cnn": {"embedding": 8, "hidden": 8, "layers": 2, "joint": 16, "dropout": 0.0},
    "mlb": {"embedding": 8, "hidden": 8, "attention": 8, "glimpses": 2, "joint": 16, "dropout": 0.0},
}


def tiny_model(name: str, seed: int = 0, arch: dict | None = None) -> VQAModel:
    """A random tiny model; for the LSTM-CNN its backbone has fc6-fc7 layers (widths 12, 10)."""
    torch.manual_seed(seed)
    arch = ARCH[name] if arch is None else arch
    fc = (12, 10) if head_feature_kind(name, arch) == "fc7" else ()
    backbone = SceneResNet((4, 4, 8, 8), input_size=32, num_labels=3, fc=fc).freeze()
    head = build_head(name, arch, len(QV), len(AV),
                      backbone.feature_channels(head_feature_kind(name, arch)))
    return VQAModel(backbone, head, QV, AV, max_question_length=6).eval()


def model_cfg(name):
    return OmegaConf.create({"name": name, "arch": ARCH[name]})


BACKBONE_CFG = {"name": "scene_resnet", "channels": [4, 4, 8, 8], "input_size": 32, "weights": "unused"}


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_end_to_end_equals_head_on_cached_features(name):
    model = tiny_model(name)
    images = torch.randn(3, 3, 32, 32)
    tokens = model.encode_questions(["what color is the circle?", "how many squares?", "what?"])
    logits = model(images, tokens)
    assert logits.shape == (3, len(AV))
    grid = model.backbone(images)
    assert grid.shape == (3, 8, 2, 2)
    features = grid if model.head.feature_kind == "grid" else model.backbone.fc7(grid)
    torch.testing.assert_close(model.head(features, tokens), logits)


@pytest.mark.parametrize("name, points", [
    ("lstm_cnn", set(POINT_NAMES) - {"alpha"}),
    ("mlb", set(POINT_NAMES)),
])
def test_analysis_points(name, points):
    model = tiny_model(name)
    seen = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.shape))
               for n, m in model.analysis_points().items()]
    model(torch.randn(2, 3, 32, 32), model.encode_questions(["how many squares?"] * 2))
    for h in handles:
        h.remove()
    assert set(seen) == points
    assert seen["image"] == (2, 3, 32, 32) and seen["conv"] == (2, 8, 2, 2)
    assert seen["q_emb"] == (2, 3, 8) and seen["F"] == (2, 16)
    if name == "mlb":
        alpha = seen["alpha"]
        assert alpha == (2, 2, 4)


def test_heads_are_registered_by_name_whatever_part_of_models_is_imported():
    import subprocess
    import sys

    # a fresh interpreter: only the registry module imported, as a user's script might
    listed = subprocess.run([sys.executable, "-c", "from pipeline.models.heads import HEADS; print(sorted(HEADS))"],
                            capture_output=True, text=True, check=True).stdout
    assert listed.strip() == "['lstm_cnn', 'mlb']"
    assert [HEADS[name].name for name in ("lstm_cnn", "mlb")] == ["lstm_cnn", "mlb"]


def test_an_unknown_or_twice_registered_head_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown model 'nope'; registered heads: \['lstm_cnn', 'mlb'\]"):
        build_head("nope", {}, len(QV), len(AV), 8)
    with pytest.raises(ValueError, match="'mlb' registered twice"):
        register_head("mlb")(type("AnotherMLB", (torch.nn.Module,), {"feature_kind": "grid"}))
    assert HEADS["mlb"].__name__ == "MLBHead"


def test_mlb_attention_is_a_distribution_per_glimpse():
    model = tiny_model("mlb")
    captured = {}
    model.analysis_points()["alpha"].register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    model(torch.randn(2, 3, 32, 32), model.encode_questions(["what color is the circle"] * 2))
    torch.testing.assert_close(captured["a"].sum(2), torch.ones(2, 2))


def test_lstm_cnn_question_feature_is_cell_and_hidden_of_both_layers():
    model = tiny_model("lstm_cnn")
    tokens = model.encode_questions(["how many squares"])
    q = model.head.encode_question(tokens)
    assert q.shape == (1, 2 * 2 * 8)
    # padding after the question does not change its feature (packed sequences)
    padded = torch.cat([tokens, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model.head.encode_question(padded), q)


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_empty_and_unknown_questions_still_get_an_answer(name, caplog):
    model = tiny_model(name)
    tokens = model.encode_questions(["", "zebra giraffe?", "how many squares"])
    assert tokens[0].tolist() == [0, 0, 0] and tokens[1].tolist()[:2] == [QV.unk_id, QV.unk_id]
    with caplog.at_level(logging.WARNING):
        logits = model(torch.randn(3, 3, 32, 32), tokens)
    assert torch.isfinite(logits).all() and len(model.answers(logits)) == 3
    assert "1 empty and 1 all-unknown-word question" in caplog.text


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_exported_model_roundtrip(tmp_path, name):
    model = tiny_model(name)
    meta = model_metadata(model_cfg(name), BACKBONE_CFG, model.backbone, QV, AV, 6, "unit")
    path = save_model(tmp_path / "model.pt", model, meta)
    loaded = load_model(path, question_vocab=QV, answer_vocab=AV)
    assert not loaded.training and loaded.name == name
    images, tokens = torch.randn(2, 3, 32, 32), model.encode_questions(["how many squares", "what"])
    torch.testing.assert_close(loaded(images, tokens), model(images, tokens))
    assert loaded.answer_vocab.answers == AV.answers and loaded.question_vocab.tokens == QV.tokens
    torch.load(path, weights_only=True)  # nothing but tensors and plain values


QV_QM = QuestionVocab.build([["what", "color", "is", "the", "circle", "?"], ["how", "many", "squares", "?"]])


def question_mark_model(question_mark: bool) -> VQAModel:
    torch.manual_seed(0)
    backbone = SceneResNet((4, 4, 8, 8), input_size=32, num_labels=3).freeze()
    head = build_head("mlb", ARCH["mlb"], len(QV_QM), len(AV), backbone.grid_channels)
    return VQAModel(backbone, head, QV_QM, AV, max_question_length=6, question_mark=question_mark).eval()


def test_encode_questions_follows_the_models_question_mark_setting():
    with_mark, without = question_mark_model(True), question_mark_model(False)
    assert with_mark.tokenize("How many squares?") == ["how", "many", "squares", "?"]
    assert without.tokenize("How many squares?") == ["how", "many", "squares"]
    tokens = with_mark.encode_questions(["How many squares?", "what color is the circle?"])
    assert tokens.tolist() == [QV_QM.encode(["how", "many", "squares", "?"]) + [0, 0],
                               QV_QM.encode(["what", "color", "is", "the", "circle", "?"])]
    assert without.encode_questions(["How many squares?"]).tolist() == [QV_QM.encode(["how", "many", "squares"])]
    # Built without the setting (code written before it): the old tokenisation, no "?".
    assert VQAModel(with_mark.backbone, with_mark.head, QV_QM, AV, 6).question_mark is False


def test_model_file_records_question_mark_and_old_files_load_without_it(tmp_path):
    model = question_mark_model(True)
    meta = model_metadata(model_cfg("mlb"), BACKBONE_CFG, model.backbone, QV_QM, AV, 6, "unit",
                          question_mark=True)
    assert meta["question_mark"] is True
    assert model_metadata(model_cfg("mlb"), BACKBONE_CFG, model.backbone, QV_QM, AV, 6,
                          "unit")["question_mark"] is False
    path = save_model(tmp_path / "model.pt", model, meta)
    loaded = load_model(path, question_vocab=QV_QM, answer_vocab=AV)
    assert loaded.question_mark is True
    assert loaded.encode_questions(["How many squares?"])[0, -1].item() == QV_QM.index["?"]
    # A model file made before the setting existed has no key: it was trained without "?", and
    # loads (exported file and Lightning checkpoint alike) tokenising text without it.
    payload = torch.load(path, weights_only=True)
    del payload["question_mark"]
    torch.save(payload, tmp_path / "old.pt")
    torch.save({"channels": [4, 4, 8, 8], "input_size": 32, "num_labels": 3,
                "state_dict": payload["backbone_state"]}, tmp_path / "backbone.pt")
    hyper_parameters = {k: v for k, v in payload.items() if not k.endswith("_state")}
    hyper_parameters["backbone"] = {**hyper_parameters["backbone"], "weights": str(tmp_path / "backbone.pt")}
    torch.save({"hyper_parameters": hyper_parameters,
                "state_dict": {f"head.{k}": v for k, v in payload["head_state"].items()}},
               tmp_path / "old.ckpt")
    for old_file in ("old.pt", "old.ckpt"):
        old = load_model(tmp_path / old_file, question_vocab=QV_QM, answer_vocab=AV)
        assert old.question_mark is False, old_file
        assert old.encode_questions(["How many squares?"]).tolist() == [QV_QM.encode(["how", "many", "squares"])]


def test_model_file_mismatches_are_clear(tmp_path):
    model = tiny_model("mlb")
    meta = model_metadata(model_cfg("mlb"), BACKBONE_CFG, model.backbone, QV, AV, 6, "unit")
    path = save_model(tmp_path / "model.pt", model, meta)
    other_words = QuestionVocab.build([["a", "b"]])
    with pytest.raises(CheckpointError, match="another question vocabulary"):
        load_model(path, question_vocab=other_words)
    with pytest.raises(CheckpointError, match="another answer vocabulary"):
        load_model(path, answer_vocab=AnswerVocab(["no", "yes", "red", "2"]))
    # weights of one model under the other's name
    payload = torch.load(path, weights_only=True)
    payload["model"] = {"name": "lstm_cnn", "arch": ARCH["lstm_cnn"], "num_answers": 4}
    torch.save(payload, tmp_path / "swapped.pt")
    with pytest.raises(CheckpointError, match="do not fit a lstm_cnn model"):
        load_model(tmp_path / "swapped.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a vqa-explain model"):
        load_model(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not torch")
    with pytest.raises(CheckpointError, match="not a readable model file"):
        load_model(tmp_path / "garbage.pt")
    with pytest.raises(FileNotFoundError, match="pipeline.train"):
        load_model(tmp_path / "missing.pt")


def test_resnet152_never_falls_back_to_random_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = OmegaConf.create({"name": "resnet152", "input_size": 448, "weights": None})
    with pytest.raises(FileNotFoundError) as e:
        build_backbone(cfg)
    assert RESNET152_HUB_FILES[0] in str(e.value) and "backbone.weights" in str(e.value)
    cfg.weights = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone(cfg)


def test_resnet152_loads_torchvision_weights_from_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import resnet152

    torch.manual_seed(0)
    reference = resnet152(weights=None).eval()
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(reference.state_dict(), hub / RESNET152_HUB_FILES[0])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    net = build_backbone(OmegaConf.create({"name": "resnet152", "input_size": 64, "weights": None}))
    assert isinstance(net, ResNet152) and not net.training
    x = torch.randn(1, 3, 64, 64)
    trunk = torch.nn.Sequential(*list(reference.children())[:-2])
    torch.testing.assert_close(net(x), trunk(x))
    assert net(x).shape == (1, 2048, 2, 2)  # 448 px gives 14 x 14
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision ResNet-152"):
        build_backbone(OmegaConf.create({"name": "resnet152", "input_size": 64,
                                         "weights": str(tmp_path / "bad.pth")}))


def test_scene_backbone_requires_pretraining(tmp_path):
    cfg = OmegaConf.create({**BACKBONE_CFG, "weights": str(tmp_path / "missing.pt")})
    with pytest.raises(FileNotFoundError, match="pretrain_backbone"):
        build_backbone(cfg)


def test_frozen_backbone_stays_in_eval_mode_and_passes_gradients():
    model = tiny_model("mlb")
    model.train()
    assert not model.backbone.training and model.head.training
    images = torch.randn(1, 3, 32, 32, requires_grad=True)
    model(images, model.encode_questions(["how many squares"])).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())
