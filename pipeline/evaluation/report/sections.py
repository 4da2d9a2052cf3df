"""The README's sections, one renderer each, in the order of docs/evaluation.md (the four
papers), then the checks. A :class:`Section` renders its title, its prose (``templates/<key>.md``),
its tables and figures and the published values next to ours; a section with something of its
own overrides one hook: :meth:`Section.lead` (before the tables), :meth:`Section.closing` (after
the figures), :meth:`Section.published_values` or :meth:`Section.absent` (why it does not apply)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.attribution.methods.gradcam_counterfactual import NAME as COUNTERFACTUAL
from pipeline.attribution.methods.random import NAME as RANDOM
from pipeline.common.config import abspath
from pipeline.common.errors import DataError
from pipeline.evaluation import faithfulness, inputs
from pipeline.evaluation.inputs import as_bool
from pipeline.evaluation.outputs import markdown_table, tables_dir
from pipeline.evaluation.published import PublishedValue, for_section
from pipeline.evaluation.report.assets import FigureSpec, TableSpec, find_figures, fold, read_table
from pipeline.evaluation.report.header import header
from pipeline.evaluation.report.prose import prose
from pipeline.evaluation.report.published_lookup import published_table

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


@dataclass
class Context:
    """What every section renders from: the config, the tables read (CSV frames and Markdown),
    the published values, and the record of what was used."""
    cfg: object
    models: list[str]
    published: tuple[PublishedValue, ...]
    assembled: Assembled
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    markdowns: dict[str, str] = field(default_factory=dict)

    @property
    def synthetic(self) -> bool:
        return self.cfg.data.source == "synthetic"

    @property
    def reports(self) -> Path:
        return abspath(self.cfg.paths.reports_dir)


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    tables: tuple[TableSpec, ...] = ()
    figures: tuple[FigureSpec, ...] = ()
    published: str | None = None   # section key in evaluation.published

    @property
    def text(self) -> str:
        """The section's prose, ``templates/<key>.md`` ("" without one)."""
        return prose(self.key)

    # --- the hooks -------------------------------------------------------------------------

    def absent(self, ctx: Context) -> str | None:
        """Why the whole section does not apply to these models (None: it does)."""
        return None

    def lead(self, ctx: Context) -> list[str]:
        """Lines between the prose and the tables."""
        return []

    def closing(self, ctx: Context) -> list[str]:
        """Lines after the figures."""
        return []

    def published_values(self, ctx: Context) -> list[str]:
        if not self.published:
            return []
        return ["**Published values next to ours**", "",
                published_table(ctx.cfg, for_section(self.published, ctx.published), ctx.frames), ""]

    # --- the shared rendering --------------------------------------------------------------

    def read(self, ctx: Context) -> None:
        """Read the section's tables into ``ctx`` (those that apply to the data)."""
        skip = self.absent(ctx) is not None
        for spec in self.tables:
            if skip or (spec.needs_ground_truth and not ctx.synthetic):
                ctx.assembled.absent.append(spec.name)
                continue
            ctx.markdowns[spec.name], ctx.frames[spec.name] = read_table(ctx.cfg, spec)
            ctx.assembled.tables.append(spec.name)

    def render(self, ctx: Context) -> str:
        reason = self.absent(ctx)
        if reason is not None:
            return f"## {self.title}\n\n*Absent: {reason}*\n"
        out = [f"## {self.title}", ""]
        if self.text:
            out += [self.text, ""]
        out += self.lead(ctx)
        out += self.render_tables(ctx)
        out += self.render_figures(ctx)
        out += self.closing(ctx)
        out += self.published_values(ctx)
        return "\n".join(out)

    def render_tables(self, ctx: Context) -> list[str]:
        cfg, out = ctx.cfg, []
        for spec in self.tables:
            if spec.name not in ctx.markdowns:
                out += [f"*{spec.caption or spec.name}: absent because `{cfg.data.name}` has no ground "
                        "truth (it needs the synthetic world).*", ""]
                continue
            if spec.caption:
                out += [f"**{spec.caption}** (`tables/{spec.name}.md`)", ""]
            out += [fold(ctx.markdowns[spec.name], int(cfg.evaluation.report.collapse_rows),
                         f"table {spec.name}"), ""]
        return out

    def render_figures(self, ctx: Context) -> list[str]:
        out = []
        for spec in self.figures:
            if spec.needs_ground_truth and not ctx.synthetic:
                out += [f"*Figure {spec.pattern}: absent because `{ctx.cfg.data.name}` has no ground truth.*", ""]
                continue
            for path in find_figures(ctx.cfg, spec):
                rel = path.relative_to(ctx.reports).as_posix()
                ctx.assembled.figures[path.stem] = path
                out += [f"![{path.stem}]({rel})", ""]
        return out


class GradcamSection(Section):
    """The Grad-CAM family's rows of the rank-correlation table."""

    def closing(self, ctx: Context) -> list[str]:
        return [gradcam_rows(ctx.frames), ""]


class HadamardSection(Section):
    """Needs a model with attention glimpses; no published number to put next to ours."""

    def absent(self, ctx: Context) -> str | None:
        if hadamard_applies(ctx.cfg, ctx.models):
            return None
        return f"none of the models ({', '.join(ctx.models)}) has attention glimpses, which the study needs."

    def published_values(self, ctx: Context) -> list[str]:
        return [prose("hadamard_unpublished"), ""]


class GatingSection(Section):
    """Where the gated map changes most along the sweep."""

    def closing(self, ctx: Context) -> list[str]:
        return [largest_map_change(ctx.frames["gating_sweep"]), ""] if "gating_sweep" in ctx.frames else []


