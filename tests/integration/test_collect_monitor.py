"""Monitor blocks end to end: synthetic telemetry with monitor blocks and a drift event through a
real mosquitto into an `edgefleet collect` process, read back with `fleet status --json`."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from agent.clikit import main
from fleet.db import FleetDB
from fleet.mqtt import SyncClient, broker_config
from tests.agent_helpers import Broker, stop_process
from tests.fleet_helpers import drift_event, dumps, monitor, state, telemetry, wait_for
from tests.integration.test_collect import _collect_proc, _last_stats

pytestmark = pytest.mark.integration
T = "edgefleet/v1/devices/{}/{}"


def test_collected_monitor_blocks_reach_fleet_status(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path, log = tmp_path / "fleet.db", tmp_path / "collect.log"
    p = _collect_proc(broker.url, db_path, log)
    try:
        wait_for(lambda: "received" in log.read_text(), what="collector progress")
        with SyncClient(broker_config(broker.url)) as c:
            for dev in ("cam-1", "cam-2"):
                c.publish(T.format(dev, "state"), dumps(state(dev, 1)), retain=True)
            for seq in range(10):
                drifting = seq >= 7
                mon = monitor(0.4 if drifting else 0.02, confidence=0.8, drifting=drifting)
                c.publish(
                    T.format("cam-1", "telemetry"),
                    dumps(telemetry("cam-1", 10 + seq, monitor=mon)),
                    retain=False,
                )
                c.publish(
                    T.format("cam-2", "telemetry"),
                    dumps(telemetry("cam-2", 10 + seq)),
                    retain=False,
                )
            c.publish(T.format("cam-1", "events"), dumps(drift_event("cam-1", 30)), retain=False)
            c.flush()
        wait_for(lambda: _last_stats(log).get("stored") == 23, what="23 messages stored")
    finally:
        rc = stop_process(p, signal.SIGTERM)
    assert rc == 0
    stats = _last_stats(log)
    assert stats["duplicates"] == 0 and stats["rejected"] == 0
    db = FleetDB(str(db_path), readonly=True)
    assert db.count("monitor") == 10 and db.count("telemetry") == 20
    (ev,) = db.query("SELECT kind, reason FROM events")
    assert ev["kind"] == "drift" and "PSI 0.41 > 0.25" in ev["reason"]
    db.close()
    assert main(["fleet", "status", "--db", str(db_path), "--json"]) == 0
    rows = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows["cam-1"]["drift"], rows["cam-1"]["drifting"]) == (0.4, True)
    assert rows["cam-1"]["mean_confidence"] == 0.8
    assert rows["cam-2"]["drift"] is None and rows["cam-2"]["p95_ms"] == 2.0
