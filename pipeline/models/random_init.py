"""Random ResNet-152 weights whose activations stay in range: for tests and timings only.

The pipeline's stages never use random weights (``find_resnet152_weights`` stops them when the
ImageNet file is missing); the tests, which cannot download that file, and the benchmark's
ResNet-152 entry, whose timings do not depend on the weights' values, use these instead, passed
as ``backbone.weights=<file>`` or labelled "random-init weights (timing only)".
"""
from __future__ import annotations

import torch
from torch import nn


def random_init_resnet152_state_dict(seed: int = 0, images: int = 4, size: int = 224,
                                     residual_scale: float = 0.2) -> dict:
    """A *randomly initialised* torchvision ResNet-152 state dict, for tests and timings only:
    no stage ever uses it (they need :func:`find_resnet152_weights`).

    torchvision's initialisation leaves BatchNorm at identity (mean 0, var 1, weight 1), so the
    residual stream grows block after block and res5c reaches ~1e8, far beyond float16. Here:

    - each residual branch's last BatchNorm (``bn3``) gets weight ``residual_scale``, so that a
      block adds a damped branch to its input (``zero_init_residual`` in small): the stream does
      not grow with depth;
    - every BatchNorm's running statistics are those of its own input over ``images`` random
      images of ``size`` px, half white noise and half smooth (bilinearly upsampled 7 x 7 noise,
      closer to natural images): one forward in training mode with cumulative averaging
      (``momentum=None``) normalises each layer with the batch statistics of its input, given
      that every earlier layer is normalised, and records exactly those.

    In eval mode each BatchNorm output then has about zero mean and unit variance, and res5c
    stays in the units (max ~5-7, std ~0.5-0.7 at 224 and 448 px) on noise, smooth, constant and
    synthetic-scene images alike. (Statistics from white noise alone fit other images badly, and
    the mismatch compounds over 150 layers: res5c ~2e4 on the synthetic scenes.) The weights stay
    random: the features mean nothing, and timings do not depend on them."""
    from torchvision.models import resnet152
    from torchvision.models.resnet import Bottleneck

    generator = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = resnet152(weights=None)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: after one batch, exactly its statistics
        if isinstance(module, Bottleneck):
            nn.init.constant_(module.bn3.weight, float(residual_scale))
    size, white = int(size), int(images) - int(images) // 2
    smooth = torch.randn(int(images) - white, 3, 7, 7, generator=generator)
    calibration = torch.cat([
        torch.randn(white, 3, size, size, generator=generator),
        1.5 * nn.functional.interpolate(smooth, size=(size, size), mode="bilinear",
                                        align_corners=False)])
    net.train()
    with torch.no_grad():
        net(calibration)
    return net.state_dict()
