"""Stage ``sanity_check``: do the explanations depend on what the model learned? Cascading
model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps", section
3.1, Fig. 2), beyond the four papers.

    python -m pipeline.sanity_check [evaluation.sanity_check.questions=48] [evaluation.models=[mlb]]

On a fixed subset of validation questions (the first ``questions`` by image id, then question
id) every configured method explains the trained model's answers. Then, on a deep copy of the
model (the model file and the loaded model are never touched), the layers are randomised one unit
at a time, cumulatively, from the classifier down to the backbone's stem
(:mod:`pipeline.evaluation.randomisation` defines the units and their order generically from the
model's modules; the table's ``layers_randomised`` names the unit each step adds). After each step
the maps are recomputed for the SAME explained answer (the original model's prediction) and
compared with the trained model's maps (step 0, the untouched copy): Spearman's rho of |map| at
r x r (``evaluation.resolution``) and of |question map| over the real tokens where the method has
one. Step 0's row is the reference point of the curves (rho = 1).

A method whose maps still correlate above ``threshold`` (mean rho) once the whole head is
randomised, or after the whole cascade, is ``flagged``: its map is then largely explained by the
input and the architecture, not by the learned weights (Adebayo et al. found guided backprop so).
``random`` is a reference line redrawn at every step (seed + step): what "no dependence" looks
like (rho ~ 0 after step 0); it is never flagged.

Occlusion and integrated gradients cost tens of backbone passes per question and step, so they run
on the first ``question_limits`` questions, occlusion with the coarser grid of ``options`` (both
sides of every comparison use the same settings, so the check is unaffected). Methods that do not
apply to a model (MLB attention on LSTM-CNN) are listed in the metrics as skipped.

Writes ``reports/tables/sanity.{csv,md}`` (model, method, modality, step, layers_randomised, n,
mean, ci_low, ci_high, undefined = constant maps, flagged), ``reports/figures/sanity.png`` and
``reports/metrics/sanity_check.json``.
"""
from __future__ import annotations

import copy
import logging
import time

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pipeline.attribution import explain, explain_options
from pipeline.common.config import stage_main
from pipeline.evaluation import inputs, randomisation
from pipeline.evaluation.randomisation import REFERENCE
from pipeline.evaluation.outputs import bootstrap_settings, json_safe, publish
from pipeline.evaluation.stats import summarise
from pipeline.models import load_trained_model
from pipeline.common.seeding import seed_everything
from pipeline.viz.figures import sanity_figure

log = logging.getLogger(__name__)

STAGE = "sanity_check"
COLUMNS = ["model", "method", "modality", "step", "layers_randomised", "n", "mean", "ci_low",
           "ci_high", "undefined", "flagged"]


def method_groups(methods, limits: dict, total: int) -> dict[int, list[str]]:
    """Methods grouped by how many of the questions they explain (methods of one group share
    passes inside one ``explain`` call)."""
    groups: dict[int, list[str]] = {}
    for m in methods:
        groups.setdefault(min(total, int(limits.get(m, total))), []).append(m)
    return groups


def explain_all(model, images, tokens, target, groups, options, resolution: int,
                seconds: dict | None = None) -> dict:
    """{method: (image maps N x r x r, question maps N x T or None)} or {method: skip reason};
    each method's wall time is added to ``seconds`` (logged, never written: it varies)."""
    out = {}
    for count, methods in groups.items():
        results = explain(model, images[:count], tokens[:count], methods=methods,
                          target=target[:count], options=options)
        for name, e in results.items():
            if seconds is not None:
                seconds[name] = seconds.get(name, 0.0) + e.seconds
            if e.skipped:
                out[name] = e.skipped
                continue
            image = inputs.to_resolution(e.image_map.detach().float().cpu().numpy(), resolution)
            question = None if e.question_map is None else e.question_map.detach().float().cpu().numpy()
            out[name] = (image, question)
    return out


def step_options(options: dict, seed: int, step: int) -> dict:
    """The options of one step: the random reference redrawn with its own seed every step."""
    o = copy.deepcopy(options)
    o.setdefault(REFERENCE, {})["seed"] = int(seed) + step
    return o


