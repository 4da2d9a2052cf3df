"""Saving and loading trained models.

Two kinds of file load into the same :class:`VQAModel`:
- the exported model ``models/<model>/model.pt`` (what ``train`` writes at the end): backbone and
  head weights, architecture, vocabularies; self-contained;
- a Lightning checkpoint (``checkpoints/<model>/{best,last}.ckpt``): head weights and the
  same metadata in ``hyper_parameters``; the backbone is rebuilt from its config.

Both hold only tensors and plain Python values, so ``torch.load(weights_only=True)`` reads them
(no pickled code runs when a file from elsewhere is opened).
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.common.errors import DataError
from pipeline.data.vocab import AnswerVocab, QuestionVocab
from pipeline.common.files import save_torch
from pipeline.models.backbones import ResNet152, SceneResNet, build_backbone
from pipeline.models.heads import build_head, head_feature_kind
from pipeline.models.vqa_model import VQAModel

FORMAT = "vqa-explain/model"
FORMAT_VERSION = 1


class CheckpointError(DataError):
    """A model file that cannot be used as asked (wrong kind, other model, other vocabulary)."""


def model_metadata(model_cfg, backbone_cfg, backbone, question_vocab: QuestionVocab,
                   answer_vocab: AnswerVocab, max_question_length: int, data_name: str,
                   question_mark: bool = False) -> dict:
    """Everything needed to rebuild a model, as plain values (it goes into checkpoints).
    ``question_mark``: whether its training questions had "?" as a token (the processed data's
    ``data.question_mark``); a file without the key was made without "?"."""
    backbone_meta = OmegaConf.to_container(backbone_cfg, resolve=True) if OmegaConf.is_config(
        backbone_cfg) else dict(backbone_cfg)
    backbone_meta.pop("pretrain", None)
    if isinstance(backbone, SceneResNet):
        backbone_meta.update(
            channels=[int(c) for c in _scene_channels(backbone)],
            num_labels=int(backbone.classifier.out_features if backbone.classifier else 0),
            num_cell_labels=int(backbone.cell_classifier.out_channels if backbone.cell_classifier else 0),
            fc=list(backbone.fc_widths))
    arch = OmegaConf.to_container(model_cfg.arch, resolve=True) if OmegaConf.is_config(
        model_cfg.arch) else dict(model_cfg.arch)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": {"name": str(model_cfg.name), "arch": arch,
                  # What the head reads (grid, pooled or fc7), so a file says it explicitly.
                  "feature_kind": head_feature_kind(str(model_cfg.name), arch),
                  "num_answers": len(answer_vocab)},
        "backbone": backbone_meta,
        "question_vocab": list(question_vocab.tokens),
        "answer_vocab": list(answer_vocab.answers),
        "max_question_length": int(max_question_length),
        "question_mark": bool(question_mark),
        "data": str(data_name),
    }


def _scene_channels(net: SceneResNet) -> list[int]:
    return [block.conv2.out_channels for block in net.stages]


def save_model(path: str | Path, model: VQAModel, metadata: dict) -> Path:
    """Write the self-contained exported model (atomically)."""
    payload = dict(metadata)
    payload["backbone_state"] = model.backbone.state_dict()
    payload["head_state"] = model.head.state_dict()
    return save_torch(payload, path)


def _build(meta: dict, head_state: dict, backbone=None) -> VQAModel:
    qv, av = QuestionVocab(list(meta["question_vocab"])), AnswerVocab(list(meta["answer_vocab"]))
    arch = dict(meta["model"]["arch"])
    if meta["model"]["name"] == "lstm_cnn" and "image_feature" not in arch:
        # Files written before the fc7 path have no feature_kind: they normalised the pooled grid.
        arch["image_feature"] = meta["model"].get("feature_kind", "pooled")
    head = build_head(meta["model"]["name"], arch, len(qv), len(av),
                      backbone.feature_channels(head_feature_kind(meta["model"]["name"], arch)))
    try:
        head.load_state_dict(head_state)
    except RuntimeError as e:
        raise CheckpointError(f"head weights do not fit a {meta['model']['name']} model with "
                              f"{len(qv)} words and {len(av)} answers: {e}") from e
    model = VQAModel(backbone, head, qv, av, meta["max_question_length"],
                     question_mark=bool(meta.get("question_mark", False)))  # older files: no "?"
    return model.eval()


def _backbone_from_state(meta: dict, state: dict):
    b = meta["backbone"]
    if b["name"] == "scene_resnet":
        net = SceneResNet(tuple(b["channels"]), int(b["input_size"]), int(b.get("num_labels", 0)),
                          int(b.get("num_cell_labels", 0)), tuple(b.get("fc", ())))
    elif b["name"] == "resnet152":
        net = ResNet152(int(b["input_size"]))
    else:
        raise CheckpointError(f"unknown backbone {b['name']!r} in model file")
    net.load_state_dict(state)
    return net.freeze()


def load_model(checkpoint_path: str | Path, question_vocab: QuestionVocab | None = None,
               answer_vocab: AnswerVocab | None = None) -> VQAModel:
    """The trained model in eval mode, from an exported ``model.pt`` or a Lightning checkpoint.

    ``model(images, question_tokens)`` returns answer logits; ``model.question_vocab``,
    ``model.answer_vocab`` and ``model.encode_questions`` give the tokenizer and answers. Pass
    the vocabularies of the data you will feed it to have a mismatch reported here, clearly,
    rather than as wrong answers or a shape error later.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}: run `python -m pipeline.train model=...`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it, a truncated file, not torch at all
        raise CheckpointError(f"{path} is not a readable model file: {e}") from e
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        meta = payload
        model = _build(meta, payload["head_state"], _backbone_from_state(meta, payload["backbone_state"]))
    elif isinstance(payload, dict) and payload.get("hyper_parameters", {}).get("format") == FORMAT:
        meta = payload["hyper_parameters"]
        head_state = {k[len("head."):]: v for k, v in payload["state_dict"].items() if k.startswith("head.")}
        model = _build(meta, head_state, build_backbone(OmegaConf.create(meta["backbone"])))
    else:
        raise CheckpointError(f"{path} is not a vqa-explain model or training checkpoint")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('version')}, this code reads "
                              f"{FORMAT_VERSION}")
    check_vocabularies(model, question_vocab, answer_vocab, path)
    return model


