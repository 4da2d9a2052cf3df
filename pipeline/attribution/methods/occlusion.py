"""Occlusion (Goyal et al. 2016, "Towards transparent AI systems: interpreting visual question
answering models", section 3.2, "discrete derivatives"): how much the explained answer's
probability falls when part of the input is hidden. Definitions and options: docs/methods.md.

    image:    the image is cut into a G x G grid of patches (H / G x W / G pixels); patch (i, j)
              is painted one colour, by default the ImageNet mean (exactly 0 after normalisation);
              importance(i, j) = p(a_hat | I, Q) - p(a_hat | I with patch (i, j) occluded, Q)
    question: word t is dropped (removed and the rest shifted left, not replaced by UNK or by
              padding in place); importance(t) = p(a_hat | I, Q) - p(a_hat | I, Q without word t)

with p the softmax probability and a_hat the explained answer (``ctx.target``). Both maps are
signed: hiding a distractor can raise the probability. Every occlusion that changes the predicted
answer (the argmax) is recorded as a flip, for the failure-prediction study.

Shared work (docs/methods.md, "Shared passes"): the backbone is frozen and question-independent,
so each distinct image's occluded copies go through it once, in batches, and serve every question
about that image; each question's feature is computed once and reused for all patches; each
image's original grid is computed once and reused for all dropped-word variants.
"""
from __future__ import annotations

import contextlib

import torch

from pipeline.attribution.base import Explanation, register
from pipeline.attribution.probe import recording, replacing

MODALITIES = ("image", "question")


def patch_size(input_size: tuple[int, int], grid: int) -> tuple[int, int]:
    """(height, width) of the patches of a ``grid`` x ``grid`` tiling of ``input_size``."""
    height, width = input_size
    if grid < 1 or height % grid or width % grid:
        valid = [g for g in range(1, min(height, width) + 1) if height % g == 0 and width % g == 0]
        raise ValueError(f"occlusion grid {grid} does not tile {height} x {width} images into "
                         f"equal patches; the grid must divide both sides: one of {valid}")
    return height // grid, width // grid


def patch_colour(value, channels: int) -> torch.Tensor:
    """The occluding colour in normalised units, C x 1 x 1. ``None`` is the ImageNet mean colour,
    which normalisation maps to exactly 0; else one value for all channels or one per channel."""
    if value is None:
        return torch.zeros(channels, 1, 1)
    colour = torch.as_tensor(value, dtype=torch.float32).flatten()
    if colour.numel() not in (1, channels):
        raise ValueError(f"occlusion patch_value needs 1 or {channels} values in normalised "
                         f"units, got {colour.numel()}")
    return colour.expand(channels)[:, None, None]


