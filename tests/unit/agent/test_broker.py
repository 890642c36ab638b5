"""The shared MQTT client factory: every setting comes from BrokerConfig, nothing is hard-coded."""

from __future__ import annotations

from pathlib import Path

import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.broker import BrokerConfig, ack_messages, make_client


def test_client_follows_the_config() -> None:
    cfg = BrokerConfig(
        url="mqtt://alice@broker.lan:1884",
        password="pw",
        protocol="5",
        keepalive_s=45,
        reconnect_min_s=2,
        reconnect_max_s=9,
    )
    c = make_client(cfg, "dev-1", max_inflight=7)
    assert c.callback_api_version == CallbackAPIVersion.VERSION2
    try:
        proto = c.protocol
    except RecursionError:  # paho-mqtt 2.0.0's Client.protocol getter calls itself (our floor)
        proto = c._protocol
    assert proto == MQTTProtocolVersion.MQTTv5
    assert c.username == "alice" and c.password == "pw"
    assert c.max_inflight_messages == 7


def test_tls_needs_files_that_exist(tmp_path: Path) -> None:
    cfg = BrokerConfig(url="mqtts://broker.lan", ca_file=tmp_path / "missing-ca.pem")
    with pytest.raises(FileNotFoundError):
        make_client(cfg)


class _Acks:
    def __init__(self) -> None:
        self.acked: list[tuple[int, int]] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append((mid, qos))


def test_ack_messages_skips_qos0() -> None:
    fake = _Acks()
    assert ack_messages(fake, [(1, 1), (2, 0), (3, 1)]) == 2  # type: ignore[arg-type]
    assert fake.acked == [(1, 1), (3, 1)]
