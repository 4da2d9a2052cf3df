"""The evaluation stages' figures: each function takes a stage's table (and what else it needs)
and returns a matplotlib figure, which the stage publishes (``evaluation.outputs.publish``)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pipeline.evaluation.agreement import HUMAN
from pipeline.evaluation.gating import CHANGE_MEASURE, SWEEP_MEASURES
from pipeline.evaluation.gating import METHOD as GATED
from pipeline.evaluation.outputs import pyplot
from pipeline.evaluation.randomisation import REFERENCE
from pipeline.viz.overlay import overlay, token_colours


def rank_correlation_figure(table: pd.DataFrame, references: list[str], resolution: int,
         by_seed: pd.DataFrame | None = None):
    """Horizontal bars (mean rho) with bootstrap-interval whiskers: one panel per reference,
    one bar per model side by side within each method; a black dot on a bar for each training
    seed's mean (``by_seed``), so the spread across seeds sits next to the interval."""
    plt = pyplot()

    methods = list(dict.fromkeys(table["method"]))
    models = [m for m in dict.fromkeys(table["model"]) if m != HUMAN]
    colours = {m: plt.get_cmap("tab10")(k) for k, m in enumerate(models)}
    colours[HUMAN] = (0.4, 0.4, 0.4, 1.0)
    height = 0.8 / max(1, len(models))
    size = (5.5 * len(references), 0.45 * len(methods) * max(1, len(models)) + 1.5)
    fig, axes = plt.subplots(1, len(references), figsize=size, sharey=True, squeeze=False)
    for ax, reference in zip(axes[0], references):
        part = table[table["reference"] == reference]
        for k, model in enumerate([*models, HUMAN]):
            rows = part[part["model"] == model]
            if rows.empty:
                continue
            y = np.array([methods.index(m) for m in rows["method"]], dtype=float)
            if model != HUMAN:
                y = y - 0.4 + height * (k + 0.5)
            mean = rows["mean"].to_numpy(dtype=float)
            whiskers = np.stack([mean - rows["ci_low"].to_numpy(dtype=float),
                                 rows["ci_high"].to_numpy(dtype=float) - mean])
            ax.barh(y, mean, height=height if model != HUMAN else 0.5, color=colours[model],
                    xerr=np.nan_to_num(whiskers), capsize=2, label=model, error_kw={"lw": 0.8})
            if by_seed is not None and model != HUMAN:
                seeds = by_seed[(by_seed["model"] == model) & (by_seed["reference"] == reference)]
                y_of = dict(zip(rows["method"], y))
                seeds = seeds[seeds["method"].isin(y_of)]
                ax.scatter(seeds["mean"].to_numpy(dtype=float), [y_of[m] for m in seeds["method"]],
                           s=6, color="black", zorder=3, label="training seeds" if k == 0 else None)
        ax.axvline(0, color="black", lw=0.6)
        ax.set_title(f"reference: {reference.replace('_', ' ')}")
        ax.set_xlabel(f"Spearman rho over {resolution}x{resolution} cells (mean, 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(methods)), methods)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Rank correlation of |image map| with where to look (Goyal et al. Table 1)")
    fig.tight_layout()
    return fig


def by_answer_type_figure(table: pd.DataFrame, reference: str):
    """One heat map per model: methods x answer types, mean rho against ``reference``, the
    cells whose interval does not lie above random's hatched."""
    plt = pyplot()

    part = table[(table["reference"] == reference) & (table["model"] != HUMAN)]
    models = list(dict.fromkeys(part["model"]))
    types = sorted(set(part["answer_type"]))
    fig, axes = plt.subplots(1, max(1, len(models)), squeeze=False, layout="constrained",
                             figsize=(1.5 + 3.2 * max(1, len(models)) + 0.9 * len(types) * max(1, len(models)),
                                      0.45 * part["method"].nunique() + 1.8))
    image = None
    for ax, model in zip(axes[0], models):
        rows = part[part["model"] == model]
        methods = list(dict.fromkeys(rows["method"]))
        grid = np.full((len(methods), len(types)), np.nan)
        below = np.zeros_like(grid, dtype=bool)
        for r in rows.itertuples(index=False):
            i, j = methods.index(r.method), types.index(r.answer_type)
            grid[i, j] = r.mean
            below[i, j] = r.beats_random is False
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-0.6, vmax=0.6, aspect="auto")
        for i in range(len(methods)):
            for j in range(len(types)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}" + (" ×" if below[i, j] else ""),
                            ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(types)), types)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_title(model)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean Spearman rho")
    fig.suptitle(f"Rank correlation with {reference.replace('_', ' ')} by answer type "
                 "(× : interval not above random's)")
    return fig


