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
methods do not beat the random baseline, faithful or only plausible (stage ``faithfulness``:
perturbation tests beside the rank correlation), and the sanity checks (Adebayo et al. 2018).

index.html: per model a deterministic sample of ``gallery.questions`` validation questions
spread over answer types and right/wrong answers; for each, the image, every method's overlay
(PNG files under ``reports/gallery/<model>/``) and the question tokens coloured by each
method's question map and its image deletion curve (stage ``faithfulness``); filterable in the
browser (inline JS, no network).

A table or figure that an evaluation stage should have written and did not is an error naming
that stage; sections that need the synthetic world's ground truth are reported as absent, with
the reason, on data without it. Writes ``reports/metrics/report.json``.
"""
from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from pipeline.common.config import abspath, stage_main
from pipeline.evaluation.outputs import publish
from pipeline.evaluation.published import PUBLISHED
from pipeline.evaluation.report.sections import Assembled, build_readme
from pipeline.common.files import atomic_directory, write_text
from pipeline.viz.gallery import build_gallery, gallery_html

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    models = [str(m) for m in cfg.evaluation.models]
    reports = abspath(cfg.paths.reports_dir)
    assembled = Assembled()
    # Every input is checked before anything is written: a missing table must not leave a
    # half-updated report behind.
    readme = build_readme(cfg, models, assembled, PUBLISHED)
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
