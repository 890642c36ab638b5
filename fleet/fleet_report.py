"""`edgefleet fleet report`: one self-contained HTML page from the fleet database (inline CSS
and SVG, no scripts, nothing fetched): a fleet summary, per-device plots of latency, temperature
and memory over time, and the deployment history with outcomes and reasons.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from agent.errors import UsageError
from agent.htmlkit import esc
from agent.protocol.states import FAILED, SERVING, TERMINAL
from fleet.db import FleetDB
from fleet.report_charts import Series, downsample, fmt_time, line_chart
from fleet.report_drift import drift_charts, drift_episodes, episodes_table
from fleet.report_generation import generation_charts
from fleet.view import (
    COLUMNS,
    DRIFT_COLUMN,
    NUMERIC_COLUMNS,
    THROTTLED_COLUMN,
    DeviceRow,
    cells,
    rows_from_db,
    shown,
)

_OUTCOME_CLASS = {**{s: "ok" for s in SERVING}, **{s: "bad" for s in FAILED}}


# ---------------------------------------------------------------- data


def deployment_history(db: FleetDB) -> list[dict[str, Any]]:
    """One entry per (device, artifact) attempt: first and last event, final state and its reason."""
    evs = db.query(
        "SELECT device, seq, ts, kind, state, name, version, sha256, reason FROM events "
        "WHERE kind = 'deployment' ORDER BY device, seq"
    )
    attempts: list[dict[str, Any]] = []
    current: dict[tuple[str, str], dict[str, Any]] = {}
    for e in evs:
        key = (e["device"], e["sha256"] or f"{e['name']}@{e['version']}")
        a = current.get(key)
        if a is None or (
            a["state"] in TERMINAL and e["state"] not in TERMINAL
        ):  # tried again: a new attempt
            a = current[key] = {
                "device": e["device"],
                "name": e["name"],
                "version": e["version"],
                "sha256": e["sha256"],
                "started": e["ts"],
                "states": [],
                "reason": "",
            }
            attempts.append(a)
        a["state"], a["ended"] = e["state"], e["ts"]
        if e["reason"]:
            a["reason"] = e["reason"]
        if e["state"] not in a["states"]:
            a["states"].append(e["state"])
    return sorted(attempts, key=lambda a: (a["started"], a["device"]))


def summary(db: FleetDB, rows: list[DeviceRow], history: list[dict[str, Any]]) -> dict[str, Any]:
    span = db.query("SELECT MIN(ts) AS lo, MAX(ts) AS hi, COUNT(*) AS n FROM telemetry")[0]
    outcomes: dict[str, int] = defaultdict(int)
    for a in history:
        outcomes[a["state"]] += 1
    models: dict[str, int] = defaultdict(int)
    for r in rows:
        if r.model:
            models[f"{r.model} {r.version}"] += 1
    p95s = sorted(r.p95_ms for r in rows if r.p95_ms is not None)
    return {
        "devices": len(rows),
        "online": sum(1 for r in rows if r.online),
        "throttled": sum(1 for r in rows if r.throttled),
        "telemetry_messages": int(span["n"] or 0),
        "from": span["lo"],
        "to": span["hi"],
        "events": db.count("events"),
        "rejected": db.count("rejected"),
        "deployments": dict(outcomes),
        "models": dict(models),
        "median_p95_ms": p95s[len(p95s) // 2] if p95s else None,
    }


# ---------------------------------------------------------------- page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",sans-serif;margin:0;
 background:#f4f6f9;color:#1d2433}
header{background:#1d2433;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#aab4c5;font-size:13px}main{padding:18px 28px;max-width:1400px}
h2{font-size:17px;margin:26px 0 10px}section.dev{background:#fff;border-radius:8px;padding:12px 16px;
 margin:12px 0;box-shadow:0 1px 2px rgba(0,0,0,.08)}section.dev h3{margin:0 0 6px;font-size:15px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border-radius:8px;padding:10px 16px;
 min-width:120px;box-shadow:0 1px 2px rgba(0,0,0,.08)}.card b{display:block;font-size:22px}
.card span{color:#5b6577;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;background:#fff;width:100%;box-shadow:0 1px 2px rgba(0,0,0,.08)}
th,td{padding:6px 10px;border-bottom:1px solid #e6e9ef;text-align:left;font-size:13px;vertical-align:top}
th{background:#eef1f6;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#137333}.bad{color:#b3261e}.warn{color:#a15c00}.muted{color:#7a8394}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.badge.ok{background:#e3f4e8}.badge.bad{background:#fbe4e2}.badge.run{background:#e8eefc;color:#2a4fb0}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:10px}
.chart{width:100%;height:auto;background:#fbfcfe;border:1px solid #e6e9ef;border-radius:6px}
.chart .ct{font-size:12px;font-weight:600;fill:#1d2433}.chart .tick{font-size:10px;fill:#5b6577}
.chart .grid{stroke:#e6e9ef}.chart .empty{fill:#9aa3b2;font-size:12px}
.chart .mark{stroke-width:1.2;stroke-dasharray:3 3}.chart .mark.ok{stroke:#34a853}.chart .mark.bad{stroke:#d93025}
.chart .mark.run{stroke:#8ab4f8}td.reason{max-width:560px;word-break:break-word}td.t{white-space:nowrap}
code{font-size:12px;color:#5b6577}
"""


