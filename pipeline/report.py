"""Stage ``report``: assemble every table and figure of the evaluation stages into one readable
report, ``reports/README.md``, and a static gallery of explanations, ``reports/index.html``.

    python -m pipeline.report [evaluation.report.gallery.questions=24]

README.md: what the numbers were computed on (data, models and their validation accuracy, the
POS tagger, the seeds), then one section per paper, in the order of docs/evaluation.md --
Goyal et al. (Table 1 rank correlation, section 4.1; Fig. 3 POS histogram and failure
prediction, section 4.2), Grad-CAM (its rows of the rank-correlation table), Kim et al. (Fig.
2-5, Eq. 9-11), Ummettuguli (Tables 1-6 and the top-n sweep) -- each with its table (the
stage's .md), figure(s) and, where the paper published one, the paper's number next to ours,
each labelled with the data and model it was computed on (:mod:`pipeline.evaluation.published`:
numbers read in the paper, shown as printed; otherwise "published value not verified"). Then which
methods do not beat the random baseline, and the sanity checks (Adebayo et al. 2018).

index.html: per model a deterministic sample of ``gallery.questions`` validation questions
spread over answer types and right/wrong answers; for each, the image, every method's overlay
(PNG files under ``reports/gallery/<model>/``) and the question tokens coloured by each
method's question map; filterable in the browser (inline JS, no network).

A table or figure that an evaluation stage should have written and did not is an error naming
that stage; sections that need the synthetic world's ground truth are reported as absent, with
the reason, on data without it. Writes ``reports/metrics/report.json``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.attribution.methods.gradcam_counterfactual import NAME as COUNTERFACTUAL
from pipeline.attribution.methods.random import NAME as RANDOM
from pipeline.config import abspath, replicate_config, stage_main, training_seeds
from pipeline.data import processed
from pipeline.data.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation.outputs import figures_dir, markdown_table, publish, tables_dir
from pipeline.evaluation.published import PUBLISHED, PublishedValue, for_section
from pipeline.io import atomic_directory, read_json, write_text
from pipeline.models.checkpoint import train_metrics_path
from pipeline.viz.gallery import gallery_html, render_entry_images, sample_questions
from pipeline.viz.overlay import display_image

log = logging.getLogger(__name__)

NOT_VERIFIED = "published value not verified"


@dataclass(frozen=True)
class TableSpec:
    name: str                      # reports/tables/<name>.md and .csv
    stage: str                     # the stage that writes it
    needs_ground_truth: bool = False
    caption: str = ""


@dataclass(frozen=True)
class FigureSpec:
    pattern: str                   # glob under reports/figures/
    stage: str
    needs_ground_truth: bool = False
    caption: str = ""


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    text: str
    tables: tuple[TableSpec, ...] = ()
    figures: tuple[FigureSpec, ...] = ()
    published: str | None = None   # section key in evaluation.published


# The sections, in the order of docs/evaluation.md (the four papers), then the checks.
SECTIONS: tuple[Section, ...] = (
    Section("rank_correlation", "Goyal et al., Table 1: rank correlation with human attention",
            "Spearman rank correlation (section 4.1) of |map| with the human attention maps at "
            "r x r, averaged over the annotators of a question, then the mean over questions with a "
            "95% bootstrap interval; the `human` row is the agreement between annotators. On the "
            "synthetic world a second reference, `ground_truth`, is the exact mask of the objects "
            "the question is about. Constant maps (rank correlation undefined) and ties are counted, "
            "not hidden. The interval is over questions for one trained model; the last columns "
            "give the spread of the mean over models trained with other seeds (`replicates.seeds`, "
            "dots in the figure), and a method beats random only if it does on every seed "
            "(`tables/rank_correlation_by_seed.csv` has each seed's row).",
            (TableSpec("rank_correlation", "rank_correlation"),
             TableSpec("rank_correlation_by_answer_type", "rank_correlation",
                       caption="The same, per answer type"),
             TableSpec("rank_correlation_by_seed", "rank_correlation",
                       caption="Every training seed's rows")),
            (FigureSpec("rank_correlation.png", "rank_correlation"),
             FigureSpec("rank_correlation_by_answer_type.png", "rank_correlation")), "rank_correlation"),
    Section("pos_histogram", "Goyal et al., Fig. 3: which words matter, by part of speech",
            "P(the most important word of a question has a tag of category c): the 15 most "
            "frequent Penn Treebank tags of the whole split, grouped into categories (WDT, WP, WRB "
            "-> wh-words, ...), sorted by frequency (section 4.2); the same per tag below. On the "
            "synthetic world, also how often the most important word is one the question's answer "
            "truly depends on.",
            (TableSpec("pos_histogram", "pos_histogram"),
             TableSpec("pos_histogram_by_tag", "pos_histogram", caption="The same per tag"),
             TableSpec("pos_ground_truth", "pos_histogram", needs_ground_truth=True,
                       caption="Most important word vs the ground-truth important words")),
            (FigureSpec("pos_histogram.png", "pos_histogram"),)),
    Section("failure_prediction", "Goyal et al., section 4.2: predicting failures from answer flips",
            "A cross-validated logistic regression predicts whether the model's answer is wrong "
            "(VQA accuracy 0: no human gave it) from how often occluding an image patch or "
            "dropping a word flips it; accuracy next to the majority-class baseline, balanced "
            "accuracy and ROC-AUC. The row `flip_count` is the paper's: the number of answer "
            "changes alone; the other rows are richer classifiers beside it.",
            (TableSpec("failure_prediction", "failure_prediction"),),
            (FigureSpec("failure_prediction.png", "failure_prediction"),), "failure_prediction"),
    Section("gradcam", "Grad-CAM (Selvaraju et al.): CAM, guided backprop, Grad-CAM, Guided Grad-CAM, "
            "counterfactual Grad-CAM",
            "The Grad-CAM family's rows of the rank-correlation table above (CAM explains the "
            "backbone's pretraining label, not the answer; counterfactual Grad-CAM, the paper's "
            "negated-gradient variant, maps the evidence *against* the answer). Their maps for "
            "individual answers are in the [gallery](index.html)."),
    Section("hadamard", "Kim et al.: explanations from the Hadamard product (MLB)",
            "Figures 2-5 of the paper: image, attention glimpse 1 and 2, and the Hadamard map "
            "(Eq. 9-10), with the question tokens coloured by their z-scores (Eq. 11); the table "
            "measures how the Hadamard map agrees with the glimpses, the ground truth and the human "
            "maps, and how often the top-scoring token is a noun.",
            (TableSpec("hadamard", "hadamard_study"),),
            (FigureSpec("hadamard_*.png", "hadamard_study"),)),
    Section("gating", "Ummettuguli: question-gated Grad-CAM",
            "Tables 1-4: the top-10 fusion neurons by s_i = sum_j |dA_i/dq_j| for one question on "
            "several images and for several questions on one image, and how much those sets overlap; "
            "Tables 5-6: Spearman between the neuron scores of question pairs; the sweep over the "
            "number n of neurons let through: does the map move with the question?",
            (TableSpec("gating_top_neurons", "gating_study", caption="Top-10 neurons (Tables 1-4)"),
             TableSpec("gating_score_correlation", "gating_study",
                       caption="Spearman between neuron scores of question pairs (Tables 5-6)"),
             TableSpec("gating_sweep", "gating_study", needs_ground_truth=True,
                       caption="Top-n sweep on same-answer question pairs")),
            (FigureSpec("gating_sweep.png", "gating_study", needs_ground_truth=True),), "gating"),
    Section("not_beating_random", "Which methods do not beat random", "",
            (TableSpec("evidence_slope", "evidence_slope", needs_ground_truth=True,
                       caption="Does the answer's score rise with the evidence at the ground truth?"),)),
    Section("sanity", "Sanity checks (Adebayo et al. 2018): cascading parameter randomisation",
            "Spearman between each method's maps from the trained model and from models whose "
            "layers are randomised from the top down; a method whose maps survive randomisation "
            "explains the input, not the model, and is flagged.",
            (TableSpec("sanity", "sanity_check"),), (FigureSpec("sanity.png", "sanity_check"),)),
)

GRADCAM_METHODS = ("cam", "guided_backprop", "gradcam", "guided_gradcam", COUNTERFACTUAL)
# Maps that are the ReLU of Grad-CAM's signed sum (Eq. 2), plain, guided or gated: when one of
# them does not beat random, the counterfactual map (the other half of the same signed sum) is
# shown next to it, which tells whether it fails because the truth holds the evidence against
# the answer.
RELU_OF_SIGNED_MAP = ("gradcam", "guided_gradcam", "gated_gradcam")


@dataclass
class Assembled:
    """What the README used, for the metrics file and wandb."""
    tables: list[str] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)
    not_beating_random: dict[str, list[str]] = field(default_factory=dict)


def missing(path: Path, stage: str, what: str = "table") -> DataError:
    return DataError(f"the {what} is missing: run `python -m pipeline.{stage}` (dvc stage "
                     f"`{stage}`), which writes it, before the report", path)


def read_table(cfg, spec: TableSpec) -> tuple[str, pd.DataFrame]:
    """The table's Markdown (embedded as written) and its CSV (for look-ups)."""
    md, csv = tables_dir(cfg) / f"{spec.name}.md", tables_dir(cfg) / f"{spec.name}.csv"
    for path in (md, csv):
        if not path.is_file():
            raise missing(path, spec.stage)
    try:
        frame = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"unreadable table ({e}): rerun `python -m pipeline.{spec.stage}`", csv) from e
    return md.read_text(encoding="utf-8"), frame


