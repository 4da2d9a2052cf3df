"""Perturbation curves: remove a model's inputs in the order an explanation ranks them and follow
the explained answer's probability (the primitives of stage ``faithfulness``).

* **Pixel flipping / deletion** (Samek et al. 2017, "Evaluating the visualization of what a deep
  neural network has learned", Eq. 12 and Fig. 3; Chefer et al. ICCV 2021, section 5, the
  perturbation tests on VQA for both modalities): sort the input units by relevance, remove a
  growing fraction of them, and record the answer's probability. ``morf`` removes the most
  relevant first (a faithful map makes the answer collapse fast: a *low* area under the curve),
  ``lerf`` the least relevant first (the answer should survive: a *high* area).
* The units are the cells of the backbone's output grid (the head's input, G x G) for the image
  and the real (non-padding) tokens for the question, so a curve costs head forwards only.
* A fraction f of K units removes round(f K) of them (half up): at f = 0 nothing, at f = 1 all.
* Ties in a map (ReLU zeros, a binary ground truth) are broken by a seeded random key, never by
  position: a position order would make a constant map look like a top-left-first deletion.
* **Fills.** ``mean``: a removed cell takes the dataset's mean feature (per channel).
  ``road``: ROAD's noisy linear imputation (Rong et al., ICML 2022, "A consistent and efficient
  evaluation strategy for attribution methods", section 4 and their ``NoisyLinearImputer``):
  every removed cell equals the weighted mean of its in-grid 8-neighbours (weight 1/6 for the 4
  edge neighbours, 1/12 for the 4 diagonal ones, renormalised by the weights of the neighbours
  inside the grid), one linear system over all removed cells jointly with the kept cells as its
  boundary values; then Gaussian noise (sd = ``noise`` x the channel's standard deviation over the
  dataset's cells; ROAD adds sd 0.01 on unit-variance images) is added to the imputed cells. A
  removed region is thus filled with what its surroundings predict, not with an
  out-of-distribution constant whose effect leaks the removal pattern (ROAD's argument). With every
  cell removed there is nothing to impute from (the system is singular): ``road`` then falls back
  to ``mean``.
* Words: a removed word becomes ``<unk>`` (``word_fill=unk``) or is deleted, the words after it
  moving up and the question ending earlier (``pad``: padding sits at the end of a question).
"""
from __future__ import annotations

import contextlib
import zlib

import numpy as np
import torch
from tqdm.auto import tqdm

