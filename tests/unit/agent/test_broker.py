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


# -- why a connection failed ------------------------------------------------------------------


def _verify_error(message: str) -> Exception:
    import ssl

    e = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    e.verify_message = message
    e.reason = "CERTIFICATE_VERIFY_FAILED"
    return e


def test_connect_failure_causes(tmp_path: Path) -> None:
    import socket
    import ssl

    from agent.broker import connect_failure_cause, is_permanent

    cfg = BrokerConfig(url="mqtts://broker.lan:8883", ca_file=tmp_path / "ca.pem")
    cause = connect_failure_cause(_verify_error("unable to get local issuer certificate"), cfg)
    assert cause.startswith("TLS: certificate verify failed") and str(tmp_path / "ca.pem") in cause
    cause = connect_failure_cause(
        _verify_error("Hostname mismatch, certificate is not valid for 'broker.lan'."), cfg
    )
    assert "not valid for host 'broker.lan'" in cause
    alert = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    assert "refused our client certificate" in connect_failure_cause(alert, cfg)
    required = ssl.SSLError(1, "x")
    required.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert "requires a client certificate" in connect_failure_cause(required, cfg)
    assert is_permanent(required) and not is_permanent(ConnectionRefusedError(111, "refused"))
    assert "refused by broker.lan:8883" in connect_failure_cause(ConnectionRefusedError(), cfg)
    gai = socket.gaierror(-2, "Name or service not known")
    assert "cannot resolve host 'broker.lan'" in connect_failure_cause(gai, cfg)


def test_refusal_causes() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from agent.broker import refusal_cause

    assert "not authorised" in refusal_cause(ReasonCode(PacketTypes.CONNACK, "Not authorized"))
    bad = ReasonCode(PacketTypes.CONNACK, "Bad user name or password")
    assert refusal_cause(bad).endswith("bad user name or password")


class _RC:
    def __init__(self, failure: bool, text: str = "Success") -> None:
        self.is_failure, self.text = failure, text

    def __str__(self) -> str:
        return self.text


def test_watch_logs_each_cause_once_per_backoff_period(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from agent import broker as broker_mod

    now = [100.0]
    monkeypatch.setattr(broker_mod.time, "monotonic", lambda: now[0])
    cfg = BrokerConfig(url="mqtts://broker.lan:8883", reconnect_max_s=30)
    w = broker_mod.ConnectWatch(cfg, logging.getLogger("t.watch"))
    caplog.set_level(logging.INFO, "t.watch")
    for _ in range(5):  # the same cause again and again within one period: one line
        w.failed(ConnectionRefusedError())
        now[0] += 5
    w.failed(_verify_error("self-signed certificate in certificate chain"))  # a new cause
    now[0] += 10
    w.failed(ConnectionRefusedError())  # 30 s after the first: once more
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert all(ln.startswith("cannot connect to mqtts://broker.lan:8883: ") for ln in lines)
    assert w.failures == 7
    assert w.connack(_RC(False)) is None and w.cause is None and w.failures == 0
    assert "after 7 failed attempts" in caplog.records[-1].getMessage()
    w.failed(ConnectionRefusedError())  # after a success, the first failure is logged at once
    assert len(caplog.records) == 5


def test_watch_names_a_certificate_rejected_after_the_handshake() -> None:
    from agent.broker import ConnectWatch

    cfg = BrokerConfig(url="mqtts://broker.lan:8883")
    w = ConnectWatch(cfg)
    w._pre_connect(make_client(cfg), None)
    w._paho_log(
        None, None, 8, "failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] x"
    )  # type: ignore[arg-type]
    assert "requires a client certificate" in (w.disconnected() or "")
    assert w.disconnected() is None  # one report per attempt
    w._pre_connect(make_client(cfg), None)
    assert w.connack(_RC(True, "Not authorized")) is not None
    assert w.disconnected() is None  # the CONNACK already said why
