"""The model's own learned attention as a baseline (not a method): MLB's glimpses alpha
(Eq. 4 of Kim et al., B x G x S softmax over the S = h x w cells of the ``conv`` grid).

``image_map_raw``: B x G x h x w, every glimpse on the grid (the Hadamard study's glimpse columns);
``image_map``: the mean over glimpses, upsampled to the input."""
from __future__ import annotations

from pipeline.attribution.base import Explanation, NotApplicable, register


@register("attention")
def attention(ctx) -> Explanation:
    probe = ctx.guided_probe()  # its forward is shared; attention needs no gradient
    if "alpha" not in probe:
        raise NotApplicable("the model has no attention (no 'alpha' point)")
    if "conv" not in probe or probe["conv"].dim() != 4:
        raise NotApplicable("attention maps need the conv grid (B x K x h x w at 'conv') for their shape")
    alpha = probe["alpha"].detach()
    h, w = probe["conv"].shape[-2:]
    if alpha.dim() != 3 or alpha.shape[2] != h * w:
        raise NotApplicable(f"attention of shape {tuple(alpha.shape)} does not cover the "
                            f"{h} x {w} conv grid")
    B, G, _ = alpha.shape
    grid = alpha.reshape(B, G, h, w)
    return Explanation("attention", image_map=ctx.upsample(grid.mean(1)), image_map_raw=grid)
