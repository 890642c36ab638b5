"""The text-generation part of the fleet report: per-device charts of decode tokens/s and time to
first token (p50, p95) for a device that serves a text-generation model; none otherwise."""

from __future__ import annotations

from fleet.db import FleetDB
from fleet.gen_store import windows
from fleet.report_charts import Series, downsample, line_chart


def generation_charts(
    db: FleetDB,
    device: str,
    x_range: tuple[float, float],
    marks: list[tuple[float, str, str]],
) -> list[str]:
    """Two inline SVG charts (tokens/s, TTFT) with the device's deployment marks."""
    rows = windows(db, device)
    if not rows:
        return []

    def pts(col: str) -> list[tuple[float, float]]:
        return downsample([(r["ts"], float(r[col])) for r in rows if r[col] is not None])

    return [
        line_chart(
            "text generation speed (decode)",
            "tokens/s",
            [Series("tokens/s", "#188038", pts("tok_s"))],
            x_range,
            marks,
        ),
        line_chart(
            "time to first token",
            "ms",
            [
                Series("p50", "#4285f4", pts("ttft_p50_ms")),
                Series("p95", "#ea8600", pts("ttft_p95_ms")),
            ],
            x_range,
            marks,
        ),
    ]
