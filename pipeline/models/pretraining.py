"""Pretraining the scene backbone on the synthetic world: the stand-in for ImageNet.

Targets, read from the world's ground truth (never from the questions):
- image level, through the global-average-pool head (so CAM, Zhou et al. 2016, is defined):
  presence of each shape, colour and shape-colour pair (multi-label BCE), and the number of
  objects of each shape and colour (regression), so that pooled features carry counts;
- cell level, through a 1x1 conv on the grid: the colour-shape pair of the object covering
  most of each grid cell (or background), from the exact instance maps. Image-level labels alone
  teach shapes very slowly; dense labels make every cell's feature name what lies under it,
  which is what attention over the grid (MLB) needs. The label is the *pair*, not shape and
  colour separately, so that each cell carries the conjunction linearly: the pooled feature
  (a mean over cells) then holds how many "red circles" there are, which the LSTM-CNN needs to
  answer "is there a red circle?" from pooled features alone.

The fc6-fc7 layers (when ``backbone.fc`` is set) are trained second, on the trained trunk's
frozen grid, through their own classifier (VGG's fc8) on the image-level targets (presence and
counts), with VGG's dropout: :func:`pretrain_fc`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from tqdm.auto import tqdm

from pipeline.data.images import ImageTransform
from pipeline.data.synthetic import COLORS, SHAPES, Scene, load_instance_map
from pipeline.data.vqa_format import coco_image_path, load_image
from pipeline.models.backbones import SceneResNet

log = logging.getLogger(__name__)

PRESENCE_LABELS = ([f"shape:{s}" for s in SHAPES] + [f"color:{c}" for c in COLORS]
                   + [f"{c} {s}" for s in SHAPES for c in COLORS])
COUNT_LABELS = [f"count:{s}" for s in SHAPES] + [f"count:{c}" for c in COLORS]
NUM_LABELS = len(PRESENCE_LABELS) + len(COUNT_LABELS)
# Cell classes: 0 = background, then every colour-shape pair in PRESENCE_LABELS' pair order.
CELL_LABELS = ["background"] + [f"{c} {s}" for s in SHAPES for c in COLORS]
NUM_CELL_LABELS = len(CELL_LABELS)
_CELL_INDEX = {name: i for i, name in enumerate(CELL_LABELS)}


def scene_targets(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(presence 0/1 over PRESENCE_LABELS, counts over COUNT_LABELS) of one scene."""
    presence = np.zeros(len(PRESENCE_LABELS), np.float32)
    counts = np.zeros(len(COUNT_LABELS), np.float32)
    index = {name: i for i, name in enumerate(PRESENCE_LABELS)}
    count_index = {name: i for i, name in enumerate(COUNT_LABELS)}
    for obj in scene.objects:
        for name in (f"shape:{obj.shape}", f"color:{obj.color}", f"{obj.color} {obj.shape}"):
            presence[index[name]] = 1.0
        counts[count_index[f"count:{obj.shape}"]] += 1
        counts[count_index[f"count:{obj.color}"]] += 1
    return presence, counts


