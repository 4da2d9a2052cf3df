"""A random baseline: i.i.d. uniform [0, 1) values on the ``conv`` grid (B x h x w, upsampled
like Grad-CAM) and on the real tokens of each question (0 on padding). Deterministic from the
option ``seed`` (default 0) through its own ``torch.Generator``: the same seed and batch shape
give the same maps, whatever the images, questions or global RNG state."""
from __future__ import annotations

import torch

from pipeline.attribution.base import Explanation, NotApplicable, register


@register("random")
def random_map(ctx) -> Explanation:
    probe, _ = ctx.gradient_pass()  # only for the grid's shape; the forward is shared
    if "conv" not in probe or probe["conv"].dim() != 4:
        raise NotApplicable("the random baseline needs a conv grid (B x K x h x w at 'conv')")
    B, _, h, w = probe["conv"].shape
    generator = torch.Generator().manual_seed(int(ctx.option("random", "seed", 0)))
    grid = torch.rand(B, h, w, generator=generator)
    question = torch.rand(ctx.tokens.shape, generator=generator) * ctx.token_mask
    device = probe["conv"].device
    grid, question = grid.to(device), question.to(device)
    return Explanation("random", image_map=ctx.upsample(grid), image_map_raw=grid,
                       question_map=question)
