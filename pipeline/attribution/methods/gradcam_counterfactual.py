"""Counterfactual Grad-CAM (Selvaraju et al. 2017, "Counterfactual Explanations"): Grad-CAM's
Eq. 1-2 with the gradient negated, alpha_k = mean_ij(-dy^c/dA^k_ij), L = ReLU(sum_k alpha_k A^k).
It maps the evidence *against* the answer: the regions whose features lower y^c, so that
weakening them would raise it. Grad-CAM minus this map is the signed Grad-CAM sum."""
from __future__ import annotations

from pipeline.attribution.base import Explanation, register
from pipeline.attribution.methods.gradcam import gradcam_map

NAME = "gradcam_counterfactual"


@register(NAME)
def gradcam_counterfactual(ctx) -> Explanation:
    activations, gradients = ctx.plain_conv_gradient("gradcam_counterfactual")  # the pass Grad-CAM reads: no extra cost
    cam = gradcam_map(activations, -gradients).detach()
    return Explanation(NAME, image_map=ctx.upsample(cam), image_map_raw=cam)