def _card(value: Any, label: str, cls: str = "") -> str:
    return f'<div class="card"><b class="{cls}">{esc(value)}</b><span>{esc(label)}</span></div>'


def _fleet_table(rows: list[DeviceRow], now: float) -> str:
    show = shown(rows)
    head = "".join(f"<th>{esc(COLUMNS[i])}</th>" for i in show)
    body = []
    for r in rows:
        c = cells(r, now)
        tds = []
        for i in show:
            v = c[i]
            cls = "num" if COLUMNS[i] in NUMERIC_COLUMNS else ""
            if i == 1:
                cls = {"online": "ok", "offline": "bad"}.get(v, "muted")
            if (i == THROTTLED_COLUMN and v == "yes") or (i == DRIFT_COLUMN and r.drifting):
                cls = "warn"
            tds.append(f'<td class="{cls}">{esc(v)}</td>')
        body.append(f"<tr>{''.join(tds)}</tr>")
    return f'<table id="fleet"><tr>{head}</tr>{"".join(body)}</table>'


def _history_table(history: list[dict[str, Any]]) -> str:
    if not history:
        return '<p class="muted">No deployments recorded.</p>'
    out = [
        '<table id="deployments"><tr><th>started</th><th>device</th><th>model</th><th>outcome</th>'
        "<th>path</th><th>reason</th></tr>"
    ]
    for a in reversed(history):
        cls = _OUTCOME_CLASS.get(a["state"], "run")
        out.append(
            f'<tr><td class="t">{fmt_time(a["started"])}</td><td class="t">{esc(a["device"])}</td>'
            f'<td class="t">{esc(a["name"])} {esc(a["version"])}</td>'
            f'<td><span class="badge {cls}">{esc(a["state"])}</span></td>'
            f'<td class="muted">{esc(" → ".join(a["states"]))}</td>'
            f'<td class="reason">{esc(a["reason"] or "")}</td></tr>'
        )
    out.append("</table>")
    return "".join(out)


def _rejected_table(db: FleetDB, limit: int = 20) -> str:
    rows = db.query(
        f"SELECT received, topic, reason, size, payload_prefix FROM rejected ORDER BY received DESC "
        f"LIMIT {int(limit)}"
    )
    if not rows:
        return '<p class="muted">None.</p>'
    body = "".join(
        f'<tr><td class="t">{fmt_time(r["received"])}</td><td>{esc(r["topic"])}</td>'
        f'<td class="reason">{esc(r["reason"])}</td><td class="num">{r["size"]}</td>'
        f"<td><code>{esc(r['payload_prefix'][:80])}</code></td></tr>"
        for r in rows
    )
    return (
        f'<table id="rejected"><tr><th>received</th><th>topic</th><th>reason</th><th>bytes</th>'
        f"<th>payload (start)</th></tr>{body}</table>"
    )


