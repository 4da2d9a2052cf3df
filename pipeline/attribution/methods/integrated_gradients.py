"""Integrated gradients (Sundararajan et al. 2017, Eq. 1) on each modality separately:

    IG_i(x) = (x_i - x'_i) * integral_0^1 dF(x' + a (x - x')) / dx_i da
            ~ (x_i - x'_i) * sum_k w_k dF(x' + a_k (x - x')) / dx_i

with the quadrature of Captum (``method``): ``riemann_trapezoid`` (default; Captum's nodes
a_k = linspace(0, 1, n) and weights 1/n with both ends halved, which sum to 1 - 1/n) or
``gausslegendre`` (Captum's default). F is the target answer's score of ``ctx.score`` (the logit
by default).

- image: IG over the normalised pixels with the question fixed. Baseline option
  ``image_baseline``: ``zeros`` (default; zero after normalisation = the normalisation's mean
  colour) or ``uniform_noise`` (pixels uniform in [0, 1], normalised with the backbone's
  mean/std; option ``seed``, default 0).
- question: IG over the word embeddings (point ``q_emb``) with the image fixed; baseline: zero
  vectors at the question's tokens, padding positions kept as they are (so they get exactly 0).
  The model is run with ``q_emb``'s output replaced by the interpolated embeddings
  (``pipeline.attribution.probe.replacing``), and gradients are taken with respect to that
  tensor. The image is fixed, so the backbone runs once and the head runs on its features
  (VQAModel contract).

Interpolation steps are batched: ``internal_batch_size`` steps (each for the whole batch) per
forward; ``steps`` (default 32) nodes in all, or ``image_steps`` / ``question_steps`` for one
modality (an image step costs a backbone forward and backward per question, a question step only
the head).

Outputs: ``image_map`` = sum over colour channels of |IG| (B x H x W), ``image_map_raw`` = IG
(B x 3 x H x W); ``question_map`` = sum over embedding dimensions of IG per token (signed, 0 on
padding), ``extras["question_attr_abs"]`` = the sum of |IG|, ``extras["question_map_raw"]`` = IG
(B x T x E). ``extras["completeness"][modality]`` holds per example ``attribution_sum``,
``score_difference`` = F(x) - F(baseline) and their ``error``: the approximation error, which
shrinks with more steps (Eq. 1 is exact in the limit; Captum's trapezoid weights add a -1/n bias).
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.attribution.base import Explanation, register
from pipeline.attribution.probe import recording, replacing

NAME = "integrated_gradients"
METHODS = ("riemann_trapezoid", "gausslegendre")
BASELINES = ("zeros", "uniform_noise")


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """(alphas, weights) of Captum's approximation ``method`` with ``steps`` nodes."""
    if method == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("integrated_gradients.steps must be at least 2 for riemann_trapezoid")
        weights = [1 / steps] * steps
        weights[0] /= 2
        weights[-1] /= 2
        return torch.linspace(0, 1, steps).tolist(), weights
    if method == "gausslegendre":
        if steps < 1:
            raise ValueError("integrated_gradients.steps must be at least 1")
        nodes, w = np.polynomial.legendre.leggauss(steps)
        return (0.5 * (1 + nodes)).tolist(), (0.5 * w).tolist()
    raise ValueError(f"integrated_gradients.method must be one of {METHODS}, got {method!r}")


def _integrate(ctx, run, x: torch.Tensor, baseline: torch.Tensor, alphas, weights,
               chunk: int) -> torch.Tensor:
    """(x - baseline) * sum_k w_k dF/dz at z = baseline + a_k (x - baseline), where
    ``run(z, k)`` gives the logits of k stacked copies of the batch (step-major)."""
    batch = x.shape[0]
    diff = x - baseline
    total = torch.zeros_like(x)
    for start in range(0, len(alphas), chunk):
        a, w = alphas[start:start + chunk], weights[start:start + chunk]
        z = torch.cat([baseline + alpha * diff for alpha in a]).requires_grad_(True)
        with torch.enable_grad():
            logits = run(z, len(a)).unflatten(0, (len(a), batch))
            score = sum(ctx.score(step, "integrated_gradients") for step in logits)  # examples are independent
            grad, = torch.autograd.grad(score, z)
        step_weights = torch.tensor(w, dtype=grad.dtype, device=grad.device)
        total += (grad.unflatten(0, (len(a), batch))
                  * step_weights.view(-1, *[1] * x.dim())).sum(0)
    return total * diff


