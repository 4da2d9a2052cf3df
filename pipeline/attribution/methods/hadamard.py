"""Hadamard-product visualisation (Kim & Zhang, "Visual explanations from Hadamard product in
multimodal deep networks", 2017), on the final fusion F = Q * V.

With F held constant, the inputs of the Hadamard product are pulled towards its output:

    grad_v = (V - F) dV/dI       guided through ReLUs (the paper's guided backpropagation)
    grad_q = (Q - F) dQ/dq_emb   plain (vector-Jacobian products; F is detached)

i.e. the gradients of 1/2 ||V - F||^2 and 1/2 ||Q - F||^2 with F a constant. They do not depend on
the answer: the method explains what the fusion attends to, not one answer's score.

Post-processing (Eq. 9-11), as read here:

* Eq. 9, image: grad_v is standardised channel-wise, per example and per colour channel c:
  g_c <- (g_c - mean_{x,y} g_c) / std_{x,y} g_c (a channel with zero spread becomes 0); the
  image map is sum_c |g_c| (B x H x W, non-negative).
* Eq. 10, question: s_t = sum_d |grad_q[t, d]| over the D embedding dimensions of token t.
* Eq. 11: z-scores of s_t over the real (non-padding) tokens of each question,
  (s_t - mean) / std (a one-word question gets 0); 0 on padding.

``std`` is the sample standard deviation (divisor n - 1) by default: every row of z-scores
printed in Kim et al.'s Figs. 2-5 has sum z^2 = n - 1 (docs/methods.md). Option ``std:
population`` divides by n instead. On a question it scales all z-scores by one factor, on the
image all pixels: rankings do not change, the printed values do.

``image_map_raw`` is the raw grad_v (B x 3 x H x W), ``question_map`` the z-scores,
``extras["token_saliency"]`` the raw s_t (0 on padding) and ``extras["question_gradient"]`` the
raw grad_q (B x T x D).
"""
from __future__ import annotations

import torch

from pipeline.attribution.base import Explanation, NotApplicable, register
from pipeline.attribution.probe import Probe

NEEDED = ("image", "q_emb", "V", "Q", "F")


STD_CONVENTIONS = {"sample": 1, "population": 0}   # name -> delta degrees of freedom


def _ddof(std: str) -> int:
    if std not in STD_CONVENTIONS:
        raise ValueError(f"hadamard std must be one of {sorted(STD_CONVENTIONS)}, got {std!r}")
    return STD_CONVENTIONS[std]


def standardise_channels(grad: torch.Tensor, std: str = "sample") -> torch.Tensor:
    """Eq. 9: per example and channel, subtract the mean over pixels and divide by the std
    (``std``: "sample" or "population"); channels without spread become 0. B x C x H x W."""
    pixels = grad.shape[2] * grad.shape[3]
    centred = grad - grad.mean(dim=(2, 3), keepdim=True)
    spread = (centred.pow(2).sum(dim=(2, 3), keepdim=True) / max(pixels - _ddof(std), 1)).sqrt()
    return centred / torch.where(spread > 0, spread, torch.ones_like(spread))


def token_zscores(saliency: torch.Tensor, mask: torch.Tensor, std: str = "sample") -> torch.Tensor:
    """Eq. 11: z-score of each real token's saliency within its question; 0 on padding (and
    everywhere in a question of one real token, or whose real tokens all score the same)."""
    real = mask.bool()
    count = real.sum(1, keepdim=True)
    mean = torch.where(real, saliency, 0).sum(1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(real, saliency - mean, 0)
    spread = (centred.pow(2).sum(1, keepdim=True) / (count - _ddof(std)).clamp(min=1)).sqrt()
    return centred / torch.where(spread > 0, spread, torch.ones_like(spread))


@register("hadamard", reuses_shared_graph=True)
def hadamard(ctx) -> Explanation:
    """Kim et al. Eq. 2-3, then Eq. 9-11. Option (``options["hadamard"]``): ``std``, "sample"
    (default, as the paper's printed z-scores) or "population"."""
    std = ctx.option("hadamard", "std", "sample")
    _ddof(std)  # a bad value fails before any pass
    probe = ctx.guided_probe()  # guided forward, shared with the gradient family
    missing = [n for n in NEEDED if n not in probe]
    if missing:
        raise NotApplicable(f"Hadamard visualisation needs analysis points {missing}")
    V, Q, F = probe["V"], probe["Q"], probe["F"]
    grad_v, = probe.grad(V, ["image"], grad_outputs=(V - F).detach())
    # The question side is plain: when a ReLU could sit between q_emb and Q, the guided pass
    # cannot be reused for it.
    qprobe = probe
    if probe.relu_after("q_emb"):
        qprobe = Probe(ctx.model, ctx.images, ctx.tokens, guided=False)
    Qp, Fp = qprobe["Q"], qprobe["F"]
    grad_q, = qprobe.grad(Qp, ["q_emb"], grad_outputs=(Qp - Fp).detach())
    grad_v, grad_q = grad_v.detach(), grad_q.detach()

    image_map = standardise_channels(grad_v, std).abs().sum(1)         # Eq. 9
    mask = ctx.token_mask
    saliency = grad_q.abs().sum(2) * mask                              # Eq. 10
    return Explanation("hadamard", image_map=image_map, image_map_raw=grad_v,
                       question_map=token_zscores(saliency, mask, std),  # Eq. 11
                       extras={"token_saliency": saliency, "question_gradient": grad_q})
