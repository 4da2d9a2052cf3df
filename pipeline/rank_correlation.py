"""Stage ``rank_correlation``: how well each explanation's image map agrees with where humans
look (Goyal et al. 2016, section 4.1, Table 1; extended to every method and both models).

    python -m pipeline.rank_correlation [evaluation.resolution=14] [evaluation.models=[mlb]]

For every model and every method that ran on it, each valid question's |image_map| is brought
to r x r (``evaluation.resolution``, 16 as Goyal et al.; 14 as VQA-HAT) by area averaging, and
Spearman's rho over the r*r cells is taken with each human attention map of the question (val
has several annotators); a question's score is the mean over its annotators, and a row is the
mean over questions with a percentile bootstrap interval. Rows: the random baseline, every
method in the order the attribute stage ran them (MLB attention included), and a ``human`` row,
the inter-human agreement (rho between each pair of annotators of one question, averaged per
question), as in Table 1.

On synthetic data the same is done against a second reference, the exact ground truth (the share
of each cell covered by the objects one needs to look at): ``reference`` = human | ground_truth;
the human row against the ground truth is each annotator's map against the truth, i.e. how good
the simulated humans are.

Nothing is hidden: constant maps (rho undefined; excluded), maps with ties (kept, average
ranks), questions without a reference map (excluded), non-finite maps (excluded) and constant
reference maps (e.g. "how many" with answer 0: nothing to look at; excluded) are counted in their
own columns. ``beats_random``: the method's interval lies entirely above the random map's
interval of the same model and reference. ``mean_all_questions`` is the paper's average over
every question with a map and a reference, an undefined rho (constant map or reference) scoring 0.

The same scores are also summarised per answer type (VQA's yes/no, number, other), because a
method can localise for one kind of question and not another: a gradient-weighted map such as
Grad-CAM explains *the local slope* of the answer's score, and on counting questions the
answer's logit mostly falls when the counted objects' features grow (stage ``evidence_slope``
measures this; growing features is not adding objects). ``rank_correlation_by_answer_type`` makes
that visible instead of averaging it away.

Training seeds. The bootstrap interval is over questions for one trained model; a model trained
with another seed (or on another CPU, whose float path is another training run) moves every
number. Every model is therefore also trained and explained with each of ``replicates.seeds``
(stages train_replicate@ / attribute_replicate@), and every row gets the spread of its mean over
the main run and the replicates (``seed_mean``, ``seed_sd`` with ddof 1, ``seed_min``,
``seed_max``) and ``beats_random_seeds`` (on how many seeds its interval lies above that seed's
random interval); ``beats_random_every_seed`` is the verdict the report uses: a method beats
random only if it does so on every seed. ``mean`` / ``ci_*`` / ``beats_random`` stay the main
run's (``train.seed``). ``rank_correlation_by_seed`` has each seed's row.

Writes ``reports/tables/rank_correlation.{csv,md}``,
``reports/tables/rank_correlation_by_seed.{csv,md}``,
``reports/tables/rank_correlation_by_answer_type.{csv,md}``,
``reports/figures/rank_correlation{,_by_answer_type}.png`` and
``reports/metrics/rank_correlation.json``.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.common.config import replicate_config, stage_main, training_seeds
from pipeline.common.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation.agreement import (GROUND_TRUTH, HUMAN, SEED_COLUMNS, all_questions_mean, beats_random_flags,
                                          by_answer_type, in_table_order, readable_by_type, readable_table,
                                          score_humans, score_maps, seed_spread)
from pipeline.evaluation.outputs import bootstrap_settings, json_safe, markdown_table, publish
from pipeline.evaluation.stats import summarise
from pipeline.viz.figures import by_answer_type_figure, rank_correlation_figure

log = logging.getLogger(__name__)

STAGE = "rank_correlation"
COLUMNS = ["model", "method", "reference", "n", "mean", "ci_low", "ci_high", "mean_all_questions",
           "constant", "ties", "no_reference_map", "invalid", "constant_reference", "beats_random",
           *SEED_COLUMNS]
BY_SEED = f"{STAGE}_by_seed"
BY_SEED_COLUMNS = ["model", "method", "reference", "seed", "n", "mean", "ci_low", "ci_high",
                   "beats_random"]
BY_TYPE = f"{STAGE}_by_answer_type"


def load_image_maps(cfg, model: str, method: str, index: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N x H x W image maps as float32, N valid flags) of one method, in index order. Only the
    arrays needed are decompressed (the raw maps and extras are most of the file)."""
    arrays = inputs.read_method(cfg, model, method, ("image_map", "valid"), index=index)
    return arrays["image_map"].astype(np.float32), arrays["valid"].astype(bool)


