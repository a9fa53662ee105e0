"""Hand-written SVG charts for the dashboard: no plotting library, no JavaScript, nothing fetched.

Why by hand: the page must render from a plain `http.server` with the project's
dependencies only, and inline SVG needs no second request and scales with the page.
Every label that can come from data (teacher names, reasons, rules, run names) goes
through `html.escape`, since captions and reasons are written by whoever filled the bucket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

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
FONT = 'font-family="system-ui, -apple-system, Segoe UI, sans-serif" font-size="12"'


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


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 5 x 10^k steps), so axes read at a glance.

    `integer` keeps steps whole, for axes that count things (no "0.25 shards").
    """
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    if integer:
        step = max(1, math.ceil(step))
    start = math.floor(lo / step) * step
    ticks = [round(start, 12)]
    while ticks[-1] < hi - step * 1e-9:  # the last tick covers the maximum, so nothing is drawn off the axis
        ticks.append(round(start + len(ticks) * step, 12))
    return ticks if len(ticks) >= 2 else [start, start + step]


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{escape(label)}" '
        f'preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg" {FONT}>' + "".join(body) + "</svg>"
    )


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def empty_chart(message: str, width: int = 560, height: int = 60) -> str:
    body = [f'<text x="{width / 2}" y="{height / 2 + 4}" text-anchor="middle" fill="{MUTED}">{escape(message)}</text>']
    return _svg(width, height, body, message)


def hbar_chart(
    counts: dict[str, int], label: str, color: str = BLUE, max_items: int = 12, width: int = 560, label_chars: int = 34
) -> str:
    """Horizontal bars, largest first; the rest folded into one '(N others)' bar so long tails stay readable."""
    if not counts:
        return empty_chart(f"no {label} yet", width)
    items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    if len(items) > max_items:
        rest = items[max_items - 1 :]
        items = items[: max_items - 1] + [(f"({len(rest)} others)", sum(c for _, c in rest))]
    total = sum(c for _, c in items) or 1
    top = max(c for _, c in items) or 1
    row, left, right = 22, min(int(width * 0.42), 40 + 7 * label_chars), 76
    label_chars = min(label_chars, int((left - 10) / 7))  # about 7 px a character at 12 px
    height = row * len(items) + 8
    span = width - left - right
    body = []
    for i, (name, count) in enumerate(items):
        y = 4 + i * row
        bar = max(1.0, span * count / top)
        text = str(name)
        shown = escape(_shorten(text, label_chars))
        body.append(
            f"<g><title>{escape(text)}: {count}</title>"
            f'<text x="{left - 8}" y="{y + 14}" text-anchor="end" fill="{INK}">{shown}</text>'
            f'<rect x="{left}" y="{y + 3}" width="{bar:.1f}" height="{row - 8}" rx="3" fill="{color}"/>'
            f'<text x="{left + bar + 6:.1f}" y="{y + 14}" fill="{MUTED}">{fmt_count(count)} '
            f"({100 * count / total:.0f}%)</text></g>"
        )
    return _svg(width, height, body, label)


def stacked_bar(parts: Sequence[tuple[str, int]], total: int | None = None, width: int = 240, height: int = 14) -> str:
    """One thin bar split by status; with a planned `total` the unfinished remainder shows grey."""
    done = sum(c for _, c in parts)
    whole = max(total or 0, done) or 1
    body = [f'<rect x="0" y="0" width="{width}" height="{height}" rx="3" fill="{GRID}"/>']
    x = 0.0
    for name, count in parts:
        w = width * count / whole
        if w > 0:
            body.append(
                f'<rect x="{x:.2f}" y="0" width="{w:.2f}" height="{height}" '
                f'fill="{STATUS_COLORS.get(name, BLUE)}"><title>{escape(name)}: {count}</title></rect>'
            )
        x += w
    label = ", ".join(f"{n} {c}" for n, c in parts)
    return (
        f'<svg class="bar" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">' + "".join(body) + "</svg>"
    )


def _time_label(seconds: float, step_s: float) -> str:
    when = datetime.fromtimestamp(seconds, UTC)
    if step_s >= 86400:
        return when.strftime("%m-%d")
    if step_s >= 3600:
        return when.strftime("%m-%d %H:%M")
    return when.strftime("%H:%M")


def _y_axis(body: list[str], ticks: list[float], y_of, left: int, right_x: float, fmt=fmt_count) -> None:
    for tick in ticks:
        y = y_of(tick)
        body.append(
            f'<line x1="{left}" x2="{right_x}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{MUTED}">{fmt(tick)}</text>'
        )


