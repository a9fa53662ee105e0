"""The dashboard's charts, drawn by matplotlib as inline SVG: no display, no JavaScript, nothing fetched.

Why matplotlib's SVG backend: it is a dependency already (the scaling study's
figure), it draws axes and ticks properly, and inline SVG needs no second request
and scales with the page. Text stays text (`svg.fonttype: none`) so the page can be
searched and read by a screen reader; matplotlib XML-escapes it, and mathtext is
off for every label from data (captions, reasons and run names are written by
whoever filled the bucket; a `$` must stay a dollar sign). Each chart's element ids
get a prefix of their own, since several SVGs share one HTML document.

Every function returns None when there is nothing to draw; the template says so.
"""

from __future__ import annotations

import hashlib
import html
import io
import math
import re
import threading
from collections.abc import Sequence
from datetime import UTC, datetime

import matplotlib
from markupsafe import Markup
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

GREEN, AMBER, RED, GREY, BLUE, INK, MUTED, GRID = (
    "#2e9d5b",
    "#d39e1d",
    "#d1495b",
    "#d8dce3",
    "#3b6fd4",
    "#1f2430",
    "#6b7280",
    "#e8eaef",
)
STATUS_COLORS = {"labelled": GREEN, "filtered": AMBER, "failed": RED, "planned": GREY}
DPI = 72  # one SVG unit per CSS pixel of the requested width
STYLE = {
    "svg.fonttype": "none",  # <text>, not glyph outlines
    "svg.hashsalt": "pseudotrack",  # the same data gives the same SVG
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"],
    "font.size": 11,
    "text.color": INK,
    "text.parse_math": False,
    "axes.edgecolor": GREY,
    "axes.labelcolor": MUTED,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.color": MUTED,
    "ytick.color": MUTED,
    "axes.grid": False,
}
_LOCK = threading.Lock()  # rc_context changes matplotlib's global settings; server threads draw one at a time
_ID = re.compile(r'\bid="([^"]+)"')


def fmt_count(value: float) -> str:
    """12, 3.4k, 1.2M: axis labels stay short whatever the scale."""
    value = float(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}" if value != int(value) else str(int(value))


def fmt_bytes(value: float) -> str:
    value = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fold_items(counts: dict[str, int], max_items: int) -> list[tuple[str, int]]:
    """Largest first; beyond max_items the rest become one '(N others)' item, so long tails stay readable."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    if len(items) > max_items:
        rest = items[max_items - 1 :]
        items = items[: max_items - 1] + [(f"({len(rest)} others)", sum(c for _, c in rest))]
    return items


def _figure(width: int, height: int) -> Figure:
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _to_svg(figure: Figure, label: str) -> Markup:
    """The figure as an <svg class="chart"> element to inline, ids prefixed so charts on one page do not clash."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None}, transparent=True)
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.DOTALL)
    prefix = "c" + hashlib.sha1(text.encode()).hexdigest()[:8] + "-"
    ids = set(_ID.findall(text))
    text = _ID.sub(lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})" if m.group(1) in ids else m[0], text)
    text = re.sub(
        r'xlink:href="#([^"]+)"', lambda m: f'xlink:href="#{prefix}{m.group(1)}"' if m.group(1) in ids else m[0], text
    )
    root_end = text.index(">")
    root = re.sub(r'\s(width|height)="[^"]*"', "", text[:root_end])
    root += f' class="chart" width="100%" role="img" aria-label="{html.escape(label, quote=True)}"'
    return Markup(root + text[root_end:])


def _draw(width: int, height: int, label: str, draw) -> Markup:
    with _LOCK, matplotlib.rc_context(STYLE):
        figure = _figure(width, height)
        draw(figure)
        return _to_svg(figure, label)


def _count_axis(axis, integer: bool = True) -> None:
    axis.set_major_locator(MaxNLocator(nbins=5, integer=integer, min_n_ticks=2))
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt_count(v)))


def hbar_chart(
    counts: dict[str, int], label: str, color: str = BLUE, max_items: int = 12, width: int = 560, label_chars: int = 34
) -> Markup | None:
    """Horizontal bars, largest first, each with its count and share of the whole."""
    if not counts:
        return None
    items = fold_items(counts, max_items)
    total = sum(c for _, c in items) or 1
    top = max(c for _, c in items) or 1
    height = 22 * len(items) + 16

    def draw(figure: Figure) -> None:
        left = min(0.45, (12 + 6.5 * min(label_chars, max(len(str(n)) for n, _ in items))) / width)
        ax = figure.add_axes((left, 8 / height, 1 - left - 90 / width, 1 - 16 / height))
        y = list(range(len(items)))
        ax.barh(y, [c for _, c in items], color=color, height=0.7)
        ax.set_yticks(y, labels=[shorten(str(n), label_chars) for n, _ in items], parse_math=False)
        ax.invert_yaxis()
        ax.set_xlim(0, top)
        ax.xaxis.set_visible(False)
        ax.spines[["bottom", "top", "right"]].set_visible(False)
        ax.tick_params(axis="y", length=0, labelcolor=INK)
        for i, (_, count) in enumerate(items):
            ax.text(
                count,
                i,
                f" {fmt_count(count)} ({100 * count / total:.0f}%)",
                va="center",
                color=MUTED,
                parse_math=False,
                clip_on=False,
            )

    return _draw(width, height, label, draw)