def pos_histogram_figure(table: pd.DataFrame, models: list[str], methods: list[str], tagger_name: str):
    """Fig. 3: one panel per model, one bar per category and method."""
    fig, axes = pyplot().subplots(len(models), 1, figsize=(12, 3.6 * len(models)), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, model in zip(axes[:, 0], models):
        part = table[table.model == model]
        names = list(dict.fromkeys(part.category))  # already in frequency order
        x = np.arange(len(names))
        for k, method in enumerate(methods):
            rows = part[part.method == method].set_index("category")
            if rows.empty:
                continue
            heights = [rows.p_most_important.get(c, np.nan) for c in names]
            ax.bar(x + (k - (len(methods) - 1) / 2) * width, heights, width, label=method)
        ax.set_xticks(x)
        tags = dict(zip(part.category, part.tags))
        ax.set_xticklabels([f"{c}\n{tags[c]}" if tags[c] != c else c for c in names], fontsize=8)
        ax.set_ylabel("P(most important | category)")
        ax.set_ylim(0, 1.15)  # headroom for the legend above bars that reach 1
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_title(f"{model}: categories by frequency on the split (tagger: {tagger_name})", fontsize=10)
        ax.legend(fontsize=8, ncol=len(methods), loc="upper right")
    fig.tight_layout()
    return fig


def flip_bins(edges: list[int]) -> list[tuple[int, float, str]]:
    """(low, high exclusive, label) of the bins [edges[k], edges[k+1]) and [edges[-1], inf)."""
    edges = sorted(int(e) for e in edges)
    bins = []
    for low, high in zip(edges, [*edges[1:], math.inf]):
        label = str(low) if high == low + 1 else (f"{low}+" if high == math.inf else f"{low}-{high - 1}")
        bins.append((low, high, label))
    return bins


def failure_figure(frames: dict[str, pd.DataFrame], edges: list[int]):
    """Share of correct answers per bin of the total flip count, one bar per model per bin,
    with the number of questions of each bar written above it."""
    bins = flip_bins(edges)
    width = 0.8 / max(1, len(frames))
    fig, ax = pyplot().subplots(figsize=(1.2 * len(bins) + 2, 3.8))
    for k, (model, frame) in enumerate(frames.items()):
        labelled = frame[frame["usable"] & frame["correct"].notna()]
        flips = labelled["total_flips"].to_numpy()
        correct = labelled["correct"].astype(bool).to_numpy()
        shares, counts = [], []
        for low, high, _ in bins:
            inside = (flips >= low) & (flips < high)
            counts.append(int(inside.sum()))
            shares.append(float(correct[inside].mean()) if inside.any() else float("nan"))
        x = np.arange(len(bins)) - 0.4 + width * (k + 0.5)
        bars = ax.bar(x, np.nan_to_num(shares), width=width, label=model)
        for bar, count in zip(bars, counts):
            ax.annotate(f"n={count}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(bins)), [label for *_, label in bins])
    ax.set_xlabel("answer flips under occlusion (image patches + dropped words)")
    ax.set_ylabel("share of answers correct")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy vs number of occlusion flips (Goyal et al. 4.2)")
    fig.tight_layout()
    return fig


def gating_sweep_figure(table: pd.DataFrame):
    """x = gate size n (log), y = each measure with its interval band; Grad-CAM dashed."""
    models = list(dict.fromkeys(table["model"]))
    fig, axes = pyplot().subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    colours = dict(zip(SWEEP_MEASURES, ("tab:green", "tab:red", "tab:purple", "tab:blue")))
    for ax, model in zip(axes[0], models):
        t = table[table["model"] == model]
        for measure in SWEEP_MEASURES:
            gated = t[(t["method"] == GATED) & (t["measure"] == measure)].sort_values("top_n")
            ax.plot(gated["top_n"], gated["mean"], "o-", color=colours[measure], label=measure, ms=4)
            ax.fill_between(gated["top_n"], gated["ci_low"], gated["ci_high"], color=colours[measure], alpha=0.2)
            ref = t[(t["method"] == "gradcam") & (t["measure"] == measure)]
            if len(ref):
                ax.axhline(float(ref["mean"].iloc[0]), color=colours[measure], ls="--", lw=1)
        change = t[(t["method"] == GATED) & (t["measure"] == CHANGE_MEASURE)].sort_values("top_n")
        if len(change):
            ax.plot(change["top_n"], change["mean"], "s:", color="0.3", ms=3,
                    label=f"{CHANGE_MEASURE} (1 - rho with the previous n)")
        ax.set_xscale("log")
        ax.axhline(0, color="0.6", lw=0.5)
        ax.set_xlabel("gate size n (top-n fusion neurons; rightmost = full width)")
        ax.set_ylabel("Spearman-based measure")
        ax.set_title(f"{model}: question-gated Grad-CAM (dashed: Grad-CAM)")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def sanity_figure(table: pd.DataFrame, metrics: dict, threshold: float):
    """Adebayo et al. Fig. 2: rank correlation with the trained model's maps as the layers are
    randomised from the top down; one panel per model and modality."""
    plt = pyplot()

    models = list(dict.fromkeys(table["model"]))
    modalities = ["image", "question"]
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.2 * len(models)), squeeze=False)
    methods = list(dict.fromkeys(table["method"]))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for row, model in enumerate(models):
        m = metrics["models"][model]
        labels = ["none", *m["cascade"]]
        for col, modality in enumerate(modalities):
            ax = axes[row][col]
            t = table[(table["model"] == model) & (table["modality"] == modality)]
            for method in methods:
                curve = t[t["method"] == method].sort_values("step")
                if not len(curve):
                    continue
                style = ":" if method == REFERENCE else "-"
                ax.plot(curve["step"], curve["mean"], style, marker="o", ms=3, color=colours[method],
                        label=method + (" (flagged)" if curve["flagged"].any() else ""))
                ax.fill_between(curve["step"], curve["ci_low"], curve["ci_high"], color=colours[method], alpha=0.15)
            ax.axhline(threshold, color="0.4", ls="--", lw=0.8)
            ax.axvline(m["head_steps"], color="0.6", ls=":", lw=0.8)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels([label.split(".", 1)[-1] for label in labels], rotation=60, ha="right", fontsize=7)
            ax.set_ylim(-0.5, 1.05)
            ax.set_ylabel("Spearman rho with trained maps")
            ax.set_title(f"{model}: {modality} maps, layers randomised cumulatively from the top")
            if len(t):
                ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    return fig