def find_figures(cfg, spec: FigureSpec) -> list[Path]:
    found = sorted(figures_dir(cfg).glob(spec.pattern))
    if not found:
        raise missing(figures_dir(cfg) / spec.pattern, spec.stage, "figure")
    return found


def fold(markdown: str, rows: int, summary: str) -> str:
    """Long tables are folded (GitHub renders <details>); the full table stays in the file."""
    body_rows = max(0, markdown.count("\n") - 2)
    if body_rows <= rows:
        return markdown
    return f"<details><summary>{summary} ({body_rows} rows)</summary>\n\n{markdown}\n</details>\n"


# --- published values next to ours ---------------------------------------------------------

def as_bool(value) -> bool | None:
    """A CSV cell of a boolean column (True/False, "True"/"False", empty) as bool or None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def locate(published: PublishedValue, frames: dict[str, pd.DataFrame]) -> tuple[float | None, str]:
    """Our counterpart of a published number: (value, "") or (None, why it was not found)."""
    ours = published.ours
    frame = frames.get(ours.table)
    if frame is None:
        return None, f"table {ours.table} not in this report"
    rows = frame
    for key, wanted in ours.match.items():
        names = key if isinstance(key, tuple) else (key,)
        column = next((c for c in names if c in frame.columns), None)
        if column is None:
            return None, f"table {ours.table} has no column {' or '.join(names)}"
        rows = rows[rows[column].astype(str) == str(wanted)]
    column = next((c for c in ours.column if c in frame.columns), None)
    if column is None:
        return None, f"table {ours.table} has no column {' or '.join(ours.column)}"
    values = pd.to_numeric(rows[column], errors="coerce").dropna().unique()
    if len(values) != 1:
        return None, (f"no row of {ours.table} matches {ours.label}" if len(values) == 0
                      else f"{len(values)} different rows of {ours.table} match {ours.label}")
    return float(values[0]), ""


def short_citation(p: PublishedValue) -> str:
    return f"{p.paper.split(',')[0].split('.')[0]} et al., {p.where}"


def published_table(cfg, entries: list[PublishedValue], frames: dict[str, pd.DataFrame]) -> str:
    data = str(cfg.data.name)
    lines = [f"| quantity | ours (computed on `{data}`) | published | computed on (paper) | citation |",
             "|---|---|---|---|---|"]
    for p in entries:
        value, why = locate(p, frames)
        ours = f"{value:.3f} ({p.ours.label})" if value is not None else f"not located: {why}"
        paper = p.shown if p.verified else NOT_VERIFIED
        computed_on = "; ".join(x for x in (p.data, p.model) if x)
        source = f" (read at {p.source})" if p.verified and p.source != p.where else ""
        lines.append(f"| {p.quantity} | {ours} | {paper} | {computed_on} | {p.paper}; {p.where}{source} |")
    note = ("Ours and the paper's numbers come from different data and models (ours: the "
            f"`{data}` data and this project's models): side by side they say whether a pattern "
            "holds, not whether the values match.")
    if not any(p.verified for p in entries):
        note += (" No published number of this section could be read in the paper, so none is "
                 "shown (see `pipeline/evaluation/published.py`).")
    return "\n".join(lines) + "\n\n" + note + "\n"


# --- the header -------------------------------------------------------------------------------

def model_accuracy(cfg, model: str) -> dict:
    path = train_metrics_path(cfg, model)
    if not path.is_file():
        raise missing(path, f"train model={model}", "training metrics file")
    metrics = read_json(path)
    if "val/acc" not in metrics:
        raise DataError(f"no `val/acc` in the training metrics: rerun `python -m pipeline.train "
                        f"model={model}`", path)
    return metrics


def accuracy_across_seeds(cfg, models: list[str]) -> pd.DataFrame:
    """Per model, the VQA accuracy of every training seed (the main run's, then each replicate's)
    on the questions its attribution store explains (every val question by default: the main
    run's equals its ``val/acc``): mean ± sd [min, max], so a reader sees how much a retrained
    model differs before reading the maps' spread. Read from the stores, which the report
    depends on, replicates included."""
    seeds = training_seeds(cfg)
    rows = []
    for model in models:
        accuracies = []
        for seed in seeds:
            index = inputs.load_store(cfg if seed == seeds[0] else replicate_config(cfg, seed), model)
            accuracies.append(float(np.mean([q["accuracy"] for q in index["questions"]])))
        a = np.asarray(accuracies)
        rows.append({"model": model, "training seeds": ", ".join(map(str, seeds)),
                     "accuracy per seed": ", ".join(f"{v:.3f}" for v in a),
                     "mean": a.mean(), "sd": a.std(ddof=1) if len(a) > 1 else float("nan"),
                     "min": a.min(), "max": a.max()})
    return pd.DataFrame(rows)


def pos_tagger(cfg, frames: dict[str, pd.DataFrame]) -> str:
    frame = frames.get("pos_histogram")
    if frame is not None and "tagger" in frame.columns:
        return ", ".join(sorted(frame["tagger"].dropna().astype(str).unique())) or "none"
    path = abspath(cfg.paths.metrics_dir) / "pos_histogram.json"
    if path.is_file() and "tagger" in (metrics := read_json(path)):
        return str(metrics["tagger"])
    raise DataError("neither the POS table nor its metrics name the tagger: rerun `python -m "
                    "pipeline.pos_histogram`", path)


def header(cfg, models: list[str], frames: dict[str, pd.DataFrame], synthetic: bool) -> str:
    data = cfg.data
    lines = ["# Explaining VQA models: results", ""]
    if synthetic:
        lines += [f"> **Computed on the synthetic world (`data={data.name}`), NOT on VQA / COCO / "
                  "VQA-HAT.** The images, questions, answers and the \"human\" attention maps are "
                  "generated (in the real file formats) with exact ground truth, and the \"human\" "
                  "maps come from simulated annotators (`data.synthetic.hat`). Numbers here test the "
                  "methods on a world whose answers are known; they are not the papers' numbers and "
                  "must not be compared with them as if they were. Run with `data=vqa_v1` or "
                  "`data=vqa_v2` for the real data.", ""]
    else:
        lines += [f"Computed on `data={data.name}` (source `{data.source}`, version "
                  f"`{data.get('version', '')}`).", ""]
    rows = []
    for model in models:
        metrics = model_accuracy(cfg, model)
        per_type = [metrics.get(f"val/acc_{t}") for t in ("yes_no", "number", "other")]
        rows.append({"model": model, "val accuracy": float(metrics["val/acc"]),
                     **{f"{t}": (float(v) if v is not None else float("nan"))
                        for t, v in zip(("yes/no", "number", "other"), per_type)},
                     "epochs": metrics.get("epochs", ""), "best epoch": metrics.get("best_epoch", "")})
    lines += ["## What was computed", "",
              f"- **Data**: `{data.name}` (source `{data.source}`), split `{cfg.evaluation.split}`; "
              f"maps compared at {int(cfg.evaluation.resolution)} x {int(cfg.evaluation.resolution)}.",
              f"- **POS tagger**: {pos_tagger(cfg, frames)}.",
              f"- **Seeds**: run seed {cfg.seed}, training seed {cfg.train.seed} (replicates "
              f"{', '.join(map(str, training_seeds(cfg)[1:])) or 'none'}), evaluation seed {cfg.evaluation.seed}"
              + (f", synthetic world seed {data.synthetic.seed}" if synthetic and "synthetic" in data else "")
              + f"; bootstrap intervals from {int(cfg.evaluation.bootstrap.samples)} resamples at "
              f"{float(cfg.evaluation.bootstrap.confidence):.0%} confidence.",
              "- **Gallery**: [index.html](index.html) (open in a browser; no server needed).", "",
              "VQA accuracy on the validation split (from `reports/metrics/train/<model>.json`):", "",
              markdown_table(pd.DataFrame(rows)), "",
              f"The same models trained again with other seeds (`replicates.seeds`; same data and "
              f"features, `train.seed` = {', '.join(map(str, training_seeds(cfg)[1:])) or 'none'}), "
              "as every table's numbers move with the training run: VQA accuracy on the "
              f"explained {cfg.evaluation.split} questions per seed (the rank-correlation table "
              "gives the spread of its means across the same seeds):", "",
              markdown_table(accuracy_across_seeds(cfg, models))]
    return "\n".join(lines) + "\n"


# --- the sections -----------------------------------------------------------------------------

def gradcam_rows(frames: dict[str, pd.DataFrame]) -> str:
    frame = frames["rank_correlation"]
    rows = frame[frame["method"].astype(str).isin(GRADCAM_METHODS)] if "method" in frame.columns else frame.iloc[:0]
    if rows.empty:
        return "The rank-correlation table has no rows for the Grad-CAM methods (were they configured in `attribution.methods`?).\n"
    keep = [c for c in ("model", "method", "reference", "resolution", "n", "mean", "ci_low",
                        "ci_high", "beats_random", "seed_mean", "seed_sd", "seed_min", "seed_max",
                        "beats_random_every_seed") if c in rows.columns]
    return markdown_table(rows[keep])


def not_beating_random(frames: dict[str, pd.DataFrame], synthetic: bool, assembled: Assembled,
                       tables: Path) -> str:
    """From the rank-correlation table's ``beats_random`` column (a method beats random when its
    interval lies entirely above random's), against the ground truth where there is one.
    ``tables`` is the folder the tables were read from (named in errors)."""
    frame = frames["rank_correlation"]
    for column in ("model", "method", "reference", "beats_random"):
        if column not in frame.columns:
            raise DataError(f"the rank-correlation table has no `{column}` column: rerun `python -m "
                            "pipeline.rank_correlation`", tables / "rank_correlation.csv")
    references = set(frame["reference"].astype(str))
    reference = "ground_truth" if "ground_truth" in references else "human"
    lines = []
    if reference == "human":
        lines.append(("This data has no ground truth, so the reference is the human attention maps."
                      if not synthetic else
                      "The table has no ground-truth rows; the reference is the (simulated) human maps.") + "\n")
    else:
        lines.append("Reference: the exact ground-truth masks (a method is judged by where the "
                     "answer truly is, not by the simulated annotators).\n")
    rows = frame[(frame["reference"].astype(str) == reference)
                 & ~frame["method"].astype(str).isin([RANDOM, "human"])
                 & (frame["model"].astype(str) != "human")]
    # The verdict must hold on every training seed (rank_correlation's beats_random_every_seed);
    # tables written before the replicates have the main run's only.
    column = "beats_random_every_seed" if "beats_random_every_seed" in frame.columns else "beats_random"
    table = []
    for model, group in rows.groupby(rows["model"].astype(str), sort=False):
        verdicts = {m: as_bool(v) for m, v in zip(group["method"].astype(str), group[column])}
        counts = (dict(zip(group["method"].astype(str), group["beats_random_seeds"].astype(str)))
                  if "beats_random_seeds" in group.columns else {})
        fail = [m for m, v in verdicts.items() if v is False]
        unknown = [m for m, v in verdicts.items() if v is None]
        assembled.not_beating_random[model] = fail
        table.append({"model": model,
                      "do NOT beat random": ", ".join(
                          f"{m} ({counts[m]} seeds)" if counts.get(m, "").split("/")[0] not in ("", "0")
                          else m for m in fail) or "(none)",
                      "beat random": ", ".join(m for m, v in verdicts.items() if v) or "(none)",
                      "undetermined": ", ".join(unknown) or "(none)"})
    if not table:
        lines.append(f"The rank-correlation table has no `{reference}` rows for any method.\n")
        return "\n".join(lines)
    lines.append(markdown_table(pd.DataFrame(table)))
    lines.append("A method beats random when its 95% interval lies entirely above the random "
                 "map's interval on every training seed (column `beats_random_every_seed` of the "
                 "rank-correlation table; \"(k/n seeds)\" after a failing method: it beat random "
                 "on k of the n seeds, so its verdict depends on the training run); "
                 "\"undetermined\" means an interval could not be computed (too few questions).\n")
    lines.append(failures_by_answer_type(frames.get("rank_correlation_by_answer_type"), reference,
                                         assembled.not_beating_random,
                                         tables / "rank_correlation_by_answer_type.csv"))
    return "\n".join(lines)


def failures_by_answer_type(by_type: pd.DataFrame | None, reference: str,
                            failing: dict[str, list[str]], source: Path) -> str:
    """Where the methods that do not beat random fail: their mean rho per answer type, next to
    random's (and counterfactual Grad-CAM's when a Grad-CAM variant fails), read from
    ``rank_correlation_by_answer_type``. A negative mean on one type is a map that points *away*
    from where to look on those questions, not noise."""
    if by_type is None or not any(failing.values()):
        return ""
    needed = {"model", "method", "reference", "answer_type", "mean", "ci_low", "ci_high", "beats_random"}
    if not needed <= set(by_type.columns):
        raise DataError("the per-answer-type table lacks columns "
                        f"{sorted(needed - set(by_type.columns))}: rerun `python -m pipeline.rank_correlation`",
                        source)
    part = by_type[by_type["reference"].astype(str) == reference]
    rows = []
    for model, methods in failing.items():
        shown = [RANDOM, *methods]
        if any(m in RELU_OF_SIGNED_MAP for m in methods) and COUNTERFACTUAL not in methods:
            shown.append(COUNTERFACTUAL)
        for method in shown:
            cells = part[(part["model"].astype(str) == model) & (part["method"].astype(str) == method)]
            if cells.empty:
                continue
            row = {"model": model, "method": method}
            for r in cells.itertuples(index=False):
                verdict = {True: " (beats random)", False: " (does not)"}.get(as_bool(r.beats_random), "")
                row[str(r.answer_type)] = (f"{r.mean:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]{verdict}"
                                           if pd.notna(r.ci_low) else f"{r.mean:.3f}")
            rows.append(row)
    if not rows:
        return ""
    return ("Where they fail, per answer type (mean rho [95% CI] against the same reference; from "
            "`tables/rank_correlation_by_answer_type.csv`). A mean below zero is a map that ranks "
            "the cells to look at *lowest* on those questions. "
            f"`{COUNTERFACTUAL}` (Grad-CAM from the negated gradient: the evidence against the "
            "answer) is listed next to failing Grad-CAM variants for comparison. The table below "
            "(stage `evidence_slope`) measures whether the answer's logit falls when the "
            "ground-truth cells' features grow; why that makes Grad-CAM rank the truth lowest, and "
            "why its signed map would sum to zero on an LSTM-CNN that normalised the grid's "
            "spatial mean instead of fc7 (Euler's theorem), is explained in "
            "[docs/evaluation.md](../docs/evaluation.md#evidence-slope-and-grad-cam-on-lstm-cnn).\n\n"
            + markdown_table(pd.DataFrame(rows).fillna("")) + "\n")


def largest_map_change(sweep: pd.DataFrame) -> str:
    """Where, per model, letting more fusion neurons through moves the gated map most (the
    ``change_from_previous`` rows of ``gating_sweep``: 1 - Spearman with the previous gate size)."""
    if not {"measure", "top_n", "method", "mean"} <= set(sweep.columns):
        return ""
    change = sweep[(sweep["measure"] == "change_from_previous") & sweep["mean"].notna()]
    if change.empty:
        return ""
    parts = []
    for model, rows in change.groupby("model", sort=False):
        best = rows.loc[rows["mean"].idxmax()]
        sizes = sorted(set(sweep.loc[(sweep["model"] == model) & (sweep["method"] == "gated_gradcam"), "top_n"]))
        before = sizes[sizes.index(int(best["top_n"])) - 1]
        parts.append(f"{model} between n = {before} and n = {int(best['top_n'])} "
                     f"(1 - rho = {best['mean']:.3f} [{best['ci_low']:.3f}, {best['ci_high']:.3f}])")
    return ("Where the gated map changes most from one gate size to the next (mean over the pairs' "
            "questions of 1 - Spearman between the maps at consecutive sizes; Ummettuguli saw the "
            "best maps at n = 25, 200 and 400 and a drastic change between 200 and 300 on one "
            "example): " + "; ".join(parts) + ".")


def render_section(cfg, section: Section, frames: dict[str, pd.DataFrame], markdowns: dict[str, str],
                   synthetic: bool, assembled: Assembled, reports: Path) -> str:
    out = [f"## {section.title}", ""]
    if section.text:
        out += [section.text, ""]
    if section.key == "not_beating_random":  # the verdict first, then the table that explains it
        out += [not_beating_random(frames, synthetic, assembled, tables_dir(cfg)), ""]
    for spec in section.tables:
        if spec.name not in markdowns:
            out += [f"*{spec.caption or spec.name}: absent because `{cfg.data.name}` has no ground "
                    "truth (it needs the synthetic world).*", ""]
            continue
        if spec.caption:
            out += [f"**{spec.caption}** (`tables/{spec.name}.md`)", ""]
        out += [fold(markdowns[spec.name], int(cfg.evaluation.report.collapse_rows),
                     f"table {spec.name}"), ""]
    for spec in section.figures:
        if spec.needs_ground_truth and not synthetic:
            out += [f"*Figure {spec.pattern}: absent because `{cfg.data.name}` has no ground truth.*", ""]
            continue
        for path in find_figures(cfg, spec):
            rel = path.relative_to(reports).as_posix()
            assembled.figures[path.stem] = path
            out += [f"![{path.stem}]({rel})", ""]
    if section.key == "gradcam":
        out += [gradcam_rows(frames), ""]
    if section.key == "gating" and "gating_sweep" in frames:
        out += [largest_map_change(frames["gating_sweep"]), ""]
    if section.published:
        out += ["**Published values next to ours**", "",
                published_table(cfg, for_section(section.published, PUBLISHED), frames), ""]
    elif section.key == "hadamard":
        out += ["No published number of this paper is put next to ours: Kim et al. print "
                "per-example token z-scores, not a statistic our table aggregates "
                "(`pipeline/evaluation/published.py`).", ""]
    return "\n".join(out)


def hadamard_applies(cfg, models: list[str]) -> bool:
    """The Hadamard study needs a model with attention glimpses (MLB)."""
    for model in models:
        info = inputs.load_store(cfg, model)["methods"].get("attention")
        if info is not None and not info.get("skipped"):
            return True
    return False


def build_readme(cfg, models: list[str], assembled: Assembled) -> str:
    synthetic = cfg.data.source == "synthetic"
    reports = abspath(cfg.paths.reports_dir)
    frames, markdowns = {}, {}
    has_attention = hadamard_applies(cfg, models)
    for section in SECTIONS:
        for spec in section.tables:
            if spec.needs_ground_truth and not synthetic:
                assembled.absent.append(spec.name)
                continue
            if section.key == "hadamard" and not has_attention:
                assembled.absent.append(spec.name)
                continue
            markdowns[spec.name], frames[spec.name] = read_table(cfg, spec)
            assembled.tables.append(spec.name)
    parts = [header(cfg, models, frames, synthetic)]
    for section in SECTIONS:
        if section.key == "hadamard" and not has_attention:
            parts.append(f"## {section.title}\n\n*Absent: none of the models "
                         f"({', '.join(models)}) has attention glimpses, which the study needs.*\n")
            continue
        parts.append(render_section(cfg, section, frames, markdowns, synthetic, assembled, reports))
    return "\n".join(parts).rstrip() + "\n"


# --- the gallery ------------------------------------------------------------------------------

def build_gallery(cfg, models: list[str], gallery_dir: Path) -> tuple[list, dict[str, int]]:
    g = cfg.evaluation.report.gallery
    records = {r["question_id"]: r for r in processed.load_question_table(
        abspath(cfg.paths.processed_dir), str(cfg.evaluation.split))}
    data_root = abspath(cfg.data.root)
    entries, counts = [], {}
    for model in models:
        index = inputs.load_store(cfg, model)
        methods = inputs.methods_that_ran(index)
        if g.methods is not None:
            unknown = sorted(set(g.methods) - set(index["methods"]))
            if unknown:
                raise DataError(f"evaluation.report.gallery.methods names {unknown}, which the store "
                                f"of {model} does not have ({list(index['methods'])})",
                                inputs.attribution_dir(cfg, model))
            methods = [m for m in methods if m in set(g.methods)]
        position = {int(q["question_id"]): i for i, q in enumerate(index["questions"])}
        sample = sample_questions(index["questions"], int(g.questions), int(cfg.evaluation.seed), model)
        # Only the arrays the gallery draws (image map, validity, question map) of each method.
        arrays = {m: inputs.read_method(cfg, model, m, (), optional=("image_map", "valid", "question_map"),
                                        index=index) for m in methods}
        for a in arrays.values():
            del a["question_ids"]
        out_dir = gallery_dir / model
        out_dir.mkdir(parents=True, exist_ok=True)
        for row in tqdm(sample, desc=f"gallery {model}", unit="q"):
            record = records.get(row["question_id"])
            if record is None:
                raise DataError(f"question {row['question_id']} of the {model} store is not in the "
                                "processed question table: rerun the attribute stage on this data",
                                processed.questions_file(abspath(cfg.paths.processed_dir), str(cfg.evaluation.split)))
            i = position[int(row["question_id"])]
            size = next(iter(arrays.values()))["image_map"].shape[-1] if arrays else None
            image = display_image(data_root, record["image"], size)
            maps = {m: {k: a[k][i] for k in a} for m, a in arrays.items()}
            entries.append(render_entry_images(out_dir, f"gallery/{model}", model, row, image, maps,
                                               alpha=float(g.alpha), cmap=str(g.cmap)))
        counts[model] = len(sample)
    return entries, counts


# --- the stage --------------------------------------------------------------------------------

def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    models = [str(m) for m in cfg.evaluation.models]
    reports = abspath(cfg.paths.reports_dir)
    assembled = Assembled()
    # Every input is checked before anything is written: a missing table must not leave a
    # half-updated report behind.
    readme = build_readme(cfg, models, assembled)
    with atomic_directory(reports / "gallery") as gallery_dir:
        entries, counts = build_gallery(cfg, models, gallery_dir)
    synthetic = cfg.data.source == "synthetic"
    note = (f"Computed on the synthetic world (data={cfg.data.name}), not on VQA / VQA-HAT."
            if synthetic else f"Computed on data={cfg.data.name}.")
    page = gallery_html(entries, "VQA explanations: gallery", note)
    write_text(reports / "README.md", readme)
    write_text(reports / "index.html", page)
    overlays = sum(1 for e in entries for v in e.methods if v.image_src)
    metrics = {
        "data": str(cfg.data.name),
        "gallery_questions": counts,
        "gallery_overlays": overlays,
        "tables_included": len(assembled.tables),
        "tables": assembled.tables,
        "figures_included": len(assembled.figures),
        "absent_sections": assembled.absent,
        "published_values": {"verified": sum(p.verified for p in PUBLISHED),
                             "not_verified": sum(not p.verified for p in PUBLISHED)},
        "not_beating_random": assembled.not_beating_random,
    }
    seconds = publish(cfg, "report", figures=assembled.figures, metrics=metrics, start=start,
                      summary={"gallery_questions": sum(counts.values()), "gallery_overlays": overlays,
                               "tables_included": len(assembled.tables)},
                      note=f"{len(assembled.tables)} tables and {len(assembled.figures)} figures included, "
                           f"gallery of {sum(counts.values())} questions ({overlays} overlays)")["seconds"]
    return {**metrics, "seconds": round(seconds, 1)}


main = stage_main(run)

if __name__ == "__main__":
    main()
