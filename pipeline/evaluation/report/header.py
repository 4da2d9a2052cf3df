"""The README's header: what the numbers were computed on (data, models and their validation
accuracy, across training seeds too, the POS tagger, the seeds)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.common.config import abspath, replicate_config, training_seeds
from pipeline.common.errors import DataError
from pipeline.evaluation import inputs
from pipeline.evaluation.outputs import markdown_table
from pipeline.evaluation.report.assets import missing
from pipeline.evaluation.report.prose import prose
from pipeline.common.files import read_json
from pipeline.models.checkpoint import train_metrics_path


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
        lines += ["> " + prose("synthetic_warning").format(data=data.name), ""]
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
