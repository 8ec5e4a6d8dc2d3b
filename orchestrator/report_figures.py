"""The paper's figures (PNG, matplotlib) from report tables and same-seed comparison grids.

Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas) rather than pyplot, so
nothing here changes the process's global matplotlib backend or state. Plotted numbers are the
tables' own cells: a figure and its table cannot disagree.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from orchestrator import schema
from orchestrator.report_tables import FLOOR, FULL_DATA, Row, Table

DPI = 120
PANEL_SIZE = (5.0, 3.8)
GRID_WIDTH_IN = 10.0
GRID_LABEL_IN = 0.35
T_SPLIT_AXIS = "t_split (coarse model for t < t_split)"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _points(
    table: Table, rows: Sequence[Row], key: str, x_index: int
) -> tuple[list[float], list[float], list[float]]:
    """(x = row.values[x_index], mean, std) of the rows with a numeric x whose cell `key` has a
    value (std 0: one seed); an "auto" t_split row has no x of its own."""
    xs, means, stds = [], [], []
    for row in rows:
        cell = table.cell(row, key)
        if cell.mean is not None and not isinstance(row.values[x_index], str):
            xs.append(float(row.values[x_index]))
            means.append(cell.mean)
            stds.append(cell.std or 0.0)
    return xs, means, stds


def _mean_over_rows(table: Table, rows: Sequence[Row], key: str) -> float | None:
    """Mean of the rows' cell means of `key` (None: no row has one)."""
    values = [c.mean for r in rows if (c := table.cell(r, key)).mean is not None]
    return float(np.mean(values)) if values else None


def _plot(ax: Axes, xs: list[float], ys: list[float], errs: list[float], **style: Any) -> None:
    if xs:
        ax.errorbar(xs, ys, yerr=errs, capsize=3, **style)


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)


def _finish(figure: Figure, table: Table, path: Path, *panels: tuple[Axes, str, str, str]) -> None:
    """Label each (axes, x label, y label, title) panel, add grid and legend, title and save."""
    for ax, xlabel, ylabel, title in panels:
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(table.title)
    _save(figure, path)


def _floor_lines(ax: Axes, table: Table, floors: Sequence[Row]) -> None:
    """Table 1's FID floors as grey horizontal lines."""
    for i, row in enumerate(floors):
        floor = table.cell(row, schema.FID).mean
        if floor is not None:
            style = ("dotted", "dashdot")[i % 2]
            ax.axhline(floor, color="grey", linestyle=style, label=f"floor: {row.labels[1]}")


def data_reduction_figure(table: Table, path: Path) -> bool:
    """FID and same-seed similarity against data fraction, one line per criterion.

    Each criterion's line runs from its subsets to the shared full-data reference (fraction 1,
    a black star). Error bars: std over seeds. The similarity panel shows the unrelated
    baseline dashed. A criterion with no value at any fraction below 1 is left out.

    Returns:
        False (and no file) when no cell has a value.
    """
    full = [r for r in table.rows if r.labels[1] == FULL_DATA]
    floors = [r for r in table.rows if r.labels[0] == FLOOR]
    by_criterion: dict[str, list[Row]] = defaultdict(list)
    for row in table.rows:
        if row.labels[1] != FULL_DATA and row not in floors:
            by_criterion[row.labels[1]].append(row)
    figure = Figure(figsize=(2 * PANEL_SIZE[0], PANEL_SIZE[1]), layout="constrained")
    fid_ax, sim_ax = figure.subplots(1, 2)
    panels: tuple[tuple[Axes, str, str, dict[str, Any]], ...] = (
        (fid_ax, schema.FID, "", {}),
        (sim_ax, schema.STABILITY_SIMILARITY, ": same seed", {}),
        (sim_ax, schema.STABILITY_UNRELATED, ": unrelated", {"linestyle": "--", "alpha": 0.6}),
    )
    plotted = False
    for i, (criterion, rows) in enumerate(sorted(by_criterion.items())):
        style = {"marker": MARKERS[i % len(MARKERS)], "color": f"C{i}"}
        for ax, key, suffix, extra in panels:
            if not _points(table, rows, key, 0)[0]:
                continue
            xs, ys, errs = _points(table, sorted(rows + full, key=lambda r: r.values[0]), key, 0)
            _plot(ax, xs, ys, errs, label=criterion + suffix, **style, **extra)
            plotted = True
    for ax, key, suffix, extra in panels:
        xs, ys, errs = _points(table, full, key, 0)
        full_style = {"marker": "*", "markersize": 12, "color": "black", "linestyle": "none"}
        _plot(
            ax, xs, ys, errs, label=FULL_DATA + suffix, alpha=extra.get("alpha", 1.0), **full_style
        )
        plotted = plotted or bool(xs)
    _floor_lines(fid_ax, table, floors)
    if not plotted:
        return False
    _finish(
        figure,
        table,
        path,
        (fid_ax, "data fraction kept", "FID (lower is better)", "FID vs data fraction"),
        (
            sim_ax,
            "data fraction kept",
            "cosine similarity to reference",
            "Same-seed similarity vs data fraction",
        ),
    )
    return True