def _device_section(
    db: FleetDB,
    r: DeviceRow,
    now: float,
    history: list[dict[str, Any]],
    episodes: list[dict[str, Any]],
) -> str:
    tel = db.query(
        "SELECT ts, p50_ms, p95_ms, temp_max_c, rss_mb FROM telemetry WHERE device = ? ORDER BY ts",
        (r.device,),
    )
    x_range = (tel[0]["ts"], tel[-1]["ts"]) if tel else (now - 60, now)

    def pts(col: str) -> list[tuple[float, float]]:
        return downsample([(t["ts"], float(t[col])) for t in tel if t[col] is not None])

    marks = [
        (
            a["ended"],
            _OUTCOME_CLASS.get(a["state"], "run"),
            f"{a['name']} {a['version']}: {a['state']}",
        )
        for a in history
        if a["device"] == r.device and a.get("ended") is not None
    ]
    charts = [
        line_chart(
            "inference latency",
            "ms",
            [Series("p50", "#4285f4", pts("p50_ms")), Series("p95", "#ea8600", pts("p95_ms"))],
            x_range,
            marks,
        ),
        line_chart(
            "max temperature",
            "°C",
            [Series("max zone", "#d93025", pts("temp_max_c"))],
            x_range,
            marks,
        ),
        line_chart(
            "agent memory (RSS)", "MB", [Series("RSS", "#188038", pts("rss_mb"))], x_range, marks
        ),
        *generation_charts(db, r.device, x_range, marks),
        *drift_charts(db, r.device, x_range, marks, episodes),
    ]
    status = (
        ("ok", "online")
        if r.online
        else (("bad", "offline") if r.online is False else ("muted", "unknown"))
    )
    model = f"{r.model} {r.version}" if r.model else "no model"
    return (
        f'<section class="dev" id="dev-{esc(r.device)}"><h3>{esc(r.device)} '
        f'<span class="{status[0]}">● {status[1]}</span> <span class="muted">{esc(r.profile or "")} · '
        f"{esc(model)} · {len(tel)} telemetry messages</span></h3>"
        f'<div class="charts">{"".join(charts)}</div></section>'
    )


def render(db: FleetDB, now: float | None = None, title: str = "edgefleet fleet report") -> str:
    """The whole page as a string."""
    return _render(db, now, title)[0]


def _render(db: FleetDB, now: float | None, title: str) -> tuple[str, dict[str, Any]]:
    """The page and the fleet summary it shows."""
    now = time.time() if now is None else now
    rows = rows_from_db(db)
    history = deployment_history(db)
    episodes = drift_episodes(db)
    s = summary(db, rows, history)
    s["drift_episodes"] = len(episodes)
    s["drifting"] = sum(1 for r in rows if r.drifting)
    dep = s["deployments"]
    healthy = sum(dep.get(st, 0) for st in SERVING)
    failed = sum(dep.get(st, 0) for st in FAILED)
    cards = "".join(
        [
            _card(
                f"{s['online']}/{s['devices']}",
                "devices online",
                "ok" if s["online"] == s["devices"] else "warn",
            ),
            _card(healthy, "deployments ok", "ok"),
            _card(
                dep.get("ROLLED_BACK", 0), "rolled back", "bad" if dep.get("ROLLED_BACK") else ""
            ),
            _card(dep.get("REJECTED", 0), "rejected", "bad" if dep.get("REJECTED") else ""),
            _card(s["throttled"], "throttled now", "warn" if s["throttled"] else ""),
            _card(s["drifting"], "drifting now", "warn" if s["drifting"] else ""),
            _card(
                "-" if s["median_p95_ms"] is None else f"{s['median_p95_ms']:.2f} ms", "median p95"
            ),
            _card(s["telemetry_messages"], "telemetry msgs"),
            _card(s["rejected"], "bad messages", "warn" if s["rejected"] else ""),
        ]
    )
    models = ", ".join(f"{esc(m)} ({n})" for m, n in sorted(s["models"].items())) or "none"
    span = f"{fmt_time(s['from'])} – {fmt_time(s['to'])}" if s["from"] else "no telemetry yet"
    sections = "".join(_device_section(db, r, now, history, episodes) for r in rows)
    data = esc(json.dumps({"summary": s, "failed_deployments": failed}))
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f"<body><header><h1>{esc(title)}</h1><p>generated {fmt_time(now)} from {esc(db.label)} · "
        f"telemetry {span}</p></header><main>"
        f'<h2>Fleet summary</h2><div class="cards" id="summary" data-summary="{data}">{cards}</div>'
        f'<p class="muted">Models running: {models}</p>'
        f"<h2>Devices</h2>{_fleet_table(rows, now)}"
        f"<h2>Deployment history</h2>{_history_table(history)}"
        f"<h2>Drift episodes</h2>{episodes_table(episodes)}"
        f"<h2>Bad messages (latest {min(20, s['rejected'])} of {s['rejected']})</h2>{_rejected_table(db)}"
        f'<h2>Per device</h2><p class="muted">Dashed lines mark deployment outcomes '
        f"(green: healthy/active, red: rolled back/rejected).</p>{sections}"
        f"</main></body></html>"
    )
    return page, s


def write_report(db: FleetDB, out: Path) -> dict[str, Any]:
    """Write the page to ``out``; returns the fleet summary it shows (``summary``)."""
    page, s = _render(db, None, "edgefleet fleet report")
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--html {out}: cannot write ({exc.strerror})") from None
    return s
