"""Captured samples through a real mosquitto: `edgefleet collect` (a shared subscription) stores
them once each, refuses an oversized one, and `edgefleet feedback export` turns them into build
data; the same on PostgreSQL, with the upgrade of a schema-2 database."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.clikit import main
from fleet.collect import Collector
from fleet.db import FleetDB
from fleet.mqtt import SyncClient, broker_config
from fleet.schema import SCHEMA_VERSION, ddl
from tests.agent_helpers import REPO, Broker, stop_process
from tests.fleet_helpers import Postgres, dumps, pg_bin_dir, sample, wait_for

pytestmark = pytest.mark.integration
T = "edgefleet/v1/devices/{}/samples"
PG_BIN = pg_bin_dir()


def publish_samples(url: str, devices: list[str], per_device: int) -> int:
    """Labelled captures of x float32 (1, 4), an outputs-only one per device, and duplicates."""
    n = 0
    with SyncClient(broker_config(url)) as c:
        for d in devices:
            for seq in range(per_device):
                x = np.full((1, 4), seq, np.float32)
                doc = sample(d, seq, {"x": x}, {"y": np.ones((1, 3), np.float32)}, label=seq % 3)
                c.publish(T.format(d), dumps(doc), retain=False)
                n += 1
            c.publish(
                T.format(d), dumps(sample(d, 0, {"x": np.zeros((1, 4), np.float32)})), retain=False
            )
            c.publish(
                T.format(d), dumps(sample(d, 1000, None, {"y": np.ones((1, 3))})), retain=False
            )
            n += 1
        c.flush()
    return n


def _stats(log: Path) -> dict[str, object]:
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    return dict(json.loads(lines[-1])) if lines else {}


def test_collect_stores_samples_once_and_export_reads_them(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, log = tmp_path / "fleet.db", tmp_path / "collect.log"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.clikit",
            "collect",
            "--broker",
            broker.url,
            "--db",
            str(db),
            "--share-group",
            "collectors",
            "--max-sample-kb",
            "16",
            "--json-stats",
            "--stats-every",
            "0.5",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: "received" in log.read_text(), what="collector progress")
        n = publish_samples(broker.url, ["cam-1", "cam-2"], 10)
        with SyncClient(broker_config(broker.url)) as c:  # 32 KB of input: over --max-sample-kb
            big = sample("cam-1", 500, {"x": np.zeros((1, 8192), np.float32)}, label=1)
            c.publish(T.format("cam-1"), dumps(big), retain=False)
            c.flush()
        wait_for(lambda: _stats(log).get("received") == n + 2 + 1, what="every sample received")
    finally:
        rc = stop_process(p, signal.SIGTERM)
    assert rc == 0, log.read_text()
    s = _stats(log)
    assert s["stored"] == n and s["duplicates"] == 2 and s["rejected"] == 1, s
    assert s["samples_oversize"] == 1 and log.read_text().count("exceeds the 16384 allowed") == 1
    out = tmp_path / "feedback.npz"
    capsys.readouterr()
    assert (
        main(
            ["feedback", "export", "--db", str(db), "--model", "tiny", "--out", str(out), "--json"]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 20 and summary["skipped"] == {"outputs_only": 2}
    assert summary["devices"] == {"cam-1": 10, "cam-2": 10} and summary["labels"] == "all"
    with np.load(out) as npz:
        assert npz["x"].shape == (20, 4) and npz["y"].dtype == np.int64
        assert sorted(npz["y"].tolist()) == sorted([k % 3 for k in range(10)] * 2)


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    if importlib.util.find_spec("psycopg") is None or PG_BIN is None:
        pytest.skip("PostgreSQL (psycopg and server binaries) not available")
    server = Postgres(PG_BIN).start()
    yield server
    server.stop()


def test_pg_upgrades_a_schema_2_database_and_stores_samples(
    pg: Postgres, broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import psycopg

    url = pg.create_db("samples")
    with psycopg.connect(url, autocommit=True) as c:  # the schema before the samples table
        for stmt in ddl("postgres"):
            if "samples" not in stmt:
                c.execute(stmt)
        c.execute("INSERT INTO meta VALUES ('schema_version', '2')")
        c.execute("INSERT INTO telemetry (device, seq, ts, p95_ms) VALUES ('d0', 1, 5.0, 3.0)")
    col = Collector(broker_config(broker.url), url, client_id="pg-samples").start()
    try:
        n = publish_samples(broker.url, ["cam-1"], 5)
        wait_for(lambda: col.stats.received == n + 1, what="every sample received")
    finally:
        col.stop()
    db = FleetDB(url)
    assert db.schema_version() == SCHEMA_VERSION and db.count("samples") == n
    assert db.query("SELECT p95_ms FROM telemetry")[0]["p95_ms"] == 3.0
    types = {
        r["column_name"]: r["data_type"]
        for r in db.query(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'samples'"
        )
    }
    assert types["redacted"] == "boolean" and types["inputs"] == "text"
    db.close()
    out = tmp_path / "pg.npz"
    capsys.readouterr()
    assert main(["feedback", "export", "--db", url, "--model", "tiny", "--out", str(out)]) == 0
    with np.load(out) as npz:
        assert npz["x"].shape == (5, 4) and npz["y"].tolist() == [0, 1, 2, 0, 1]