def time_label(seconds: float, step_s: float) -> str:
    when = datetime.fromtimestamp(seconds, UTC)
    if step_s >= 86400:
        return when.strftime("%m-%d")
    if step_s >= 3600:
        return when.strftime("%m-%d %H:%M")
    return when.strftime("%H:%M")


def rate_chart(
    start_s: float,
    step_s: float,
    series: dict[str, Sequence[float]],
    label: str,
    unit: str = "videos/hour",
    width: int = 1120,
    height: int = 240,
) -> Markup | None:
    """Stacked columns over time (one per bucket), e.g. labelled and failed videos per hour."""
    names = [n for n, v in series.items() if any(v)]
    length = max((len(v) for v in series.values()), default=0)
    if not names or length == 0:
        return None

    def draw(figure: Figure) -> None:
        ax = figure.add_axes((64 / width, 30 / height, 1 - 80 / width, 1 - 60 / height))
        base = [0.0] * length
        for name in names:
            values = [float(series[name][i]) if i < len(series[name]) else 0.0 for i in range(length)]
            ax.bar(range(length), values, bottom=base, width=0.8, color=STATUS_COLORS.get(name, BLUE), label=name)
            base = [b + v for b, v in zip(base, values, strict=True)]
        ax.set_xlim(-0.5, length - 0.5)
        every = max(1, math.ceil(length / 8))
        ticks = list(range(0, length, every))
        ax.set_xticks(ticks, labels=[time_label(start_s + i * step_s, step_s) for i in ticks])
        _count_axis(ax.yaxis, integer=False)
        ax.yaxis.grid(True, color=GRID)
        ax.set_axisbelow(True)
        ax.set_title(unit, loc="left", color=MUTED, fontsize=11)
        ax.legend(loc="lower right", bbox_to_anchor=(1, 1), ncols=len(names), frameon=False)

    return _draw(width, height, label, draw)


def line_chart(
    xs: Sequence[float | None],
    ys: Sequence[float | None],
    label: str,
    x_name: str = "step",
    y_name: str = "loss",
    width: int = 540,
    height: int = 220,
    color: str = BLUE,
) -> Markup | None:
    """One curve with axes, e.g. training loss against step; None, NaN and inf points are left out."""
    points = [
        (float(x), float(y))
        for x, y in zip(xs, ys, strict=False)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    if not points:
        return None

    def draw(figure: Figure) -> None:
        ax = figure.add_axes((56 / width, 40 / height, 1 - 72 / width, 1 - 66 / height))
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], color=color, linewidth=1.8, marker="o" * (len(points) == 1)
        )
        _count_axis(ax.xaxis)
        _count_axis(ax.yaxis, integer=False)
        ax.yaxis.grid(True, color=GRID)
        ax.set_title(y_name, loc="left", color=MUTED, fontsize=11, parse_math=False)
        ax.set_xlabel(x_name, loc="right", parse_math=False)

    return _draw(width, height, label, draw)


def histogram_chart(
    edges: Sequence[float],
    counts: Sequence[int],
    label: str,
    fmt=fmt_bytes,
    width: int = 540,
    height: int = 220,
    color: str = BLUE,
    title: str = "shards",
) -> Markup | None:
    """Columns over value bins (`edges` has one more entry than `counts`), e.g. shard sizes."""
    if not counts or not any(counts):
        return None

    def draw(figure: Figure) -> None:
        ax = figure.add_axes((48 / width, 40 / height, 1 - 70 / width, 1 - 66 / height))
        widths = [edges[i + 1] - edges[i] for i in range(len(counts))]
        ax.bar(edges[:-1], counts, width=widths, align="edge", color=color, edgecolor="white", linewidth=1)
        ax.set_xlim(edges[0], edges[-1])
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
        _count_axis(ax.yaxis)
        ax.yaxis.grid(True, color=GRID)
        ax.set_axisbelow(True)
        ax.set_title(title, loc="left", color=MUTED, fontsize=11)

    return _draw(width, height, label, draw)


def stacked_bar(parts: Sequence[tuple[str, int]], total: int | None = None, width: int = 240) -> list[dict]:
    """The segments of a round's progress bar (drawn by the template): one per status, grey for the rest.

    With a planned `total` the unfinished remainder shows as the grey background.
    """
    done = sum(c for _, c in parts)
    whole = max(total or 0, done) or 1
    segments, x = [], 0.0
    for name, count in parts:
        w = width * count / whole
        if w > 0:
            segments.append({"name": name, "count": count, "x": round(x, 2), "width": round(w, 2)})
            segments[-1]["color"] = STATUS_COLORS.get(name, BLUE)
        x += w
    return segments
