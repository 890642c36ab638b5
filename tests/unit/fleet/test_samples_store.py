"""Captured samples in the fleet database (SQLite): one row per (device, seq), the size bound,
tensors checked against dtype and shape, and the upgrade of a schema-2 database
(PostgreSQL: tests/integration/test_collect_samples.py)."""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import topics
from fleet.collect import subscriptions
from fleet.db import Batch, FleetDB
from fleet.feedback import _tensor
from fleet.ingest import add_message
from fleet.samples_store import DTYPES, SampleLimit
from fleet.schema import SCHEMA_VERSION, ddl
from tests.fleet_helpers import dumps, sample, telemetry

T = "edgefleet/v1/devices/{}/{}"
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def test_samples_topic_is_subscribed_and_parsed() -> None:
    assert topics.parse(T.format("d1", "samples")) == topics.Topic("samples", device="d1")
    assert topics.device_topic("d1", "samples") == T.format("d1", "samples")
    assert "$share/g/edgefleet/v1/devices/+/samples" in subscriptions("g")
    assert "edgefleet/v1/devices/+/samples" in subscriptions(None)


def test_a_sample_is_stored_once_with_its_tensors(tmp_path: Path) -> None:
    db = FleetDB(str(tmp_path / "fleet.db"))
    b = Batch.empty()
    doc = sample("d1", 7, {"x": X}, {"y": np.ones((2, 3), np.float32)}, [1, 2], "low_confidence")
    doc["request_id"] = "r-1"
    assert add_message(b, T.format("d1", "samples"), dumps(doc), 10.0)
    assert add_message(b, T.format("d1", "samples"), dumps(sample("d1", 8, None, {"y": X})), 10.0)
    assert db.store(b) == 2 and db.store(b) == 0  # a redelivery is not stored twice
    assert db.count("samples") == 2
    r = db.query("SELECT * FROM samples WHERE seq = 7")[0]
    assert (r["model"], r["version"], r["trigger"], r["request_id"]) == (
        "tiny",
        "1.0.0",
        "low_confidence",
        "r-1",
    )
    assert json.loads(r["label"]) == [1, 2] and not r["redacted"] and r["size"] > 0
    assert json.loads(r["inputs"])["x"] == doc["inputs"]["x"]
    outputs_only = db.query("SELECT inputs, redacted, label FROM samples WHERE seq = 8")[0]
    assert (
        outputs_only["inputs"] is None
        and outputs_only["redacted"]
        and outputs_only["label"] is None
    )
    assert db.query("SELECT last_seen FROM devices")[0]["last_seen"] == 10.0


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: d["inputs"]["x"].update(shape=[3, 4]), "dtype and shape need 48"),
        (lambda d: d["inputs"]["x"].update(dtype="complex64"), "dtype 'complex64'"),
        (lambda d: d["inputs"]["x"].update(data="abc"), "not base64"),
        (lambda d: d.update(trigger="whim"), "trigger"),
        (lambda d: d.update(device="d2"), "does not match the topic"),
        (lambda d: d.update(extra=1), "unknown field"),
    ],
)
def test_a_bad_sample_is_a_rejected_row(tmp_path: Path, mangle: object, reason: str) -> None:
    doc = sample("d1", 1, {"x": X})
    mangle(doc)  # type: ignore[operator]
    b = Batch.empty()
    assert not add_message(b, T.format("d1", "samples"), dumps(doc), 1.0)
    (rej,) = b.rows["rejected"]
    assert reason in rej[2] and not b.rows["samples"]


def test_an_oversized_sample_is_refused_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limit = SampleLimit(max_bytes=1000)
    big = dumps(sample("d1", 1, {"x": np.zeros((1, 500), np.float32)}))
    small = dumps(sample("d1", 2, {"x": X}))
    b = Batch.empty()
    with caplog.at_level(logging.WARNING, "edgefleet.collect"):
        for seq in range(3):
            assert not add_message(b, T.format("d1", "samples"), big, float(seq), limit)
        assert add_message(b, T.format("d1", "samples"), small, 4.0, limit)
    assert limit.refused == 3 and len(b.rows["rejected"]) == 3
    assert "exceeds the 1000 allowed" in b.rows["rejected"][0][2]
    assert len([r for r in caplog.records if "exceeds" in r.getMessage()]) == 1
    # the 64 KB bound of the other topics does not apply to samples
    mid = dumps(sample("d1", 3, {"x": np.zeros((1, 30_000), np.float32)}))
    assert len(mid) > 64 * 1024 and add_message(b, T.format("d1", "samples"), mid, 5.0)


def test_a_schema_2_database_gains_the_samples_table_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    for stmt in ddl("sqlite"):
        if "samples" not in stmt:  # the schema before this table existed
            old.execute(stmt)
    old.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    old.execute("INSERT INTO telemetry (device, seq, ts, p95_ms) VALUES ('d0', 1, 5.0, 3.0)")
    old.commit()
    old.close()
    ro = FleetDB(str(path), readonly=True)  # readers before the collector upgraded it
    assert not ro.has_table("samples") and ro.schema_version() == 2
    ro.close()
    db = FleetDB(str(path))  # the collector's start upgrades
    assert db.has_table("samples") and db.schema_version() == SCHEMA_VERSION == 4
    assert db.query("SELECT p95_ms FROM telemetry")[0]["p95_ms"] == 3.0
    b = Batch.empty()
    add_message(b, T.format("d0", "samples"), dumps(sample("d0", 2, {"x": X})), 6.0)
    add_message(b, T.format("d0", "telemetry"), dumps(telemetry("d0", 2)), 6.0)
    assert db.store(b) == 2
    db.close()
    assert FleetDB(str(path)).schema_version() == SCHEMA_VERSION  # idempotent


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 4), max_size=3),
    data=st.text("ABCDabcd0123+/=", max_size=40),
)
def test_what_the_collector_accepts_the_exporter_decodes(
    dtype: str, shape: list[int], data: str
) -> None:
    doc = sample("d1", 1, {"x": X})
    doc["inputs"]["x"] = {"dtype": dtype, "shape": shape, "data": data}
    b = Batch.empty()
    if add_message(b, T.format("d1", "samples"), dumps(doc), 1.0):
        stored = json.loads(b.rows["samples"][0][12])["x"]
        assert _tensor(stored).size == math.prod(shape)