def coarse_to_fine_figure(table: Table, path: Path) -> bool:
    """FID and speedup against t_split, one line per (coarse, fine) model pair.

    The FID panel marks each pair's fine-model-alone FID (dotted); the speedup panel shows the
    measured speedup (solid) and the FLOP-count bound (dashed); a vertical line marks the
    automatically chosen t_split where logged.

    Returns:
        False (and no file) when no cell has a value.
    """
    pairs: dict[tuple[str, ...], list[Row]] = defaultdict(list)
    for row in table.rows:
        pairs[row.labels[:3]].append(row)
    figure = Figure(figsize=(2 * PANEL_SIZE[0], PANEL_SIZE[1]), layout="constrained")
    fid_ax, speed_ax = figure.subplots(1, 2)
    plotted = False
    for i, (pair, rows) in enumerate(sorted(pairs.items())):
        name = f"{pair[0]} [{pair[1]}] → {pair[2]}"
        color, marker = f"C{i}", MARKERS[i % len(MARKERS)]
        for ax, key, style in (
            (fid_ax, schema.FID, {"label": name}),
            (fid_ax, schema.FID_SEAM, {"label": f"{name}: with seam", "linestyle": "-."}),
            (speed_ax, schema.SPEEDUP_VS_FINE, {"label": f"{name}: measured"}),
            (
                speed_ax,
                schema.FLOP_SPEEDUP_VS_FINE,
                {"label": f"{name}: FLOP bound", "linestyle": "--"},
            ),
        ):
            if not table.has(key):  # the seam columns exist only with coarse_to_fine.seam
                continue
            xs, ys, errs = _points(table, rows, key, -1)
            _plot(ax, xs, ys, errs, marker=marker, color=color, **style)
            plotted = plotted or bool(xs)
        fine = _mean_over_rows(table, rows, schema.FID_REFERENCE)
        if fine is not None:
            fid_ax.axhline(fine, color=color, linestyle=":", label=f"{pair[2]} alone (fine only)")
        chosen = _mean_over_rows(table, rows, schema.CHOSEN_T_SPLIT)
        if chosen is not None:
            for ax in (fid_ax, speed_ax):
                ax.axvline(chosen, color=color, alpha=0.4, label=f"chosen t_split {chosen:.2f}")
    if not plotted:
        return False
    speed_ax.axhline(1.0, color="grey", linewidth=0.8)
    _finish(
        figure,
        table,
        path,
        (fid_ax, T_SPLIT_AXIS, "FID (lower is better)", "FID vs t_split"),
        (
            speed_ax,
            T_SPLIT_AXIS,
            "speedup over fine model alone (x)",
            "Sampling speedup vs t_split",
        ),
    )
    return True


def read_png(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def split_comparison(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top row, bottom row) of a two-row same-seed comparison grid (reference above, trial below).

    The grid's rows have equal height and padding, so cutting at half its height separates them.
    """
    half = image.shape[0] // 2
    return image[:half], image[half:]


def same_seed_figure(rows: Sequence[tuple[str, np.ndarray]], path: Path, title: str) -> None:
    """Stack labelled image rows (same sample seeds in every column) into one PNG.

    Args:
        rows: (label, (H, W, 3) uint8 image) from top to bottom.
        path: the PNG to write.
        title: the figure's title.
    """
    width = max(image.shape[1] for _, image in rows)
    heights = [GRID_WIDTH_IN * image.shape[0] / width for _, image in rows]
    figure = Figure(
        figsize=(GRID_WIDTH_IN, sum(heights) + GRID_LABEL_IN * (len(rows) + 1)),
        layout="constrained",
    )
    axes = figure.subplots(len(rows), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (label, image) in zip(axes, rows, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize="medium", loc="left")
    figure.suptitle(title)
    _save(figure, path)
