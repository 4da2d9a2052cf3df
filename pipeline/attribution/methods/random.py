"""A random baseline: i.i.d. uniform [0, 1) values on the ``conv`` grid (B x h x w, upsampled
like Grad-CAM) and on the real tokens of each question (0 on padding).

Each question's maps come from its own generator, seeded by the option ``seed`` (default 0) and
a checksum of that question's tokens and image: the same question gets the same maps however
the questions are batched or split across processes, and different questions get different
ones, whatever the global RNG state."""
from __future__ import annotations

import zlib

import torch

from pipeline.attribution.base import Explanation, NotApplicable, register

NAME = "random"  # the baseline every evaluation compares against


def _row_seed(seed: int, tokens: torch.Tensor, image: torch.Tensor) -> int:
    digest = zlib.crc32(tokens.detach().cpu().numpy().tobytes())
    digest = zlib.crc32(image.detach().cpu().numpy().tobytes(), digest)
    return (int(seed) * 1_000_003 + digest) % (2**63)


@register(NAME)
def random_map(ctx) -> Explanation:
    probe = ctx.guided_probe()  # only for the grid's shape; the forward is shared
    if "conv" not in probe or probe["conv"].dim() != 4:
        raise NotApplicable("the random baseline needs a conv grid (B x K x h x w at 'conv')")
    B, _, h, w = probe["conv"].shape
    seed = int(ctx.option(NAME, "seed", 0))
    grids, questions = [], []
    for row in range(B):
        generator = torch.Generator().manual_seed(_row_seed(seed, ctx.tokens[row], ctx.images[row]))
        grids.append(torch.rand(h, w, generator=generator))
        questions.append(torch.rand(ctx.tokens.shape[1], generator=generator))
    device = probe["conv"].device
    grid = torch.stack(grids).to(device)
    question = torch.stack(questions).to(device) * ctx.token_mask
    return Explanation(NAME, image_map=ctx.upsample(grid), image_map_raw=grid,
                       question_map=question)
