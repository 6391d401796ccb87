"""The merge's diagnostic PNGs (docs/design.md §8c): match quality per group, the solve objective, similarity heat
maps, the attention-head pairing and the accuracy table — drawn from a `MergeDiagnostics` and evaluation results.

matplotlib's object API with the Agg canvas: no pyplot, no display, no global backend switch, safe in threads and
on headless machines. Imported only when plots are drawn, so `hf-mudsc --help` never pays for matplotlib. The
PNGs carry no timestamp or version metadata: the same data gives the same bytes, so `hf-mudsc inspect` redraws
a folder's plots identically and its ownership marker stays valid.
"""

from __future__ import annotations

import logging
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from hf_mudsc.errors import escaped, parent_names
from hf_mudsc.option_values import start_margin_note
from hf_mudsc.publish.folder import write_file_atomically
from hf_mudsc.solve.diagnostics import GroupDiagnostics, MergeDiagnostics

logger = logging.getLogger(__name__)

DPI = 100
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
         "xtick.labelsize": 9, "ytick.labelsize": 10, "figure.titlesize": 13, "axes.grid": False,
         # names (tasks, groups, labels) come from configs and users: a `$` in one is text, never mathtext
         "text.parse_math": False}
# Parents' bars are grey; A, B, C, ... told apart by hatching.
PARENT_HATCHES = (None, "//", "\\\\", "xx", "..")
# Merged models' bars: matplotlib's default cycle without its grey (the parents' colour).
MERGED_COLORS = ("#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
# Past the palette (the demo draws 12 merged models) the colours come round again hatched, so no two look alike.
MERGED_HATCHES = (None, "..", "oo", "++", "**")
COLORS = {"activation": "#1f77b4", "weight": "#ff7f0e", "blended": "#222222", "value": "#7f7f7f"}


@dataclass(frozen=True)
class Plot:
    """One written PNG: `name` is its file stem, `title` the card's alt text, `caption` says what it shows."""

    name: str
    title: str
    caption: str
    path: Path


# ------------------------------------------------------------------------------------------------ entry point


def draw_plots(folder: str | os.PathLike, diagnostics: MergeDiagnostics | None, evaluation: Any = None, *,
               owner: str | os.PathLike | None = None) -> list[Plot]:
    """Draw every plot the data allows into `folder` (created if needed), each file written atomically.

    Args:
        diagnostics: the merge's diagnostics (None: no unit matching, only the accuracy chart can be drawn).
        evaluation: an `EvaluationResult` or its JSON dict (`eval_results.json`), for the accuracy chart.
        owner: a merged folder whose ownership marker should list the PNGs (`write_file_atomically`).

    Returns:
        The plots written, in a fixed order; empty when there is nothing to draw.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    drawn: list[Plot] = []
    figures = []
    if diagnostics is not None and diagnostics.groups:
        if any(g.blended is not None for g in diagnostics.groups):
            caption = "correlation of the fused unit pairs of A and B, per group along the depth"
            if any(g.baseline_blended is not None for g in diagnostics.groups):
                caption += (", against its chance level (dashed: the same mean over random A–B pairs; the residual "
                            "stream's weight rows correlate highly for any pair)")
        else:  # drawn from config.json alone (no merge_diagnostics.json: more than two parents, or removed)
            caption = "the matcher's match value per group along the depth (no correlations of fused pairs recorded)"
        if diagnostics.matcher == "zip":  # its value line also counts fusions within one parent (the figure's title)
            caption += (", and zip's match value, which also counts the units it fused within one parent (a group "
                        "marked \"no A–B pair\" fused none of A with B)")
        figures.append(("match_quality", "Match quality per group", caption, match_quality_figure(diagnostics)))
        if diagnostics.objective_history and diagnostics.sweeps > 0:
            figures.append(("solve_objective", "Solve objective per sweep",
                            "the solve's objective after each sweep, and each start's final objective",
                            objective_figure(diagnostics)))
        if diagnostics.heatmaps:
            figures.append(("similarity_heatmaps", "Similarity heat maps",
                            "similarity of A units (rows) and B units (columns) in matched order, for chosen groups",
                            heatmap_figure(diagnostics)))
        if any(g.head_pairing for g in diagnostics.groups):
            figures.append(("attention_heads", "Attention head pairing",
                            "the head of B merged with each head of A, per block",
                            head_pairing_figure(diagnostics)))
    curve = diagnostics.alpha_curve if diagnostics is not None else None
    if curve and curve.get("returned_fidelity") is not None:  # (None: no held-out example, nothing scored)
        figures.append(("alpha_fidelity", "Balance factor α chosen without labels",
                        "held-out fidelity of the merge to its parents for each α of the search (alpha=\"auto\")",
                        alpha_figure(curve)))
    chart = accuracy_chart(evaluation)
    if chart is not None:
        figures.append(("accuracy", *chart))
    for name, title, caption, figure in figures:
        path = folder / f"{name}.png"
        write_file_atomically(path, lambda temporary, figure=figure: save_figure(figure, temporary), owner=owner)
        drawn.append(Plot(name=name, title=title, caption=caption, path=path))
    logger.debug("wrote %d plots to %s", len(drawn), folder)
    return drawn


def accuracy_chart(evaluation: Any) -> tuple[str, str, Figure] | None:
    """`(title, caption, figure)` of the accuracy chart of `evaluation` (an `EvaluationResult` or its dict), not yet
    written (`hf-mudsc evaluate` puts it in place together with the results and the card); None without scores."""
    scores = _evaluation_dict(evaluation)
    if scores is None or not scores.get("scores"):
        return None
    title, caption = evaluation_chart_text(scores)
    return title, caption, accuracy_figure(scores)


def save_figure(figure: Figure, path: Path) -> None:
    """Write `figure` as a PNG without time or version metadata: the same data gives the same bytes."""
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=DPI, metadata={"Software": None})


def _evaluation_dict(evaluation: Any) -> Mapping[str, Any] | None:
    if evaluation is None:
        return None
    if isinstance(evaluation, Mapping):
        return evaluation
    to_dict = getattr(evaluation, "to_dict", None)
    if to_dict is None:
        raise TypeError(f"evaluation must be an EvaluationResult or its dict, got {type(evaluation).__name__}")
    return to_dict()


# ------------------------------------------------------------------------------------------------ names


def short_name(group: str) -> str:
    """A group's axis label: `L3 q/k`, `vision L0 mlp` for block groups; other groups as named (`residual`)."""
    parts = group.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    if not digits:
        return group
    position = digits[-1]
    tower = next((t for t in ("vision", "text") if any(t in p for p in parts[:position])), "")
    kind = ".".join(parts[position + 1:])
    kind = re.sub(r"^(attention|self_attn|attn)\.", "", kind).replace("qk", "q/k")
    return f"{tower + ' ' if tower else ''}L{parts[position]} {kind}".strip()


def block_name(group: str) -> str:
    """The block a group belongs to (`…layers.3`), or the group itself outside blocks."""
    parts = group.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[:digits[-1] + 1]) if digits else group