def cascade(cfg, model_name: str, s, boot: dict) -> tuple[list[dict], dict]:
    """The rows of the sanity table for one model and its metrics."""
    seed = boot["seed"]
    model = load_trained_model(cfg, model_name)
    records, images, tokens = inputs.question_batch(cfg, model, str(cfg.evaluation.split),
                                                     int(s.questions))
    resolution = int(cfg.evaluation.resolution)
    options = explain_options(cfg.attribution, s.options)
    methods = list(dict.fromkeys([*map(str, s.methods), REFERENCE]))
    groups = method_groups(methods, OmegaConf.to_container(s.question_limits, resolve=True) or {}, len(records))
    real_tokens = (tokens != 0).numpy()

    with torch.no_grad():
        target = model(images, tokens).argmax(1)  # the explained answers, fixed for every step
    units = randomisation.cascade_units(model, images, tokens)
    if not s.get("backbone", True):
        top = units[0][0].split(".")[0]
        units = [u for u in units if u[0].split(".")[0] == top]
    # The last step that randomises a unit of the top-level child nearest the output (the head).
    head_steps = next((k for k, (name, _) in enumerate(units, start=1)
                       if k == len(units) or units[k][0].split(".")[0] != name.split(".")[0]), 0)
    working = copy.deepcopy(model)  # randomised step by step; ``model`` and its file stay as trained
    working_units = dict(working.named_modules())
    names = ["none"] + [name for name, _ in units]
    original, skipped, rows, seconds = None, {}, [], {}
    for step, unit in enumerate(tqdm(names, desc=f"cascade ({model_name})", unit="step")):
        if step:
            randomisation.randomise_unit(unit, working_units[unit], seed)
        current = explain_all(working, images, tokens, target, groups, step_options(options, seed, step),
                              resolution, seconds)
        if original is None:  # step 0: the trained maps every later step is compared with
            original = current
            skipped = {m: v for m, v in original.items() if isinstance(v, str)}
            for m, reason in skipped.items():
                log.info("%s: %s skipped: %s", model_name, m, reason)
        for method, maps in original.items():
            if isinstance(maps, str):
                continue
            image, question = maps
            n = len(image)
            results = [("image", randomisation.image_correlation(image, current[method][0]))]
            if question is not None and current[method][1] is not None:
                results.append(("question", randomisation.question_correlation(
                    question, current[method][1], real_tokens[:n])))
            for modality, rho in results:
                summary = summarise(rho, **boot)
                rows.append({"model": model_name, "method": method, "modality": modality, "step": step,
                             "layers_randomised": unit, **summary,
                             "undefined": int(np.isnan(rho).sum()), "flagged": False})
    log.info("%s: seconds per method over the cascade: %s", model_name,
             ", ".join(f"{m} {t:.1f}" for m, t in seconds.items()))
    table = pd.DataFrame(rows, columns=COLUMNS)
    threshold = float(s.threshold)
    flagged, after = [], {}
    for (method, modality), t in table.groupby(["method", "modality"], sort=False):
        at_head = float(t.loc[t["step"] == head_steps, "mean"].iloc[0])
        at_end = float(t.loc[t["step"] == len(units), "mean"].iloc[0])
        after[f"{method}/{modality}"] = {"after_head": at_head, "after_all": at_end}
        if method != REFERENCE and (at_head > threshold or at_end > threshold):
            table.loc[t.index, "flagged"] = True
            flagged.append(f"{method}/{modality}")
    logits_change = None
    with torch.no_grad():
        logits_change = float((working(images, tokens) - model(images, tokens)).abs().max())
    metrics = {"questions": len(records), "cascade": names[1:], "head_steps": head_steps,
               "threshold": threshold, "flagged": flagged, "skipped": skipped,
               "correlation": after, "max_logit_change_after_all": logits_change}
    for f in flagged:
        log.warning("%s: %s maps still correlate above %.2f after randomisation", model_name, f, threshold)
    return table.to_dict("records"), metrics


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    settings, boot = cfg.evaluation.sanity_check, bootstrap_settings(cfg)
    seed_everything(boot["seed"])
    rows, metrics = [], {"models": {}}
    for model_name in cfg.evaluation.models:
        model_rows, model_metrics = cascade(cfg, str(model_name), settings, boot)
        rows += model_rows
        metrics["models"][str(model_name)] = model_metrics
    table = pd.DataFrame(rows, columns=COLUMNS)
    figure = sanity_figure(table, metrics, float(settings.threshold))
    metrics = json_safe(metrics)
    summary = {f"{model}/{key}/{when}": value for model, m in metrics["models"].items()
               for key, v in m["correlation"].items() for when, value in v.items()}
    summary.update({f"{model}/flagged": len(m["flagged"]) for model, m in metrics["models"].items()})
    publish(cfg, STAGE, tables={"sanity": table}, figures={"sanity": figure}, metrics=metrics, summary=summary,
            start=start, note=f"models {list(metrics['models'])}")
    return metrics


main = stage_main(run)

if __name__ == "__main__":
    main()
