"""Stage ``pretrain_backbone``: train the scene backbone on the synthetic world, then freeze it.

    python -m pipeline.pretrain_backbone [backbone.pretrain.epochs=N] [paths.root=DIR]

Writes ``${backbone.weights}`` (``models/backbone/scene_resnet.pt``: weights, channels, input
size, label names) and ``${paths.metrics_dir}/pretrain_backbone.json`` (validation accuracy of
the presence, count and cell labels per epoch; then of the fc7 classifier per fc epoch).

Nothing to train in two cases; the stage then checks its input and says so:

- ``backbone=resnet152`` uses ImageNet weights: the stage finds them and writes a record of the
  file (path, sha256) to ``${backbone.pretrained}`` (``models/backbone/resnet152.json``);
- ``backbone=scene_resnet`` on real data (no scene descriptions to train on): the weights
  pretrained on the synthetic world must already be at ``backbone.weights``; the stage checks
  that they load at ``backbone.input_size`` and keeps them (dvc.yaml marks the file
  ``persist``, so switching the data to a real set does not delete it).

``${backbone.pretrained}`` is what dvc.yaml records as the stage's output and the later stages'
input.
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline.common.config import abspath, stage_main
from pipeline.data.http_download import sha256_file
from pipeline.common.errors import DataError
from pipeline.data.images import ImageTransform
from pipeline.data.synthetic import load_ground_truth
from pipeline.common.files import save_torch, write_json
from pipeline.models.backbones import SceneResNet, build_backbone, find_resnet152_weights
from pipeline.models.pretraining import (CELL_LABELS, COUNT_LABELS, NUM_CELL_LABELS,
                                         NUM_LABELS, PRESENCE_LABELS, load_split_tensors,
                                         pretrain, pretrain_fc)
from pipeline.common.seeding import seed_everything

log = logging.getLogger(__name__)


def check_pretrained_scene_resnet(cfg: DictConfig, metrics_path) -> dict:
    """Real data: scene_resnet cannot be pretrained on it (no scene descriptions), so the
    weights pretrained on the synthetic world must be there already, for this input size."""
    path = abspath(cfg.backbone.weights)
    if not path.is_file():
        raise DataError(
            f"scene_resnet is pretrained on the synthetic world's scene descriptions, which "
            f"data={cfg.data.name} lacks: pretrain it on the synthetic world first (python -m "
            f"pipeline.pretrain_backbone data=synthetic backbone.input_size="
            f"{cfg.backbone.input_size}), so that backbone.weights is there, or use "
            f"backbone=resnet152 (preset={cfg.data.name})", path)
    build_backbone(cfg.backbone)  # loads, and checks the input size the file was trained at
    log.info("data=%s has nothing to pretrain scene_resnet on: using the weights pretrained on "
             "the synthetic world at %s", cfg.data.name, path)
    metrics = {"backbone": "scene_resnet", "weights": str(cfg.backbone.weights),
               "pretrained_here": False, "sha256": sha256_file(path)}
    write_json(metrics_path, metrics)
    return metrics


def run(cfg: DictConfig) -> dict:
    """Pretrain (or check) the backbone; the metrics written to pretrain_backbone.json."""
    metrics_path = abspath(cfg.paths.metrics_dir) / "pretrain_backbone.json"
    if cfg.backbone.name == "resnet152":
        path = find_resnet152_weights(cfg.backbone.get("weights"))
        log.info("resnet152 uses ImageNet weights from %s; nothing to pretrain", path)
        record = {"backbone": "resnet152", "weights": str(path)}
        if cfg.backbone.get("pretrained"):
            write_json(abspath(cfg.backbone.pretrained), {**record, "sha256": sha256_file(path)})
        write_json(metrics_path, record)
        return record
    if cfg.backbone.name != "scene_resnet":
        raise ValueError(f"pretrain_backbone knows scene_resnet and resnet152, not {cfg.backbone.name!r}")
    if cfg.data.source != "synthetic":
        return check_pretrained_scene_resnet(cfg, metrics_path)

    seed_everything(int(cfg.seed))
    root = abspath(cfg.data.root)
    settings = cfg.backbone.pretrain
    net = SceneResNet(tuple(cfg.backbone.channels), int(cfg.backbone.input_size), NUM_LABELS,
                      NUM_CELL_LABELS, tuple(cfg.backbone.get("fc", ())),
                      float(settings.get("fc_dropout", 0.5)))
    grid = net.input_size // 16  # four stride-2 stages
    transform = ImageTransform(net.input_size, net.mean, net.std)
    tensors = {}
    for key in ("train", "val"):
        split = cfg.data.splits[key]
        tensors[key] = load_split_tensors(root, split, load_ground_truth(root, split)["images"],
                                          transform, grid)
    device = str(settings.get("device", "cpu"))
    history = pretrain(net, tensors["train"], tensors["val"], int(settings.epochs),
                       int(settings.batch_size), float(settings.lr), float(settings.weight_decay),
                       int(cfg.seed), device, channels_last=bool(cfg.backbone.get("channels_last")))
    fc_history = []
    if net.fc is not None:
        fc_history = pretrain_fc(net, tensors["train"], tensors["val"], int(settings.fc_epochs),
                                 int(settings.fc_batch_size), float(settings.fc_lr),
                                 float(settings.weight_decay), int(cfg.seed) + 1, device)
    net.cpu()
    save_torch({"state_dict": net.state_dict(), "channels": list(cfg.backbone.channels),
                "input_size": net.input_size, "num_labels": NUM_LABELS,
                "num_cell_labels": NUM_CELL_LABELS, "cell_labels": CELL_LABELS,
                "fc": list(net.fc_widths),
                "presence_labels": PRESENCE_LABELS, "count_labels": COUNT_LABELS},
               abspath(cfg.backbone.weights))
    metrics = {"backbone": "scene_resnet", "val": history[-1] if history else {}, "history": history,
               "fc_val": fc_history[-1] if fc_history else {}, "fc_history": fc_history}
    write_json(metrics_path, metrics)
    return metrics


main = stage_main(run)

if __name__ == "__main__":
    main()
