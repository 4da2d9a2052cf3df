"""Question-gated Grad-CAM (Ummettuguli): Grad-CAM through only the fusion neurons that depend
most on the question.

    s_i = sum_j |dF_i / dq_j|      per example, F the fusion activations (joint width D), q the
                                   question feature at point ``q`` (the full Jacobian, autograd)
    keep the top-n neurons by s_i (option ``top_n``, default 10; n >= D keeps all),
    g_F = d y^c / dF  masked to the kept neurons,  g_A = g_F^T dF/dA  at the ``conv`` point A,
    map = ReLU(sum_k mean_ij(g_A^k) A^k)   (Grad-CAM, Selvaraju et al. Eq. 1-2)

With n = D the mask is all ones and the map is Grad-CAM's (the score depends on A only through F).
Extras: ``neuron_scores`` (B x D), ``top_neurons`` (B x n, by score descending, ties by index)
and ``top_values`` (their scores).
"""
from __future__ import annotations

import torch

from pipeline.attribution.base import Explanation, NotApplicable, register
from pipeline.attribution.methods.gradcam import gradcam_map
from pipeline.attribution.probe import Probe

# Bound on the number of Jacobian entries held at once (chunks of the joint dimensions).
_MAX_JACOBIAN_ELEMENTS = 1 << 24


def neuron_scores(F: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """s[b, i] = sum_j |dF[b, i] / dq[b, j]|, B x D. Examples are independent (eval mode), so
    one batched vector-Jacobian product per joint dimension i holds every example's row i."""
    B, D = F.shape
    chunk = max(1, min(D, _MAX_JACOBIAN_ELEMENTS // max(1, B * q[0].numel())))
    scores = []
    for start in range(0, D, chunk):
        rows = torch.arange(start, min(D, start + chunk), device=F.device)
        basis = torch.zeros(len(rows), B, D, dtype=F.dtype, device=F.device)
        basis[torch.arange(len(rows)), :, rows] = 1
        try:
            jac, = torch.autograd.grad(F, q, grad_outputs=basis, retain_graph=True,
                                       is_grads_batched=True, allow_unused=True)
        except RuntimeError:  # an op without a batching rule: one backward per neuron
            jac = torch.stack([torch.autograd.grad(F, q, grad_outputs=b, retain_graph=True,
                                                   allow_unused=True)[0] for b in basis])
        if jac is None:  # F does not depend on q at all
            jac = torch.zeros(len(rows), *q.shape, dtype=q.dtype, device=q.device)
        scores.append(jac.abs().flatten(2).sum(2).T)  # len(rows) x B -> B x len(rows)
    return torch.cat(scores, dim=1)


def rank_neurons(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's neuron scores (B x D), by score descending and, among
    equal scores, by index ascending (a stable sort: the gate is the same on every run)."""
    return torch.sort(scores, dim=1, descending=True, stable=True)


def gated_map(probe: Probe, grad_F: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Grad-CAM through the kept fusion neurons only: mask = 1 on ``top`` (B x n neuron indices),
    g_A = (dy/dF * mask)^T dF/dA at the probe's ``conv`` point A, and the map
    ReLU(sum_k mean_ij(g_A^k) A^k) (Selvaraju et al. Eq. 1-2), B x h x w. ``grad_F`` is dy/dF
    from the same probe; the probe's graph is kept, so that one forward serves many gates."""
    F, conv = probe["F"], probe["conv"]
    mask = torch.zeros_like(F).scatter_(1, top, 1.0)
    grad_conv, = probe.grad(F, ["conv"], grad_outputs=grad_F * mask)
    return gradcam_map(conv, grad_conv).detach()


@register("gated_gradcam", reuses_shared_graph=True)
def gated_gradcam(ctx) -> Explanation:
    probe = ctx.guided_probe()
    missing = [n for n in ("conv", "q", "F") if n not in probe]
    if missing:
        raise NotApplicable(f"question-gated Grad-CAM needs analysis points {missing}")
    if probe.relu_after("conv") or probe.relu_after("q"):
        # Guided ReLUs would change dF/dA or dF/dq: take plain gradients from a plain pass.
        probe = Probe(ctx.model, ctx.images, ctx.tokens, guided=False)
    F, q = probe["F"], probe["q"]
    if F.dim() != 2:
        raise NotApplicable("question-gated Grad-CAM needs fusion activations F of shape B x D")

    scores = neuron_scores(F, q).detach()
    n = min(int(ctx.option("gated_gradcam", "top_n", 10)), F.shape[1])
    if n < 1:
        raise ValueError(f"gated_gradcam top_n must be at least 1, got {n}")
    values, order = rank_neurons(scores)
    top, top_values = order[:, :n], values[:, :n]

    grad_F, = probe.grad(ctx.score(probe.logits, "gated_gradcam"), ["F"])
    cam = gated_map(probe, grad_F, top)
    return Explanation("gated_gradcam", image_map=ctx.upsample(cam), image_map_raw=cam,
                       extras={"neuron_scores": scores, "top_neurons": top,
                               "top_values": top_values})
