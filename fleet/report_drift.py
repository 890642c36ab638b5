"""The model-monitoring part of the fleet report: per-device charts of drift (the max score of
each monitor window) and confidence, and the drift episodes the agents reported as events
("drift: ..." opens one, "drift ended ..." closes it)."""

from __future__ import annotations

import json
from typing import Any

from agent.htmlkit import esc
from fleet.db import FleetDB
from fleet.monitor_store import windows
from fleet.report_charts import Series, downsample, fmt_time, line_chart

ENDED = "drift ended"  # how the agent's closing event's reason begins


def drift_episodes(db: FleetDB) -> list[dict[str, Any]]:
    """One entry per episode: device, model, started, ended (None while it lasts), reason,
    threshold and windows (from the opening event's detail), end_reason; oldest first."""
    evs = db.query(
        "SELECT device, seq, ts, name, version, reason, detail FROM events "
        "WHERE kind = 'drift' ORDER BY device, seq"
    )
    open_: dict[str, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for e in evs:
        reason = e["reason"] or ""
        if reason.startswith(ENDED):
            ep = open_.pop(e["device"], None)
            if ep is not None:
                ep["ended"], ep["end_reason"] = e["ts"], reason
            continue
        if e["device"] in open_:  # a repeated opening event (the agent restarted): same episode
            continue
        try:
            detail = json.loads(e["detail"] or "{}")
        except ValueError:
            detail = {}
        detail = detail if isinstance(detail, dict) else {}
        ep = {
            "device": e["device"],
            "model": " ".join(x for x in (e["name"], e["version"]) if x),
            "started": e["ts"],
            "ended": None,
            "reason": reason,
            "threshold": detail.get("threshold"),
            "windows": detail.get("windows"),
            "end_reason": "",
        }
        open_[e["device"]] = ep
        out.append(ep)
    _close_replaced(db, [ep for ep in out if ep["ended"] is None])
    return sorted(out, key=lambda ep: (ep["started"], ep["device"]))


def _close_replaced(db: FleetDB, ongoing: list[dict[str, Any]]) -> None:
    """An episode of a model the device no longer runs is over: the agent monitors the new model
    against its own reference and says nothing more of the old one. Its end is when another
    model went ACTIVE on the device."""
    for ep in ongoing:
        rows = db.query(
            "SELECT ts, name, version FROM events WHERE kind = 'deployment' AND state = 'ACTIVE' "
            "AND device = ? AND ts > ? ORDER BY ts",
            (ep["device"], ep["started"]),
        )
        for r in rows:
            model = " ".join(x for x in (r["name"], r["version"]) if x)
            if model and model != ep["model"]:
                ep["ended"], ep["end_reason"] = r["ts"], f"model replaced by {model}"
                break


def drift_charts(
    db: FleetDB,
    device: str,
    x_range: tuple[float, float],
    marks: list[tuple[float, str, str]],
    episodes: list[dict[str, Any]],
) -> list[str]:
    """Two inline SVG charts (drift, confidence) for a device that sends monitor blocks, with the
    same deployment marks as its other charts; none for a device that does not."""
    rows = windows(db, device)
    if not rows:
        return []

    def pts(col: str) -> list[tuple[float, float]]:
        return downsample([(r["ts"], float(r[col])) for r in rows if r[col] is not None])

    drift = [Series("max drift", "#a142f4", pts("drift_max"))]
    thresholds = [ep["threshold"] for ep in episodes if ep["device"] == device]
    thr = next((t for t in reversed(thresholds) if isinstance(t, (int, float))), None)
    if thr is not None:  # the agent's threshold, as its drift events stated it
        drift.append(Series("threshold", "#d93025", [(x_range[0], thr), (x_range[1], thr)]))
    return [
        line_chart("model drift (max score per window)", "score", drift, x_range, marks),
        line_chart(
            "prediction confidence",
            "",
            [
                Series("mean", "#12b5cb", pts("mean_confidence")),
                Series("low-conf rate", "#ea8600", pts("low_confidence_rate")),
            ],
            x_range,
            marks,
        ),
    ]


def episodes_table(episodes: list[dict[str, Any]]) -> str:
    if not episodes:
        return '<p class="muted">No drift reported.</p>'
    out = [
        '<table id="drift-episodes"><tr><th>started</th><th>ended</th><th>device</th>'
        "<th>model</th><th>reason</th></tr>"
    ]
    for ep in reversed(episodes):
        ended = (
            '<span class="badge bad">ongoing</span>'
            if ep["ended"] is None
            else esc(fmt_time(ep["ended"]))
            + (
                f'<br><span class="muted">{esc(ep["end_reason"])}</span>'
                if ep["end_reason"]
                else ""
            )
        )
        out.append(
            f'<tr><td class="t">{fmt_time(ep["started"])}</td><td class="t">{ended}</td>'
            f'<td class="t">{esc(ep["device"])}</td><td class="t">{esc(ep["model"])}</td>'
            f'<td class="reason">{esc(ep["reason"])}</td></tr>'
        )
    out.append("</table>")
    return "".join(out)