def cell_targets(instances: np.ndarray, scene: Scene, grid: int) -> np.ndarray:
    """Class (index into CELL_LABELS) of every cell of a ``grid`` x ``grid`` partition of the
    image: the colour-shape pair of the object covering most of the cell's pixels, 0 when
    background covers most."""
    h, w = instances.shape
    if h % grid or w % grid:
        raise ValueError(f"image {h}x{w} does not split into a {grid}x{grid} grid")
    cells = instances.reshape(grid, h // grid, grid, w // grid).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    # Majority label per cell: count every instance label (0..255), take the most frequent.
    winner = np.apply_along_axis(np.bincount, 2, cells, minlength=256).argmax(2)
    class_of = np.zeros(256, np.int64)
    for obj in scene.objects:
        class_of[obj.index + 1] = _CELL_INDEX[f"{obj.color} {obj.shape}"]
    return class_of[winner]


def load_split_tensors(root: Path, split: str, scenes: dict[int, Scene], transform: ImageTransform,
                       grid: int) -> tuple[torch.Tensor, ...]:
    """All images of a split as one normalised tensor (the synthetic world fits in memory), with
    their targets: presence, counts, cell classes."""
    ids = sorted(scenes)
    images = torch.stack([transform(load_image(root / coco_image_path(split, i)))
                          for i in tqdm(ids, desc=f"loading {split} images", unit="img")])
    targets = [scene_targets(scenes[i]) for i in ids]
    cells = [cell_targets(load_instance_map(root, split, i), scenes[i], grid) for i in ids]
    return (images,
            torch.from_numpy(np.stack([t[0] for t in targets])),
            torch.from_numpy(np.stack([t[1] for t in targets])),
            torch.from_numpy(np.stack(cells)))


def pretraining_loss(net: SceneResNet, images, presence, counts, cell_classes) -> torch.Tensor:
    grid = net(images)
    logits = net.classifier(grid.mean(dim=(2, 3)))
    cells = net.cell_classifier(grid)
    n = presence.shape[1]
    return (nnf.binary_cross_entropy_with_logits(logits[:, :n], presence)
            + nnf.mse_loss(logits[:, n:], counts)
            + nnf.cross_entropy(cells, cell_classes))


@torch.inference_mode()
def evaluate(net: SceneResNet, images, presence, counts, cell_classes, batch_size: int = 256) -> dict:
    """Presence accuracy (per label, and of the colour-shape pairs alone), count accuracy
    (rounded), and the accuracy of the cells that an object covers."""
    net.eval()
    grids = torch.cat([net(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    outs = net.classifier(grids.mean(dim=(2, 3)))
    cells = net.cell_classifier(grids)
    n = presence.shape[1]
    correct = (outs[:, :n] > 0).float() == presence
    pairs = slice(len(SHAPES) + len(COLORS), n)
    on_object = cell_classes > 0
    return {
        "presence_label_acc": float(correct.float().mean()),
        "pair_presence_acc": float(correct[:, pairs].float().mean()),
        "count_acc": float((outs[:, n:].round() == counts).float().mean()),
        "cell_acc": float((cells.argmax(1) == cell_classes)[on_object].float().mean()),
    }


def pretrain(net: SceneResNet, train, val, epochs: int, batch_size: int, lr: float,
             weight_decay: float, seed: int, device: str = "cpu",
             channels_last: bool = False) -> list[dict]:
    """Train ``net`` in place (AdamW, one-cycle schedule); returns per-epoch validation metrics."""
    generator = torch.Generator().manual_seed(seed)
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(train[0]) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    history = []
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train[0]), generator=generator)
        bar = tqdm(range(0, len(order), batch_size), desc=f"pretrain epoch {epoch + 1}/{epochs}",
                   unit="batch")
        for start in bar:
            rows = order[start:start + batch_size]
            batch = [t[rows].to(device) for t in train]
            loss = pretraining_loss(net, *batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss is {loss.item()} at epoch {epoch + 1}, "
                                         f"batch starting at row {start}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        metrics = evaluate(net, *(t.to(device) for t in val))
        metrics["epoch"] = epoch + 1
        log.info("pretrain epoch %d: %s", epoch + 1, metrics)
        history.append(metrics)
    return history


@torch.inference_mode()
def trunk_grids(net: SceneResNet, images: torch.Tensor, batch_size: int = 256,
                device: str = "cpu") -> torch.Tensor:
    """The trained trunk's grids of ``images`` (eval mode: BatchNorm running statistics, as
    every later stage sees them), on the CPU."""
    net.eval()
    return torch.cat([net(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)]).contiguous()


def fc_loss(net: SceneResNet, grids, presence, counts) -> torch.Tensor:
    logits = net.fc_classifier(net.fc(grids))
    n = presence.shape[1]
    return (nnf.binary_cross_entropy_with_logits(logits[:, :n], presence)
            + nnf.mse_loss(logits[:, n:], counts))


@torch.inference_mode()
def evaluate_fc(net: SceneResNet, grids, presence, counts) -> dict:
    """Presence accuracy (per label, and of the colour-shape pairs) and count accuracy of the
    fc7 classifier."""
    net.fc.eval()
    outs = net.fc_classifier(net.fc(grids))
    n = presence.shape[1]
    correct = (outs[:, :n] > 0).float() == presence
    pairs = slice(len(SHAPES) + len(COLORS), n)
    return {"fc_presence_label_acc": float(correct.float().mean()),
            "fc_pair_presence_acc": float(correct[:, pairs].float().mean()),
            "fc_count_acc": float((outs[:, n:].round() == counts).float().mean())}


def pretrain_fc(net: SceneResNet, train, val, epochs: int, batch_size: int, lr: float,
                weight_decay: float, seed: int, device: str = "cpu") -> list[dict]:
    """Train ``net``'s fc6-fc7 layers and their classifier in place on the frozen trunk's grids
    (``train``/``val``: images, presence, counts, cell classes as :func:`load_split_tensors`
    returns them); returns per-epoch validation metrics."""
    if net.fc is None or net.fc_classifier is None:
        raise ValueError("this SceneResNet has no fc layers or no fc classifier to pretrain")
    train_grids = trunk_grids(net, train[0], device=device)
    val_grids = trunk_grids(net, val[0], device=device)
    head = torch.nn.Sequential(net.fc, net.fc_classifier).to(device)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(train_grids) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    history = []
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(train_grids), generator=generator)
        for start in tqdm(range(0, len(order), batch_size), desc=f"pretrain fc epoch {epoch + 1}/{epochs}",
                          unit="batch"):
            rows = order[start:start + batch_size]
            loss = fc_loss(net, train_grids[rows].to(device), train[1][rows].to(device),
                           train[2][rows].to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fc pretraining loss is {loss.item()} at epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        metrics = evaluate_fc(net, val_grids.to(device), val[1].to(device), val[2].to(device))
        metrics["epoch"] = epoch + 1
        log.info("pretrain fc epoch %d: %s", epoch + 1, metrics)
        history.append(metrics)
    head.eval()
    return history
