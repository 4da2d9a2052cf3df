"""The tables and figures the report embeds: what each section expects an evaluation stage to
have written, reading them, and the error naming the stage when one is missing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.common.errors import DataError
from pipeline.evaluation.outputs import figures_dir, tables_dir


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