def draw_question(ax, tokens: list[str], scores: np.ndarray) -> None:
    """The question under a row, each token on a background coloured by its z-score."""
    ax.axis("off")
    colours = token_colours(scores)
    anchor = ax.text(0.0, 0.5, "", transform=ax.transAxes, va="center", fontsize=10)
    for token, colour in zip(tokens, colours):
        # Each token is placed right after the previous one (annotate relative to its extent);
        # white letters on dark backgrounds keep strongly scored words readable.
        red, green, blue = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
        ink = "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 128 else "black"
        anchor = ax.annotate(token, xy=(1, 0), xycoords=anchor, xytext=(4, 0),
                             textcoords="offset points", va="bottom", fontsize=10, color=ink,
                             bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5})
    scale = float(np.max(np.abs(scores))) if len(scores) else 0.0
    ax.annotate(f"  (token z-scores, full colour = {scale:.2f})", xy=(1, 0), xycoords=anchor,
                xytext=(6, 0), textcoords="offset points", va="bottom", fontsize=8, color="0.4")


def hadamard_figure(rows: list[int], questions: list[dict], images: list[np.ndarray], glimpses: np.ndarray,
                hadamard_maps: np.ndarray, z_scores: np.ndarray, title: str):
    height = 3.2 * len(rows)
    fig = pyplot().figure(figsize=(10, height))
    grid = fig.add_gridspec(2 * len(rows), 4, height_ratios=[5, 1] * len(rows), hspace=0.3, wspace=0.05,
                            top=1 - 0.6 / height, bottom=0.2 / height)
    for k, (row, image) in enumerate(zip(rows, images)):
        q = questions[row]
        panels = [("image", image), ("glimpse 1", overlay(image, glimpses[row, 0])),
                  ("glimpse 2", overlay(image, glimpses[row, 1])),
                  ("Hadamard", overlay(image, hadamard_maps[row]))]
        for c, (name, picture) in enumerate(panels):
            ax = fig.add_subplot(grid[2 * k, c])
            ax.imshow(picture)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                verdict = {True: "correct", False: "wrong"}.get(q.get("correct"), "unscored")
                name = f"A: {q['predicted']} ({verdict}, p={q['probability']:.2f})"
            ax.set_title(name, fontsize=9)
        length = min(len(q["tokens"]), z_scores.shape[1])
        draw_question(fig.add_subplot(grid[2 * k + 1, :]), q["tokens"][:length], z_scores[row, :length])
    fig.suptitle(title, fontsize=11, y=1 - 0.15 / height)
    return fig


