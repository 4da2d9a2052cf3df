"""Stage ``faithfulness``: does the model's answer depend on what a map ranks highest? Perturbation
tests on both modalities, beside the plausibility the other stages measure (beyond the papers).

    python -m pipeline.faithfulness [evaluation.faithfulness.questions=null] [...fills=[mean]]

For every model of ``evaluation.models``, a sample of its explained questions
(``questions``; the report's gallery questions among them) and every method with an image or a
question map in its attribution store, plus the references (a seeded random map, the human map,
on the synthetic world the ground truth; :mod:`pipeline.evaluation.faithfulness`): remove the
backbone grid's cells (the head's input, G x G; each map area-averaged to the grid) or the
question's real words in the map's order, at ``fractions`` of them, and record the explained
answer's softmax probability and whether it is still the argmax (Samek et al. 2017, pixel
flipping; Chefer et al. ICCV 2021, the perturbation tests on VQA for both modalities). Orders:
``morf`` (most relevant first; faithful: low area under the curve) and ``lerf`` (least relevant
first; faithful: high area). Fills of removed cells: ``mean`` (the training split's mean
feature) and ``road`` (ROAD's noisy linear imputation, Rong et al. ICML 2022); removed words:
``<unk>`` or deleted (``word_fill``). Head forwards only, batched over questions x fractions
(:mod:`pipeline.evaluation.perturbation`). ``pixel_questions`` questions are also run with the
image's pixels occluded through the whole model, to check that the two spaces agree.

Writes ``reports/tables/faithfulness.{csv,md}`` (per model x method x modality x order x fill: n,
mean AUC with a 95% bootstrap interval, the answer-kept share, ``more_faithful_than_random``),
``faithfulness_curves.csv`` (the mean curves), ``faithfulness_plausibility.{csv,md}`` (rank
correlation beside image deletion), ``faithfulness_pixel_check.{csv,md}``, the figures
``faithfulness_{image,question,vs_plausibility}.png``, the per-question image deletion curves the
gallery draws (``reports/faithfulness/question_curves.csv``, DVC-cached) and
``reports/metrics/faithfulness.json`` (ms per question per model, the stage's seconds).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pipeline.common.config import abspath, stage_main
from pipeline.common.seeding import seed_everything
from pipeline.common.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation import faithfulness as lib
from pipeline.evaluation.outputs import bootstrap_settings, json_safe, markdown_table, publish, tables_dir, write_table
from pipeline.evaluation.perturbation import FILLS, image_curves, question_curves
from pipeline.models import load_trained_model
from pipeline.viz.figures import faithfulness_curves_figure, faithfulness_scatter_figure
from pipeline.viz.gallery import sample_questions

log = logging.getLogger(__name__)

STAGE = "faithfulness"
QUESTION_CURVES = "faithfulness/question_curves.csv"


def question_positions(index: dict, count, seed: int, model: str) -> np.ndarray:
    """Store positions of the questions evaluated: all (``count`` None) or the gallery's sample."""
    questions = index["questions"]
    if count is None or int(count) >= len(questions):
        return np.arange(len(questions))
    at = {int(q["question_id"]): i for i, q in enumerate(questions)}
    return np.array(sorted(at[int(r["question_id"])] for r in sample_questions(questions, int(count), seed, model)))


