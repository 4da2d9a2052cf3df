"""Hadamard-product visualisation (Kim & Zhang, "Visual explanations from Hadamard product in
multimodal deep networks", 2017), on the final fusion F = Q * V.

With F held constant, the inputs of the Hadamard product are pulled towards its output:

    grad_v = (V - F) dV/dI       guided through ReLUs (the paper's guided backpropagation)
    grad_q = (Q - F) dQ/dq_emb   plain (vector-Jacobian products; F is detached)

i.e. the gradients of 1/2 ||V - F||^2 and 1/2 ||Q - F||^2 with F a constant. They do not depend on
the answer: the method explains what the fusion attends to, not one answer's score.

Post-processing (Eq. 9-11), as read here:

* Eq. 9, image: grad_v is standardised channel-wise, per example and per colour channel c:
  g_c <- (g_c - mean_{x,y} g_c) / std_{x,y} g_c (population std over the H x W pixels; a channel
  with zero spread becomes 0); the image map is sum_c |g_c| (B x H x W, non-negative).
* Eq. 10, question: s_t = sum_d |grad_q[t, d]| over the D embedding dimensions of token t.
* Eq. 11: z-scores of s_t over the real (non-padding) tokens of each question,
  (s_t - mean) / std (population std; a one-word question gets 0); 0 on padding.

``image_map_raw`` is the raw grad_v (B x 3 x H x W), ``question_map`` the z-scores,
``extras["token_saliency"]`` the raw s_t (0 on padding) and ``extras["question_gradient"]`` the
raw grad_q (B x T x D).
"""
from __future__ import annotations

import torch

from pipeline.attribution.base import Explanation, NotApplicable, register
from pipeline.attribution.probe import Probe

NEEDED = ("image", "q_emb", "V", "Q", "F")


def standardise_channels(grad: torch.Tensor) -> torch.Tensor:
    """Eq. 9: per example and channel, subtract the mean over pixels and divide by the
    (population) std; channels without spread become 0. B x C x H x W -> same shape."""
    centred = grad - grad.mean(dim=(2, 3), keepdim=True)
    std = centred.pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
    return centred / torch.where(std > 0, std, torch.ones_like(std))


def token_zscores(saliency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 11: z-score of each real token's saliency within its question; 0 on padding (and
    everywhere in a question whose real tokens all score the same)."""
    real = mask.bool()
    count = real.sum(1, keepdim=True).clamp(min=1)
    mean = torch.where(real, saliency, 0).sum(1, keepdim=True) / count
    centred = torch.where(real, saliency - mean, 0)
    std = (centred.pow(2).sum(1, keepdim=True) / count).sqrt()
    return centred / torch.where(std > 0, std, torch.ones_like(std))


@register("hadamard", reuses_shared_graph=True)
def hadamard(ctx) -> Explanation:
    probe, _ = ctx.gradient_pass()  # guided forward, shared with the gradient family
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

    image_map = standardise_channels(grad_v).abs().sum(1)              # Eq. 9
    mask = ctx.token_mask
    saliency = grad_q.abs().sum(2) * mask                              # Eq. 10
    return Explanation("hadamard", image_map=image_map, image_map_raw=grad_v,
                       question_map=token_zscores(saliency, mask),     # Eq. 11
                       extras={"token_saliency": saliency, "question_gradient": grad_q})
