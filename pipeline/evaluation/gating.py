"""The library under the ``gating_study`` stage (Ummettuguli, "Towards visual explanations that
ground multiple modalities"): which fusion neurons the question selects, how much two questions'
selections agree, and the question-gated Grad-CAM map for every gate size n of a sweep.

Neuron scores are s_i = sum_j |dF_i / dq_j| (the paper's dA/dq; ``gated_gradcam`` stores them as
``extra/neuron_scores``). The top-k set of a question is its k highest-scoring neurons, ties
broken by the lower index (the order ``rank_neurons`` gives in the method itself).
"""
from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import torch

from pipeline.attribution.base import answer_scores
from pipeline.attribution.methods.gated_gradcam import gated_map, rank_neurons
from pipeline.attribution.methods.gradcam import gradcam_map
from pipeline.attribution.probe import Probe
from pipeline.evaluation.stats import spearman_rows

# The method the study explains, the measures of its top-n sweep and the change between
# consecutive gate sizes.
METHOD = "gated_gradcam"
SWEEP_MEASURES = ("own_mask", "other_mask", "own_minus_other", "pair_difference")
# 1 - Spearman between a question's gated map at gate size n and at the next smaller size of the
# sweep: how much letting more neurons through moves the map (Ummettuguli section 3.3 describes
# the map changing "drastically" between n = 200 and 300 on one example).
CHANGE_MEASURE = "change_from_previous"


# --------------------------------------------------------------------------------------------
# Tables 1-6: top neurons, overlaps and score correlations