def measure(cfg, model_name: str, settings, fractions, boot: dict) -> dict:
    """Every curve, row and check of one model."""
    seed, batch = int(cfg.evaluation.seed), int(settings.batch_size)
    index = inputs.load_store(cfg, model_name)
    model = load_trained_model(cfg, model_name).eval()
    positions = question_positions(index, settings.questions, seed, model_name)
    data = lib.explained_inputs(cfg, model, index, positions)
    mean, sd, source = lib.feature_statistics(cfg, data["grid"])
    size, width = data["grid"].shape[-1], data["tokens"].shape[1]
    methods = None if settings.methods is None else list(settings.methods)
    image_maps, image_absent = lib.image_relevance(cfg, model_name, index, positions, data["question_ids"], size,
                                                   methods, bool(settings.absolute), seed)
    word_maps, word_absent = lib.question_relevance(cfg, model_name, index, positions, data["question_ids"],
                                                    width, methods, bool(settings.absolute), seed)
    started = time.perf_counter()
    image = image_curves(model.head, data["grid"], data["tokens"], data["targets"], image_maps, fractions,
                         list(settings.fills), mean, float(settings.road_noise) * sd, seed, batch, model_name)
    words = question_curves(model.head, data["grid"], data["tokens"], data["targets"], word_maps, fractions,
                            str(settings.word_fill), model.question_vocab.unk_id, seed, batch)
    ms = 1000 * (time.perf_counter() - started) / len(positions)
    rows, _ = lib.summary_rows(model_name, lib.IMAGE, image, fractions, boot)
    rows += lib.summary_rows(model_name, lib.QUESTION, words, fractions, boot)[0]
    curves = (lib.mean_curve_rows(model_name, lib.IMAGE, image, fractions)
              + lib.mean_curve_rows(model_name, lib.QUESTION, words, fractions))
    per_question = [{"model": model_name, "question_id": int(q), "method": name, "fill": fill,
                     **{f"p{f:g}": image[(name, "morf", fill)][0][i, k] for k, f in enumerate(fractions)}}
                    for (name, order, fill) in image if order == "morf" for i, q in enumerate(data["question_ids"])]
    check = {"model": model_name, "questions": min(int(settings.pixel_questions), len(positions))}
    if check["questions"] > 0 and "mean" in settings.fills:
        check.update(lib.pixel_check(model, data, image_maps, fractions, image, seed, batch, check["questions"]))
    return {"rows": rows, "curves": curves, "per_question": per_question, "pixel": check,
            "metrics": {"questions": len(positions), "ms_per_question": round(ms, 2), "mean_fill_source": source,
                        "prediction_differs": data["prediction_differs"], "maps": {"image": len(image_maps),
                                                                                    "question": len(word_maps)},
                        "absent_references": {lib.IMAGE: image_absent, lib.QUESTION: word_absent}}}


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    settings = cfg.evaluation[STAGE]
    fractions = [float(f) for f in settings.fractions]
    if fractions[0] != 0.0 or fractions[-1] != 1.0 or np.any(np.diff(fractions) <= 0):
        raise DataError(f"evaluation.faithfulness.fractions must rise from 0 to 1, got {fractions}")
    if not set(settings.fills) <= set(FILLS) or not len(settings.fills):
        raise DataError(f"evaluation.faithfulness.fills: one or more of {FILLS}, got {list(settings.fills)}")
    boot = bootstrap_settings(cfg)
    seed_everything(int(cfg.evaluation.seed))
    rank_csv = tables_dir(cfg) / "rank_correlation.csv"
    if not rank_csv.is_file():
        raise DataError("the rank-correlation table is missing: run `python -m pipeline.rank_correlation` "
                        "(dvc stage rank_correlation) first; the plausibility scatter reads it", rank_csv)
    results = {m: measure(cfg, m, settings, fractions, boot) for m in [str(m) for m in cfg.evaluation.models]}
    table = pd.DataFrame([r for res in results.values() for r in res["rows"]], columns=lib.COLUMNS[:-1])
    table["more_faithful_than_random"] = lib.faithful_flags(table)
    curves = pd.DataFrame([r for res in results.values() for r in res["curves"]])
    plausibility = lib.plausibility_table(table, pd.read_csv(rank_csv))
    pixel = pd.DataFrame([res["pixel"] for res in results.values()])
    dependent = lib.fill_dependent(table)
    write_table(pd.DataFrame([r for res in results.values() for r in res["per_question"]]),
                abspath(cfg.paths.reports_dir) / QUESTION_CURVES, markdown=False)
    fills = ", ".join(f"`{f}`" for f in settings.fills)
    caption = (f"Perturbation tests over {len(fractions)} fractions of the backbone grid's cells (image; fills "
               f"{fills}) or the question's words (`{settings.word_fill}`): area under the explained answer's "
               f"probability curve, mean over questions with a 95% bootstrap interval ({boot['samples']} "
               "resamples); `kept`: the share of fractions at which the answer stays the argmax. `morf`: most "
               "relevant first (faithful = low AUC); `lerf`: least relevant first (faithful = high AUC). More "
               "faithful than random: the interval lies entirely below (morf) or above (lerf) the random map's "
               "for the same model, modality, order and fill.\n\n")
    metrics = {m: res["metrics"] for m, res in results.items()}
    metrics.update(verdict_depends_on_fill=dependent, pixel_check=pixel.to_dict("records"),
                   not_more_faithful_than_random=[f"{r.model}/{r.method}/{r.modality}/{r.order}/{r.fill}"
                                                  for r in table.itertuples() if r.more_faithful_than_random is False])
    pixel_caption = ("Grid space against pixel space: for the first questions, the pixels under the removed cells "
                     "set to the normalisation mean (0) and the full model run; Spearman's rho between the two "
                     "spaces' AUCs (grid: `mean` fill) and Pearson's r over every curve point.\n\n")
    metrics["seconds"] = round(time.perf_counter() - start, 1)   # before writing: the measurement's time
    published = publish(
        cfg, STAGE, start=start, note=f"{len(table)} rows, models {list(results)}",
        tables={STAGE: (table, caption + markdown_table(lib.readable(table))),
                f"{STAGE}_curves": (curves, "The mean curves: `faithfulness_curves.csv`.\n"),
                f"{STAGE}_plausibility": (plausibility, lib.plausibility_caption() + markdown_table(plausibility)),
                f"{STAGE}_pixel_check": (pixel, pixel_caption + markdown_table(pixel))},
        figures={f"{STAGE}_image": faithfulness_curves_figure(curves, lib.IMAGE),
                 f"{STAGE}_question": faithfulness_curves_figure(curves, lib.QUESTION),
                 f"{STAGE}_vs_plausibility": faithfulness_scatter_figure(plausibility, list(settings.fills))},
        metrics=metrics, summary={f"{r.model}/{r.method}/{r.modality}/{r.order}/{r.fill}": json_safe(r.auc)
                                  for r in table.itertuples()})
    return {"table": table, "curves": curves, "plausibility": plausibility, "pixel": pixel,
            "metrics": published["metrics"], "seconds": published["seconds"]}


main = stage_main(run)

if __name__ == "__main__":
    main()
