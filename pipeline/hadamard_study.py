"""Stage ``hadamard_study``: the Hadamard-product explanations of MLB next to its own attention
(Kim et al., "Visual explanations from Hadamard product in multimodal deep networks", Fig. 2-5),
drawn and measured.

    python -m pipeline.hadamard_study [evaluation.hadamard_study.figures=3]
                                      [evaluation.hadamard_study.rows=4]

Only models with learned attention (MLB) take part; any other model (LSTM-CNN: the attribute
stage skipped ``attention`` for it) is skipped with its reason logged and written to the metrics.

Figures (``reports/figures/hadamard_<k>.png``, as the paper's): each row is one question, columns
image | attention glimpse 1 | glimpse 2 (``attention.image_map_raw[:, g]`` upsampled as the
attribute stage upsamples) | Hadamard map (``hadamard.image_map``, Eq. 9), and below it the
question with each token coloured by its z-score (``hadamard.question_map``, Eq. 11); the title
gives the model's answer and whether it is right. Questions are picked deterministically: the
first correct ones (by question id) of each answer type in turn, then incorrect ones if the
correct ones run out.

Table (``reports/tables/hadamard.csv`` + .md), measured rather than eyeballed:

* Spearman's rho (r x r cells, ``evaluation.resolution``, |map|, area averaging) of the Hadamard
  map with glimpse 1, glimpse 2, the mean attention, the synthetic ground-truth masks and the
  human maps (per question the mean over its annotators): n, mean, 95% bootstrap interval, and
  the questions where rho is undefined (a constant map), counted, not dropped silently;
* the share of nouns (NN, NNS, NNP, NNPS) among each question's top-scoring token (largest
  z-score) and among its top two, next to the share of nouns among all tokens (chance), tagged
  with the same tagger as ``pos_histogram``.

Also ``reports/metrics/hadamard_study.json``.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.attribution.base import upsample_maps
from pipeline.config import abspath, stage_main
from pipeline.data import processed
from pipeline.data.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation.outputs import bootstrap_settings, figures_dir, json_safe, publish, save_figure
from pipeline.evaluation.pos import Tagger, is_noun, make_tagger, top_words
from pipeline.evaluation.stats import spearman_rows, summarise
from pipeline.viz.overlay import display_image, overlay, token_colours
from pipeline.viz.plots import pyplot

log = logging.getLogger(__name__)

COLUMNS = ["model", "measure", "reference", "n", "mean", "ci_low", "ci_high", "undefined", "chance",
           "tagger"]


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


def draw_question(ax, tokens: list[str], scores: np.ndarray) -> None:
    """The question under a row, each token on a background coloured by its z-score."""
    ax.axis("off")
    colours = token_colours(scores)
    anchor = ax.text(0.0, 0.5, "", transform=ax.transAxes, va="center", fontsize=10)
    for token, colour in zip(tokens, colours):
        # Each token is placed right after the previous one (annotate relative to its extent);
        # white letters on dark backgrounds keep strongly scored words readable.
        red, green, blue = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
        ink = "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 128 else "black"
        anchor = ax.annotate(token, xy=(1, 0), xycoords=anchor, xytext=(4, 0),
                             textcoords="offset points", va="bottom", fontsize=10, color=ink,
                             bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5})
    scale = float(np.max(np.abs(scores))) if len(scores) else 0.0
    ax.annotate(f"  (token z-scores, full colour = {scale:.2f})", xy=(1, 0), xycoords=anchor,
                xytext=(6, 0), textcoords="offset points", va="bottom", fontsize=8, color="0.4")


def draw_figure(rows: list[int], questions: list[dict], images: list[np.ndarray], glimpses: np.ndarray,
                hadamard_maps: np.ndarray, z_scores: np.ndarray, title: str):
    height = 3.2 * len(rows)
    fig = pyplot().figure(figsize=(10, height))
    grid = fig.add_gridspec(2 * len(rows), 4, height_ratios=[5, 1] * len(rows), hspace=0.3, wspace=0.05,
                            top=1 - 0.6 / height, bottom=0.2 / height)
    for k, (row, image) in enumerate(zip(rows, images)):
        q = questions[row]
        panels = [("image", image), ("glimpse 1", overlay(image, glimpses[row, 0])),
                  ("glimpse 2", overlay(image, glimpses[row, 1])),
                  ("Hadamard", overlay(image, hadamard_maps[row]))]
        for c, (name, picture) in enumerate(panels):
            ax = fig.add_subplot(grid[2 * k, c])
            ax.imshow(picture)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                verdict = {True: "correct", False: "wrong"}.get(q.get("correct"), "unscored")
                name = f"A: {q['predicted']} ({verdict}, p={q['probability']:.2f})"
            ax.set_title(name, fontsize=9)
        length = min(len(q["tokens"]), z_scores.shape[1])
        draw_question(fig.add_subplot(grid[2 * k + 1, :]), q["tokens"][:length], z_scores[row, :length])
    fig.suptitle(title, fontsize=11, y=1 - 0.15 / height)
    return fig


def study_model(cfg, model: str, index: dict, tagger: Tagger, boot: dict) -> tuple[list[dict], dict]:
    """Table rows and arrays needed for the figures of one attention model."""
    e = cfg.evaluation
    r = int(e.resolution)
    questions = index["questions"]
    qids = [q["question_id"] for q in questions]
    hadamard = inputs.read_method(cfg, model, "hadamard", ("image_map", "question_map", "valid"), index=index)
    attention = inputs.read_method(cfg, model, "attention", ("image_map", "image_map_raw", "valid"), index=index)
    valid = hadamard["valid"] & attention["valid"]
    usable = np.flatnonzero(valid)
    image_size = tuple(hadamard["image_map"].shape[-2:])
    glimpses = upsample_glimpses(attention["image_map_raw"], image_size,
                                 str(index.get("options", {}).get("upsample", "bilinear")))
    if glimpses.shape[1] < 2:
        raise DataError(f"{model}'s attention has {glimpses.shape[1]} glimpse(s); the study compares two",
                        inputs.attribution_dir(cfg, model) / "attention.npz")

    hadamard_r = inputs.to_resolution(hadamard["image_map"][usable], r)
    references = {
        "glimpse_1": inputs.to_resolution(glimpses[usable, 0], r),
        "glimpse_2": inputs.to_resolution(glimpses[usable, 1], r),
        "mean_attention": inputs.to_resolution(attention["image_map"][usable], r),
    }
    rhos = {name: spearman_with(hadamard_r, ref) for name, ref in references.items()}
    usable_qids = [qids[i] for i in usable]
    truth = inputs.ground_truth_maps(cfg, str(e.split), usable_qids, r)
    if truth:
        rhos["ground_truth"] = spearman_with(hadamard_r, np.stack([truth[q] for q in usable_qids]))
    humans = inputs.human_maps(cfg, str(e.split), usable_qids, r)
    human_rows = [k for k, q in enumerate(usable_qids) if q in humans]
    rhos["human"] = spearman_with_annotators(hadamard_r, human_rows,
                                             [humans[usable_qids[k]] for k in human_rows])

    rows = []
    for reference, values in rhos.items():
        s = summarise(values, **boot)
        rows.append({"model": model, "measure": "spearman_hadamard", "reference": reference, **s,
                     "undefined": int(np.isnan(values).sum()), "chance": float("nan"), "tagger": ""})
    z_scores = np.asarray(hadamard["question_map"], dtype=np.float64)
    shares = noun_shares(questions, z_scores, list(usable), tagger)
    for measure, key in (("noun_share_top1", "top1"), ("noun_share_top2", "top2")):
        s = summarise(shares[key], **boot)
        rows.append({"model": model, "measure": measure, "reference": "all_tokens", **s,
                     "undefined": 0, "chance": shares["chance"], "tagger": tagger.name})
    return rows, {"questions": questions, "valid": valid, "glimpses": glimpses,
                  "hadamard": hadamard["image_map"], "z_scores": z_scores, "image_size": image_size}


def figure_prefix(model: str) -> str:
    # MLB is the paper's model: its figures are hadamard_<k>.png; any other attention model
    # gets its own names rather than overwriting them.
    return "hadamard" if model == "mlb" else f"hadamard_{model}"


def write_figures(cfg, model: str, study: dict) -> list:
    settings = cfg.evaluation.hadamard_study
    per_figure, count = int(settings.rows), int(settings.figures)
    rows = pick_questions(study["questions"], study["valid"], per_figure * count)
    image_paths = {r["question_id"]: r["image"] for r in
                   processed.load_question_table(abspath(cfg.paths.processed_dir), str(cfg.evaluation.split))}
    data_root = abspath(cfg.data.root)
    paths = []
    for k in tqdm(range(count), desc=f"hadamard figures ({model})", unit="figure"):
        chunk = rows[k * per_figure:(k + 1) * per_figure]
        if not chunk:
            log.warning("only %d usable questions: %d figure(s) instead of %d", len(rows), k, count)
            break
        images = []
        for row in chunk:
            qid = study["questions"][row]["question_id"]
            if qid not in image_paths:
                raise DataError(f"question {qid} of the attribution store is not in the processed "
                                f"question table: rerun `python -m pipeline.prepare`",
                                abspath(cfg.paths.processed_dir))
            images.append(display_image(data_root, image_paths[qid], study["image_size"][0]))
        fig = draw_figure(chunk, study["questions"], images, study["glimpses"], study["hadamard"],
                          study["z_scores"], f"{model}: attention glimpses and the Hadamard map "
                                             f"(Kim et al. Fig. 2-5), figure {k + 1}/{count}")
        paths.append(save_figure(fig, figures_dir(cfg) / f"{figure_prefix(model)}_{k + 1}.png"))
    return paths


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    e = cfg.evaluation
    tagger = make_tagger(str(e.hadamard_study.tagger))
    boot = bootstrap_settings(cfg)
    table_rows, figures, skipped = [], {}, {}
    for model in [str(m) for m in e.models]:
        index = inputs.load_store(cfg, model)
        attention = index["methods"].get("attention")
        if attention is None or attention.get("skipped"):
            reason = (attention or {}).get("skipped") or "the attribute stage did not run attention"
            skipped[model] = f"no learned attention: {reason}"
            log.info("hadamard_study skips %s (%s)", model, skipped[model])
            continue
        rows, study = study_model(cfg, model, index, tagger, boot)
        table_rows.extend(rows)
        for path in write_figures(cfg, model, study):
            figures[path.stem] = path
        for r in rows:
            log.info("%s %s vs %s: mean %.3f (95%% CI %.3f-%.3f, n=%d, undefined %d%s)", model,
                     r["measure"], r["reference"], r["mean"], r["ci_low"], r["ci_high"], r["n"],
                     r["undefined"], "" if np.isnan(r["chance"]) else f", chance {r['chance']:.3f}")
    if not table_rows:
        log.warning("hadamard_study: no model with learned attention among %s; tables are empty",
                    list(e.models))
    table = pd.DataFrame(table_rows, columns=COLUMNS)
    metrics = {"tagger": tagger.name, "skipped": skipped,
               "results": {r["model"]: {} for r in table_rows}}
    for r in table_rows:
        metrics["results"][r["model"]][f"{r['measure']}/{r['reference']}"] = {
            k: r[k] for k in ("n", "mean", "ci_low", "ci_high", "undefined", "chance")}
    metrics = publish(cfg, "hadamard_study", tables={"hadamard": table}, figures=figures, metrics=metrics,
                      start=start, summary={f"{m}/{k}": json_safe(v["mean"]) for m, per in metrics["results"].items()
                                            for k, v in per.items()})["metrics"]
    return {**metrics, "table": table, "figures": [str(p) for p in figures.values()]}


main = stage_main(run)

if __name__ == "__main__":
    main()