class NotBeatingRandomSection(Section):
    """The verdict first, then the table that explains it."""

    def lead(self, ctx: Context) -> list[str]:
        return [not_beating_random(ctx.frames, ctx.synthetic, ctx.assembled, tables_dir(ctx.cfg)), ""]


class FaithfulnessSection(Section):
    """After the curves: the methods plausible but not faithful (or the reverse), and the
    verdicts that depend on the fill."""

    def closing(self, ctx: Context) -> list[str]:
        return [faithfulness_verdicts(ctx.frames), ""]


SECTIONS: tuple[Section, ...] = (
    Section("rank_correlation", "Goyal et al., Table 1: rank correlation with human attention",
            (TableSpec("rank_correlation", "rank_correlation"),
             TableSpec("rank_correlation_by_answer_type", "rank_correlation",
                       caption="The same, per answer type"),
             TableSpec("rank_correlation_by_seed", "rank_correlation",
                       caption="Every training seed's rows")),
            (FigureSpec("rank_correlation.png", "rank_correlation"),
             FigureSpec("rank_correlation_by_answer_type.png", "rank_correlation")), "rank_correlation"),
    Section("pos_histogram", "Goyal et al., Fig. 3: which words matter, by part of speech",
            (TableSpec("pos_histogram", "pos_histogram"),
             TableSpec("pos_histogram_by_tag", "pos_histogram", caption="The same per tag"),
             TableSpec("pos_ground_truth", "pos_histogram", needs_ground_truth=True,
                       caption="Most important word vs the ground-truth important words")),
            (FigureSpec("pos_histogram.png", "pos_histogram"),)),
    Section("failure_prediction", "Goyal et al., section 4.2: predicting failures from answer flips",
            (TableSpec("failure_prediction", "failure_prediction"),),
            (FigureSpec("failure_prediction.png", "failure_prediction"),), "failure_prediction"),
    GradcamSection("gradcam", "Grad-CAM (Selvaraju et al.): CAM, guided backprop, Grad-CAM, Guided Grad-CAM, "
                   "counterfactual Grad-CAM"),
    HadamardSection("hadamard", "Kim et al.: explanations from the Hadamard product (MLB)",
                    (TableSpec("hadamard", "hadamard_study"),),
                    (FigureSpec("hadamard_*.png", "hadamard_study"),)),
    GatingSection("gating", "Ummettuguli: question-gated Grad-CAM",
                  (TableSpec("gating_top_neurons", "gating_study", caption="Top-10 neurons (Tables 1-4)"),
                   TableSpec("gating_score_correlation", "gating_study",
                             caption="Spearman between neuron scores of question pairs (Tables 5-6)"),
                   TableSpec("gating_sweep", "gating_study", needs_ground_truth=True,
                             caption="Top-n sweep on same-answer question pairs")),
                  (FigureSpec("gating_sweep.png", "gating_study", needs_ground_truth=True),), "gating"),
    NotBeatingRandomSection("not_beating_random", "Which methods do not beat random",
                            (TableSpec("evidence_slope", "evidence_slope", needs_ground_truth=True,
                                       caption="Does the answer's score rise with the evidence at the "
                                               "ground truth?"),)),
    FaithfulnessSection("faithfulness", "Faithful or only plausible?",
                        (TableSpec("faithfulness_plausibility", "faithfulness",
                                   caption="Plausibility (rank correlation) beside faithfulness (image deletion)"),
                         TableSpec("faithfulness", "faithfulness", caption="Every perturbation curve's area"),
                         TableSpec("faithfulness_pixel_check", "faithfulness",
                                   caption="Grid-space curves against pixel-space curves")),
                        (FigureSpec("faithfulness_vs_plausibility.png", "faithfulness"),
                         FigureSpec("faithfulness_image.png", "faithfulness"),
                         FigureSpec("faithfulness_question.png", "faithfulness"))),
    Section("sanity", "Sanity checks (Adebayo et al. 2018): cascading parameter randomisation",
            (TableSpec("sanity", "sanity_check"),), (FigureSpec("sanity.png", "sanity_check"),)),
)


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
    lines.append(prose("verdict_legend") + "\n")
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
    return (prose("failures_by_answer_type").format(counterfactual=COUNTERFACTUAL) + "\n\n"
            + markdown_table(pd.DataFrame(rows).fillna("")) + "\n")


def faithfulness_verdicts(frames: dict[str, pd.DataFrame]) -> str:
    """Sentences from the faithfulness tables (read from CSV: verdicts as True / False / empty)."""
    table = frames["faithfulness"].copy()
    table["more_faithful_than_random"] = [("" if v is None else v) for v in
                                          map(as_bool, table["more_faithful_than_random"])]
    plausibility = frames["faithfulness_plausibility"].copy()
    if plausibility.empty:
        return "No method has both a rank correlation and an image deletion curve.\n"
    plausibility["plausible"] = plausibility["plausible"].map(as_bool)
    plausibility["faithful"] = plausibility["faithful"].fillna("").astype(str)
    return "\n".join(faithfulness.verdict_sentences(plausibility, faithfulness.fill_dependent(table))) + "\n"


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


def hadamard_applies(cfg, models: list[str]) -> bool:
    """The Hadamard study needs a model with attention glimpses (MLB)."""
    for model in models:
        info = inputs.load_store(cfg, model)["methods"].get("attention")
        if info is not None and not info.get("skipped"):
            return True
    return False


def build_readme(cfg, models: list[str], assembled: Assembled,
                 published: tuple[PublishedValue, ...]) -> str:
    """Every table is read (and checked) before any section is rendered."""
    ctx = Context(cfg, models, published, assembled)
    for section in SECTIONS:
        section.read(ctx)
    parts = [header(cfg, models, ctx.frames, ctx.synthetic)]
    parts += [section.render(ctx) for section in SECTIONS]
    return "\n".join(parts).rstrip() + "\n"
