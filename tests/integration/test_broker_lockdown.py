"""A broker set up by `edgefleet broker init`, run for real: each identity does what the ACL
grants and nothing more; clients without a valid certificate are refused, with the cause named."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.broker import BrokerConfig
from agent.errors import BrokerError
from agent.protocol import topics
from fleet.broker_init import add_device, init_broker
from fleet.deploy import deploy
from fleet.mqtt import SyncClient, broker_config
from fleet.publish import publish_artifact
from tests.agent_helpers import TIME_SCALE, AgentProcess, Broker, free_port, operator, write_config

pytestmark = pytest.mark.integration


@dataclass
class Locked:
    dir: Path
    broker: Broker

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.port}"

    def cfg(self, identity: str, ca_from: Path | None = None) -> BrokerConfig:
        d = self.dir / identity
        ca = (ca_from or self.dir) / "ca.pem"
        return broker_config(self.url, str(ca), str(d / "cert.pem"), str(d / "key.pem"))

    def client(self, identity: str) -> SyncClient:
        return SyncClient(self.cfg(identity), timeout=10 * TIME_SCALE).__enter__()


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Locked]:
    d = tmp_path / "broker"
    port = free_port()
    init_broker(d, port=port, bind="127.0.0.1", devices={"dev-a": ["lab"], "dev-b": []})
    b = Broker(tmp_path / "mq", port=port)  # the helper's start/stop, with the generated config
    b.conf.write_text(
        (d / "mosquitto.conf").read_text()
        + ("user root\n" if os.geteuid() == 0 else "")  # as root mosquitto would drop privileges
    )
    b.start()
    try:
        yield Locked(d, b)
    finally:
        b.stop()


def _agent_config(
    lk: Locked, tmp: Path, device: str, keys: Any, ca_from: Path | None = None, **kw: Any
) -> Path:
    cfg = write_config(
        tmp / f"{device}.toml", device, lk.url, [keys.public], tmp / f"state-{device}", **kw
    )
    d = lk.dir / "devices" / device
    ca = (ca_from or lk.dir) / "ca.pem"
    cfg.write_text(
        cfg.read_text().replace(
            f'url = "{lk.url}"',
            f'url = "{lk.url}"\nca_file = "{ca}"\ncert_file = "{d}/cert.pem"\nkey_file = "{d}/key.pem"',
        )
    )
    return cfg


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout * TIME_SCALE
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_agent_with_its_certificate_gets_a_group_deployment_from_the_operator(
    locked: Locked, tmp_path: Path, keys: Any, artifacts: Any
) -> None:
    op = locked.client("operator")
    agent = None
    try:
        events = op.listen([(topics.device_topic("dev-a", "events"), 1)], wait=True)
        cfg = _agent_config(locked, tmp_path, "dev-a", keys, groups=("lab",))
        agent = AgentProcess(cfg, tmp_path / "agent.log").start()
        sha = publish_artifact(
            artifacts(version="1.0.0"), locked.cfg("operator"), chunk_size=4096
        ).sha256
        deploy(locked.cfg("operator"), "tiny@1.0.0", operator(), group="lab")
        deadline = time.monotonic() + 60 * TIME_SCALE
        while True:
            m = events.get(max(0.0, deadline - time.monotonic()))
            assert m is not None, (tmp_path / "agent.log").read_text()[-3000:]
            ev = json.loads(m.payload)
            if ev.get("state") == "HEALTHY" and ev.get("sha256") == sha:
                break
    finally:
        if agent is not None:
            agent.stop()
        op.close()


def test_a_device_cannot_write_or_read_another_devices_topics(locked: Locked) -> None:
    op, a, b = (locked.client(i) for i in ("operator", "devices/dev-a", "devices/dev-b"))
    try:
        seen = op.listen([("edgefleet/v1/devices/#", 1)], wait=True)
        for leaf in ("state", "events", "telemetry", "cmd/result"):
            b.publish(topics.device_topic("dev-a", leaf), b'{"forged": true}', retain=False)
        b.publish(topics.device_topic("dev-b", "telemetry"), b"sentinel-b", retain=False)
        b.flush()
        got = []
        while not any(m.payload == b"sentinel-b" for m in got):
            m = seen.get(10 * TIME_SCALE)
            assert m is not None, "b's own telemetry never arrived"
            got.append(m)
        assert [m.topic for m in got] == [topics.device_topic("dev-b", "telemetry")]
        # a's own reports do get through (the ACL is not simply closed)
        a.publish(topics.device_topic("dev-a", "telemetry"), b"from-a", retain=False)
        a.flush()
        m = seen.get(10 * TIME_SCALE)
        assert m is not None and m.payload == b"from-a"

        # b subscribes to a's commands and deployments: mosquitto grants the SUBACK but delivers nothing
        spy = b.listen(
            [
                (topics.device_topic("dev-a", "cmd"), 1),
                (topics.device_topic("dev-a", "deployment"), 1),
                (topics.group_deployment("lab"), 1),
                (topics.device_topic("dev-b", "cmd"), 1),
            ],
            wait=True,
        )
        mine = a.listen([(topics.device_topic("dev-a", "cmd"), 1)], wait=True)
        op.publish(topics.device_topic("dev-a", "cmd"), b"for-a", retain=False)
        op.publish(topics.device_topic("dev-a", "deployment"), b"dep-a", retain=False)
        op.publish(topics.group_deployment("lab"), b"dep-lab", retain=False)
        op.publish(topics.device_topic("dev-b", "cmd"), b"sentinel-cmd-b", retain=False)
        op.flush()
        m = spy.get(10 * TIME_SCALE)
        assert m is not None and m.payload == b"sentinel-cmd-b", m
        assert spy.drain() == []
        m = mine.get(10 * TIME_SCALE)
        assert m is not None and m.payload == b"for-a"
    finally:
        for c in (op, a, b):
            c.close()


def test_clients_without_a_valid_certificate_are_refused_with_the_cause(
    locked: Locked, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    init_broker(other)
    no_cert = broker_config(locked.url, str(locked.dir / "ca.pem"))
    with pytest.raises(BrokerError, match="requires a client certificate"):
        SyncClient(no_cert, timeout=10 * TIME_SCALE).__enter__()
    foreign = broker_config(
        locked.url,
        str(locked.dir / "ca.pem"),
        str(other / "operator/cert.pem"),
        str(other / "operator/key.pem"),
    )
    with pytest.raises(BrokerError, match="refused our client certificate"):
        SyncClient(foreign, timeout=10 * TIME_SCALE).__enter__()
    with pytest.raises(BrokerError, match="certificate verify failed"):
        SyncClient(locked.cfg("operator", ca_from=other), timeout=10 * TIME_SCALE).__enter__()
    # a fleet command: one line, exit 8, no retries
    from agent.clikit import edgefleet, run_cli

    t0 = time.monotonic()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = run_cli(
            edgefleet,
            [
                "device",
                "cmd",
                "dev-a",
                "status",
                "--broker",
                locked.url,
                "--identity",
                str(other / "operator"),
                "--timeout",
                "5",
            ],
            "edgefleet",
        )
    lines = err.getvalue().strip().splitlines()
    assert rc == 8 and len(lines) == 1, lines
    assert (
        lines[0].startswith("error: cannot connect to mqtts://")
        and "certificate verify failed" in lines[0]
    )
    assert time.monotonic() - t0 < 5 * TIME_SCALE  # not retried


@pytest.mark.parametrize("share_group", [None, "collectors"])
def test_the_collector_identity_collects_telemetry(
    locked: Locked, tmp_path: Path, keys: Any, share_group: str | None
) -> None:
    from fleet.collect import Collector

    col = Collector(locked.cfg("collector"), str(tmp_path / "fleet.db"), share_group=share_group)
    col.start()
    agent = None
    try:
        cfg = _agent_config(locked, tmp_path, "dev-b", keys, telemetry={"interval_s": 0.3})
        agent = AgentProcess(cfg, tmp_path / "agent.log").start()
        _wait(lambda: col.stats.stored >= 3, 40, (tmp_path / "agent.log").read_text()[-2000:])
    finally:
        if agent is not None:
            agent.stop()
        col.stop()
    from fleet.db import FleetDB

    db = FleetDB(str(tmp_path / "fleet.db"))
    try:
        n = db.conn.execute("SELECT COUNT(*) FROM telemetry WHERE device = 'dev-b'").fetchone()[0]
    finally:
        db.close()
    assert n >= 1


def test_an_agent_with_the_wrong_ca_logs_why(locked: Locked, tmp_path: Path, keys: Any) -> None:
    other = tmp_path / "other"
    init_broker(other)
    cfg = _agent_config(locked, tmp_path, "dev-a", keys, ca_from=other)
    log = tmp_path / "agent.log"
    agent = AgentProcess(cfg, log).start()
    try:
        _wait(lambda: "certificate verify failed" in log.read_text(), 30, "no cause in the log")
    finally:
        agent.stop()
    lines = [ln for ln in log.read_text().splitlines() if "certificate verify failed" in ln]
    assert f"cannot connect to {locked.url}: TLS: certificate verify failed" in lines[0]
    assert str(other / "ca.pem") in lines[0]


def test_add_device_then_sighup_lets_the_new_device_in(locked: Locked) -> None:
    op = locked.client("operator")
    try:
        op.publish(topics.PREFIX + "/trust", b'{"trust": 1}', retain=True)
        op.flush()
        add_device(locked.dir, "dev-c", ["lab"])
        c = locked.client("devices/dev-c")  # its certificate is valid at once ...
        try:
            assert (
                c.retained_one(topics.PREFIX + "/trust", limit=1.0) is None
            )  # ... its rights are not
        finally:
            c.close()
        assert locked.broker.proc is not None
        locked.broker.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10 * TIME_SCALE
        got = None
        while got is None and time.monotonic() < deadline:
            c = locked.client("devices/dev-c")
            try:
                got = c.retained_one(topics.PREFIX + "/trust", limit=0.5)
            finally:
                c.close()
        assert got == b'{"trust": 1}'
    finally:
        op.close()
