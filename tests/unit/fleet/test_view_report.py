"""Fleet table rows (from the database and from broker messages) and the HTML report, including
a render in headless Chromium when it is installed."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from agent.clikit import main
from fleet.db import Batch, FleetDB
from fleet.fleet_report import deployment_history, render
from fleet.ingest import add_message
from fleet.mqtt import broker_config
from fleet.report_charts import downsample
from fleet.view import LiveFleet, render_table, rows_from_db
from tests.fleet_helpers import dumps, event, state, telemetry

T0 = 1_795_500_000.0
T = "edgefleet/v1/devices/{}/{}"
REASON = "p95 12.40 ms is 60% worse than the current model's 7.75 ms (limit 20%)"


def populate(db: FleetDB) -> None:
    """Three devices over ten minutes: one healthy upgrade, one rolled back (hot, throttled), one offline."""
    b = Batch.empty()
    add = add_message
    for i, dev in enumerate(("cam-01", "cam-02", "gate-03")):
        add(
            b,
            T.format(dev, "state"),
            dumps(
                state(dev, 1, online=dev != "gate-03", ts=T0, profile="rpi4" if i < 2 else "jetson")
            ),
            T0,
        )
        for k in range(120):
            ts = T0 + 5 * k
            hot = dev == "cam-02" and k > 60
            doc = telemetry(
                dev,
                10 + k,
                ts=ts,
                p50=2.0 + i + (3.0 if hot else 0.0) + (k % 7) * 0.1,
                p95=4.0 + i + (6.0 if hot else 0.0) + (k % 5) * 0.3,
                temp=55.0 + (25.0 if hot else 0.0) + (k % 3),
                rss=70.0 + i * 10 + k * 0.05,
                throttled=hot,
            )
            add(b, T.format(dev, "telemetry"), dumps(doc), ts + 0.1)
    seq = 500
    for dev, final, reason in (
        ("cam-01", "HEALTHY", ""),
        ("cam-02", "ROLLED_BACK", REASON),
        ("gate-03", "REJECTED", "signed by an untrusted key 9c1e0a7b5d3f2e11"),
    ):
        path = (
            ["FETCHING", "VERIFIED", "UNPACKED", "SELF_TEST", "ACTIVE", final]
            if final != "REJECTED"
            else ["FETCHING", final]
        )
        for j, st in enumerate(path):
            seq += 1
            add(
                b,
                T.format(dev, "events"),
                dumps(
                    event(
                        dev,
                        seq,
                        st,
                        version="1.1.0",
                        reason=reason if st == final else "",
                        ts=T0 + 300 + j,
                    )
                ),
                T0 + 300 + j,
            )
    add(b, T.format("cam-01", "telemetry"), b"{broken", T0 + 10)
    db.store(b)


@pytest.fixture
def db(tmp_path: Path) -> FleetDB:
    d = FleetDB(str(tmp_path / "fleet.db"))
    populate(d)
    return d


def test_rows_from_db_have_latest_telemetry_and_state(db: FleetDB) -> None:
    rows = {r.device: r for r in rows_from_db(db)}
    assert set(rows) == {"cam-01", "cam-02", "gate-03"}
    c2 = rows["cam-02"]
    assert c2.online and c2.profile == "rpi4" and c2.model == "tiny" and c2.version == "1.0.0"
    assert c2.throttled is True and c2.temp_max_c is not None and c2.temp_max_c >= 80.0
    assert c2.p95_ms == pytest.approx(4.0 + 1 + 6.0 + (129 % 5) * 0.3)
    assert rows["gate-03"].online is False and rows["cam-01"].throttled is False
    buf = io.StringIO()
    Console(file=buf, width=200).print(render_table(list(rows.values()), now=T0 + 700))
    out = buf.getvalue()
    assert "2/3 online" in out and "offline" in out and "cam-02" in out and "yes" in out


def test_live_rows_fold_state_and_telemetry_messages() -> None:
    live = LiveFleet(broker_config("mqtt://127.0.0.1:1"))  # never connected: apply() only
    live.apply(T.format("d1", "state"), dumps(state("d1", 1, online=True)), 10.0)
    live.apply(T.format("d1", "telemetry"), dumps(telemetry("d1", 2, p95=7.5, temp=71.0)), 11.0)
    live.apply(T.format("d1", "telemetry"), b"garbage", 12.0)  # ignored
    live.apply(T.format("d2", "state"), dumps(state("d2", 1, online=False, model=None)), 12.0)
    rows = {r.device: r for r in live.snapshot()}
    assert (
        rows["d1"].p95_ms == 7.5 and rows["d1"].temp_max_c == 71.0 and rows["d1"].last_seen == 11.0
    )
    assert rows["d2"].online is False and rows["d2"].model is None and rows["d2"].last_seen is None


def test_deployment_history_outcomes_and_reasons(db: FleetDB) -> None:
    hist = {a["device"]: a for a in deployment_history(db)}
    assert hist["cam-01"]["state"] == "HEALTHY"
    assert hist["cam-02"]["state"] == "ROLLED_BACK" and hist["cam-02"]["reason"] == REASON
    assert hist["gate-03"]["states"] == ["FETCHING", "REJECTED"]


def test_downsample_bounds_points_and_keeps_mean() -> None:
    pts = [(float(i), float(i % 10)) for i in range(10_000)]
    out = downsample(pts, 100)
    assert len(out) == 100
    assert sum(y for _, y in out) / 100 == pytest.approx(4.5, abs=0.01)


def test_report_page_is_self_contained_and_has_content(db: FleetDB) -> None:
    page = render(db, now=T0 + 700)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count("<svg") == 9  # three charts per device
    assert html.escape(REASON) in page and "ROLLED_BACK" in page and "untrusted key" in page
    assert len(re.findall(r"<polyline", page)) == 12  # p50+p95, temperature, RSS for 3 devices
    summary = json.loads(re.search(r'data-summary="([^"]+)"', page).group(1).replace("&quot;", '"'))  # type: ignore[union-attr]
    assert summary["summary"]["devices"] == 3 and summary["summary"]["telemetry_messages"] == 360
    assert summary["summary"]["rejected"] == 1 and summary["failed_deployments"] == 2


def test_report_and_status_commands(
    db: FleetDB, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.html"
    assert main(["fleet", "report", "--db", db.target, "--html", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["devices"] == 3 and doc["deployments"] == {
        "HEALTHY": 1,
        "ROLLED_BACK": 1,
        "REJECTED": 1,
    }
    assert out.stat().st_size > 10_000
    assert main(["fleet", "status", "--db", db.target, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["device"] for r in rows] == ["cam-01", "cam-02", "gate-03"]
    assert main(["fleet", "status", "--db", db.target]) == 0
    assert "cam-02" in capsys.readouterr().out
    assert main(["fleet", "status"]) == 2
    assert "exactly one of --broker" in capsys.readouterr().err
    assert main(["fleet", "report", "--db", str(tmp_path / "nope.db"), "--html", str(out)]) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/setup installs it)")
def test_report_renders_in_headless_chromium(db: FleetDB, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render(db, now=T0 + 700))
    shot = tmp_path / "report.png"
    flags = [
        CHROMIUM or "",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert (
        'id="deployments"' in dom.stdout
        and REASON in dom.stdout
        and dom.stdout.count("<polyline") == 12
    )
    res = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1300,1800", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and shot.stat().st_size > 20_000, res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = Path("/tmp/edgefleet-report-screenshot.png")
    shutil.copy(shot, keep)  # for a person to look at after the run


def test_watch_from_the_db_is_bounded_and_exits_cleanly(
    db: FleetDB, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    t0 = time.monotonic()
    assert main(["fleet", "watch", "--db", db.target, "--refresh", "0.2", "--for", "0.6"]) == 0
    assert time.monotonic() - t0 < 10
    out = capsys.readouterr().out
    assert "2/3 online" in out and "gate-03" in out and "offline" in out
    assert main(["fleet", "watch", "--db", db.target, "--refresh", "0.05"]) == 2  # below the bound
    assert "0.05" in capsys.readouterr().err
