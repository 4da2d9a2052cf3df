"""Image backbones: frozen convolutional trunks whose last feature map is the ``conv`` analysis
point (the Grad-CAM layer). Each also gives two image vectors computed from that grid:

- ``pooled`` (pool5): the grid's spatial mean;
- ``fc7``: the vector "Deeper LSTM Q + norm I" reads (Antol et al. 2015; VGG's fc7, 4096-d, after
  fc6 and fc7 with ReLU, read by the model Goyal et al. explain). It is a function of the grid,
  so gradients flow from it back to the ``conv`` point and the pixels.

Backbones:

- ``scene_resnet``: a small residual CNN pretrained in the pipeline on the synthetic scenes
  (multi-label presence of shapes, colours and shape-colour pairs through a global-average-pool
  head, so that CAM is defined for it); the stand-in for ImageNet pretraining. Its ``fc`` layers
  are VGG's fc6 and fc7 in small: fully connected layers with ReLU on the *flattened* grid, as
  VGG's fc6 reads the flattened pool5, pretrained on the same image-level targets through their
  own classifier (VGG's fc8).
- ``resnet152``: torchvision's ResNet-152 with ImageNet weights from the torch hub cache or a
  file; res5c (14 x 14 x 2048 at 448 x 448) is the grid, as in MLB (Kim et al.). ResNet has no
  fc6/fc7: its ``fc7`` is pool5 (the 2048-d spatial mean), the stand-in later reimplementations
  of the LSTM-CNN use (docs/fidelity.md says what that implies for Grad-CAM).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# ImageNet statistics: both backbones see images normalised the same way, so the occlusion
# patch (the ImageNet mean colour) is exactly zero after normalisation for either.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


IMAGE_VECTORS = ("pooled", "fc7")


class Backbone(nn.Module):
    """A frozen trunk: ``forward(images) -> grid`` (B x C x h x w); ``pooled(grid)`` and
    ``fc7(grid)`` are the image vectors computed from the grid (module docstring)."""

    name: str = ""
    grid_channels: int = 0
    input_size: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # What ``fc7`` computes on this backbone (recorded in the feature store); None: no fc7.
    fc7_source: str | None = None

    @staticmethod
    def pooled(grid: torch.Tensor) -> torch.Tensor:
        """pool5: the grid's spatial mean, B x C."""
        return grid.mean(dim=(2, 3))

    def fc7(self, grid: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"backbone {self.name} has no fc7 layers")

    @property
    def fc7_channels(self) -> int:
        raise NotImplementedError(f"backbone {self.name} has no fc7 layers")

    def image_vector(self, kind: str, grid: torch.Tensor) -> torch.Tensor:
        """The image vector ``kind`` (``pooled`` or ``fc7``) of a grid."""
        if kind == "pooled":
            return self.pooled(grid)
        if kind == "fc7":
            return self.fc7(grid)
        raise ValueError(f"unknown image vector {kind!r}; known: {IMAGE_VECTORS}")

    def feature_channels(self, kind: str) -> int:
        """Channels of what a head reads: the grid's C (``grid``, ``pooled``) or fc7's width."""
        if kind in ("grid", "pooled"):
            return self.grid_channels
        if kind == "fc7":
            return self.fc7_channels
        raise ValueError(f"unknown feature kind {kind!r}; known: grid, {', '.join(IMAGE_VECTORS)}")

    def freeze(self) -> "Backbone":
        """Eval mode (BatchNorm uses running statistics) and no parameter gradients. Gradients
        still flow *through* the trunk to the pixels, which attribution needs."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Backbone":
        # A frozen backbone stays in eval mode even inside a model put in training mode.
        frozen = not any(p.requires_grad for p in self.parameters())
        return super().train(False if frozen else mode)


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (projected) shortcut, then ReLU (He et al. 2016).

    ReLUs are modules, not functional calls, so that guided backpropagation can hook them.

    The projected shortcut is a 1x1 convolution with stride ``s``, computed as subsampling
    (every ``s``-th row and column) followed by a stride-1 1x1 convolution: the same function,
    value for value. The strided form would send the backward pass of channels-last inputs with
    few input channels into a oneDNN kernel that corrupts memory or returns wrong weight
    gradients (docs/determinism.md, "The oneDNN 1x1 convolution bug"); the stride-1 form never
    reaches it. Parameter names are those of the strided form, so older weight files load."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut_stride = int(stride)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        s = self.shortcut_stride
        return self.relu2(y + self.shortcut(x[:, :, ::s, ::s] if s > 1 else x))


class SceneResNet(Backbone):
    """A 4-stage residual CNN (one block per stage, stride 2 each: grid = input / 16).

    ``classifier`` is the global-average-pool + linear head used for pretraining; CAM
    (Zhou et al. 2016, M_c = sum_k w_k^c A_k) is defined on it. ``cell_classifier`` (1x1 conv)
    names what lies under each grid cell; it only serves pretraining (dense supervision teaches
    shapes far faster than image-level labels).

    ``fc`` (widths of fc6, fc7; empty for none): ``fc7(grid) = ReLU(W7 ReLU(W6 vec(grid) + b6)
    + b7)``, VGG's layers with their dropout (active only while they are pretrained);
    ``fc_classifier`` is their pretraining head (VGG's fc8)."""

    name = "scene_resnet"

    def __init__(self, channels=(16, 32, 64, 128), input_size: int = 128, num_labels: int = 0,
                 num_cell_labels: int = 0, fc: tuple[int, ...] = (), fc_dropout: float = 0.5):
        super().__init__()
        self.input_size = int(input_size)
        self.grid_channels = int(channels[-1])
        c0 = int(channels[0])
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        stages, c_in = [], c0
        for c in channels:
            stages.append(ResidualBlock(c_in, int(c), stride=2))
            c_in = int(c)
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.grid_channels, num_labels) if num_labels else None
        self.cell_classifier = nn.Conv2d(self.grid_channels, num_cell_labels, 1) if num_cell_labels else None
        # Created after every convolution so that the trunk's initial weights (and so the
        # pretrained grid) do not depend on whether fc layers exist.
        self.fc_widths = tuple(int(w) for w in fc)
        if len(self.fc_widths) not in (0, 2):
            raise ValueError(f"backbone.fc holds the widths of fc6 and fc7 (two numbers) or "
                             f"nothing, got {list(fc)}")
        if self.fc_widths:
            cells = (self.input_size // 16) ** 2
            fc6, fc7 = self.fc_widths
            # ReLUs are modules so that guided backpropagation passes through them guided.
            self.fc = nn.Sequential(
                nn.Flatten(), nn.Linear(self.grid_channels * cells, fc6), nn.ReLU(),
                nn.Dropout(fc_dropout), nn.Linear(fc6, fc7), nn.ReLU(), nn.Dropout(fc_dropout))
            self.fc_classifier = nn.Linear(fc7, num_labels) if num_labels else None
            self.fc7_source = (f"fc6-fc7 ({fc6}, {fc7}) with ReLU on the flattened "
                               f"{self.grid_channels} x {self.input_size // 16} x "
                               f"{self.input_size // 16} grid")
        else:
            self.fc = self.fc_classifier = None

    def fc7(self, grid: torch.Tensor) -> torch.Tensor:
        if self.fc is None:
            raise RuntimeError("this scene_resnet was pretrained without fc6/fc7 layers "
                               "(backbone.fc=[]): rerun `python -m pipeline.pretrain_backbone` "
                               "with backbone.fc=[fc6,fc7], or use model.arch.image_feature=pooled")
        return self.fc(grid)

    @property
    def fc7_channels(self) -> int:
        if self.fc is None:
            return super().fc7_channels
        return self.fc_widths[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(images))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Pretraining logits through the GAP head."""
        if self.classifier is None:
            raise RuntimeError("this SceneResNet has no pretraining head (num_labels=0)")
        return self.classifier(self.pool(self(images)).flatten(1))


class ResNet152(Backbone):
    """torchvision ResNet-152 up to res5c (``layer4``)."""

    name = "resnet152"

    def __init__(self, input_size: int = 448, torchvision_state: dict | None = None):
        super().__init__()
        from torchvision.models import resnet152

        net = resnet152(weights=None)
        if torchvision_state is not None:
            try:
                missing, unexpected = net.load_state_dict(torchvision_state, strict=False)
            except RuntimeError as e:  # right keys, wrong shapes
                raise ValueError(f"not a torchvision ResNet-152 state dict ({e})") from e
            if missing or unexpected:
                raise ValueError("not a torchvision ResNet-152 state dict "
                                 f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
        self.input_size = int(input_size)
        self.grid_channels = 2048
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                   net.layer1, net.layer2, net.layer3, net.layer4)

    # ResNet has no fc6/fc7 (its only fully connected layer is the ImageNet classifier): pool5
    # stands in, as in later LSTM-CNN reimplementations on ResNet features. An L2-normalised
    # pool5 makes the model's score scale-invariant in the grid again (docs/fidelity.md).
    fc7_source = "pool5 (spatial mean of res5c; ResNet has no fc6/fc7)"

    def fc7(self, grid: torch.Tensor) -> torch.Tensor:
        return self.pooled(grid)

    @property
    def fc7_channels(self) -> int:
        return self.grid_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)


# File names torchvision's hub cache uses for ResNet-152's ImageNet weights (V1 is the one the
# papers' era used; V2 is accepted too).
RESNET152_HUB_FILES = ("resnet152-394f9c45.pth", "resnet152-f82ba261.pth")


def find_resnet152_weights(weights: str | None) -> Path:
    """The weights file to use: ``backbone.weights`` if set, else the torch hub cache.
    Never falls back to random weights: a missing file is an error that says where to put it."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"backbone.weights={weights} does not exist")
        return path
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in RESNET152_HUB_FILES:
        if (hub / name).is_file():
            return hub / name
    raise FileNotFoundError(
        "ResNet-152 ImageNet weights not found. Put torchvision's file "
        f"{RESNET152_HUB_FILES[0]} (https://download.pytorch.org/models/{RESNET152_HUB_FILES[0]}) "
        f"into {hub}/, or pass backbone.weights=/path/to/resnet152.pth. "
        "The pipeline never uses random weights in their place.")


def build_backbone(cfg) -> Backbone:
    """The frozen backbone of the ``backbone`` config group, with its trained weights.

    scene_resnet loads the file the ``pretrain_backbone`` stage wrote (``backbone.weights``);
    resnet152 loads ImageNet weights (:func:`find_resnet152_weights`). A missing file is an
    error naming the stage to run or the place to put it, never a random initialisation."""
    if cfg.name == "scene_resnet":
        path = Path(cfg.weights)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained scene_resnet weights not found at {path}: run "
                                    "`python -m pipeline.pretrain_backbone` (or `dvc repro "
                                    "pretrain_backbone`) first")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = SceneResNet(tuple(saved["channels"]), int(saved["input_size"]), int(saved["num_labels"]),
                          int(saved.get("num_cell_labels", 0)), tuple(saved.get("fc", ())))
        net.load_state_dict(saved["state_dict"])
        if net.input_size != int(cfg.input_size):
            raise ValueError(f"{path} was pretrained at {net.input_size}px but backbone.input_size "
                             f"is {cfg.input_size}")
        return net.freeze()
    if cfg.name == "resnet152":
        path = find_resnet152_weights(cfg.get("weights"))
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            return ResNet152(int(cfg.input_size), state).freeze()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    raise ValueError(f"unknown backbone {cfg.name!r}; available: scene_resnet, resnet152")
