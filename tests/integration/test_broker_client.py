"""The shared MQTT client factory against a real mosquitto: the collector's backpressure never
waits on paho's thread and loses nothing, an MQTT 5 collector keeps its session, fleet
listeners survive a broker restart, and the agent's deliveries are confirmed by on_publish."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from agent.broker import BrokerConfig
from agent.transport.mqtt import MqttTransport
from fleet.collect import Collector
from fleet.db import Batch, FleetDB
from fleet.mqtt import SyncClient, broker_config
from tests.agent_helpers import Broker
from tests.fleet_helpers import dumps, telemetry, wait_for

pytestmark = pytest.mark.integration
T = "edgefleet/v1/devices/{}/telemetry"


class SlowDB(FleetDB):
    """A database that commits only when the test lets it, so the collector's queue fills."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.gate = threading.Event()

    def store(self, batch: Batch) -> int:
        self.gate.wait(30)
        return super().store(batch)


def _publish(url: str, device: str, n: int, start: int = 0) -> None:
    with SyncClient(broker_config(url)) as c:
        for seq in range(start, start + n):
            c.publish(T.format(device), dumps(telemetry(device, seq)), retain=False, window=100)
        c.flush()


def test_full_queue_defers_to_the_broker_without_blocking_paho(
    broker: Broker, tmp_path: Path
) -> None:
    db = SlowDB(str(tmp_path / "fleet.db"))
    col = Collector(broker_config(broker.url), db, client_id="overflow", max_queued=5, batch_max=5)
    col.start()
    try:
        _publish(broker.url, "o1", 60)
        # the database is stuck, yet paho's thread stays free: it keeps answering (a publish works)
        wait_for(lambda: col.stats.deferred > 0, what="a deferred message")
        _publish(broker.url, "o2", 1)
        db.gate.set()
        wait_for(
            lambda: FleetDB(str(tmp_path / "fleet.db")).count("telemetry") >= 61,
            timeout=60,
            what="every message stored after the overflow",
        )
        assert col.stats.connects >= 2  # the resync reconnect brought the deferred ones back
    finally:
        db.gate.set()
        col.stop()
    assert col.stats.error is None and FleetDB(str(tmp_path / "fleet.db")).count("telemetry") == 61


def test_mqtt5_collector_keeps_its_session(broker: Broker, tmp_path: Path) -> None:
    cfg = BrokerConfig(url=broker.url, protocol="5")
    db_path = str(tmp_path / "fleet.db")
    col = Collector(cfg, db_path, client_id="v5-col").start()
    col.stop()
    _publish(broker.url, "v5", 10)  # while the collector is away: held in its session
    col = Collector(cfg, db_path, client_id="v5-col").start()
    try:
        wait_for(lambda: col.stats.stored >= 10, what="messages held by the MQTT 5 session")
    finally:
        col.stop()


def test_listener_subscriptions_survive_a_broker_restart(broker: Broker) -> None:
    with SyncClient(broker_config(broker.url)) as c:
        li = c.listen([(T.format("+"), 1)], wait=True)
        _publish(broker.url, "l1", 1)
        assert li.get(10) is not None
        broker.restart()
        got: list[Any] = []

        def seen() -> bool:
            _publish(broker.url, "l1", 1, start=len(got) + 1)
            got.extend(li.drain())
            return bool(got)

        wait_for(seen, timeout=30, what="a message after the restart")


def test_agent_delivery_is_confirmed_by_the_puback(broker: Broker) -> None:
    t = MqttTransport(BrokerConfig(url=broker.url), "deliveries")
    t.start(lambda *_a: None, lambda: None)
    try:
        wait_for(t.is_connected, what="the agent transport connected")
        d = t.publish_tracked("edgefleet/v1/devices/deliveries/telemetry", b"{}")
        assert d.wait(10) and d.acked()
    finally:
        t.stop()
