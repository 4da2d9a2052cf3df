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
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.common.config import abspath, stage_main
from pipeline.data import processed
from pipeline.common.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation.outputs import bootstrap_settings, figures_dir, json_safe, publish, save_figure
from pipeline.evaluation.hadamard import pick_questions, study_rows, upsample_glimpses
from pipeline.evaluation.pos import Tagger, make_tagger
from pipeline.viz.figures import hadamard_figure
from pipeline.viz.overlay import display_image

log = logging.getLogger(__name__)

COLUMNS = ["model", "measure", "reference", "n", "mean", "ci_low", "ci_high", "undefined", "chance",
           "tagger"]


def study_model(cfg, model: str, index: dict, tagger: Tagger, boot: dict) -> tuple[list[dict], dict]:
    """Table rows and arrays needed for the figures of one attention model."""
    evaluation = cfg.evaluation
    resolution = int(evaluation.resolution)
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

    hadamard_r = inputs.to_resolution(hadamard["image_map"][usable], resolution)
    references = {
        "glimpse_1": inputs.to_resolution(glimpses[usable, 0], resolution),
        "glimpse_2": inputs.to_resolution(glimpses[usable, 1], resolution),
        "mean_attention": inputs.to_resolution(attention["image_map"][usable], resolution),
    }
    usable_qids = [qids[i] for i in usable]
    truth = inputs.ground_truth_maps(cfg, str(evaluation.split), usable_qids, resolution)
    if truth:
        references["ground_truth"] = np.stack([truth[q] for q in usable_qids])
    humans = inputs.human_maps(cfg, str(evaluation.split), usable_qids, resolution)
    human_rows = [k for k, q in enumerate(usable_qids) if q in humans]
    z_scores = np.asarray(hadamard["question_map"], dtype=np.float64)
    rows = study_rows(model, hadamard_r, references, human_rows, [humans[usable_qids[k]] for k in human_rows],
                      questions, z_scores, list(usable), tagger, boot)
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
        fig = hadamard_figure(chunk, study["questions"], images, study["glimpses"], study["hadamard"],
                          study["z_scores"], f"{model}: attention glimpses and the Hadamard map "
                                             f"(Kim et al. Fig. 2-5), figure {k + 1}/{count}")
        paths.append(save_figure(fig, figures_dir(cfg) / f"{figure_prefix(model)}_{k + 1}.png"))
    return paths


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    evaluation = cfg.evaluation
    tagger = make_tagger(str(evaluation.hadamard_study.tagger))
    boot = bootstrap_settings(cfg)
    table_rows, figures, skipped = [], {}, {}
    for model in [str(m) for m in evaluation.models]:
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
                    list(evaluation.models))
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
