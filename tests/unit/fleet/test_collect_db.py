"""Collector decoding and the fleet database (SQLite here; PostgreSQL in tests/integration)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DatabaseError, UsageError
from fleet.collect import subscriptions
from fleet.db import Batch, FleetDB
from fleet.ingest import MAX_PAYLOAD, add_message
from fleet.schema import columns, ddl
from tests.fleet_helpers import dumps, event, state, telemetry

T = "edgefleet/v1/devices/{}/{}"


def _db(tmp_path: Path) -> FleetDB:
    return FleetDB(str(tmp_path / "fleet.db"))


def test_telemetry_row_keeps_fields_and_absent_sensors_are_null(tmp_path: Path) -> None:
    b = Batch.empty()
    assert add_message(b, T.format("d1", "telemetry"), dumps(telemetry("d1", 5, temp=61.0)), 100.0)
    assert add_message(
        b,
        T.format("d2", "telemetry"),
        dumps(telemetry("d2", 1, temp=None, rss=None, throttled=None)),
        101.0,
    )
    db = _db(tmp_path)
    assert db.store(b) == 2
    rows = {r["device"]: r for r in db.query("SELECT * FROM telemetry")}
    d1, d2 = rows["d1"], rows["d2"]
    assert (d1["seq"], d1["p50_ms"], d1["p95_ms"], d1["rss_mb"], d1["temp_max_c"], d1["model"]) == (
        5,
        1.0,
        2.0,
        80.0,
        61.0,
        "tiny",
    )
    assert json.loads(d1["temperatures"]) == {"cpu-thermal": 61.0, "gpu-thermal": 58.0}
    assert d2["rss_mb"] is None and d2["temp_max_c"] is None and d2["throttled"] is None
    seen = {r["device"]: r["last_seen"] for r in db.query("SELECT device, last_seen FROM devices")}
    assert seen == {"d1": 100.0, "d2": 101.0}


def test_inserts_are_idempotent_per_device_and_seq(tmp_path: Path) -> None:
    db = _db(tmp_path)
    b = Batch.empty()
    for seq in (1, 2, 2, 3):  # a redelivered message inside one batch
        add_message(b, T.format("d1", "telemetry"), dumps(telemetry("d1", seq)), time.time())
    add_message(
        b, T.format("d1", "events"), dumps(event("d1", 2, "ACTIVE")), time.time()
    )  # seq 2, other table
    add_message(b, T.format("d1", "cmd/result"), b'{"id": "c1", "ok": true}', time.time())
    assert db.store(b) == 5
    assert db.store(b) == 0  # the whole batch again (a collector restarted before acking)
    assert db.count("telemetry") == 3 and db.count("events") == 1 and db.count("cmd_results") == 1


def test_state_updates_current_device_row_in_arrival_order(tmp_path: Path) -> None:
    db = _db(tmp_path)
    b = Batch.empty()
    add_message(b, T.format("d1", "state"), dumps(state("d1", 10, online=True)), 1.0)
    add_message(
        b, T.format("d1", "state"), dumps(state("d1", 9, online=False)), 2.0
    )  # Last Will: older seq
    db.store(b)
    (dev,) = db.query("SELECT * FROM devices")
    assert not dev["online"] and dev["state_seq"] == 9 and dev["profile"] == "test-cpu"
    assert db.count("states") == 2


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not UTF-8 JSON"),
        (b"[1, 2]", "JSON list"),
        (b'{"device": "d1"}', "Telemetry: seq: Field required"),
        (dumps({**telemetry("d1", 1), "extra": 1}), "unknown field"),
        (dumps({**telemetry("d1", 1), "seq": -1}), "seq"),
        (dumps(telemetry("other", 1)), "does not match the topic"),
        (b"\xff\xfe" * 10, "not UTF-8 JSON"),
        (b"x" * (MAX_PAYLOAD + 1), f"exceeds the {MAX_PAYLOAD} allowed"),
    ],
)
def test_malformed_telemetry_is_stored_as_rejected(
    tmp_path: Path, payload: bytes, reason: str
) -> None:
    b = Batch.empty()
    assert not add_message(b, T.format("d1", "telemetry"), payload, 5.0)
    db = _db(tmp_path)
    db.store(b)
    (rej,) = db.query("SELECT * FROM rejected")
    assert reason in rej["reason"]
    assert rej["topic"] == T.format("d1", "telemetry") and rej["size"] == len(payload)
    assert len(rej["payload_prefix"]) <= 200
    assert db.count("telemetry") == 0


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(max_size=300) | st.text(max_size=200).map(str.encode),
    leaf=st.sampled_from(["state", "events", "telemetry", "cmd/result", "samples"]),
)
def test_any_bytes_on_any_topic_are_stored_or_rejected_never_raise(
    payload: bytes, leaf: str
) -> None:
    b = Batch.empty()
    ok = add_message(b, T.format("d1", leaf), payload, 1.0)
    assert len(b) == 1
    assert ok == (len(b.rows["rejected"]) == 0)


def test_schema_is_one_definition_in_two_dialects(tmp_path: Path) -> None:
    lite, pg = ddl("sqlite"), ddl("postgres")
    assert len(lite) == len(pg)
    assert any("BIGSERIAL" in s for s in pg) and not any("BIGSERIAL" in s for s in lite)
    assert any("PRIMARY KEY (device, seq)" in s for s in pg)
    db = _db(tmp_path)
    names = {r["name"] for r in db.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"devices", "states", "events", "telemetry", "cmd_results", "rejected", "meta"} <= names
    cols = [r["name"] for r in db.query("PRAGMA table_info(telemetry)")]
    assert cols == columns("telemetry")
    assert db.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"


def test_bad_db_targets_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown database scheme 'mysql://'"):
        FleetDB("mysql://h/db")
    with pytest.raises(DatabaseError, match="does not exist"):
        FleetDB(str(tmp_path / "missing" / "f.db"))
    with pytest.raises(DatabaseError, match="cannot open database"):
        FleetDB(str(tmp_path))  # a directory
    if Path("/proc/self").is_dir():  # a location nobody can create files in, root included
        with pytest.raises(DatabaseError, match="cannot open database"):
            FleetDB("/proc/edgefleet-fleet.db")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatabaseError, match="file is not a database"):
        FleetDB(str(tmp_path / "junk.db"))
    with pytest.raises(UsageError, match="no such database"):
        FleetDB(str(tmp_path / "absent.db"), readonly=True)


def test_shared_subscription_filters_keep_state_direct() -> None:
    subs = subscriptions("g1")
    assert "edgefleet/v1/devices/+/state" in subs
    assert "$share/g1/edgefleet/v1/devices/+/telemetry" in subs
    assert "$share/g1/edgefleet/v1/devices/+/cmd/result" in subs
    assert all(not s.startswith("$share") for s in subscriptions(None))