def _title_settings(diagnostics: MergeDiagnostics) -> str:
    bits = [diagnostics.method]
    if diagnostics.matcher:
        bits.append(diagnostics.matcher)
    if diagnostics.alpha is not None:
        bits.append(f"α = {diagnostics.alpha:g}")
    return ", ".join(bits)


# ------------------------------------------------------------------------------------------------ figures


def match_quality_figure(diagnostics: MergeDiagnostics) -> Figure:
    """Per group (solve order = along the depth): mean activation, weight and blended correlation of fused pairs."""
    groups = diagnostics.groups
    positions = list(range(len(groups)))
    with rc_context(STYLE):
        figure = Figure(figsize=(min(max(8.0, 0.3 * len(groups) + 3.0), 24.0), 6.0), layout="constrained")
        axes = figure.add_subplot()
        series = [("activation", "activation"), ("weight", "weight"),
                  ("blended", f"blended (α = {diagnostics.alpha:g}; matched on)" if diagnostics.alpha is not None
                   else "blended (matched on)")]
        fractions = [g.cross_fraction for g in groups]
        if any(f is not None for f in fractions):
            axes.bar(positions, [0.0 if f is None else f for f in fractions], width=0.7, color="#e3e3e3",
                     label="share of merged units fusing A with B", zorder=0)
        drawn = False
        for key, label in series:
            values = [getattr(g, key) for g in groups]
            if all(v is None for v in values):
                continue
            axes.plot(positions, [math.nan if v is None else v for v in values], marker="o" if key != "blended"
                      else "D", markersize=5, linewidth=2.2 if key == "blended" else 1.4, color=COLORS[key],
                      label=label)
            drawn = True
            chance = [getattr(g, f"baseline_{key}") for g in groups]
            if any(v is not None for v in chance):  # what any (A unit, B unit) pair scores: the chance level
                axes.plot(positions, [math.nan if v is None else v for v in chance], linestyle="--",
                          linewidth=1.1, alpha=0.8, color=COLORS[key], label=f"{key}: random A–B pairs (chance)")
        if any(g.value is not None for g in groups):  # zip's also counts fusions within one parent
            axes.plot(positions, [math.nan if g.value is None else g.value for g in groups], marker="s" if drawn
                      else "o", markersize=4, linestyle=":" if drawn else "-", color=COLORS["value"],
                      label="match value (matcher's objective)")
        for position, group in enumerate(groups):
            if group.cross_fraction == 0.0:  # zip fused every unit within its own parent: no pair to score
                axes.annotate("no A–B pair", (position, 0.0), xytext=(0, 6), textcoords="offset points",
                              ha="center", fontsize=8, rotation=90, color="#555555")
        _block_separators(axes, groups)
        axes.axhline(0.0, color="#bbbbbb", linewidth=0.8, zorder=0)
        axes.set_xticks(positions, [short_name(g.name) for g in groups], rotation=60 if len(groups) > 8 else 0,
                        ha="right" if len(groups) > 8 else "center")
        axes.set_xlim(-0.5, len(groups) - 0.5)
        low = min([v for g in groups for v in (g.activation, g.weight, g.blended, g.value, g.baseline_activation,
                                                g.baseline_weight, g.baseline_blended) if v is not None], default=0.0)
        axes.set_ylim(min(-0.05, low - 0.05), 1.05)
        axes.set_xlabel("unit group, in solve order (residual stream, then each block's q/k, v, MLP)")
        note = "\n(zip's match value also counts fusions within one parent)" if diagnostics.matcher == "zip" else ""
        if drawn:
            axes.set_ylabel("mean correlation of fused A–B pairs")
            chance = ("dashed: the same mean over random A–B pairs (chance level)"
                      if any(g.baseline_blended is not None for g in groups) else "1 = fused units agree perfectly")
            axes.set_title(f"Match quality per group — {_title_settings(diagnostics)}\n{chance}{note}")
        else:  # only the match values of config.json: no pair correlations, no chance level
            axes.set_ylabel("match value (the matcher's objective)")
            axes.set_title(f"Match value per group — {_title_settings(diagnostics)}\n"
                           "from config.json alone: no merge_diagnostics.json, so no correlations of fused pairs"
                           f"{note}")
        axes.grid(axis="y", alpha=0.3)
        entries = len(axes.get_legend_handles_labels()[0])  # with the chance lines, 3 columns would not fit
        figure.legend(loc="outside lower center", ncols=3 if entries <= 6 else 2, framealpha=0.9)
    return figure


