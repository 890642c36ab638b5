"""The collector against a real mosquitto: storage of every topic, restart without loss (CLI
process, SIGTERM), two collectors sharing the stream, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.clikit import main
from fleet.collect import Collector
from fleet.db import FleetDB
from fleet.mqtt import SyncClient, broker_config
from tests.agent_helpers import REPO, Broker, free_port, stop_process
from tests.fleet_helpers import dumps, event, state, telemetry, wait_for

pytestmark = pytest.mark.integration
T = "edgefleet/v1/devices/{}/{}"


def publish_telemetry(url: str, devices: list[str], per_device: int, start_seq: int = 0) -> int:
    with SyncClient(broker_config(url)) as c:
        for k in range(per_device):
            for d in devices:
                c.publish(
                    T.format(d, "telemetry"),
                    dumps(telemetry(d, start_seq + k)),
                    retain=False,
                    window=200,
                )
        c.flush()
    return len(devices) * per_device


def test_collector_stores_state_events_telemetry_results_and_rejects(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "fleet.db"
    with SyncClient(broker_config(broker.url)) as c:  # retained before the collector starts
        c.publish(T.format("d1", "state"), dumps(state("d1", 1)), retain=True)
        c.flush()
    col = Collector(broker_config(broker.url), str(db_path), client_id="t-col").start()
    try:
        with SyncClient(broker_config(broker.url)) as c:
            c.publish(T.format("d2", "state"), dumps(state("d2", 1, online=False)), retain=True)
            for seq, st in enumerate(["FETCHING", "VERIFIED", "ACTIVE", "HEALTHY"], start=2):
                c.publish(T.format("d1", "events"), dumps(event("d1", seq, st)), retain=False)
            for seq in range(10, 30):
                c.publish(
                    T.format("d1", "telemetry"), dumps(telemetry("d1", seq, p95=3.5)), retain=False
                )
            c.publish(
                T.format("d1", "cmd/result"),
                b'{"id": "c-1", "ok": false, "reason": "unknown op"}',
                retain=False,
            )
            c.publish(T.format("d1", "telemetry"), b'{"device": "d1", "seq": "x"}', retain=False)
            c.publish(T.format("d1", "telemetry"), b"\x00" * 70_000, retain=False)  # oversized
            c.flush()
        wait_for(lambda: col.stats.received >= 29, what="29 messages stored")
        assert col.stats.rejected == 2 and col.stats.error is None
    finally:
        col.stop()
    db = FleetDB(str(db_path))
    assert db.count("states") == 2 and db.count("events") == 4 and db.count("telemetry") == 20
    (res,) = db.query("SELECT * FROM cmd_results")
    assert res["cmd_id"] == "c-1" and not res["ok"] and res["reason"] == "unknown op"
    reasons = sorted(r["reason"] for r in db.query("SELECT reason FROM rejected"))
    assert reasons[0].startswith("Telemetry: seq") and "70000 bytes exceeds" in reasons[1]
    # the same rows through the scripts' interface
    assert main(["fleet", "status", "--db", str(db_path), "--json"]) == 0
    rows = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
    assert (
        rows["d1"]["online"] is True
        and rows["d1"]["p95_ms"] == 3.5
        and rows["d2"]["online"] is False
    )
    # and live from the broker: retained state plus telemetry while listening
    with SyncClient(broker_config(broker.url)) as c:
        listened = threading.Event()

        def until_listened() -> None:
            # telemetry every 0.1 s until the command returns: whenever it subscribes, one arrives
            seq = 99
            while not listened.is_set():
                c.publish(
                    T.format("d1", "telemetry"), dumps(telemetry("d1", seq, p95=9.25)), retain=False
                )
                c.flush()
                seq += 1
                listened.wait(0.1)

        th = threading.Thread(target=until_listened)
        th.start()
        try:
            assert (
                main(["fleet", "status", "--broker", broker.url, "--listen", "1.5", "--json"]) == 0
            )
        finally:
            listened.set()
            th.join()
    live = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
    assert live["d1"]["p95_ms"] == 9.25 and live["d2"]["online"] is False


def _sigint_at_default() -> None:  # runs in the child between fork and exec
    """A runner that ignores SIGINT passes that on to children, and Python then never raises
    KeyboardInterrupt: restore the default so the Ctrl-C path is what is tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _collect_proc(url: str, db: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.clikit",
            "collect",
            "--broker",
            url,
            "--db",
            str(db),
            "--client-id",
            "restart-test",
            "--json-stats",
            "--stats-every",
            "0.5",
            *extra,
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=_sigint_at_default,
    )


def _last_stats(log: Path) -> dict[str, object]:
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    return dict(json.loads(lines[-1])) if lines else {}


def test_collector_restart_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    db_path = tmp_path / "fleet.db"
    devices = [f"dev-{i}" for i in range(5)]
    p = _collect_proc(broker.url, db_path, tmp_path / "c1.log")
    try:
        wait_for(lambda: "received" in (tmp_path / "c1.log").read_text(), what="collector progress")
        n1 = publish_telemetry(broker.url, devices, 20)
        wait_for(
            lambda: _last_stats(tmp_path / "c1.log").get("stored") == n1, what="first batch stored"
        )
    finally:
        rc = stop_process(p, signal.SIGTERM)
    assert rc == 0
    final = _last_stats(tmp_path / "c1.log")
    assert final["final"] is True and final["stored"] == n1
    # while the collector is down: the broker keeps them for its persistent session
    n2 = publish_telemetry(broker.url, devices, 30, start_seq=100)
    p = _collect_proc(broker.url, db_path, tmp_path / "c2.log")
    try:
        wait_for(
            lambda: _last_stats(tmp_path / "c2.log").get("stored") == n2, what="backlog stored"
        )
    finally:
        rc = stop_process(p, signal.SIGINT)  # Ctrl-C also stops cleanly
    assert rc == 0
    db = FleetDB(str(db_path))
    assert db.count("telemetry") == n1 + n2
    per_dev = db.query(
        "SELECT device, COUNT(*) AS n, MIN(seq) AS lo, MAX(seq) AS hi FROM telemetry "
        "GROUP BY device ORDER BY device"
    )
    assert [(r["n"], r["lo"], r["hi"]) for r in per_dev] == [(50, 0, 129)] * 5