def top_neurons(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of the k highest scores of each row (N x D), by score descending and,
    among equal scores, by index ascending; k is capped at D."""
    scores = np.asarray(scores, dtype=np.float64)
    k = min(int(k), scores.shape[1])
    # lexsort sorts by its last key first: -score, then the index for ties.
    order = np.stack([np.lexsort((np.arange(scores.shape[1]), -row))[:k] for row in scores])
    return order, np.take_along_axis(scores, order, axis=1)


def jaccard(a, b) -> float:
    """|A & B| / |A | B| of two index sets."""
    a, b = set(map(int, a)), set(map(int, b))
    union = a | b
    return len(a & b) / len(union) if union else float("nan")


def pair_jaccard(top: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Jaccard overlap of the top-k sets of each pair of rows (P x 2 row indices)."""
    return np.array([jaccard(top[i], top[j]) for i, j in pairs], dtype=np.float64)


def pair_spearman(scores: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Spearman's rho between the full score vectors of each pair of rows (NaN when either
    vector is constant, e.g. a question whose fusion does not depend on q at all)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        return np.zeros(0)
    return spearman_rows(scores[pairs[:, 0]], scores[pairs[:, 1]])


def question_key(row: dict) -> str:
    """Two questions are 'the same question' when their tokens are (case and punctuation other
    than a kept "?" do not make a different question for the model, which only sees the tokens)."""
    return " ".join(row["tokens"])


def same_question_groups(rows: list[dict], min_images: int = 2) -> list[tuple[str, list[int]]]:
    """(question text, row indices) of every question asked about at least ``min_images``
    different images: one row per image (its lowest question id), rows ordered by image id.
    Groups are ordered by the number of images (most first), then by text."""
    by_key: dict[str, dict[int, int]] = defaultdict(dict)
    for i, r in enumerate(rows):
        per_image = by_key[question_key(r)]
        j = per_image.get(r["image_id"])
        if j is None or r["question_id"] < rows[j]["question_id"]:
            per_image[r["image_id"]] = i
    groups = [(key, [per_image[image] for image in sorted(per_image)])
              for key, per_image in by_key.items() if len(per_image) >= min_images]
    groups.sort(key=lambda g: (-len(g[1]), g[0]))
    return groups


def same_image_groups(rows: list[dict]) -> list[tuple[int, list[int]]]:
    """(image id, row indices) of every image with at least two different questions (one row per
    distinct question, its lowest id), ordered by the number of questions (most first), then id."""
    by_image: dict[int, dict[str, int]] = defaultdict(dict)
    for i, r in enumerate(rows):
        per_key = by_image[r["image_id"]]
        key = question_key(r)
        j = per_key.get(key)
        if j is None or r["question_id"] < rows[j]["question_id"]:
            per_key[key] = i
    groups = [(image, sorted(per_key.values(), key=lambda i: rows[i]["question_id"]))
              for image, per_key in by_image.items() if len(per_key) >= 2]
    groups.sort(key=lambda g: (-len(g[1]), g[0]))
    return groups


def within_group_pairs(groups) -> np.ndarray:
    """Every unordered pair of rows inside each group, P x 2."""
    pairs = [pair for _, members in groups for pair in itertools.combinations(members, 2)]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _pairs_within(labels) -> int:
    """Number of unordered pairs of items that share a label."""
    _, counts = np.unique(np.asarray(labels), axis=0, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def unrelated_pairs(rows: list[dict], count: int, seed: int) -> np.ndarray:
    """A baseline: ``count`` pairs of rows with different questions about different images (all
    of them when there are fewer), drawn uniformly without repeating a pair from a generator
    seeded with ``seed``, in the order drawn."""
    n = len(rows)
    _, key_ids = np.unique([question_key(r) for r in rows], return_inverse=True)
    image_ids = np.array([r["image_id"] for r in rows], dtype=np.int64)
    # Inclusion-exclusion: all pairs - same image - same question + same image and question.
    eligible = (n * (n - 1) // 2 - _pairs_within(image_ids) - _pairs_within(key_ids)
                + _pairs_within(np.stack([image_ids, key_ids], 1)))
    target = min(int(count), eligible)
    rng = np.random.default_rng(seed)
    chosen: dict[tuple[int, int], None] = {}  # insertion-ordered set
    while len(chosen) < target:
        draws = rng.integers(0, n, size=(4 * target, 2))
        for i, j in draws.tolist():
            i, j = min(i, j), max(i, j)
            if i == j or image_ids[i] == image_ids[j] or key_ids[i] == key_ids[j]:
                continue
            chosen.setdefault((i, j))
            if len(chosen) == target:
                break
    return np.array(list(chosen), dtype=np.int64).reshape(-1, 2)


def subsample_pairs(pairs: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` of ``pairs`` (a seeded draw without replacement, kept in their order)."""
    if limit is None or len(pairs) <= int(limit):
        return pairs
    keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=int(limit), replace=False))
    return pairs[keep]


# --------------------------------------------------------------------------------------------
# The top-n sweep


def gated_gradcam_sweep(model, images: torch.Tensor, tokens: torch.Tensor,
                        neuron_scores: torch.Tensor, top_ns, score: str = "logit",
                        target: torch.Tensor | None = None):
    """Grad-CAM and question-gated Grad-CAM for every gate size in ``top_ns`` from ONE forward
    pass: the method's steps (``pipeline.attribution.methods.gated_gradcam``) with the neuron
    scores given (B x D) instead of recomputed, so the Jacobian dF/dq, which costs more than
    everything else together, is taken once per question for the whole sweep.

    For each n: keep the top-n neurons by score (ties by index), g_A = (dy/dF * mask)^T dF/dA,
    map = ReLU(sum_k mean_ij(g_A^k) A^k) at the ``conv`` grid. Returns (logits, target, gradcam
    B x h x w, {n: gated B x h x w}); n >= D keeps every neuron, which is Grad-CAM.

    The probe is plain (no guided ReLUs): both methods want plain gradients at ``conv`` and ``F``
    (they take them from the guided pass only when no ReLU follows those points, where guided
    and plain gradients are the same)."""
    probe = Probe(model, images, tokens, guided=False)
    missing = [n for n in ("conv", "F") if n not in probe]
    if missing:
        raise ValueError(f"the gating sweep needs analysis points {missing}")
    F, conv = probe["F"], probe["conv"]
    if target is None:
        target = probe.logits.argmax(1).detach()
    # The explained answers' scores summed over the batch, as ``ExplainContext.score`` (there is
    # no context here: the target and the score kind are given).
    score_sum = answer_scores(probe.logits, target, score).sum()
    grad_conv, grad_F = probe.grad(score_sum, ["conv", "F"])
    gradcam = gradcam_map(conv, grad_conv).detach()
    scores = torch.as_tensor(neuron_scores, dtype=torch.float32)
    if scores.shape != F.shape:
        raise ValueError(f"neuron scores of shape {tuple(scores.shape)} do not fit the fusion "
                         f"activations {tuple(F.shape)}")
    order = rank_neurons(scores).indices
    gated = {}
    for n in top_ns:
        n = int(n)
        if n < 1:
            raise ValueError(f"gate size must be at least 1, got {n}")
        gated[n] = gated_map(probe, grad_F, order[:, :min(n, F.shape[1])])
    return probe.logits.detach(), target, gradcam, gated


def pair_map_measures(maps_a: np.ndarray, maps_b: np.ndarray, masks_a: np.ndarray,
                      masks_b: np.ndarray) -> dict[str, np.ndarray]:
    """The sweep's measures for P pairs (maps and masks flattened or not, P x r x r each; maps are
    taken in absolute value, as Goyal et al.):

    ``own_mask``       rho(map, own question's mask), both questions of every pair (2P values)
    ``other_mask``     rho(map, the other question's mask), same order
    ``own_minus_other`` their difference per question (> 0: the map follows its own question)
    ``pair_difference`` 1 - rho(map_a, map_b) per pair (0: the two questions get the same map)"""
    P = len(maps_a)
    a = np.abs(np.asarray(maps_a, dtype=np.float64)).reshape(P, -1)
    b = np.abs(np.asarray(maps_b, dtype=np.float64)).reshape(P, -1)
    ma = np.asarray(masks_a, dtype=np.float64).reshape(P, -1)
    mb = np.asarray(masks_b, dtype=np.float64).reshape(P, -1)
    own = np.concatenate([spearman_rows(a, ma), spearman_rows(b, mb)])
    other = np.concatenate([spearman_rows(a, mb), spearman_rows(b, ma)])
    return {"own_mask": own, "other_mask": other, "own_minus_other": own - other,
            "pair_difference": 1.0 - spearman_rows(a, b)}