def load_trained_model(cfg, name: str) -> VQAModel:
    """What every stage that explains a trained model starts from: ``models/<name>/model.pt``
    checked against the processed data's vocabularies, in eval mode, its backbone in
    channels-last format when ``backbone.channels_last`` is set."""
    from pipeline.common.config import abspath
    from pipeline.data import processed

    question_vocab, answer_vocab = processed.load_vocabs(abspath(cfg.paths.processed_dir))
    model = load_model(trained_model_path(cfg, name),
                       question_vocab=question_vocab, answer_vocab=answer_vocab).eval()
    if cfg.backbone.get("channels_last"):
        model.backbone.to(memory_format=torch.channels_last)
    return model


def trained_model_path(cfg, name: str) -> Path:
    """Where the train stage exports model ``name``: ``${paths.models_dir}/<name>/model.pt``."""
    from pipeline.common.config import abspath

    return abspath(cfg.paths.models_dir) / name / "model.pt"


def train_metrics_path(cfg, name: str) -> Path:
    """The train stage's metrics of model ``name``: one file per model in one folder, which the
    report stage depends on as a whole (so a new model needs no edit of dvc.yaml)."""
    from pipeline.common.config import abspath

    return abspath(cfg.paths.metrics_dir) / "train" / f"{name}.json"


def check_vocabularies(model: VQAModel, question_vocab: QuestionVocab | None,
                       answer_vocab: AnswerVocab | None, path: Path | str = "model") -> None:
    """Raise :class:`CheckpointError` if the model was trained with other vocabularies."""
    if question_vocab is not None and model.question_vocab.tokens != question_vocab.tokens:
        raise CheckpointError(
            f"{path} was trained with another question vocabulary ({len(model.question_vocab)} "
            f"words) than the data's ({len(question_vocab)} words): retrain, or use the data it "
            "was trained on")
    if answer_vocab is not None and model.answer_vocab.answers != answer_vocab.answers[:len(model.answer_vocab)]:
        raise CheckpointError(
            f"{path} answers with another answer vocabulary ({len(model.answer_vocab)} answers) "
            f"than the data's ({len(answer_vocab)}): retrain, or use the data it was trained on")
