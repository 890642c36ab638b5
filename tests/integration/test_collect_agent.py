"""A real agent process publishes state, deployment events and telemetry; the collector stores
them and the report shows them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.clikit import main
from fleet.collect import Collector
from fleet.db import FleetDB
from fleet.mqtt import broker_config
from tests.agent_helpers import Broker, deploy, publish
from tests.fleet_helpers import wait_for

pytestmark = pytest.mark.integration


def test_real_agent_telemetry_events_and_last_will_are_collected(
    broker: Broker, agents: Any, artifacts: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = str(tmp_path / "fleet.db")
    col = Collector(broker_config(broker.url), db_path, client_id="agent-test").start()
    try:
        proc = agents.start("cam-1", telemetry={"interval_s": 0.3})
        db = FleetDB(db_path)
        wait_for(lambda: db.count("telemetry") >= 2, timeout=30, what="telemetry from the agent")
        publish(broker.url, artifacts(version="1.0.0"))
        deploy(broker.url, "tiny@1.0.0", device="cam-1")
        wait_for(
            lambda: bool(db.query("SELECT 1 FROM events WHERE state = 'HEALTHY'")),
            timeout=60,
            what="HEALTHY event",
        )
        wait_for(
            lambda: bool(db.query("SELECT 1 FROM telemetry WHERE model = 'tiny'")),
            timeout=30,
            what="telemetry naming the new model",
        )
        (dev,) = db.query("SELECT * FROM devices")
        assert (
            dev["device"] == "cam-1"
            and dev["online"]
            and dev["model"] == "tiny"
            and dev["version"] == "1.0.0"
        )
        t = db.query("SELECT * FROM telemetry ORDER BY seq DESC LIMIT 1")[0]
        assert t["rss_mb"] > 10 and t["uptime_s"] > 0 and t["interval_s"] > 0
        assert db.count("rejected") == 0
        states = [
            r["state"]
            for r in db.query("SELECT state FROM events WHERE kind = 'deployment' ORDER BY seq")
        ]
        assert states[0] == "FETCHING" and states[-1] == "HEALTHY" and "SELF_TEST" in states
        proc.kill()  # the broker publishes the Last Will
        wait_for(
            lambda: not db.query("SELECT online FROM devices")[0]["online"],
            timeout=30,
            what="Last Will",
        )
    finally:
        col.stop()
    out = tmp_path / "report.html"
    assert main(["fleet", "report", "--db", db_path, "--html", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["devices"] == 1
        and summary["online"] == 0
        and summary["deployments"] == {"HEALTHY": 1}
    )
    page = out.read_text()
    assert "cam-1" in page and "HEALTHY" in page and "<polyline" in page
