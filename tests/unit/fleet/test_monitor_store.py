"""Monitor blocks in the fleet database: the monitor row of a telemetry message, drift events,
the upgrade of a schema-1 database, and a block with odd values (SQLite; PostgreSQL in
tests/integration/test_collect_pg.py)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from fleet.db import Batch, FleetDB
from fleet.ingest import add_message
from fleet.monitor_store import MonitorWindow, latest_windows
from fleet.schema import SCHEMA_VERSION, ddl
from fleet.view import rows_from_db
from tests.fleet_helpers import drift_event, dumps, monitor, state, telemetry

T = "edgefleet/v1/devices/{}/{}"


def test_monitor_block_becomes_a_row_beside_its_telemetry(tmp_path: Path) -> None:
    db = FleetDB(str(tmp_path / "fleet.db"))
    b = Batch.empty()
    add_message(b, T.format("d1", "telemetry"), dumps(telemetry("d1", 1, ts=10.0)), 10.0)
    for seq, d in ((2, 0.05), (3, 0.41)):
        doc = telemetry("d1", seq, ts=10.0 + seq, monitor=monitor(d, drifting=d > 0.25))
        add_message(b, T.format("d1", "telemetry"), dumps(doc), 11.0)
    add_message(b, T.format("d1", "events"), dumps(drift_event("d1", 4)), 12.0)
    assert db.store(b) == 4  # messages, not rows: the monitor rows ride on their telemetry
    assert db.store(b) == 0 and db.count("monitor") == 2 and db.count("telemetry") == 3
    last = db.query("SELECT * FROM monitor WHERE seq = 3")[0]
    assert (last["model"], last["version"], last["sha256"]) == ("tiny", "1.0.0", "ab" * 32)
    assert (last["count"], last["metric"], last["drift_max"], last["non_finite"]) == (
        42,
        "psi",
        0.41,
        0,
    )
    assert bool(last["drifting"]) and last["mean_confidence"] == 0.91
    assert last["low_confidence_rate"] == 0.02
    assert json.loads(last["block"])["classes"] == {"0": 12, "1": 30}
    (ev,) = db.query("SELECT kind, reason, detail FROM events")
    assert ev["kind"] == "drift" and ev["reason"].startswith("drift: input x PSI 0.41")
    assert json.loads(ev["detail"])["threshold"] == 0.25
    assert latest_windows(db)["d1"]["drift_max"] == 0.41


def test_odd_monitor_values_are_null_not_rejected() -> None:
    w = MonitorWindow.parse(
        {
            "count": "many",
            "drift": {"inputs": {"x": 0.2, "z": "bad"}, "outputs": {"y": 0.3}},  # no "max"
            "classes": {"0": 5, "1": -1, "2": True},
            "mean_confidence": float("nan"),
            "drifting": "yes",
        }
    )
    assert w.count is None and w.drift_max == 0.3 and w.classes == {"0": 5.0}
    assert w.mean_confidence is None and w.drifting is None


def test_a_schema_1_database_gains_the_monitor_table_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    for stmt in ddl("sqlite"):
        if "monitor" not in stmt:  # the schema before this table existed
            old.execute(stmt)
    old.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    old.execute("INSERT INTO telemetry (device, seq, ts, p95_ms) VALUES ('d0', 1, 5.0, 3.0)")
    old.execute("INSERT INTO devices (device, last_seen) VALUES ('d0', 5.0)")
    old.commit()
    old.close()
    ro = FleetDB(str(path), readonly=True)  # `fleet status` before the collector upgraded it
    assert not ro.has_table("monitor") and rows_from_db(ro)[0].drift is None
    ro.close()
    db = FleetDB(str(path))  # the collector's start upgrades
    assert db.has_table("monitor") and db.schema_version() == SCHEMA_VERSION >= 2
    assert db.query("SELECT p95_ms FROM telemetry")[0]["p95_ms"] == 3.0
    b = Batch.empty()
    add_message(b, T.format("d0", "state"), dumps(state("d0", 1)), 6.0)
    add_message(
        b, T.format("d0", "telemetry"), dumps(telemetry("d0", 2, monitor=monitor(0.1))), 6.0
    )
    db.store(b)
    assert rows_from_db(db)[0].drift == 0.1
    db.close()
    assert FleetDB(str(path)).schema_version() == SCHEMA_VERSION  # idempotent
