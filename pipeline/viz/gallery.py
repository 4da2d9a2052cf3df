"""The static gallery of the report (``reports/index.html``): per sampled question the image,
every method's heat-map overlay and the question tokens coloured by each method's question map,
filterable by model, method, answer type and correctness.

The page is self-contained (inline CSS and a few lines of inline JS, no CDN, no server): open
the file in a browser. Overlays are PNG files written with PIL (``viz.overlay``): one blend per
image, no matplotlib figure per image, so 2 models x 24 questions x 10 methods render in seconds.
"""
from __future__ import annotations

import html
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.common.config import abspath
from pipeline.data import processed
from pipeline.common.errors import DataError
from pipeline.evaluation import inputs
from pipeline.common.files import atomic_path
from pipeline.viz.overlay import display_image, overlay, tokens_html


@dataclass
class MethodView:
    method: str
    image_src: str | None          # overlay PNG relative to the page; None when there is no map
    note: str = ""                 # why there is no overlay (non-finite map)
    tokens: str = ""               # coloured tokens (HTML) or "" when the method has no question map
    curve: str = ""                # inline SVG: the image deletion (morf) curve, "" when not computed


@dataclass
class GalleryEntry:
    model: str
    question_id: int
    image_id: int
    question: str
    tokens: list[str]
    answer_type: str
    predicted: str
    probability: float
    correct: bool | None
    image_src: str
    methods: list[MethodView] = field(default_factory=list)


def correctness(correct: bool | None) -> str:
    return "unscored" if correct is None else ("correct" if correct else "wrong")


def sample_questions(rows: list[dict], n: int, seed: int, salt: str = "") -> list[dict]:
    """``n`` questions spread over answer types and right/wrong answers: the rows are split into
    strata (answer type, correctness), each stratum shuffled by a generator seeded with ``seed``
    (and ``salt``, e.g. the model name, so two models do not get the same positions), and the
    strata are taken round-robin. Deterministic; returned sorted by question id."""
    strata: dict[tuple[str, str], list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["question_id"]):
        strata.setdefault((str(row["answer_type"]), correctness(row.get("correct"))), []).append(row)
    rng = np.random.default_rng([int(seed), zlib.crc32(salt.encode())])
    queues = [[members[i] for i in rng.permutation(len(members))] for _, members in sorted(strata.items())]
    picked: list[dict] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return sorted(picked, key=lambda r: r["question_id"])


