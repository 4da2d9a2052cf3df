"""Analysis points: the named places where attribution methods read activations and gradients
(docs/analysis_points.md, which lists them per model). A method talks only to these names, never
to a model class.

| point   | meaning                                            |
|---------|----------------------------------------------------|
| image   | normalised pixels, B x 3 x H x W                   |
| q_emb   | word embeddings, B x T x E                         |
| q       | the question feature the fusion reads, B x D_q     |
| conv    | last conv feature map A (the Grad-CAM layer)       |
| V, Q, F | inputs and output of the final Hadamard fusion     |
| alpha   | learned attention, B x G x S (MLB only)            |
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

POINT_NAMES = ("image", "q_emb", "q", "conv", "V", "Q", "F", "alpha")


class AnalysisPoint(nn.Identity):
    """An identity layer that marks a named activation; hooks on it see the tensor and its
    gradient without the model knowing who listens."""

    def __init__(self, point: str):
        super().__init__()
        if point not in POINT_NAMES:
            raise ValueError(f"unknown analysis point {point!r}; known: {POINT_NAMES}")
        self.point = point

    def extra_repr(self) -> str:
        return self.point


def analysis_points(module: nn.Module) -> dict[str, AnalysisPoint]:
    """Every analysis point inside ``module``, by name."""
    points = {}
    for m in module.modules():
        if isinstance(m, AnalysisPoint):
            if m.point in points:
                raise ValueError(f"analysis point {m.point!r} appears twice")
            points[m.point] = m
    return points


def question_lengths(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Number of real tokens per question (padding at the end), at least 1 so that an empty
    question still runs through the encoder (it reads one padding token and gets an answer)."""
    return (tokens != pad_id).sum(1).clamp(min=1)


def warn_degenerate_questions(tokens: torch.Tensor, pad_id: int = 0, unk_id: int = 1) -> None:
    """Log questions the model can only answer from the image (empty or all unknown words)."""
    real = tokens != pad_id
    empty = ~real.any(1)
    all_unk = real.any(1) & ((tokens == unk_id) | ~real).all(1)
    if empty.any() or all_unk.any():
        log.warning("%d empty and %d all-unknown-word question(s) in this batch (rows %s): the "
                    "answer comes from the image alone", int(empty.sum()), int(all_unk.sum()),
                    (empty | all_unk).nonzero().flatten().tolist()[:10])