# The references of the faithfulness curves, drawn apart from the methods (dashed, greys, green).
# References in black and grey, each with its own dash, so that no method colour repeats one.
CURVE_REFERENCES = {"random": ("black", "--"), "human": ("0.5", "-."), "ground_truth": ("black", ":")}


def faithfulness_curves_figure(curves: pd.DataFrame, modality: str):
    """Mean deletion curves of one modality: a panel per model (rows) and order (columns), a line
    per method (the references black dashed, grey, green), the fills as line widths (thin: the
    first fill, e.g. ``mean``; thick: the second, ``road``) in the legend's title."""
    plt = pyplot()
    part = curves[curves["modality"] == modality]
    if part.empty:
        fig, ax = plt.subplots(figsize=(5, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, f"No {modality} map to perturb", ha="center", va="center")
        return fig
    models, orders = list(dict.fromkeys(part["model"])), list(dict.fromkeys(part["order"]))
    fills = list(dict.fromkeys(part["fill"]))
    methods = [m for m in dict.fromkeys(part["method"]) if m not in CURVE_REFERENCES]
    # tab10 without its grey (the human reference's), then tab20's light shades: no two methods alike.
    palette = [plt.get_cmap("tab10")(k) for k in range(10) if k != 7] + \
        [plt.get_cmap("tab20")(k) for k in range(1, 20, 2)]
    colours = {m: palette[k % len(palette)] for k, m in enumerate(methods)}
    fig, axes = plt.subplots(len(models), len(orders), figsize=(5.2 * len(orders), 3.6 * len(models)),
                             squeeze=False, sharey=True)
    for i, model in enumerate(models):
        for j, order in enumerate(orders):
            ax = axes[i][j]
            for (method, fill), rows in part[(part["model"] == model) & (part["order"] == order)].groupby(
                    ["method", "fill"], sort=False):
                colour, style = CURVE_REFERENCES.get(method, (colours.get(method), "-"))
                width = 0.9 + 1.2 * fills.index(fill)
                ax.plot(rows["fraction"], rows["probability"], style, color=colour, lw=width,
                        label=method if fill == fills[0] else None)
            ax.set_title(f"{model}: {order} ({'most' if order == 'morf' else 'least'} relevant first)", fontsize=10)
            ax.set_xlabel(f"share of {'grid cells' if modality == 'image' else 'words'} removed")
            ax.set_ylabel("p(explained answer), mean")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2, loc="upper right",
                       title="line width: " + " < ".join(fills) if len(fills) > 1 else f"fill: {fills[0]}",
                       title_fontsize=7)
    fig.suptitle(f"Faithfulness: {modality} deletion curves (faithful: morf falls fast, lerf stays high)")
    fig.tight_layout()
    return fig


def faithfulness_scatter_figure(plausibility: pd.DataFrame, fills: list[str]):
    """Plausibility (rank correlation with the reference) against faithfulness (image ``morf``
    AUC: lower is more faithful), a panel per fill, a colour per model, each point named."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(fills), figsize=(5.5 * len(fills), 4.5), squeeze=False)
    models = list(dict.fromkeys(plausibility["model"])) if len(plausibility) else []
    for ax, fill in zip(axes[0], fills):
        for k, model in enumerate(models):
            rows = plausibility[plausibility["model"] == model]
            if f"auc_{fill}" not in rows:
                continue
            ax.scatter(rows["rank_correlation"], rows[f"auc_{fill}"], color=plt.get_cmap("tab10")(k), label=model, s=18)
            for r in rows.itertuples(index=False):
                ax.annotate(r.method, (r.rank_correlation, getattr(r, f"auc_{fill}")), fontsize=6,
                            xytext=(2, 2), textcoords="offset points")
        reference = plausibility["reference"].iloc[0] if len(plausibility) else "reference"
        ax.set_xlabel(f"plausibility: Spearman rho with {str(reference).replace('_', ' ')}")
        ax.set_ylabel(f"image deletion (morf) AUC, fill {fill}\n(lower = more faithful)")
        ax.axvline(0, color="black", lw=0.5)
        ax.grid(alpha=0.3)
    if models:
        axes[0][0].legend(fontsize=8)
    fig.suptitle("Plausible or faithful? One point per method and model")
    fig.tight_layout()
    return fig
