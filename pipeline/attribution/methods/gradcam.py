"""Grad-CAM (Selvaraju et al. 2017, Eq. 1-2): alpha_k = mean_ij dy^c/dA^k_ij,
L = ReLU(sum_k alpha_k A^k), on the ``conv`` point, upsampled to the input."""
from __future__ import annotations

import torch

from pipeline.attribution.base import Explanation, NotApplicable, register


def gradcam_map(activations: torch.Tensor, gradients: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Eq. 1 (channel weights: spatially averaged gradients) and Eq. 2 (ReLU of the weighted
    sum of feature maps): B x K x h x w -> B x h x w. ``relu=False`` keeps the signed sum (the
    evidence-slope check reads where it is negative)."""
    if activations.dim() != 4:
        raise NotApplicable("Grad-CAM needs a spatial conv map (B x K x h x w) at 'conv'")
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    weighted = (weights * activations).sum(dim=1)
    return torch.relu(weighted) if relu else weighted


@register("gradcam")
def gradcam(ctx) -> Explanation:
    activations, gradients = ctx.plain_conv_gradient("gradcam")
    cam = gradcam_map(activations, gradients).detach()
    return Explanation("gradcam", image_map=ctx.upsample(cam), image_map_raw=cam)