def _image_baseline(ctx, kind: str) -> torch.Tensor:
    images = ctx.images.detach()
    if kind == "zeros":
        return torch.zeros_like(images)
    if kind == "uniform_noise":
        backbone = ctx.model.backbone
        generator = torch.Generator().manual_seed(int(ctx.option(NAME, "seed", 0)))
        pixels = torch.rand(images.shape, generator=generator, dtype=images.dtype)
        mean = torch.tensor(backbone.mean, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(backbone.std, dtype=images.dtype).view(1, -1, 1, 1)
        return ((pixels - mean) / std).to(images.device)
    raise ValueError(f"integrated_gradients.image_baseline must be one of {BASELINES}, got {kind!r}")


def _completeness(attributions: torch.Tensor, at_input: torch.Tensor, at_baseline: torch.Tensor) -> dict:
    total = attributions.flatten(1).sum(1)
    difference = at_input - at_baseline
    return {"attribution_sum": total, "score_difference": difference, "error": total - difference}


@register(NAME)
def integrated_gradients(ctx) -> Explanation:
    steps = int(ctx.option(NAME, "steps", 32))
    # Each image step is a backbone forward and backward per question; a question step runs the
    # head alone. So the two may take different numbers of steps (default: ``steps`` for both).
    image_steps = int(ctx.option(NAME, "image_steps", None) or steps)
    question_steps = int(ctx.option(NAME, "question_steps", None) or steps)
    method = ctx.option(NAME, "method", "riemann_trapezoid")
    chunk = int(ctx.option(NAME, "internal_batch_size", 32))
    if chunk < 1:
        raise ValueError("integrated_gradients.internal_batch_size must be at least 1")
    alphas, weights = quadrature(method, image_steps)
    baseline_kind = ctx.option(NAME, "image_baseline", "zeros")
    model, images, tokens = ctx.model, ctx.images.detach(), ctx.tokens
    target = ctx.target  # given, or predicted (ctx runs the forward)

    # F(x) per example (completeness compares it with the attributions' sum), recording the word
    # embeddings on the way.
    with recording(model, ["q_emb"]) as recorded, torch.no_grad():
        at_input = ctx.score(model(images, tokens), NAME, per_example=True)

    # Image, question fixed.
    image_baseline = _image_baseline(ctx, baseline_kind)
    image_ig = _integrate(ctx, lambda z, k: model(z, tokens.repeat(k, 1)), images, image_baseline,
                          alphas, weights, chunk).detach()
    with torch.no_grad():
        at_image_baseline = ctx.score(model(image_baseline, tokens), NAME, per_example=True)
    extras = {"image_baseline": image_baseline, "image_steps": image_steps,
              "question_steps": question_steps, "method": method, "target": target,
              "completeness": {"image": _completeness(image_ig, at_input, at_image_baseline)}}

    # Question (word embeddings), image fixed.
    question_map = None
    if "q_emb" in recorded:
        embeddings = recorded["q_emb"].detach()
        mask = ctx.token_mask.to(embeddings.dtype)
        q_baseline = embeddings * (1 - mask)[..., None]  # 0 on tokens, padding as it is
        with torch.no_grad():
            features = model.backbone(images)

        def run_head(z, k):
            # The interpolated embeddings z (k stacked copies of the batch) stand in for q_emb.
            with replacing(model, "q_emb", z):
                return model.head(features.repeat(k, *[1] * (features.dim() - 1)), tokens.repeat(k, 1))

        alphas, weights = quadrature(method, question_steps)
        question_ig = _integrate(ctx, run_head, embeddings, q_baseline, alphas, weights,
                                 chunk).detach()
        with torch.no_grad():
            at_question_baseline = ctx.score(run_head(q_baseline, 1), NAME, per_example=True)
        question_ig = question_ig * mask[..., None]
        question_map = question_ig.sum(2)
        extras["question_attr_abs"] = question_ig.abs().sum(2)
        extras["question_map_raw"] = question_ig
        extras["completeness"]["question"] = _completeness(question_ig, at_input, at_question_baseline)
    return Explanation(NAME, image_map=image_ig.abs().sum(1), image_map_raw=image_ig,
                       question_map=question_map, extras=extras)
