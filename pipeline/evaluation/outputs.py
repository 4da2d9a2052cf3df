"""Writing what the evaluation stages produce: tables as CSV and Markdown, figures as PNG (each
written atomically), metrics as JSON, and the same tables and figures logged to the run's wandb
project (offline by default, like training). Every stage ends with :func:`publish`."""
from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path

import pandas as pd

from pipeline.common.config import abspath
from pipeline.common.files import atomic_path, write_json, write_text

log = logging.getLogger(__name__)


@functools.cache
def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (stages run headless and only
    write PNG files), chosen here once for every figure the pipeline draws: the stages' figures
    (``pipeline.viz``) and the ones this module saves and publishes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def json_safe(value):
    """Metrics with undefined numbers (NaN: nothing finite to average) as null, which every JSON
    reader (``dvc metrics``) accepts; dicts, lists and tuples converted all the way down."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def bootstrap_settings(cfg) -> dict:
    """The percentile bootstrap of every table (``evaluation.bootstrap``, ``evaluation.seed``) as
    keyword arguments of :func:`pipeline.evaluation.stats.summarise` and ``bootstrap_ci``."""
    evaluation = cfg.evaluation
    return {"samples": int(evaluation.bootstrap.samples),
            "confidence": float(evaluation.bootstrap.confidence), "seed": int(evaluation.seed)}


def tables_dir(cfg) -> Path:
    return abspath(cfg.paths.reports_dir) / "tables"


def figures_dir(cfg) -> Path:
    return abspath(cfg.paths.reports_dir) / "figures"


def metrics_path(cfg, stage: str) -> Path:
    return abspath(cfg.paths.metrics_dir) / f"{stage}.json"


def _cell(value, digits: int) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency), floats to ``digits`` places."""
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(_cell(v, digits) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def write_table(df: pd.DataFrame, path: Path, markdown: bool = True, digits: int = 3) -> list[Path]:
    """``path`` (.csv) and, with ``markdown``, the same table as ``path.with_suffix('.md')``.
    CSV floats keep full precision (tables are compared byte for byte across runs)."""
    path = Path(path).with_suffix(".csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    written = [path]
    if markdown:
        written.append(write_text(path.with_suffix(".md"), markdown_table(df, digits)))
    return written


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG (no timestamps in the file: reproducible)."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def not_measured_figure(path: Path, reason: str) -> Path:
    """A small figure that says why a measurement was left out (e.g. it needs the synthetic
    world's ground truth): a stage writes every output dvc.yaml declares, and none from an
    earlier run on other data may stay behind."""
    fig, ax = pyplot().subplots(figsize=(5, 1))
    ax.axis("off")
    ax.text(0.5, 0.5, f"Not measured: {reason}", ha="center", va="center", wrap=True, fontsize=8)
    return save_figure(fig, path)


def _typed_for_wandb(df: pd.DataFrame) -> pd.DataFrame:
    """wandb tables need one type per column: text columns that mix types (a flag left empty on
    the reference row) are logged as text."""
    df = df.copy()
    for column in df.columns:
        if df[column].dtype == object:
            df[column] = df[column].map(lambda v: "" if v is None else str(v))
    return df


def log_to_wandb(cfg, stage: str, tables: dict[str, pd.DataFrame] | None = None,
                 figures: dict[str, Path] | None = None, summary: dict | None = None) -> None:
    """One wandb run per stage (job_type = stage) in ``logger.project``, holding the stage's
    tables, figures and summary numbers. Offline unless ``logger.mode=online``; nothing when
    ``logger.wandb=false`` (``logger=csv``)."""
    if not cfg.logger.get("wandb"):
        return
    import wandb

    run = wandb.init(project=str(cfg.logger.project), mode=str(cfg.logger.mode), job_type=stage,
                     name=stage, dir=str(abspath(cfg.logger.dir)), reinit="finish_previous",
                     settings=wandb.Settings(silent=True))
    try:
        # Tables and figures under keys of their own: a stage's figure often shares its table's
        # name, and one key would keep only the last value logged.
        payload = {f"{stage}/tables/{name}": wandb.Table(dataframe=_typed_for_wandb(df))
                   for name, df in (tables or {}).items()}
        payload.update({f"{stage}/figures/{name}": wandb.Image(str(p)) for name, p in (figures or {}).items()})
        if payload:
            run.log(payload)
        for key, value in (summary or {}).items():
            run.summary[f"{stage}/{key}"] = value
    finally:
        run.finish()


def publish(cfg, stage: str, *, tables: dict | None = None, figures: dict | None = None,
            metrics: dict | None = None, summary: dict | None = None, start: float | None = None,
            note: str = "") -> dict:
    """The end of every evaluation stage: write its outputs, log them to wandb, log the time.

    ``tables``: name -> DataFrame, written as ``reports/tables/<name>.csv`` and ``.md``
    (:func:`write_table`), or name -> (DataFrame, Markdown text): the ``.md`` is that text (a
    caption before the table, or why it was not measured). ``figures``: name -> matplotlib figure,
    saved as ``reports/figures/<name>.png``, or the path of one the stage saved already.
    ``metrics``: written (:func:`json_safe`) as ``reports/metrics/<stage>.json``. Then one wandb
    run (:func:`log_to_wandb`) with the tables that have rows, the figures and ``summary``, none
    when there is nothing to log; ``note`` goes into the log line with the seconds since ``start``.
    Returns {"tables": name -> CSV path, "figures": name -> PNG path, "metrics": as written,
    "seconds": since ``start`` (None without it)}."""
    frames, csv_paths, figure_paths = {}, {}, {}
    for name, table in (tables or {}).items():
        df, markdown = table if isinstance(table, tuple) else (table, None)
        (csv_paths[name], *_) = write_table(df, tables_dir(cfg) / f"{name}.csv", markdown=markdown is None)
        if markdown is not None:
            write_text(csv_paths[name].with_suffix(".md"), markdown)
        if len(df):
            frames[name] = df
    for name, figure in (figures or {}).items():
        figure_paths[name] = (Path(figure) if isinstance(figure, (str, Path))
                              else save_figure(figure, figures_dir(cfg) / f"{name}.png"))
    if metrics is not None:
        metrics = json_safe(metrics)
        write_json(metrics_path(cfg, stage), metrics)
    if frames or figure_paths or summary:
        log_to_wandb(cfg, stage, tables=frames, figures=figure_paths, summary=summary)
    seconds = None if start is None else time.perf_counter() - start
    log.info("%s%s: %d table(s), %d figure(s)%s%s", stage, f" ({note})" if note else "", len(csv_paths),
             len(figure_paths), "" if metrics is None else f", metrics {metrics_path(cfg, stage)}",
             "" if seconds is None else f" in {seconds:.1f} s")
    return {"tables": csv_paths, "figures": figure_paths, "metrics": metrics, "seconds": seconds}
