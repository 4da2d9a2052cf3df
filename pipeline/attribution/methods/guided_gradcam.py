"""Guided Grad-CAM (Selvaraju et al. 2017, section 3): guided backpropagation multiplied
element-wise by the upsampled Grad-CAM map. Reuses both from the shared pass."""
from __future__ import annotations

from pipeline.attribution.base import Explanation, register
from pipeline.attribution.methods.gradcam import gradcam_map


@register("guided_gradcam")
def guided_gradcam(ctx) -> Explanation:
    activations, gradients = ctx.plain_conv_gradient("guided_gradcam")
    cam = ctx.upsample(gradcam_map(activations, gradients).detach())
    _, grads = ctx.gradient_pass("guided_gradcam")  # its score for both factors (Grad-CAM paper)
    product = grads["image"].detach() * cam[:, None]
    return Explanation("guided_gradcam", image_map=product.abs().sum(1), image_map_raw=product)
