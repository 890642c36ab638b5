"""The fleet report's charts: inline SVG line charts over time (no script) with deployment marks,
and the downsampling that keeps a series to at most ``MAX_POINTS`` points. The device sections
of fleet/fleet_report.py, fleet/report_drift.py and fleet/report_generation.py draw with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from agent.htmlkit import esc

MAX_POINTS = 400  # per series; longer series are averaged into buckets


def fmt_time(ts: float | None, with_date: bool = True) -> str:
    """A UTC time as the page shows it (axis ticks: the time of day only); "-" for none."""
    if ts is None:
        return "-"
    d = datetime.fromtimestamp(ts, timezone.utc)
    return d.strftime("%Y-%m-%d %H:%M:%S UTC" if with_date else "%H:%M:%S")


@dataclass
class Series:
    label: str
    color: str
    points: list[tuple[float, float]]


def downsample(points: list[tuple[float, float]], n: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most ``n`` points: consecutive points averaged in equal-count buckets (keeps the shape)."""
    if len(points) <= n:
        return points
    size = len(points) / n
    out = []
    for i in range(n):
        chunk = points[int(i * size) : int((i + 1) * size)] or [points[int(i * size)]]
        out.append((sum(p[0] for p in chunk) / len(chunk), sum(p[1] for p in chunk) / len(chunk)))
    return out


def _nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** int(f"{raw:e}".split("e")[1])
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = int(lo // step) * step
    ticks, v = [], start
    while v <= hi + step * 0.01:
        if v >= lo - step * 0.01:
            ticks.append(round(v, 10))
        v += step
    return ticks


def line_chart(
    title: str,
    unit: str,
    series: list[Series],
    x_range: tuple[float, float],
    marks: tuple[tuple[float, str, str], ...] | list[tuple[float, str, str]] = (),
    width: int = 360,
    height: int = 190,
) -> str:
    """An inline SVG line chart; ``marks`` are (x, css class, label) vertical lines (deployments)."""
    left, right, top, bottom = 46, 10, 26, 26
    pw, ph = width - left - right, height - top - bottom
    pts = [p for s in series for p in s.points]
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" preserveAspectRatio="xMidYMid meet" '
        f'role="img" aria-label="{esc(title)}">',
        f'<text x="{left}" y="15" class="ct">{esc(title)}</text>',
    ]
    if not pts:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" class="empty" text-anchor="middle">no data</text></svg>'
        )
        return "".join(parts)
    x0, x1 = x_range
    if x1 <= x0:
        x1 = x0 + 1.0
    ys = [p[1] for p in pts]
    y_lo, y_hi = min(0.0, min(ys)), max(ys) * 1.1 or 1.0
    ticks = _nice_ticks(y_lo, y_hi)
    y_lo, y_hi = min(y_lo, ticks[0]), max(y_hi, ticks[-1])

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y_lo) / (y_hi - y_lo) * ph

    for tv in ticks:
        y = sy(tv)
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 5}" y="{y + 3.5:.1f}" class="tick" text-anchor="end">{tv:g}</text>'
        )
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        xv = x0 + frac * (x1 - x0)
        parts.append(
            f'<text x="{sx(xv):.1f}" y="{height - 8}" class="tick" text-anchor="{anchor}">'
            f"{fmt_time(xv, with_date=False)}</text>"
        )
    parts.append(
        f'<text x="{left - 5}" y="{top - 6}" class="tick" text-anchor="end">{esc(unit)}</text>'
    )
    for x, cls, label in marks:
        if x0 <= x <= x1:
            parts.append(
                f'<line x1="{sx(x):.1f}" y1="{top}" x2="{sx(x):.1f}" y2="{top + ph}" class="mark {cls}">'
                f"<title>{esc(label)}</title></line>"
            )
    for s in series:
        if not s.points:
            continue
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
        if len(s.points) == 1:
            x, y = s.points[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{s.color}"/>')
        else:
            parts.append(
                f'<polyline points="{d}" fill="none" stroke="{s.color}" stroke-width="1.6" '
                'stroke-linejoin="round"/>'
            )
    lx = left + pw
    for s in reversed(series):
        w = 7 * len(s.label) + 16
        lx -= w
        parts.append(
            f'<rect x="{lx}" y="8" width="10" height="3" fill="{s.color}"/>'
            f'<text x="{lx + 13}" y="13" class="tick">{esc(s.label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