def _block_separators(axes: Any, groups: Sequence[GroupDiagnostics]) -> None:
    blocks = [block_name(g.name) for g in groups]
    for position in range(1, len(blocks)):
        if blocks[position] != blocks[position - 1]:
            axes.axvline(position - 0.5, color="#dddddd", linewidth=0.8, zorder=0)


def objective_figure(diagnostics: MergeDiagnostics) -> Figure:
    """The kept start's objective after each sweep, and every start's final objective as a dashed line."""
    history = diagnostics.objective_history
    with rc_context(STYLE):
        figure = Figure(figsize=(8.0, 4.8), layout="constrained")
        axes = figure.add_subplot()
        sweeps = list(range(1, len(history) + 1))
        axes.plot(sweeps, history, marker="o", color=COLORS["blended"], linewidth=1.8,
                  label=f"{diagnostics.solve_start or 'kept'} start, after each sweep")
        styles = ["--", ":", "-."]
        for index, (name, value) in enumerate(diagnostics.starts.items()):
            kept = " (kept)" if name == diagnostics.solve_start else ""
            axes.axhline(value, linestyle=styles[index % len(styles)], linewidth=1.3, color=f"C{index + 2}",
                         label=f"{name} start: final {value:.4f}{kept}")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlim(0.5, max(len(history), 1) + 0.5)
        axes.set_xlabel("sweep (each group re-matched once, in a seeded random order)")
        axes.set_ylabel("objective: mean match value over groups")
        margin = start_margin_note(diagnostics.starts, diagnostics.solve_start)
        axes.set_title(f"Solve objective per sweep — {_title_settings(diagnostics)}\n"
                       f"{diagnostics.sweeps} sweeps; the best sweep's matches are kept"
                       + (f"\n{margin}" if margin else ""))
        axes.grid(alpha=0.3)
        axes.legend(loc="best", framealpha=0.9)
    return figure