ORDERS = ("morf", "lerf")
FILLS = ("mean", "road")
# ROAD's neighbour weights (row offset, column offset, weight): edges 1/6, diagonals 1/12.
ROAD_NEIGHBOURS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6),
                   (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


def trapezoid(curves: np.ndarray, fractions) -> np.ndarray:
    """Area under each curve (last axis) over ``fractions`` by the trapezoid rule, on [0, 1]."""
    return np.trapezoid(np.asarray(curves, dtype=np.float64), np.asarray(fractions, dtype=np.float64), axis=-1)


def removed_counts(fractions, units: int) -> np.ndarray:
    """How many of ``units`` a fraction removes: round(f * units), half up."""
    return np.floor(np.asarray(fractions, dtype=np.float64) * units + 0.5).astype(int).clip(0, units)


def removal_order(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, K) relevance scores -> (N, K) unit indices, most relevant first, ties in random order."""
    scores = np.asarray(scores, dtype=np.float64)
    tie_break = rng.random(scores.shape)
    return np.lexsort((tie_break, -scores), axis=-1)


def removal_masks(order: np.ndarray, counts: np.ndarray, direction: str) -> np.ndarray:
    """(N, K) orders (most relevant first) -> (N, F, K) bool masks of the removed units, one per
    count: the first ``counts[f]`` units (``morf``) or the last ones (``lerf``)."""
    if direction not in ORDERS:
        raise ValueError(f"order is one of {ORDERS}, got {direction!r}")
    order = order if direction == "morf" else order[:, ::-1]
    n, k = order.shape
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(k), (n, k)), axis=1)
    return rank[:, None, :] < np.asarray(counts)[None, :, None]


def road_operator(size: int) -> torch.Tensor:
    """The Z x Z (Z = size^2) matrix L = diag(s) - W of ROAD's equations on a size x size grid:
    W[i, j] the weight of neighbour j of cell i, s_i the sum of cell i's in-grid weights."""
    z = size * size
    weights = torch.zeros(z, z, dtype=torch.float64)
    for row in range(size):
        for col in range(size):
            for dr, dc, w in ROAD_NEIGHBOURS:
                r, c = row + dr, col + dc
                if 0 <= r < size and 0 <= c < size:
                    weights[row * size + col, r * size + c] = w
    return torch.diag(weights.sum(1)) - weights


def road_impute(grid: torch.Tensor, removed: torch.Tensor, noise_sd: torch.Tensor | float = 0.0,
                generator: torch.Generator | None = None, operator: torch.Tensor | None = None) -> torch.Tensor:
    """ROAD's noisy linear imputation of the ``removed`` cells (B x G x G bool) of ``grid``
    (B x C x G x G). Solves, for every row b jointly over its removed cells,

        s_i x_i - sum_j W_ij x_j = 0   (i removed),      x_i = grid_i   (i kept),

    i.e. each removed cell is the renormalised weighted mean of its 8 neighbours, then adds
    N(0, noise_sd^2) per channel to the removed cells (``noise_sd``: a number or a C vector).
    Kept cells are returned unchanged. A row with every cell removed is returned as it is (the
    system has no boundary; callers fill it otherwise)."""
    b, c, g, _ = grid.shape
    z = g * g
    operator = road_operator(g) if operator is None else operator
    flat = grid.reshape(b, c, z).double()
    gone = removed.reshape(b, z)
    solvable = gone.any(1) & ~gone.all(1)
    out = flat.clone()
    if solvable.any():
        r = gone[solvable].double()
        eye = torch.eye(z, dtype=torch.float64)
        system = r[:, :, None] * operator[None] + (1 - r)[:, :, None] * eye[None]
        rhs = ((1 - r)[:, :, None] * flat[solvable].transpose(1, 2))
        # The inverse and a batched product: about twice as fast on CPU as a batched solve with
        # C right-hand sides, and as exact here (the system is diagonally dominant, well conditioned).
        solved = (torch.linalg.inv(system) @ rhs).transpose(1, 2)          # B' x C x Z
        noise = torch.randn(solved.shape, generator=generator, dtype=torch.float64)
        sd = torch.as_tensor(noise_sd, dtype=torch.float64).reshape(-1, 1) if torch.is_tensor(noise_sd) \
            else torch.tensor(float(noise_sd), dtype=torch.float64)
        solved = solved + r[:, None, :] * noise * sd
        out[solvable] = torch.where(gone[solvable][:, None, :], solved, flat[solvable])
    return out.reshape(b, c, g, g).to(grid.dtype)


def mean_fill(grid: torch.Tensor, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The removed cells (B x G x G) of ``grid`` (B x C x G x G) set to the mean feature (C)."""
    return torch.where(removed[:, None], mean.to(grid.dtype)[None, :, None, None], grid)


def fill_cells(grid: torch.Tensor, removed: torch.Tensor, fill: str, mean: torch.Tensor,
               noise_sd, generator: torch.Generator | None, operator: torch.Tensor | None = None) -> torch.Tensor:
    """``grid`` with its ``removed`` cells filled by ``fill`` (:data:`FILLS`; module docstring)."""
    if fill == "mean":
        return mean_fill(grid, removed, mean)
    if fill == "road":
        every = removed.flatten(1).all(1)
        out = road_impute(grid, removed, noise_sd, generator, operator)
        return torch.where(every[:, None, None, None], mean_fill(grid, removed, mean), out)
    raise ValueError(f"fill is one of {FILLS}, got {fill!r}")


def remove_words(tokens: torch.Tensor, removed: torch.Tensor, word_fill: str, unk_id: int,
                 pad_id: int = 0) -> torch.Tensor:
    """Token rows (B x T) with the ``removed`` positions (B x T bool) replaced by ``unk_id``
    (``unk``) or deleted, the later words moving up and padding filling the end (``pad``)."""
    if word_fill == "unk":
        return torch.where(removed, torch.full_like(tokens, unk_id), tokens)
    if word_fill == "pad":
        out = torch.full_like(tokens, pad_id)
        for row in range(len(tokens)):
            kept = tokens[row][~removed[row] & (tokens[row] != pad_id)]
            out[row, :len(kept)] = kept
        return out
    raise ValueError(f"word_fill is unk or pad, got {word_fill!r}")


@contextlib.contextmanager
def question_encoded_once(head):
    """While perturbing the image, every row of a question carries the same tokens: a head with
    ``encode_question(tokens)`` (both models) encodes each distinct token row once per batch and
    the rows share it (the LSTM is a third of a head forward). The same function of the tokens;
    nothing else of the head changes."""
    encode = getattr(head, "encode_question", None)
    if encode is None or "encode_question" in vars(head):
        yield head
        return

    def once(tokens: torch.Tensor) -> torch.Tensor:
        distinct, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        return encode(distinct)[inverse]

    head.encode_question = once
    try:
        yield head
    finally:
        del head.encode_question


def answer_probability(head, grids: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor,
                       batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The softmax probability of ``targets`` and whether it is still the argmax, for every row,
    head forwards in batches of ``batch_size`` (no gradients; the head in eval mode)."""
    probs, kept = [], []
    with torch.no_grad(), question_encoded_once(head):
        for start in range(0, len(grids), batch_size):
            stop = start + batch_size
            logits = head(grids[start:stop], tokens[start:stop])
            p = torch.softmax(logits.double(), dim=1)
            t = targets[start:stop]
            probs.append(p.gather(1, t[:, None])[:, 0].numpy())
            kept.append((logits.argmax(1) == t).numpy().astype(np.float64))
    if not probs:
        return np.zeros(0), np.zeros(0, bool)
    return np.concatenate(probs), np.concatenate(kept)


def seeded(seed: int, *keys: str) -> np.random.Generator:
    """A generator for one map (and order): seeded by the run's seed and the names, so that adding
    a method to the store leaves every other map's tie-breaks and noise as they were."""
    return np.random.default_rng([int(seed), *(zlib.crc32(k.encode()) for k in keys)])


def image_curves(head, grid: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor,
                 relevance: dict[str, np.ndarray], fractions, fills, mean: torch.Tensor, noise_sd,
                 seed: int, batch_size: int, desc: str = "image") -> dict[tuple[str, str, str], tuple]:
    """Deletion curves over the G x G cells of ``grid`` (N x C x G x G, the head's input) for every
    map of ``relevance`` (name -> N x G*G scores; a row with a non-finite value has no map and
    gets NaN), both orders and every fill. Returns (name, order, fill) -> (probability, kept),
    each N x F (F = len(fractions)): the explained answer's probability and whether it is still
    the argmax (1.0 / 0.0). Nothing removed and everything removed are the same input for every
    map (``road`` with every cell removed is ``mean``), so they are computed once; the fractions
    in between go to the head stacked, questions x fractions, ``batch_size`` rows at a time."""
    n, _, g, _ = grid.shape
    counts = removed_counts(fractions, g * g)
    inner = np.flatnonzero((counts > 0) & (counts < g * g))
    every_cell = torch.ones(n, g, g, dtype=torch.bool)
    ends = {0: answer_probability(head, grid, tokens, targets, batch_size),
            g * g: answer_probability(head, mean_fill(grid, every_cell, mean), tokens, targets, batch_size)}
    operator = road_operator(g)
    chunk = max(1, batch_size // max(1, len(inner)))
    out = {}
    jobs = [(name, order) for name in relevance for order in ORDERS]
    for name, order in tqdm(jobs, desc=f"faithfulness {desc}", unit="curve set", leave=False):
        scores = np.asarray(relevance[name], dtype=np.float64)
        valid = np.isfinite(scores).all(1)
        ranking = removal_order(np.where(valid[:, None], scores, 0.0), seeded(seed, name))
        masks = torch.from_numpy(removal_masks(ranking, counts[inner], order))     # N x F' x G*G
        rows = np.flatnonzero(valid)
        for fill in fills:
            generator = torch.Generator().manual_seed(int(seeded(seed, name, order, fill).integers(2 ** 62)))
            probability = np.full((n, len(counts)), np.nan)
            kept = np.full((n, len(counts)), np.nan)
            for f, k in enumerate(counts):
                if k in ends:
                    probability[rows, f], kept[rows, f] = ends[k][0][rows], ends[k][1][rows]
            for start in range(0, len(rows), chunk):
                idx = torch.from_numpy(rows[start:start + chunk])
                removed = masks[idx].reshape(-1, g, g)
                filled = fill_cells(grid[idx].repeat_interleave(len(inner), 0), removed, fill, mean,
                                    noise_sd, generator, operator)
                p, a = answer_probability(head, filled, tokens[idx].repeat_interleave(len(inner), 0),
                                          targets[idx].repeat_interleave(len(inner), 0), batch_size)
                probability[np.ix_(idx.numpy(), inner)] = p.reshape(len(idx), len(inner))
                kept[np.ix_(idx.numpy(), inner)] = a.reshape(len(idx), len(inner))
            out[(name, order, fill)] = (probability, kept)
    return out


def question_curves(head, grid: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor,
                    relevance: dict[str, np.ndarray], fractions, word_fill: str, unk_id: int,
                    seed: int, batch_size: int, pad_id: int = 0) -> dict[tuple[str, str, str], tuple]:
    """Deletion curves over each question's real words (the non-padding tokens of ``tokens``,
    N x T) for every map of ``relevance`` (name -> N x T scores, read on the real words; a row
    with a non-finite score there has no map), both orders, removed words filled by
    ``word_fill``; the image is left as it is. Returns (name, order, word_fill) -> (probability,
    kept), N x F each, as :func:`image_curves`."""
    n = len(tokens)
    lengths = (tokens != pad_id).sum(1).numpy()
    real = torch.arange(tokens.shape[1])[None] < torch.from_numpy(lengths)[:, None]
    base = answer_probability(head, grid, tokens, targets, batch_size)
    empty = answer_probability(head, grid, remove_words(tokens, real, word_fill, unk_id, pad_id),
                               targets, batch_size)
    out = {}
    for name in tqdm(relevance, desc="faithfulness question", unit="map", leave=False):
        scores = np.asarray(relevance[name], dtype=np.float64)
        for order in ORDERS:
            probability = np.full((n, len(fractions)), np.nan)
            kept = np.full((n, len(fractions)), np.nan)
            rng = seeded(seed, name, "question")
            batch_rows, batch_tokens, where = [], [], []
            for i in range(n):
                length = int(lengths[i])
                row = scores[i, :length]
                if length == 0 or not np.isfinite(row).all():
                    continue
                counts = removed_counts(fractions, length)
                masks = removal_masks(removal_order(row[None], rng), counts, order)[0]  # F x L
                for f, k in enumerate(counts):
                    if k == 0 or k == length:
                        source = base if k == 0 else empty
                        probability[i, f], kept[i, f] = source[0][i], source[1][i]
                        continue
                    removed = torch.zeros(tokens.shape[1], dtype=torch.bool)
                    removed[:length] = torch.from_numpy(masks[f])
                    batch_rows.append(i)
                    batch_tokens.append(remove_words(tokens[i:i + 1], removed[None], word_fill, unk_id, pad_id)[0])
                    where.append((i, f))
            if where:
                idx = torch.tensor(batch_rows)
                p, a = answer_probability(head, grid[idx], torch.stack(batch_tokens), targets[idx], batch_size)
                for (i, f), pi, ai in zip(where, p, a):
                    probability[i, f], kept[i, f] = pi, ai
            out[(name, order, word_fill)] = (probability, kept)
    return out