def drop_word(tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Each row of ``tokens`` (N x T, padding 0 at the end) without its word at ``position`` (N):
    the later words shift left and a padding token fills the end."""
    n, length = tokens.shape
    keep = torch.arange(length - 1).expand(n, -1)
    keep = keep + (keep >= position[:, None]).long()
    return torch.cat([tokens.gather(1, keep), tokens.new_zeros(n, 1)], dim=1)


def distinct_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct images in order of first appearance, the index of each row's image among
    them). Exact comparison, row against the distinct images found so far: questions about one
    image come together, so this is a few comparisons per row (and far cheaper than sorting
    the rows, which ``torch.unique(dim=0)`` does)."""
    flat = images.flatten(1)
    first: list[int] = []
    owner = torch.empty(len(images), dtype=torch.long)
    for row in range(len(images)):
        for u in range(len(first) - 1, -1, -1):  # the latest image is the likeliest match
            if torch.equal(flat[row], flat[first[u]]):
                owner[row] = u
                break
        else:
            owner[row] = len(first)
            first.append(row)
    return images[first], owner


def _chunks(n: int, size: int):
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


def _occlude_patches(ctx, backbone, distinct, owner, q0, probability0, prediction, target, grid,
                     colour, batch_size):
    """p(a_hat | occluded) and the answers, each B x G*G (patch index = row * G + column)."""
    model, tokens = ctx.model, ctx.tokens
    ph, pw = patch_size(ctx.input_size, grid)
    # An occlusion that leaves the input unchanged (the patch already has the patch colour) has
    # importance exactly 0 by definition: keep p(original) and the prediction, and do not run it,
    # so that it picks up no batch-dependent rounding either.
    probabilities = probability0[:, None].repeat(1, grid * grid)
    answers = prediction[:, None].repeat(1, grid * grid)
    # Questions about the same image share its occluded copies.
    for u, image in enumerate(distinct):
        questions = (owner == u).nonzero().flatten().tolist()
        patches = image.unflatten(1, (grid, ph)).unflatten(3, (grid, pw))  # C x G x ph x G x pw
        changed = (patches != colour[:, :, :, None, None]).any(dim=(0, 2, 4))  # G x G
        changed = changed.flatten().nonzero()[:, 0]
        for part in _chunks(len(changed), batch_size):
            index = changed[part]
            copies = image.expand(len(index), -1, -1, -1).clone()
            for n, k in enumerate(index.tolist()):
                i, j = divmod(k, grid)
                copies[n, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = colour
            occluded = backbone(copies)  # the only backbone pass of these copies
            for b in questions:
                # The question branch once for all patches: this question's feature from the
                # original pass stands in for the encoder, which then does not run (a model
                # without a point ``q`` runs its encoder on the question's tokens).
                with contextlib.nullcontext() if q0 is None else replacing(model, "q", q0[b:b + 1]):
                    logits = model.head(occluded, tokens[b:b + 1].expand(len(index), -1))
                probabilities[b, index] = torch.softmax(logits, 1)[:, target[b]]
                answers[b, index] = logits.argmax(1)
    return probabilities, answers


def _drop_words(ctx, grid0, target, batch_size):
    """One variant per real word: (question row, position, p(a_hat | dropped), answer), each N."""
    owner, position = ctx.token_mask.nonzero(as_tuple=True)
    dropped = drop_word(ctx.tokens[owner], position)
    probabilities = torch.empty(len(owner), dtype=grid0.dtype)
    answers = torch.empty(len(owner), dtype=torch.long)
    for part in _chunks(len(owner), batch_size):
        # The image branch once for all variants: the original grid, not a new backbone pass.
        logits = ctx.model.head(grid0[owner[part]], dropped[part])
        probabilities[part] = torch.softmax(logits, 1).gather(1, target[owner[part], None])[:, 0]
        answers[part] = logits.argmax(1)
    return owner, position, probabilities, answers


@register("occlusion")
def occlusion(ctx) -> Explanation:
    """Goyal et al. 2016, section 3.2 (definitions in the module docstring). Options
    (``options["occlusion"]``): ``grid`` G (default 16), ``patch_value`` (None = the ImageNet
    mean colour, else 1 or C values in normalised units), ``batch_size`` (occluded copies or
    question variants per forward, default 64), ``fold_batchnorm`` (default True: the copies run
    through the backbone with BatchNorm folded into its convolutions, ~20% faster, equal to float
    rounding), ``modalities`` (default both: ``image``,
    ``question``; one alone skips the other's passes).

    ``image_map_raw`` B x G x G, ``image_map`` B x H x W (each pixel its patch's value),
    ``question_map`` B x T (0 on padding). ``extras``: ``prediction`` (B), ``answers_image``
    (B x G x G) and ``answers_question`` (B x T; the prediction on padding) under each occlusion,
    ``image_flips`` / ``question_flips`` (answer != prediction) and ``flip_counts``."""
    grid = int(ctx.option("occlusion", "grid", 16))
    batch_size = int(ctx.option("occlusion", "batch_size", 64))
    ph, pw = patch_size(ctx.input_size, grid)
    colour = patch_colour(ctx.option("occlusion", "patch_value", None), ctx.images.shape[1])
    target = ctx.target  # outside inference mode: an unset target comes from the gradient pass
    model, tokens = ctx.model, ctx.tokens
    modalities = list(ctx.option("occlusion", "modalities", MODALITIES))
    if not modalities or set(modalities) - set(MODALITIES):
        raise ValueError(f"occlusion.modalities must be a non-empty subset of {list(MODALITIES)}, "
                         f"got {modalities}")
    backbone = ctx.inference_backbone(bool(ctx.option("occlusion", "fold_batchnorm", True)))
    with torch.inference_mode():
        # Rows are grouped by image content (a repeated image need not share storage, so data
        # pointers would miss it): the original grid is computed once per distinct image.
        distinct, owner = distinct_images(ctx.images)
        with recording(model, ["q"]) as captured:
            grid0 = backbone(distinct)[owner]
            logits0 = model.head(grid0, tokens)
        probability0 = torch.softmax(logits0, 1).gather(1, target[:, None])[:, 0]
        prediction = logits0.argmax(1)

        image_raw = answers_image = question_map = answers_question = None
        if "image" in modalities:
            p_image, answers_image = _occlude_patches(ctx, backbone, distinct, owner, captured.get("q"),
                                                      probability0, prediction, target, grid,
                                                      colour, batch_size)
            image_raw = (probability0[:, None] - p_image).view(-1, grid, grid)
            answers_image = answers_image.view(-1, grid, grid)
        if "question" in modalities:
            words, position, p_words, answers_words = _drop_words(ctx, grid0, target, batch_size)
            question_map = torch.zeros(tokens.shape, dtype=probability0.dtype)
            question_map[words, position] = probability0[words] - p_words
            answers_question = prediction[:, None].repeat(1, tokens.shape[1])
            answers_question[words, position] = answers_words
    # Inference tensors cannot be changed in place outside inference mode: hand back ordinary
    # tensors (clones) so that callers may normalise the maps in place.
    prediction = prediction.clone()
    extras = {"prediction": prediction, "flip_counts": {}}
    image_map = None
    if image_raw is not None:
        image_raw, answers_image = image_raw.clone(), answers_image.clone()
        image_map = image_raw.repeat_interleave(ph, 1).repeat_interleave(pw, 2)  # nearest upsampling
        extras.update(answers_image=answers_image,
                      image_flips=answers_image != prediction[:, None, None])
        extras["flip_counts"]["image"] = extras["image_flips"].flatten(1).sum(1)
    if question_map is not None:
        question_map, answers_question = question_map.clone(), answers_question.clone()
        extras.update(answers_question=answers_question,
                      question_flips=answers_question != prediction[:, None])
        extras["flip_counts"]["question"] = extras["question_flips"].sum(1)
    return Explanation("occlusion", image_map=image_map, image_map_raw=image_raw,
                       question_map=question_map, extras=extras)