def score_run(cfg, models: list[str], references: dict[str, dict], boot: dict,
              question_ids: dict[str, list[int]] | None = None,
              indexes: dict[str, dict] | None = None) -> tuple[list[dict], list[tuple]]:
    """Rows (model, method, reference, summary, counts) and per-question scores of every method
    with an image map in every model's store of one training run (``cfg``: the main run's or a
    replicate's; ``indexes``: its stores' indexes when already loaded). ``question_ids``, when
    given, are the main run's: a replicate's store must hold the same questions in the same
    order."""
    rows, scores = [], []
    for model in models:
        index = indexes[model] if indexes is not None else inputs.load_store(cfg, model)
        ids = [int(q["question_id"]) for q in index["questions"]]
        if question_ids is not None and ids != question_ids[model]:
            raise DataError(f"the attribution store of {model} covers other questions than the main "
                            f"run's: {inputs.rerun_attribute(cfg, model)}", inputs.attribution_dir(cfg, model))
        answer_types = [str(q.get("answer_type", "unknown")) for q in index["questions"]]
        methods = [m for m in inputs.methods_that_ran(index)
                   if "image_map" in index["methods"][m].get("arrays", [])]
        for method in tqdm(methods, desc=f"rank correlation {model}", unit="method", leave=False):
            maps, valid = load_image_maps(cfg, model, method, index)
            small = inputs.to_resolution(np.abs(maps), int(cfg.evaluation.resolution))
            # A map that is finite at full resolution stays finite after area averaging, but an
            # overflow in float16 would not: recheck.
            valid = valid & np.isfinite(small.reshape(len(small), -1)).all(1)
            for reference, reference_maps in references.items():
                rho, counts = score_maps(small, valid, ids, reference_maps)
                rows.append({"model": model, "method": method, "reference": reference,
                             **summarise(rho, **boot), **counts})
                scores.append((model, method, reference, rho, answer_types))
    return rows, scores


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    evaluation = cfg.evaluation
    resolution = int(evaluation.resolution)
    boot = bootstrap_settings(cfg)
    split = str(evaluation.split)
    models = [str(m) for m in evaluation.models]
    if not models:
        raise DataError("evaluation.models is empty: name at least one model")
    seeds = training_seeds(cfg)
    indexes = {m: inputs.load_store(cfg, m) for m in models}
    question_ids = {m: [int(q["question_id"]) for q in indexes[m]["questions"]] for m in models}
    every_question = sorted({q for ids in question_ids.values() for q in ids})

    references = {HUMAN: inputs.human_maps(cfg, split, every_question, resolution)}
    if cfg.evaluation[STAGE].ground_truth and cfg.data.source == "synthetic":
        references[GROUND_TRUTH] = inputs.ground_truth_maps(cfg, split, every_question, resolution)
    if not references[HUMAN]:
        log.warning("no human attention map for any of the %d questions: every human-reference "
                    "row is empty (does %s have HAT maps?)", len(every_question), cfg.data.name)

    answer_types = {m: [str(q.get("answer_type", "unknown")) for q in indexes[m]["questions"]]
                    for m in models}
    type_of = {q: t for m in models for q, t in zip(question_ids[m], answer_types[m])}
    rows, scores = score_run(cfg, models, references, boot, indexes=indexes)
    for reference in references:
        rho, counts = score_humans(references[HUMAN], every_question,
                                   None if reference == HUMAN else references[reference])
        rows.append({"model": HUMAN, "method": HUMAN, "reference": reference,
                     **summarise(rho, **boot), **counts})
        scores.append((HUMAN, HUMAN, reference, rho, [type_of[q] for q in every_question]))

    table = in_table_order(pd.DataFrame(rows), list(references), models)
    table["beats_random"] = beats_random_flags(table)
    table["mean_all_questions"] = all_questions_mean(table)

    # The same rows for every training seed: the main run's, then each replicate's.
    per_seed = []
    for seed in seeds:
        if seed == seeds[0]:
            seed_rows = [r for r in rows if r["model"] != HUMAN]
        else:
            log.info("replicate train.seed=%d", seed)
            seed_rows, _ = score_run(replicate_config(cfg, seed), models, references, boot, question_ids)
        seed_table = in_table_order(pd.DataFrame(seed_rows), list(references), models)
        seed_table["beats_random"] = beats_random_flags(seed_table)
        per_seed.append(seed_table.assign(seed=seed))
    by_seed = pd.concat(per_seed, ignore_index=True)[BY_SEED_COLUMNS]
    table = table.merge(seed_spread(by_seed), on=["model", "method", "reference"], how="left")
    # The human row has no training seed: empty cells, as random's beats_random.
    human = table["model"] == HUMAN
    table["seeds"] = table["seeds"].astype(object)
    table.loc[human, ["seeds", "beats_random_seeds", "beats_random_every_seed"]] = ""
    table.loc[~human, "seeds"] = table.loc[~human, "seeds"].astype(int)
    table = table[COLUMNS]

    by_type = in_table_order(by_answer_type(scores, boot), list(references), models)
    metrics: dict = {}
    for row in table.itertuples(index=False):
        metrics.setdefault(row.model, {}).setdefault(row.method, {})[row.reference] = row.mean
    metrics["training_seeds"] = seeds
    metrics["not_beating_random"] = [f"{r.model}/{r.method}/{r.reference}"
                                     for r in table.itertuples(index=False) if r.beats_random is False]
    metrics["not_beating_random_on_every_seed"] = [
        f"{r.model}/{r.method}/{r.reference}" for r in table.itertuples(index=False)
        if r.beats_random_every_seed is False]
    metrics["verdict_differs_across_seeds"] = [
        f"{r.model}/{r.method}/{r.reference} ({r.beats_random_seeds})"
        for r in table.itertuples(index=False)
        if r.beats_random_seeds and r.beats_random_seeds not in (f"0/{len(seeds)}", f"{len(seeds)}/{len(seeds)}")]
    metrics["not_beating_random_by_answer_type"] = [
        f"{r.model}/{r.method}/{r.reference}/{r.answer_type}"
        for r in by_type.itertuples(index=False) if r.beats_random is False]

    type_reference = GROUND_TRUTH if GROUND_TRUTH in references else HUMAN
    published = publish(
        cfg, STAGE, start=start, metrics=metrics,
        note=f"{len(table)} rows over {len(every_question)} questions and {len(seeds)} training seeds",
        tables={
            STAGE: (table, f"Spearman rank correlation of |image map| with each reference over "
                           f"{resolution}x{resolution} cells; mean over questions with a 95% bootstrap "
                           f"interval ({boot['samples']} resamples), for the model trained with seed "
                           f"{seeds[0]}; then the spread of that mean over {len(seeds)} training seeds "
                           f"({', '.join(map(str, seeds))}): mean ± sd [min, max], and on how many seeds "
                           "the interval lies above random's. A method beats random only if it does on "
                           "every seed.\n\n" + markdown_table(readable_table(table))),
            BY_TYPE: (by_type, f"The table above per answer type (the model trained with seed {seeds[0]}): "
                               f"mean Spearman rho over {resolution}x{resolution} cells [95% bootstrap "
                               f"interval]; * where the interval lies entirely above the random map's for "
                               f"the same model, reference and answer type.\n\n"
                               + markdown_table(readable_by_type(by_type))),
            BY_SEED: (by_seed, f"Every training seed's row of the rank-correlation table (mean over "
                               f"questions, 95% bootstrap interval, beats random against the same seed's "
                               f"random map).\n\n" + markdown_table(by_seed))},
        figures={STAGE: rank_correlation_figure(table, list(references), resolution, by_seed),
                 BY_TYPE: by_answer_type_figure(by_type, type_reference)},
        summary={f"{r.model}/{r.method}/{r.reference}": json_safe(r.mean) for r in table.itertuples(index=False)})
    return {"table": table, "by_answer_type": by_type, "by_seed": by_seed, "metrics": published["metrics"],
            "seconds": published["seconds"]}


main = stage_main(run)

if __name__ == "__main__":
    main()
