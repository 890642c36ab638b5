"""The collector on a real PostgreSQL server: same schema, shared subscriptions, and acks only
after the commit (a collector killed while its insert waits loses nothing)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.clikit import main
from fleet.collect import Collector
from fleet.db import FleetDB
from fleet.mqtt import broker_config
from tests.agent_helpers import REPO, Broker, stop_process
from tests.fleet_helpers import Postgres, pg_bin_dir, wait_for
from tests.integration.test_collect import publish_telemetry

PG_BIN = pg_bin_dir()
pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("psycopg") is None,
        reason="workstation-only: the PostgreSQL store needs psycopg (pip install 'edgefleet[postgres]')",
    ),
    pytest.mark.integration,
    pytest.mark.skipif(
        PG_BIN is None,
        reason="PostgreSQL server binaries (initdb, pg_ctl) are not installed; "
        ".ci/setup installs them with apt-get install postgresql",
    ),
]


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    assert PG_BIN is not None
    server = Postgres(PG_BIN).start()
    yield server
    server.stop()


def test_pg_shared_collectors_store_each_message_once(
    pg: Postgres, broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg.create_db("shared")
    FleetDB(url).close()
    a = Collector(broker_config(broker.url), url, share_group="pg", client_id="pg-a").start()
    b = Collector(broker_config(broker.url), url, share_group="pg", client_id="pg-b").start()
    try:
        n = publish_telemetry(broker.url, [f"d{i}" for i in range(10)], 30)
        wait_for(lambda: a.stats.received + b.stats.received >= n, what="all messages")
    finally:
        a.stop()
        b.stop()
    assert (
        a.stats.received > 0 and b.stats.received > 0 and a.stats.received + b.stats.received == n
    )
    db = FleetDB(url)
    assert db.dialect == "postgres" and db.count("telemetry") == n
    types = {
        r["column_name"]: r["data_type"]
        for r in db.query(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'telemetry'"
        )
    }
    assert (
        types["seq"] == "bigint"
        and types["throttled"] == "boolean"
        and types["p95_ms"] == "double precision"
    )
    assert main(["fleet", "status", "--db", url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 10 and all(r["p95_ms"] == 2.0 for r in rows)
    out = tmp_path / "r.html"
    assert (
        main(["fleet", "report", "--db", url, "--html", str(out)]) == 0 and "d9" in out.read_text()
    )


def test_pg_collector_killed_before_commit_loses_nothing(
    pg: Postgres, broker: Broker, tmp_path: Path
) -> None:
    import psycopg

    url = pg.create_db("killed")
    FleetDB(url).close()
    log = tmp_path / "c.log"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.clikit",
                "collect",
                "--broker",
                broker.url,
                "--db",
                url,
                "--client-id",
                "pg-kill",
                "--json-stats",
                "--stats-every",
                "0.5",
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    p = start()
    locker = psycopg.connect(url)
    try:
        wait_for(lambda: '"received"' in log.read_text(), what="collector running")
        # Hold a lock so the collector's INSERT waits: it has the messages but has not committed.
        locker.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
        n = publish_telemetry(broker.url, ["k1", "k2", "k3"], 20)
        # the collector has the messages and its INSERT waits on the lock: nothing acknowledged yet
        wait_for(
            lambda: (
                locker.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted "
                    "AND relation = 'telemetry'::regclass"
                ).fetchone()[0]
                > 0
            ),  # type: ignore[index]
            what="the collector's INSERT waiting on the lock",
        )
    finally:
        stop_process(p, signal.SIGKILL, 10)  # killed before the lock goes, so it never commits
        locker.rollback()
        locker.close()
    assert FleetDB(url).count("telemetry") == 0
    p = start()  # same client id: the broker redelivers everything that was never acknowledged
    try:
        wait_for(lambda: FleetDB(url).count("telemetry") == n, what="redelivered messages stored")
    finally:
        rc = stop_process(p, signal.SIGTERM)
    assert rc == 0


def test_pg_schema_1_database_gains_monitor_rows(
    pg: Postgres, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing PostgreSQL database (schema 1) gains the monitor table without losing rows."""
    import psycopg

    from fleet.db import Batch
    from fleet.ingest import add_message
    from fleet.schema import SCHEMA_VERSION, ddl
    from tests.fleet_helpers import drift_event, dumps, monitor, state, telemetry

    url = pg.create_db("upgrade")
    with psycopg.connect(url, autocommit=True) as c:
        for stmt in ddl("postgres"):
            if "monitor" not in stmt:
                c.execute(stmt)
        c.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        c.execute("INSERT INTO telemetry (device, seq, ts, p95_ms) VALUES ('d0', 1, 5.0, 3.0)")
    db = FleetDB(url)
    assert db.schema_version() == SCHEMA_VERSION and db.has_table("monitor")
    b = Batch.empty()
    t = "edgefleet/v1/devices/d0/{}"
    add_message(b, t.format("state"), dumps(state("d0", 1)), 6.0)
    doc = telemetry("d0", 2, monitor=monitor(0.4, drifting=True, confidence=0.7))
    add_message(b, t.format("telemetry"), dumps(doc), 6.0)
    add_message(b, t.format("events"), dumps(drift_event("d0", 3)), 6.0)
    assert db.store(b) == 3 and db.store(b) == 0
    types = {
        r["column_name"]: r["data_type"]
        for r in db.query(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'monitor'"
        )
    }
    assert types["drifting"] == "boolean" and types["drift_max"] == "double precision"
    assert db.count("telemetry") == 2 and db.count("monitor") == 1
    db.close()
    assert main(["fleet", "status", "--db", url, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["drift"], row["drifting"], row["mean_confidence"]) == (0.4, True, 0.7)
