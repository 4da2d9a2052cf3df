"""The published values next to ours: our counterpart of each number a paper printed
(:mod:`pipeline.evaluation.published`), located in the tables the report read, and the Markdown
table that puts them side by side."""
from __future__ import annotations

import pandas as pd

from pipeline.evaluation.published import PublishedValue


NOT_VERIFIED = "published value not verified"


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