def heatmap_figure(diagnostics: MergeDiagnostics) -> Figure:
    """A sampled block of the similarity of chosen groups, A units (rows) x B units (columns) in matched order."""
    maps = diagnostics.heatmaps
    widths = {g.name: g.width for g in diagnostics.groups}
    with rc_context(STYLE):
        figure = Figure(figsize=(3.9 * len(maps) + 1.2, 4.6), layout="constrained")
        axes_list = figure.subplots(1, len(maps), squeeze=False)[0]
        image = None
        for axes, heatmap in zip(axes_list, maps):
            image = axes.imshow(heatmap.values, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
            shown = len(heatmap.rows)
            total = heatmap.fused_units or shown
            sample = f"{shown} of {total} fused pairs" if shown < total else f"all {total} fused pairs"
            axes.set_title(f"{short_name(heatmap.group)}\n({sample}; {widths.get(heatmap.group, '?')} units)")
            axes.set_xlabel("unit of B (merged order)")
            ticks = sorted({0, shown - 1})
            axes.set_xticks(ticks)
            axes.set_yticks(ticks)
        axes_list[0].set_ylabel("unit of A (merged order)")
        if image is not None:
            bar = figure.colorbar(image, ax=list(axes_list), shrink=0.85)
            bar.set_label("similarity (blended correlation)")
        figure.suptitle(f"Similarity in matched order — {_title_settings(diagnostics)}: "
                        "row i and column i were fused (diagonal), red = similar")
    return figure


def head_pairing_figure(diagnostics: MergeDiagnostics) -> Figure:
    """One row per block (per attention group when q/k and v were paired independently), one column per head of
    A: the text is the head of B merged with it, the colour its fused units' mean blended correlation."""
    rows: list[tuple[str, list[int | None], list[float | None]]] = []
    by_block: dict[str, list[GroupDiagnostics]] = {}
    for group in diagnostics.groups:
        if group.head_pairing:
            by_block.setdefault(block_name(group.name), []).append(group)
    for groups in by_block.values():
        if all(g.head_pairing == groups[0].head_pairing for g in groups):
            scores = [_mean_or_none([g.head_scores[h] if g.head_scores else None for g in groups])
                      for h in range(len(groups[0].head_pairing or []))]
            label = short_name(groups[0].name).rsplit(" ", 1)[0] if len(groups) > 1 else short_name(groups[0].name)
            rows.append((label, list(groups[0].head_pairing or []), scores))
        else:
            for g in groups:
                rows.append((short_name(g.name), list(g.head_pairing or []),
                             list(g.head_scores or [None] * len(g.head_pairing or []))))
    heads = max(len(pairing) for _, pairing, _ in rows)
    values = [[(s if s is not None else math.nan) for s in scores] + [math.nan] * (heads - len(scores))
              for _, _, scores in rows]
    with rc_context(STYLE):
        figure = Figure(figsize=(min(max(8.0, 0.55 * heads + 3.5), 20.0), min(max(3.2, 0.4 * len(rows) + 2.0), 24.0)),
                        layout="constrained")
        axes = figure.add_subplot()
        colours = colormaps["viridis"].with_extremes(bad="#e0e0e0")  # grey: no fused pair to score
        image = axes.imshow(values, cmap=colours, vmin=min(0.0, _nanmin(values)), vmax=1.0, aspect="auto",
                            interpolation="nearest")
        for row, (_, pairing, _) in enumerate(rows):
            for head in range(len(pairing), heads):  # a block with fewer heads (CLIP's towers): no cell at all
                axes.add_patch(Rectangle((head - 0.5, row - 0.5), 1, 1, facecolor="white", edgecolor="none"))
            for head, partner in enumerate(pairing):
                value = values[row][head]
                colour = "black" if math.isnan(value) or value > 0.6 else "white"
                axes.text(head, row, "–" if partner is None else str(partner), ha="center", va="center",
                          fontsize=9 if heads > 16 else 10, color=colour,
                          fontweight="bold" if partner is not None and partner != head else "normal")
        axes.set_xticks(range(heads), [str(h) for h in range(heads)])
        axes.set_yticks(range(len(rows)), [label for label, _, _ in rows])
        axes.set_xlabel("head of A")
        axes.set_ylabel("block")
        apart = any(partner is None for _, pairing, _ in rows for partner in pairing)
        axes.set_title("Attention head pairing: the head of B merged with each head of A\n"
                       "bold: another index than A's; colour: mean similarity of its fused A–B units "
                       "(grey: none fused)" + ("\n–: a pair the size budget kept apart (size_spend='heads')" if apart
                                               else ""), fontsize=11)
        bar = figure.colorbar(image, ax=axes, shrink=0.9)
        bar.set_label("mean blended correlation")
    return figure


def alpha_figure(curve: Mapping[str, Any]) -> Figure:
    """`alpha="auto"`: each α of the grid against the held-out fidelity of its merge, the chosen one marked."""
    grid, fidelity, chosen = list(curve["grid"]), list(curve["fidelity"]), curve["chosen"]
    with rc_context(STYLE):
        figure = Figure(figsize=(8.0, 4.8), layout="constrained")
        axes = figure.add_subplot()
        axes.plot(grid, fidelity, marker="o", color=COLORS["blended"], linewidth=1.8,
                  label="held-out fidelity of the merge at this α")
        axes.axvline(chosen, color="C1", linestyle="--", linewidth=1.3, label=f"chosen: α = {chosen:g}")
        if curve.get("returned_is_candidate") is False:  # the full solve at the chosen α changed the merge
            axes.plot([chosen], [curve["returned_fidelity"]], linestyle="none", marker="*", markersize=13,
                      color="C3", label="the merge returned (solved again with every start)")
        axes.set_xlim(-0.02, 1.02)
        axes.set_xlabel("α: weight-space share of the similarity (0 = activations only, 1 = weights only)")
        axes.set_ylabel("fidelity to the parents (1 = agrees everywhere)")
        examples = curve.get("held_out_examples", "?")
        starts = f" from the {' and '.join(curve['candidate_starts'])} start" if curve.get("candidate_starts") else ""
        detail = f"each α solved{starts} and scored on {examples} held-out calibration examples"
        axes.set_title("Balance factor chosen without labels (alpha=\"auto\")\n"
                       + textwrap.fill(detail, 70))  # one line of it ran past the picture's right edge
        axes.grid(alpha=0.3)
        axes.legend(loc="best", framealpha=0.9)
    return figure


#: The longest name an axis or legend shows whole: a task or model named by a long text pushed the axes out of the
#: picture (matplotlib gives up its layout and the bars shrink to nothing).
NAME_LIMIT = 24


def drawn_name(name: str, limit: int = NAME_LIMIT) -> str:
    """A task's or model's name as a chart shows it: control characters as escapes (they have no glyph, and matplotlib
    warns with the raw character, which a terminal acts on), a name past `limit` cut in the middle (`abc…xyz`:
    names alike at their start still differ)."""
    text = escaped(name)
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-(limit - 1 - half):]}"