def test_two_collectors_share_the_stream_exactly_once(broker: Broker, tmp_path: Path) -> None:
    db_path = str(tmp_path / "fleet.db")
    FleetDB(db_path).close()  # schema first, so the two do not race to create it
    a = Collector(broker_config(broker.url), db_path, share_group="g", client_id="col-a").start()
    b = Collector(broker_config(broker.url), db_path, share_group="g", client_id="col-b").start()
    try:
        n = publish_telemetry(broker.url, [f"d{i}" for i in range(20)], 20)
        wait_for(lambda: a.stats.received + b.stats.received >= n, what="all messages received")
        # A duplicate of those would reach its collector before anything published later (mosquitto
        # keeps each client's order): publish barrier messages until each collector has one.
        ra, rb = a.stats.received, b.stats.received
        barriers = 0

        def both_passed_a_barrier() -> bool:
            nonlocal barriers
            if (
                a.stats.received + b.stats.received - ra - rb >= barriers
            ):  # all barriers so far delivered
                barriers += publish_telemetry(broker.url, ["barrier"], 1, start_seq=barriers)
            return a.stats.received > ra and b.stats.received > rb

        wait_for(both_passed_a_barrier, what="a barrier message at each collector")
        wait_for(
            lambda: a.stats.received + b.stats.received >= n + barriers,
            what="every barrier received",
        )
    finally:
        a.stop()
        b.stop()
    assert (
        a.stats.received + b.stats.received == n + barriers
    )  # each message went to one collector only
    assert a.stats.received > n // 10 and b.stats.received > n // 10  # and both did work
    assert a.stats.duplicates == 0 and b.stats.duplicates == 0
    assert FleetDB(db_path).count("telemetry") == n + barriers


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    rc = main(
        ["collect", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--db", str(tmp_path / "f.db")]
    )
    err = capsys.readouterr().err.strip()
    assert (
        rc == 8
        and err.startswith("error: cannot connect to mqtt://127.0.0.1:")
        and "4 attempts" in err
    )
    assert "\n" not in err and time.monotonic() - t0 < 15  # bounded retries
    assert main(["collect", "--broker", "mqtt://127.0.0.1:1", "--db", "mongodb://x/y"]) == 2
    assert "unknown database scheme" in capsys.readouterr().err
    assert main(["collect", "--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path)]) == 9
    err = capsys.readouterr().err.strip()
    assert "cannot open database" in err and "\n" not in err
    assert main(["collect", "--broker", "ftp://x", "--db", str(tmp_path / "g.db")]) == 2


def test_fleet_watch_refreshes_from_the_broker_and_stops_on_ctrl_c(
    broker: Broker, tmp_path: Path
) -> None:
    pytest.importorskip(
        "rich", reason="workstation-only: `edgefleet fleet watch` needs rich (edgefleet[builder])"
    )
    with SyncClient(broker_config(broker.url)) as c:
        c.publish(T.format("w1", "state"), dumps(state("w1", 1, profile="rpi4")), retain=True)
        c.flush()
    log = tmp_path / "watch.log"
    # TTY_COMPATIBLE/TTY_INTERACTIVE: rich draws every refresh into the log (not only the last frame), so the test
    # waits on what the table shows instead of a fixed sleep while the process is still importing.
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.clikit",
            "fleet",
            "watch",
            "--broker",
            broker.url,
            "--refresh",
            "0.3",
        ],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "COLUMNS": "180",
            "TTY_COMPATIBLE": "1",
            "TTY_INTERACTIVE": "1",
        },
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=_sigint_at_default,
    )
    try:
        wait_for(
            lambda: "1/1 online" in log.read_text(errors="replace"),
            timeout=120,
            what="the first table",
        )
        with SyncClient(broker_config(broker.url)) as c:
            c.publish(
                T.format("w1", "telemetry"),
                dumps(telemetry("w1", 5, p95=6.75, temp=77.0, throttled=True)),
                retain=False,
            )
            c.flush()
        wait_for(
            lambda: "6.75 ms" in log.read_text(errors="replace"),
            timeout=60,
            what="the telemetry row",
        )
    finally:
        rc = stop_process(p, signal.SIGINT, 30)
    out = log.read_text(errors="replace")
    assert rc == 0 and "Traceback" not in out
    assert (
        "w1" in out
        and "rpi4" in out
        and "6.75 ms" in out
        and "77.0 °C" in out
        and "1/1 online" in out
    )


def test_collector_reconnects_after_a_broker_restart(broker: Broker, tmp_path: Path) -> None:
    db_path = str(tmp_path / "fleet.db")
    col = Collector(broker_config(broker.url), db_path, client_id="reconnect").start()
    try:
        n1 = publish_telemetry(broker.url, ["r1", "r2"], 10)
        wait_for(lambda: col.stats.stored >= n1, what="first messages")
        broker.restart()
        wait_for(lambda: col.stats.connects >= 2, timeout=30, what="reconnect")
        n2 = publish_telemetry(broker.url, ["r1", "r2"], 10, start_seq=50)
        wait_for(lambda: col.stats.stored >= n1 + n2, what="messages after the restart")
    finally:
        col.stop()
    assert col.stats.error is None and FleetDB(db_path).count("telemetry") == n1 + n2
