"""The library under the ``hadamard_study`` stage (Kim et al., explanations from the Hadamard
product of MLB): the attention glimpses at image size, the Hadamard map's agreement with the
glimpses and reference maps, the noun share of the top-scoring tokens, and which questions the
figures show."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.attribution.base import upsample_maps
from pipeline.evaluation.pos import Tagger, is_noun, top_words
from pipeline.evaluation.stats import spearman_rows, summarise


def upsample_glimpses(raw: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """N x G x h x w attention grids -> N x G x H x W, interpolated as the attribute stage
    upsamples its maps (``attribution.upsample``: the same function)."""
    x = torch.as_tensor(np.asarray(raw, dtype=np.float32))
    n, g = x.shape[:2]
    return upsample_maps(x.reshape(n * g, *x.shape[2:]), size, mode).reshape(n, g, *size).numpy()


def spearman_with(hadamard: np.ndarray, references: np.ndarray) -> np.ndarray:
    """rho of |hadamard[i]| with |references[i]| over the r x r cells (N x r x r each); NaN
    where either map is constant."""
    n = len(hadamard)
    return spearman_rows(np.abs(hadamard).reshape(n, -1), np.abs(references).reshape(n, -1))


def spearman_with_annotators(hadamard: np.ndarray, rows: list[int], humans: list[np.ndarray]) -> np.ndarray:
    """Per listed question: the mean of rho over its annotators' maps (NaN if every one is
    undefined)."""
    out = np.full(len(rows), np.nan)
    for k, (row, maps) in enumerate(zip(rows, humans)):
        rho = spearman_rows(np.abs(hadamard[row]).reshape(1, -1), np.abs(maps).reshape(len(maps), -1))
        if np.isfinite(rho).any():
            out[k] = float(np.nanmean(rho))
    return out


def noun_shares(questions: list[dict], z_scores: np.ndarray, rows: list[int],
                tagger: Tagger) -> dict[str, np.ndarray]:
    """Per question: 1/0 whether the top token is a noun and the noun share among the top two
    (questions of two or more tokens); and the share of nouns among all their tokens (chance)."""
    top1, top2 = [], []
    tokens_all = nouns_all = 0
    for row in rows:
        length = min(len(questions[row]["tokens"]), z_scores.shape[1])
        if length < 1:
            continue
        tags = tagger.tag(questions[row]["tokens"][:length])
        nouns = [is_noun(t) for t in tags]
        best = top_words(z_scores[row], length, 2)
        top1.append(float(nouns[best[0]]))
        if length >= 2:
            top2.append(sum(nouns[i] for i in best) / 2)
        tokens_all += length
        nouns_all += sum(nouns)
    return {"top1": np.asarray(top1), "top2": np.asarray(top2),
            "chance": nouns_all / tokens_all if tokens_all else float("nan")}


def pick_questions(questions: list[dict], usable: np.ndarray, count: int) -> list[int]:
    """Rows for the figures: the first correct questions (by question id) of each answer type
    in turn (answer types alphabetically), one question per image while unseen images remain;
    then the remaining correct questions, then incorrect ones, in the same order."""
    rows: list[int] = []
    seen_images: set = set()
    for wanted, new_images_only in ((True, True), (True, False), (False, True), (False, False)):
        by_type: dict[str, list[int]] = {}
        for row, q in enumerate(questions):
            if usable[row] and bool(q.get("correct")) is wanted and row not in rows:
                by_type.setdefault(str(q["answer_type"]), []).append(row)
        queues = [by_type[t] for t in sorted(by_type)]
        while queues and len(rows) < count:
            for queue in queues:
                while queue and new_images_only and questions[queue[0]]["image_id"] in seen_images:
                    queue.pop(0)
                if queue and len(rows) < count:
                    row = queue.pop(0)
                    rows.append(row)
                    seen_images.add(questions[row]["image_id"])
            queues = [q for q in queues if q]
    return rows


def study_rows(model: str, hadamard_r: np.ndarray, references: dict[str, np.ndarray], human_rows: list[int],
               humans: list[np.ndarray], questions: list[dict], z_scores: np.ndarray, usable: list[int],
               tagger: Tagger, boot: dict) -> list[dict]:
    """The table rows of one attention model: Spearman of the Hadamard map (``hadamard_r``, the
    usable questions at r x r) with each reference map (same rows) and with the annotators' maps
    of the questions ``human_rows`` (the ``human`` row), then the noun share of the top one and
    two tokens by z-score (``z_scores`` of every question; ``usable`` their rows)."""
    rhos = {name: spearman_with(hadamard_r, ref) for name, ref in references.items()}
    rhos["human"] = spearman_with_annotators(hadamard_r, human_rows, humans)
    rows = []
    for reference, values in rhos.items():
        s = summarise(values, **boot)
        rows.append({"model": model, "measure": "spearman_hadamard", "reference": reference, **s,
                     "undefined": int(np.isnan(values).sum()), "chance": float("nan"), "tagger": ""})
    shares = noun_shares(questions, z_scores, usable, tagger)
    for measure, key in (("noun_share_top1", "top1"), ("noun_share_top2", "top2")):
        s = summarise(shares[key], **boot)
        rows.append({"model": model, "measure": measure, "reference": "all_tokens", **s,
                     "undefined": 0, "chance": shares["chance"], "tagger": tagger.name})
    return rows