def drawn_names(names: Sequence[str]) -> list[str]:
    """The names of one chart's legend or axis (`drawn_name`), each distinct: names cut alike
    (`vit-cars-pe…-mudsc-final` for `...-seed1-...` and `...-seed2-...`) are shown longer, up to twice
    `NAME_LIMIT`, and numbered (` (2)`) if still alike; the others keep the usual cut."""
    shown = [drawn_name(name) for name in names]
    limit = NAME_LIMIT
    while limit < 2 * NAME_LIMIT and len(set(shown)) < len(shown):
        limit += 1
        alike = {text for text in shown if shown.count(text) > 1}
        shown = [drawn_name(name, limit) if text in alike else text for name, text in zip(names, shown)]
    seen: dict[str, int] = {}
    numbered = []
    for text in shown:
        seen[text] = seen.get(text, 0) + 1
        numbered.append(text if seen[text] == 1 else f"{text} ({seen[text]})")
    return numbered


def scorer_label(scorer: str, parents: Sequence[str] = tuple(parent_names(2))) -> str:
    """How a legend names a scorer: `parent_c` -> "parent C", the ensemble by its parents' letters ("ensemble
    (A+B+C)"); merged models by their own names."""
    if scorer == "ensemble":
        return f"ensemble ({'+'.join(p.removeprefix('parent_').upper() for p in parents)})"
    return f"parent {scorer.removeprefix('parent_').upper()}" if scorer.startswith("parent_") else scorer


