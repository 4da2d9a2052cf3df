"""The library under the ``evidence_slope`` stage: does the explained answer's score rise when
the ground-truth cells' features grow, and what the signed Grad-CAM map says about it; the
per-answer-type summary of those measurements."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.attribution.methods.gradcam import gradcam_map
from pipeline.evaluation.stats import bootstrap_ci


def evidence_slope(head, grid: torch.Tensor, tokens: torch.Tensor, masks: torch.Tensor,
                   eps: float) -> dict[str, np.ndarray]:
    """For one batch: ``grid`` B x C x h x w features at ``conv``, ``masks`` B x h x w bool (the
    ground-truth cells). Returns per question the explained (predicted) answer, ``delta``,
    ``delta_logprob``, ``delta_down``, ``first_order``, ``gradcam_contrast`` (NaN where the
    mask is empty or covers every cell), ``relu_kept`` and ``signed_sum`` (NaN where the signed
    Grad-CAM map is zero everywhere)."""
    features = grid.detach().requires_grad_(True)
    logits = head(features, tokens)
    target = logits.argmax(1)
    score = logits.gather(1, target[:, None])[:, 0]
    (gradient,) = torch.autograd.grad(score.sum(), features)
    weight = masks[:, None].to(features.dtype)
    with torch.no_grad():
        scaled = features * (1 + eps * weight)
        scaled_logits = head(scaled, tokens)
        delta = scaled_logits.gather(1, target[:, None])[:, 0] - score
        log_prob_change = scaled_logits.log_softmax(1) - logits.log_softmax(1)
        delta_logprob = log_prob_change.gather(1, target[:, None])[:, 0]
        reduced = features * (1 - eps * weight)
        delta_down = head(reduced, tokens).gather(1, target[:, None])[:, 0] - score
        first_order = eps * (gradient * features * weight).sum(dim=(1, 2, 3))
        cam = gradcam_map(features, gradient, relu=False)
        inside, outside = masks.sum((1, 2)), (~masks).sum((1, 2))
        contrast = ((cam * masks).sum((1, 2)) / inside.clamp(min=1)
                    - (cam * ~masks).sum((1, 2)) / outside.clamp(min=1))
        contrast = torch.where((inside > 0) & (outside > 0), contrast, torch.nan)
        mass = cam.abs().sum((1, 2))
        defined = mass > 0
        relu_kept = torch.where(defined, torch.relu(cam).sum((1, 2)) / mass.clamp(min=1e-30), torch.nan)
        signed_sum = torch.where(defined, cam.sum((1, 2)) / mass.clamp(min=1e-30), torch.nan)
    return {"target": target.numpy(), "delta": delta.double().numpy(),
            "delta_logprob": delta_logprob.double().numpy(), "delta_down": delta_down.double().numpy(),
            "first_order": first_order.double().numpy(), "gradcam_contrast": contrast.double().numpy(),
            "relu_kept": relu_kept.double().numpy(), "signed_sum": signed_sum.double().numpy()}


def share(flags) -> float:
    """The share of true values; NaN when there are none to count."""
    flags = np.asarray(flags, dtype=bool)
    return float(flags.mean()) if flags.size else float("nan")


def summarise_model(model: str, per_question: pd.DataFrame, boot: dict,
                    zero_sum_tolerance: float) -> list[dict]:
    rows = []
    groups = [(t, per_question[per_question["answer_type"] == t])
              for t in sorted(per_question["answer_type"].unique())] + [("all", per_question)]
    for answer_type, part in groups:
        scored = part[part["truth_cells"] > 0]
        delta = scored["delta"].to_numpy()
        low, high = bootstrap_ci((delta < 0).astype(np.float64), **boot)
        contrast = scored["gradcam_contrast"].to_numpy()
        defined = np.isfinite(contrast)
        kept, signed = scored["relu_kept"].to_numpy(), scored["signed_sum"].to_numpy()
        rows.append({
            "model": model, "answer_type": answer_type, "n": int(len(scored)),
            "no_truth": int((part["truth_cells"] == 0).sum()),
            "score_falls": share(delta < 0), "ci_low": low, "ci_high": high,
            "peak": share((delta < 0) & (scored["delta_down"].to_numpy() < 0)),
            "prob_falls": share(scored["delta_logprob"].to_numpy() < 0),
            "mean_delta": float(delta.mean()) if len(delta) else float("nan"),
            "first_order_agrees": share(np.sign(scored["first_order"].to_numpy()) == np.sign(delta)),
            "gradcam_negative": share(contrast[defined] < 0),
            "gradcam_agrees": share(np.sign(contrast[defined]) == np.sign(delta[defined])),
            "relu_kept": float(np.nanmean(kept)) if np.isfinite(kept).any() else float("nan"),
            "zero_sum": share(np.abs(signed[np.isfinite(signed)]) <= zero_sum_tolerance),
        })
    return rows
