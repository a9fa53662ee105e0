"""Figure 1 of a scaling study: AJ, δ_avg and OA against the number of videos the students trained on.

Drawn with matplotlib's Agg backend (no display needed, safe in worker threads
and on servers), returned as PNG bytes so it can go to any object store.
"""

from __future__ import annotations

import io
import math

METRICS = {"AJ": "average_jaccard", "δ_avg": "average_pts_within_thresh", "OA": "occlusion_accuracy"}
COLOURS = {"AJ": "tab:blue", "δ_avg": "tab:orange", "OA": "tab:green"}


def figure_png(rows: list[dict], baseline: dict | None, study: str, benchmark: str) -> bytes:
    """One panel per metric (in percent), number of videos on a log axis, the starting checkpoint as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg on this figure only: no global backend
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(METRICS))
    xs = [row.get("labelled", row["videos"]) for row in rows]  # the videos trained on, not the size asked for
    for ax, (label, key) in zip(axes, METRICS.items(), strict=True):
        ys = [100 * row["metrics"][key] for row in rows]
        ax.plot(xs, ys, marker="o", color=COLOURS[label], label="student")
        for x, y in zip(xs, ys, strict=True):
            if math.isfinite(y):
                ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        if baseline is not None:
            ax.axhline(100 * baseline["metrics"][key], color="grey", linestyle="--", label="start")
        ax.set_xscale("log")
        if len(xs) == 1:  # a single point gets a decade around it, not a degenerate axis
            ax.set_xlim(xs[0] / 3, xs[0] * 3)
        ax.set_xlabel("training videos")
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    figure.suptitle(f"{study}: {benchmark}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