def chart_metric(evaluation: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The metric the evaluation chart draws (accuracy when scored, else the first) and how the card's table names
    it (`f1 (macro)`, from the record's `metric_args`), so the chart, its title and the card's caption all name the
    figures drawn."""
    metric = "accuracy" if "accuracy" in evaluation.get("metrics", []) else (evaluation.get("metrics") or [None])[0]
    args = (evaluation.get("metric_args") or {}).get(metric) if metric is not None else None
    return metric, (f"{metric} ({', '.join(str(v) for v in args.values())})" if args else metric)


def evaluation_chart_text(evaluation: Mapping[str, Any]) -> tuple[str, str]:
    """The evaluation chart's title and caption in the card, named by the metric drawn (not always accuracy:
    `evaluate --metric f1` redraws it with macro-F1)."""
    _, label = chart_metric(evaluation)
    label = label or "accuracy"
    return (label[:1].upper() + label[1:],
            f"per task and joint {label} of the merge, its parents and their ensemble")


def accuracy_figure(evaluation: Mapping[str, Any]) -> Figure:
    """Grouped bars: per task, joint and average, one bar per scorer (parents, ensemble, merged models)."""
    metric, label = chart_metric(evaluation)
    scores: Mapping[str, Mapping[str, Mapping[str, float]]] = evaluation["scores"]
    views = [*evaluation.get("tasks", {}), "joint", "average"]
    views = [v for v in views if any(metric in scores[s].get(v, {}) for s in scores)]
    # Merge order (A..Z, then 27, ...; the evaluation's scorer names): sorting the names put parent_27 before
    # parent_a.
    parents = [name for name in parent_names(len(scores)) if name in scores]
    fixed = parents + [s for s in ("ensemble",) if s in scores]
    order = fixed + [s for s in scores if s not in fixed]
    width = 0.8 / max(len(order), 1)
    with rc_context(STYLE):
        figure = Figure(figsize=(min(max(8.0, 2.5 + len(views) * (0.25 * len(order) + 0.5)), 15.0), 5.2),
                        layout="constrained")
        axes = figure.add_subplot()
        legend = drawn_names([scorer_label(scorer, parents) for scorer in order])
        for index, scorer in enumerate(order):
            xs, heights = [], []
            for position, view in enumerate(views):
                value = scores[scorer].get(view, {}).get(metric)
                if value is not None:
                    xs.append(position - 0.4 + width * (index + 0.5))
                    heights.append(100.0 * value)
            colour = "#9e9e9e" if scorer in parents else ("#555555" if scorer == "ensemble" else None)
            merged_index = index - len(fixed)
            hatch = (PARENT_HATCHES[index % len(PARENT_HATCHES)] if scorer in parents else None if colour
                     else MERGED_HATCHES[merged_index // len(MERGED_COLORS) % len(MERGED_HATCHES)])
            bars = axes.bar(xs, heights, width=width * 0.95, label=legend[index],
                            color=colour if colour else MERGED_COLORS[merged_index % len(MERGED_COLORS)],
                            hatch=hatch, edgecolor="white" if colour or hatch else None)
            if len(order) <= 6:
                axes.bar_label(bars, fmt="%.0f", fontsize=8, padding=1)
        ticks = drawn_names(views)
        long = max(map(len, ticks), default=0) > 10  # side by side, longer names run into each other: slanted
        axes.set_xticks(range(len(views)), ticks, rotation=25 if long else 0, ha="right" if long else "center",
                        rotation_mode="anchor")
        axes.set_ylim(0, 105)
        axes.set_ylabel(f"{label} (%)")
        axes.set_xlabel("evaluation (per task: argmax within the task's classes; joint: over all classes)")
        axes.set_title(f"{evaluation_chart_text(evaluation)[0]} of the merge, its parents and their ensemble")
        axes.grid(axis="y", alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    return figure


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _nanmin(values: Sequence[Sequence[float]]) -> float:
    known = [v for row in values for v in row if not math.isnan(v)]
    return min(known) if known else 0.0