def rate_chart(
    start_s: float,
    step_s: float,
    series: dict[str, Sequence[float]],
    label: str,
    unit: str = "videos/hour",
    width: int = 1120,
    height: int = 240,
) -> str:
    """Stacked columns over time (one per bucket), e.g. labelled and failed videos per hour."""
    names = [n for n, v in series.items() if any(v)]
    length = max((len(v) for v in series.values()), default=0)
    if not names or length == 0:
        return empty_chart(f"no {label} yet", width)
    totals = [sum(series[n][i] for n in names if i < len(series[n])) for i in range(length)]
    ticks = nice_ticks(0, max(totals), integer=True)
    left, right, top, bottom = 64, 16, 26, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    y_max = ticks[-1]

    def y_of(v: float) -> float:
        return top + plot_h * (1 - v / y_max)

    body: list[str] = [f'<text x="{left}" y="14" fill="{MUTED}">{escape(unit)}</text>']
    _y_axis(body, ticks, y_of, left, width - right)
    col = plot_w / length
    for i in range(length):
        base = 0.0
        when = _time_label(start_s + i * step_s, step_s)
        for name in names:
            value = series[name][i] if i < len(series[name]) else 0
            if value <= 0:
                continue
            y0, y1 = y_of(base), y_of(base + value)
            body.append(
                f'<rect x="{left + i * col + col * 0.1:.1f}" y="{y1:.1f}" width="{max(col * 0.8, 1):.1f}" '
                f'height="{max(y0 - y1, 0.5):.1f}" fill="{STATUS_COLORS.get(name, BLUE)}">'
                f"<title>{escape(when)} {escape(name)}: {fmt_count(value)} {escape(unit)}</title></rect>"
            )
            base += value
    every = max(1, math.ceil(length / 8))
    for i in range(0, length, every):
        x = left + (i + 0.5) * col
        body.append(
            f'<text x="{x:.1f}" y="{height - 10}" text-anchor="middle" fill="{MUTED}">'
            f"{escape(_time_label(start_s + i * step_s, step_s))}</text>"
        )
    _legend(body, [(n, STATUS_COLORS.get(n, BLUE)) for n in names], width - right, 14)
    return _svg(width, height, body, label)


def _legend(body: list[str], entries: list[tuple[str, str]], right_x: float, y: float) -> None:
    x = right_x
    for name, color in reversed(entries):
        x -= 8 + 7 * len(name)
        body.append(
            f'<rect x="{x:.0f}" y="{y - 9}" width="10" height="10" rx="2" fill="{color}"/>'
            f'<text x="{x + 14:.0f}" y="{y}" fill="{INK}">{escape(name)}</text>'
        )
        x -= 14


def line_chart(
    xs: Sequence[float | None],
    ys: Sequence[float | None],
    label: str,
    x_name: str = "step",
    y_name: str = "loss",
    width: int = 540,
    height: int = 220,
    color: str = BLUE,
) -> str:
    """One curve with axes, e.g. training loss against step; None, NaN and inf points are left out."""
    points = [
        (float(x), float(y))
        for x, y in zip(xs, ys, strict=False)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    if not points:
        return empty_chart(f"no {label} points yet", width)
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    y_ticks = nice_ticks(min(0.0, y_lo) if y_lo >= 0 and y_lo < 0.2 * y_hi else y_lo, y_hi, 4)
    x_ticks = [t for t in nice_ticks(x_lo, x_hi, 5) if x_lo <= t <= x_hi] or [x_lo]
    left, right, top, bottom = 56, 14, 22, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    x_span = (x_hi - x_lo) or 1.0
    y_span = (y_ticks[-1] - y_ticks[0]) or 1.0

    def x_of(v: float) -> float:
        return left + plot_w * (v - x_lo) / x_span

    def y_of(v: float) -> float:
        return top + plot_h * (1 - (v - y_ticks[0]) / y_span)

    body: list[str] = [f'<text x="{left}" y="14" fill="{MUTED}">{escape(y_name)}</text>']
    _y_axis(body, y_ticks, y_of, left, width - right)
    for tick in x_ticks:
        body.append(
            f'<text x="{x_of(tick):.1f}" y="{height - 16}" text-anchor="middle" fill="{MUTED}">{fmt_count(tick)}</text>'
        )
    body.append(f'<text x="{width - right}" y="{height - 2}" text-anchor="end" fill="{MUTED}">{escape(x_name)}</text>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{x_of(x):.1f},{y_of(y):.1f}" for i, (x, y) in enumerate(points))
    body.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.8" stroke-linejoin="round"/>')
    if len(points) == 1:
        x, y = points[0]
        body.append(f'<circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="3" fill="{color}"/>')
    return _svg(width, height, body, label)


def histogram_chart(
    edges: Sequence[float],
    counts: Sequence[int],
    label: str,
    fmt=fmt_bytes,
    width: int = 540,
    height: int = 220,
    color: str = BLUE,
) -> str:
    """Columns over value bins (`edges` has one more entry than `counts`), e.g. shard sizes."""
    if not counts or not any(counts):
        return empty_chart(f"no {label} yet", width)
    ticks = nice_ticks(0, max(counts), 4, integer=True)
    left, right, top, bottom = 48, 14, 22, 34
    plot_w, plot_h = width - left - right, height - top - bottom

    def y_of(v: float) -> float:
        return top + plot_h * (1 - v / ticks[-1])

    body: list[str] = [f'<text x="{left}" y="14" fill="{MUTED}">shards</text>']
    _y_axis(body, ticks, y_of, left, width - right)
    col = plot_w / len(counts)
    for i, count in enumerate(counts):
        if count:
            y = y_of(count)
            body.append(
                f'<rect x="{left + i * col + 1:.1f}" y="{y:.1f}" width="{max(col - 2, 1):.1f}" '
                f'height="{top + plot_h - y:.1f}" fill="{color}"><title>{fmt(edges[i])} – '
                f"{fmt(edges[i + 1])}: {count}</title></rect>"
            )
    every = max(1, math.ceil(len(counts) / 5))
    shown = sorted({*range(0, len(edges), every), len(edges) - 1})
    for i in shown:
        if i != len(edges) - 1 and len(edges) - 1 - i < every * 0.6:
            continue  # too close to the last label
        anchor = "start" if i == 0 else "end" if i == len(edges) - 1 else "middle"
        body.append(
            f'<text x="{left + i * col:.1f}" y="{height - 16}" text-anchor="{anchor}" fill="{MUTED}">'
            f"{escape(fmt(edges[i]))}</text>"
        )
    return _svg(width, height, body, label)
