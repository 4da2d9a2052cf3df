"""Guided backpropagation (Springenberg et al. 2015) on both inputs, as Goyal et al. use it
(section 3, Eq. 3): the gradient of the answer's probability (their choice; option ``score``)
through ReLUs that pass only positive gradient where their input was positive. Image map: sum over colour channels of |gradient|; question map: the L2 norm of the
gradient at each word embedding."""
from __future__ import annotations

from pipeline.attribution.base import Explanation, register


@register("guided_backprop")
def guided_backprop(ctx) -> Explanation:
    _, grads = ctx.gradient_pass("guided_backprop")
    pixels = grads["image"].detach()
    question = None
    if "q_emb" in grads:
        question = grads["q_emb"].detach().norm(dim=2) * ctx.token_mask
    return Explanation("guided_backprop", image_map=pixels.abs().sum(1), image_map_raw=pixels,
                       question_map=question)