def write_png(path: Path, rgb: np.ndarray) -> Path:
    """uint8 H x W x 3 -> PNG, atomically (PIL writes no timestamp: identical bytes run to run)."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return Path(path)


def render_entry_images(out_dir: Path, src_prefix: str, model: str, row: dict, image: np.ndarray,
                        maps: dict[str, dict], alpha: float = 0.5, cmap: str = "jet") -> GalleryEntry:
    """Write ``<qid>_image.png`` and ``<qid>_<method>.png`` (overlay of |image_map|) into
    ``out_dir`` for one question of ``model``; ``maps[method]`` holds this question's ``image_map``,
    ``valid`` and (optional) ``question_map``. Returns the gallery entry describing them."""
    qid = int(row["question_id"])
    write_png(out_dir / f"{qid}_image.png", image)
    tokens = list(row["tokens"])
    entry = GalleryEntry(model=model, question_id=qid, image_id=int(row["image_id"]),
                         question=str(row["question"]), tokens=tokens,
                         answer_type=str(row["answer_type"]), predicted=str(row["predicted"]),
                         probability=float(row["probability"]), correct=row.get("correct"),
                         image_src=f"{src_prefix}/{qid}_image.png")
    for method, arrays in maps.items():
        view = MethodView(method, None)
        heat = np.asarray(arrays["image_map"], dtype=np.float32)
        if not bool(arrays.get("valid", True)) or not np.isfinite(heat).all():
            view.note = "map not finite"
        else:
            write_png(out_dir / f"{qid}_{method}.png", overlay(image, heat, alpha=alpha, cmap=cmap))
            view.image_src = f"{src_prefix}/{qid}_{method}.png"
        question_map = arrays.get("question_map")
        if question_map is not None:
            scores = np.asarray(question_map, dtype=np.float64)[:len(tokens)]
            if np.isfinite(scores).all():
                view.tokens = tokens_html(tokens[:len(scores)], scores)
        entry.methods.append(view)
    return entry


CSS = """
body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
#filters{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:.5em;z-index:1}
#filters label{margin-right:.6em;white-space:nowrap}
.entry{background:#fff;border:1px solid #ddd;border-radius:6px;margin:.8em 0;padding:.5em}
.entry h3{margin:.2em 0;font-size:1em;font-weight:normal}
.row{display:flex;flex-wrap:wrap;gap:.5em}
figure{margin:0;width:140px;font-size:.75em}
figure img{width:128px;height:128px;image-rendering:pixelated;display:block}
figcaption{font-weight:bold}
.tok{padding:0 2px;border-radius:2px}
.badge{padding:0 .4em;border-radius:3px;color:#fff}
.correct{background:#2a7}.wrong{background:#c33}.unscored{background:#888}
.none{color:#888}
.note{background:#ffd;border:1px solid #cc9;padding:.4em;margin:.5em 0}
"""

JS = """
function applyFilters(){
  var model=document.getElementById('f-model').value;
  var type=document.getElementById('f-type').value;
  var corr=document.getElementById('f-correct').value;
  var shown=0;
  document.querySelectorAll('.entry').forEach(function(e){
    var ok=(!model||e.dataset.model===model)&&(!type||e.dataset.answerType===type)&&(!corr||e.dataset.correct===corr);
    e.style.display=ok?'':'none'; if(ok){shown++;}
  });
  var methods={};
  document.querySelectorAll('.f-method').forEach(function(c){methods[c.value]=c.checked;});
  document.querySelectorAll('figure.method').forEach(function(f){
    f.style.display=methods[f.dataset.method]?'':'none';
  });
  document.getElementById('count').textContent=shown+' question(s) shown';
}
document.addEventListener('DOMContentLoaded',function(){
  document.querySelectorAll('#filters select,#filters input').forEach(function(el){
    el.addEventListener('change',applyFilters);
  });
  applyFilters();
});
"""


def _options(values: list[str]) -> str:
    return '<option value="">all</option>' + "".join(
        f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)


def entry_html(entry: GalleryEntry) -> str:
    status = correctness(entry.correct)
    head = (f'<h3><b>{html.escape(entry.model)}</b> · question {entry.question_id} · image '
            f'{entry.image_id} · {html.escape(entry.answer_type)} — “{html.escape(entry.question)}” → '
            f'<b>{html.escape(entry.predicted)}</b> (p = {entry.probability:.3f}) '
            f'<span class="badge {status}">{status}</span></h3>')
    figures = [f'<figure><img src="{html.escape(entry.image_src)}" alt="image {entry.image_id}">'
               f'<figcaption>image</figcaption></figure>']
    for view in entry.methods:
        picture = (f'<img src="{html.escape(view.image_src)}" alt="{html.escape(view.method)}">'
                   if view.image_src else f'<div class="none">{html.escape(view.note)}</div>')
        tokens = view.tokens or '<span class="none">no question map</span>'
        figures.append(f'<figure class="method" data-method="{html.escape(view.method)}">{picture}'
                       f'<figcaption>{html.escape(view.method)}</figcaption><div>{tokens}</div>'
                       f'{view.curve}</figure>')
    return (f'<div class="entry" data-model="{html.escape(entry.model)}" data-qid="{entry.question_id}" '
            f'data-answer-type="{html.escape(entry.answer_type)}" data-correct="{status}">\n{head}\n'
            f'<div class="row">{"".join(figures)}</div>\n</div>')


def gallery_html(entries: list[GalleryEntry], title: str, note: str = "") -> str:
    """The whole page: filters (model, answer type, correctness, one checkbox per method) and
    one block per entry, in the given order."""
    models = list(dict.fromkeys(e.model for e in entries))
    types = sorted({e.answer_type for e in entries})
    methods = list(dict.fromkeys(v.method for e in entries for v in e.methods))
    checkboxes = "".join(f'<label><input type="checkbox" class="f-method" value="{html.escape(m)}" '
                         f'checked> {html.escape(m)}</label>' for m in methods)
    filters = (f'<div id="filters">Model <select id="f-model">{_options(models)}</select> '
               f'Answer type <select id="f-type">{_options(types)}</select> '
               f'Answer <select id="f-correct">{_options(["correct", "wrong", "unscored"])}</select>'
               f'<br>Methods: {checkboxes} <span id="count"></span></div>')
    body = "\n".join(entry_html(e) for e in entries)
    note_html = f'<div class="note">{note}</div>' if note else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n<script>{JS}</script>\n'
            f'</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{note_html}\n'
            f'<p>Heat maps show |map| normalised per map (red = high). Tokens: red = important, '
            f'blue = negative, white = 0 (hover for the score). Methods without a question map '
            f'say so.</p>\n{filters}\n{body}\n</body>\n</html>\n')


def curve_svg(curves: dict[str, np.ndarray], fractions: np.ndarray, random: dict[str, np.ndarray]) -> str:
    """A 128 x 48 inline SVG of one question's image deletion (morf) curves: the method's per fill
    (solid: the last fill, ``road``; dashed: the others) over the random map's (grey), the
    probability axis from 0 to the highest value shown; the areas in the tooltip."""
    shown = [*curves.values(), *random.values()]
    top = max(float(np.nanmax(c)) for c in shown) if shown else 0.0
    if not np.isfinite(top) or top <= 0:
        return ""
    width, height = 128, 48

    def points(c):
        return " ".join(f"{width * x:.1f},{height * (1 - y / top):.1f}" for x, y in zip(fractions, c))

    lines, fills = [], list(curves)
    for fill, c in random.items():
        lines.append(f'<polyline points="{points(c)}" fill="none" stroke="#aaa" stroke-width="1"/>')
    for fill, c in curves.items():
        dash = "" if fill == fills[-1] else ' stroke-dasharray="3,2"'
        lines.append(f'<polyline points="{points(c)}" fill="none" stroke="#c33" stroke-width="1.5"{dash}/>')
    areas = ", ".join(f"{f} AUC {np.trapezoid(c, fractions):.3f}" for f, c in curves.items())
    return (f'<svg class="curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'<title>deletion (morf): p(answer) vs share of grid cells removed; {html.escape(areas)}; '
            f'grey: random</title>{"".join(lines)}</svg>')


def question_curves(cfg) -> tuple[dict, np.ndarray]:
    """The faithfulness stage's per-question image deletion curves: (model, question id, method)
    -> fill -> probabilities, and the fractions; a missing file names the stage."""
    import pandas as pd

    from pipeline.evaluation.report.assets import missing

    path = abspath(cfg.paths.reports_dir) / "faithfulness" / "question_curves.csv"
    if not path.is_file():
        raise missing(path, "faithfulness")
    frame = pd.read_csv(path)
    columns = [c for c in frame.columns if c.startswith("p") and c[1:].replace(".", "").isdigit()]
    out: dict = {}
    for row, values in zip(frame.itertuples(index=False), frame[columns].to_numpy(dtype=float)):
        out.setdefault((str(row.model), int(row.question_id), str(row.method)), {})[str(row.fill)] = values
    return out, np.array([float(c[1:]) for c in columns])


# --- the report's gallery: sample, overlays, entries ----------------------------------------


def build_gallery(cfg, models: list[str], gallery_dir: Path) -> tuple[list, dict[str, int]]:
    gallery = cfg.evaluation.report.gallery
    records = {r["question_id"]: r for r in processed.load_question_table(
        abspath(cfg.paths.processed_dir), str(cfg.evaluation.split))}
    data_root = abspath(cfg.data.root)
    curves, fractions = question_curves(cfg)
    entries, counts = [], {}
    for model in models:
        index = inputs.load_store(cfg, model)
        methods = inputs.methods_that_ran(index)
        if gallery.methods is not None:
            unknown = sorted(set(gallery.methods) - set(index["methods"]))
            if unknown:
                raise DataError(f"evaluation.report.gallery.methods names {unknown}, which the store "
                                f"of {model} does not have ({list(index['methods'])})",
                                inputs.attribution_dir(cfg, model))
            methods = [m for m in methods if m in set(gallery.methods)]
        position = {int(q["question_id"]): i for i, q in enumerate(index["questions"])}
        sample = sample_questions(index["questions"], int(gallery.questions), int(cfg.evaluation.seed), model)
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
            entry = render_entry_images(out_dir, f"gallery/{model}", model, row, image, maps,
                                        alpha=float(gallery.alpha), cmap=str(gallery.cmap))
            random = curves.get((model, entry.question_id, "random"), {})
            for view in entry.methods:
                own = curves.get((model, entry.question_id, view.method))
                view.curve = curve_svg(own, fractions, random) if own else ""
            entries.append(entry)
        counts[model] = len(sample)
    return entries, counts
