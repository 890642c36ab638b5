"""Model monitoring in `fleet status|watch` (the drift and confidence columns, live and from the
database) and in the HTML report (drift and confidence charts, drift episodes)."""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from agent.clikit import main
from fleet.db import Batch, FleetDB
from fleet.fleet_report import render
from fleet.ingest import add_message
from fleet.mqtt import broker_config
from fleet.report_drift import drift_episodes
from fleet.view import LiveFleet, cells, render_table, rows_from_db
from tests.fleet_helpers import drift_event, dumps, event, monitor, state, telemetry

T0 = 1_795_500_000.0
T = "edgefleet/v1/devices/{}/{}"


@pytest.fixture
def db(tmp_path: Path) -> FleetDB:
    """cam-01 monitors its model and drifts after a deployment (one episode ended, one ongoing);
    cam-02 sends no monitor block."""
    d = FleetDB(str(tmp_path / "fleet.db"))
    b = Batch.empty()
    for dev in ("cam-01", "cam-02"):
        add_message(b, T.format(dev, "state"), dumps(state(dev, 1, ts=T0)), T0)
        for k in range(60):
            ts = T0 + 5 * k
            score = 0.4 if 20 <= k < 30 or k >= 50 else 0.05
            mon = monitor(score, confidence=0.9 - score, drifting=score > 0.25)
            doc = telemetry(dev, 10 + k, ts=ts, monitor=mon if dev == "cam-01" else None)
            add_message(b, T.format(dev, "telemetry"), dumps(doc), ts)
    for seq, (ts, ended) in enumerate(((T0 + 115, False), (T0 + 150, True), (T0 + 265, False))):
        add_message(
            b, T.format("cam-01", "events"), dumps(drift_event("cam-01", 200 + seq, ended, ts)), ts
        )
    add_message(
        b, T.format("cam-01", "events"), dumps(event("cam-01", 300, "HEALTHY", ts=T0 + 90)), T0
    )
    d.store(b)
    return d


def test_status_rows_and_table_show_the_latest_drift_marked_when_drifting(
    db: FleetDB, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = {r.device: r for r in rows_from_db(db)}
    c1, c2 = rows["cam-01"], rows["cam-02"]
    assert (c1.drift, c1.drifting, c1.mean_confidence) == (0.4, True, pytest.approx(0.5))
    assert c2.drift is None and c2.drifting is None and c2.mean_confidence is None
    assert cells(c1, T0)[-3:-1] == ["⚠ 0.400", "0.50"] and cells(c2, T0)[-3:-1] == ["-", "-"]
    buf = io.StringIO()
    Console(file=buf, width=220).print(render_table(list(rows.values()), now=T0 + 300))
    out = buf.getvalue()
    assert "drift" in out and "conf" in out and "⚠ 0.400" in out
    assert main(["fleet", "status", "--db", db.target, "--json"]) == 0
    got = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
    assert got["cam-01"]["drift"] == 0.4 and got["cam-01"]["drifting"] is True
    assert got["cam-01"]["mean_confidence"] == pytest.approx(0.5)
    assert got["cam-02"]["drift"] is None
    assert main(["fleet", "watch", "--db", db.target, "--refresh", "0.2", "--for", "0.3"]) == 0
    assert "⚠ 0.400" in capsys.readouterr().out


def test_live_rows_take_drift_from_telemetry() -> None:
    live = LiveFleet(broker_config("mqtt://127.0.0.1:1"))  # never connected: apply() only
    live.apply(T.format("d1", "state"), dumps(state("d1", 1)), 10.0)
    doc = telemetry("d1", 2, monitor=monitor(0.03, confidence=0.93))
    live.apply(T.format("d1", "telemetry"), dumps(doc), 11.0)
    (row,) = live.snapshot()
    assert (row.drift, row.drifting, row.mean_confidence) == (0.03, False, 0.93)
    assert "⚠" not in cells(row, 12.0)[-3]


def test_drift_episodes_pair_start_and_end_events(db: FleetDB) -> None:
    eps = drift_episodes(db)
    assert [(e["started"], e["ended"]) for e in eps] == [(T0 + 115, T0 + 150), (T0 + 265, None)]
    assert eps[0]["threshold"] == 0.25 and eps[0]["windows"] == 3
    assert eps[0]["reason"].startswith("drift: input x PSI 0.41 > 0.25")


def test_report_plots_drift_and_confidence_and_lists_episodes(db: FleetDB) -> None:
    page = render(db, now=T0 + 400)
    assert "<script" not in page and "https://" not in page
    sec1 = re.search(r'<section class="dev" id="dev-cam-01">.*?</section>', page)
    sec2 = re.search(r'<section class="dev" id="dev-cam-02">.*?</section>', page)
    assert sec1 is not None and sec2 is not None
    assert sec1.group(0).count("<svg") == 5 and sec2.group(0).count("<svg") == 3
    assert 'aria-label="model drift (max score per window)"' in sec1.group(0)
    assert 'aria-label="prediction confidence"' in sec1.group(0)
    drift_svg = re.search(r'aria-label="model drift.*?</svg>', sec1.group(0))
    assert drift_svg is not None and "threshold" in drift_svg.group(0)
    assert 'class="mark ok"' in drift_svg.group(0)  # the deployment is marked on it too
    table = re.search(r'<table id="drift-episodes">.*?</table>', page)
    assert table is not None
    assert table.group(0).count("<tr>") == 3 and "ongoing" in table.group(0)
    assert html.escape("drift: input x PSI 0.41 > 0.25 (3 windows)") in table.group(0)
    summary = json.loads(
        html.unescape(re.search(r'data-summary="([^"]+)"', page).group(1))  # type: ignore[union-attr]
    )
    assert summary["summary"]["drift_episodes"] == 2 and summary["summary"]["drifting"] == 1


def test_an_episode_ends_when_the_device_runs_another_model(db: FleetDB) -> None:
    # the demo's report showed the old model's episode "ongoing" after the retrained version
    # replaced it: the agent monitors the new model and never speaks of the old one again
    b = Batch.empty()
    same = event("cam-01", 301, "ACTIVE", version="1.0.0", ts=T0 + 280)  # a restart: same model
    new = event("cam-01", 302, "ACTIVE", version="1.1.0", ts=T0 + 290)
    for doc in (same, new):
        add_message(b, T.format("cam-01", "events"), dumps(doc), doc["ts"])
    db.store(b)
    eps = drift_episodes(db)
    assert [(e["started"], e["ended"]) for e in eps] == [(T0 + 115, T0 + 150), (T0 + 265, T0 + 290)]
    assert eps[1]["end_reason"] == "model replaced by tiny 1.1.0"
    table = re.search(r'<table id="drift-episodes">.*?</table>', render(db, now=T0 + 400))
    assert table is not None and "ongoing" not in table.group(0)
    assert "model replaced by tiny 1.1.0" in table.group(0)
